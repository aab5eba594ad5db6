//! The exec source: a command run once a tick, each line it prints a
//! reading, `name value`.
//!
//! The command runs without a shell unless asked (`EXEC_SHELL=true` runs
//! `/bin/sh -c EXEC_COMMAND`), in a process group of its own, with no
//! input, for at most `EXEC_TIMEOUT`; then it and everything it started are
//! killed. It gets only PATH, HOME, LANG and the variables `EXEC_ENV` names
//! from the node's environment, so no secret of the node's (the sink's
//! token, the database's password) reaches it unless named. Its output is taken whole or not at all: a command that fails,
//! runs out of time or prints more than [`MOST_OUTPUT`] bytes gives no
//! readings that tick, and a line that is not `name value` is skipped. Each
//! is counted and logged; none holds up the other sources.

use std::{collections::HashSet, process::Stdio, time::Duration};

use tokio::io::{AsyncRead, AsyncReadExt};

use super::{Failure, Probe, Round, children};
use crate::config::Owned;
use crate::reading::{check_sensor_name, sensor_name};

/// The most bytes of output taken from one run: about 30,000 readings.
pub(crate) const MOST_OUTPUT: usize = 1 << 20;

/// The most distinct sensors a command may report over the node's life:
/// each name is kept for good, so a command printing a new name every tick
/// must not grow the node without bound.
pub(crate) const MOST_SENSORS: usize = 10_000;

/// The variables every command gets from the node's environment.
const PASSED: [&str; 3] = ["PATH", "HOME", "LANG"];

/// Bytes of the command's standard error kept for the log.
const STDERR_KEPT: usize = 512;

/// The command, and what it has reported so far.
#[derive(Debug)]
pub(crate) struct Exec {
    /// Program and arguments.
    argv: Vec<String>,
    /// Longest a run may take.
    timeout: Duration,
    /// Variables it gets besides [`PASSED`] (EXEC_ENV).
    pass: Vec<String>,
    /// Names other sources own, which the command may not report.
    owned: Owned,
    /// Every name the command has reported, kept once each.
    known: HashSet<&'static str>,
}

impl Exec {
    /// Runs `argv` (at least a program) for at most `timeout` a tick, with
    /// the variables [`PASSED`] and `pass` name.
    pub(crate) fn new(argv: Vec<String>, timeout: Duration, pass: Vec<String>, owned: Owned) -> Self {
        Self { argv, timeout, pass, owned, known: HashSet::new() }
    }

    /// The readings of one run's `output`.
    fn parse(&mut self, output: &[u8]) -> Round {
        let mut round = Round::default();
        let mut seen = HashSet::new();
        for line in output.split(|&b| b == b'\n') {
            let line = line.trim_ascii();
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            match self.reading(line, &mut seen) {
                Ok(reading) => round.values.push(reading),
                Err(reason) => round.failures.push(Failure::new(reason, quote(line))),
            }
        }
        round
    }

    /// The reading `line` gives, or why it gives none.
    fn reading(&mut self, line: &[u8], seen: &mut HashSet<&'static str>) -> Result<(&'static str, i64), &'static str> {
        let text = std::str::from_utf8(line).map_err(|_| "garbage")?;
        let mut fields = text.split_ascii_whitespace();
        let (Some(name), Some(value), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err("garbage");
        };
        let value: i64 = value.parse().map_err(|_| "garbage")?;
        check_sensor_name(name).map_err(|_| "garbage")?;
        if self.owned.owns(name) {
            return Err("name_taken");
        }
        let name = match self.known.get(name) {
            Some(&name) => name,
            None if self.known.len() >= MOST_SENSORS => return Err("too_many_sensors"),
            None => {
                let kept = sensor_name(name);
                self.known.insert(kept);
                kept
            }
        };
        if !seen.insert(name) {
            return Err("duplicate");
        }
        Ok((name, value))
    }
}

impl Probe for Exec {
    const KIND: &'static str = "exec";

    async fn read(&mut self) -> Round {
        match run(&self.argv, self.timeout, &self.pass).await {
            Ok(output) => self.parse(&output),
            Err(failure) => Round { values: Vec::new(), failures: vec![failure] },
        }
    }
}

/// Runs `argv` with the variables [`PASSED`] and `pass` name, and returns
/// what it printed, if it exited 0 within `timeout` having printed at most
/// [`MOST_OUTPUT`] bytes. Its process group is
/// killed when the run ends, however it ends (the node stopping mid-run
/// included), so nothing it started outlives it (see [`children`] for what
/// leaves the group).
async fn run(argv: &[String], timeout: Duration, pass: &[String]) -> Result<Vec<u8>, Failure> {
    let (program, args) = argv.split_first().ok_or_else(|| Failure::new("failed", "no command"))?;
    let mut command = tokio::process::Command::new(program);
    // The node's environment holds its secrets: none is the command's
    // business unless named.
    command.env_clear();
    for name in PASSED.iter().copied().chain(pass.iter().map(String::as_str)) {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let (mut child, _run) = children::spawn(command.process_group(0).kill_on_drop(true))
        .map_err(|error| Failure::new("failed", format!("{program}: {error}")))?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    // Read beside stdout, so that a command filling its stderr pipe is not
    // held up; it ends when the pipe closes (at the latest, the group's end).
    let mut errors = tokio::spawn(read_capped(stderr, STDERR_KEPT, PastTheCap::Drain));
    let finished = tokio::time::timeout(timeout, async {
        let Ok(output) = read_capped(stdout, MOST_OUTPUT, PastTheCap::Stop).await else {
            return Err(Failure::new("output_too_large", format!("{program}: printed more than {MOST_OUTPUT} bytes")));
        };
        let status = child.wait().await.map_err(|error| Failure::new("failed", format!("{program}: {error}")))?;
        if !status.success() {
            let errors = tokio::time::timeout(Duration::from_millis(100), &mut errors).await;
            let errors = errors.ok().and_then(Result::ok).map(|kept| kept.unwrap_or_else(|kept| kept));
            let said = quote(errors.unwrap_or_default().trim_ascii());
            return Err(Failure::new("failed", format!("{program}: {status}: {said}")));
        }
        Ok(output)
    })
    .await;
    errors.abort();
    finished.unwrap_or_else(|_| {
        Err(Failure::new("timeout", format!("{program}: still running after {}", humantime::format_duration(timeout))))
    })
}

/// What [`read_capped`] does once a pipe has given more than it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PastTheCap {
    /// Stop reading: the output is too much to use anyway.
    Stop,
    /// Read the rest and throw it away, so that the command does not block
    /// on a full pipe until its timeout.
    Drain,
}

/// All of `pipe`, if it holds at most `most` bytes; else `Err` with its
/// first `most` bytes, as soon as that is clear or once the rest is drained.
async fn read_capped(
    pipe: Option<impl AsyncRead + Unpin>,
    most: usize,
    past_the_cap: PastTheCap,
) -> Result<Vec<u8>, Vec<u8>> {
    let Some(mut pipe) = pipe else { return Ok(Vec::new()) };
    let (mut kept, mut buffer, mut over) = (Vec::new(), vec![0; 8192], false);
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = most.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..n.min(room)]);
                if n > room {
                    over = true;
                    if past_the_cap == PastTheCap::Stop {
                        break;
                    }
                }
            }
        }
    }
    if over { Err(kept) } else { Ok(kept) }
}

/// `bytes` for a log line: at most 120 characters, escaped.
fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]);
    text.escape_debug().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> Vec<String> {
        vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()]
    }

    fn exec(script: &str, timeout: Duration) -> Exec {
        Exec::new(shell(script), timeout, Vec::new(), Owned::default())
    }

    #[tokio::test]
    async fn each_line_is_a_reading() {
        let mut probe = exec("echo 'a 1'; echo; echo '# note'; echo '  b   -2  '", Duration::from_secs(5));
        let round = probe.read().await;
        assert_eq!(round.values, [("a", 1), ("b", -2)]);
        assert!(round.failures.is_empty(), "{:?}", round.failures);
    }

    #[tokio::test]
    async fn bad_lines_are_skipped_and_counted_the_rest_kept() {
        let script = "printf 'a 1\\nb\\nc 1.5\\nd 1 2\\na 3\\nsensor 4\\n\\377 5\\ne 6\\n'";
        let owned = Owned::new(Some(("sensor".into(), 1)), HashSet::new(), false);
        let mut probe = Exec::new(shell(script), Duration::from_secs(5), Vec::new(), owned);
        let round = probe.read().await;
        assert_eq!(round.values, [("a", 1), ("e", 6)]);
        let reasons: Vec<&str> = round.failures.iter().map(|f| f.reason).collect();
        assert_eq!(reasons, ["garbage", "garbage", "garbage", "duplicate", "name_taken", "garbage"]);
    }

    #[tokio::test]
    async fn a_failing_command_gives_nothing() {
        let round = exec("echo 'a 1'; echo oops >&2; exit 1", Duration::from_secs(5)).read().await;
        assert!(round.values.is_empty());
        assert_eq!(round.failures[0].reason, "failed");
        assert!(round.failures[0].detail.contains("oops"), "{}", round.failures[0].detail);
        let mut missing =
            Exec::new(vec!["/no/such/program".into()], Duration::from_secs(5), Vec::new(), Owned::default());
        let round = missing.read().await;
        assert_eq!(round.failures[0].reason, "failed");
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_at_its_timeout_with_its_children() {
        let marker = std::env::temp_dir().join(format!("tn-exec-hang-{}", std::process::id()));
        let script = format!("echo 'a 1'; (sleep 30; touch {}) & sleep 30", marker.display());
        let started = std::time::Instant::now();
        let round = exec(&script, Duration::from_millis(300)).read().await;
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(round.values.is_empty());
        assert_eq!(round.failures[0].reason, "timeout");
        assert_eq!(left_running(&marker.display().to_string()).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn endless_output_is_cut_at_the_cap_even_when_the_command_ignores_sigpipe() {
        let script = "trap '' PIPE; while :; do echo 'x 1' || exit 0; done";
        let started = std::time::Instant::now();
        let round = exec(script, Duration::from_secs(20)).read().await;
        assert_eq!(round.failures[0].reason, "output_too_large");
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    /// Processes whose command line holds `marker`, once the group had a
    /// moment to die.
    async fn left_running(marker: &str) -> Vec<String> {
        let find = || -> Vec<String> {
            let processes = std::fs::read_dir("/proc").unwrap().filter_map(Result::ok);
            let lines = processes.filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok());
            lines.map(|line| String::from_utf8_lossy(&line).into_owned()).filter(|line| line.contains(marker)).collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !find().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        find()
    }

    #[tokio::test]
    async fn nothing_a_finished_or_abandoned_run_started_is_left_running() {
        // A run that succeeds but leaves a child behind, detached from its output.
        let marker = format!("tn-exec-leftover-{}", std::process::id());
        let script = format!("echo 'a 1'; ( exec >/dev/null 2>&1; sleep 30 || echo {marker} ) & true");
        let round = exec(&script, Duration::from_secs(5)).read().await;
        assert_eq!(round.values, [("a", 1)]);
        assert_eq!(left_running(&marker).await, Vec::<String>::new());
        // A run dropped mid-way, as when the node stops.
        let marker = format!("tn-exec-abandoned-{}", std::process::id());
        let script = format!("sleep 30 || echo {marker}");
        let mut probe = exec(&script, Duration::from_secs(60));
        assert!(tokio::time::timeout(Duration::from_millis(300), probe.read()).await.is_err());
        drop(probe);
        assert_eq!(left_running(&marker).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn output_past_the_cap_is_refused_whole() {
        let round = exec("head -c 10000000 /dev/zero | tr '\\0' 'x'", Duration::from_secs(10)).read().await;
        assert!(round.values.is_empty());
        assert_eq!(round.failures[0].reason, "output_too_large");
    }

    #[tokio::test]
    async fn a_command_may_report_only_so_many_sensors() {
        let script = format!("seq 1 {} | sed 's/^/s/; s/$/ 1/'", MOST_SENSORS + 5);
        let round = exec(&script, Duration::from_secs(10)).read().await;
        assert_eq!(round.values.len(), MOST_SENSORS);
        assert_eq!(round.failures.len(), 5);
        assert!(round.failures.iter().all(|f| f.reason == "too_many_sensors"));
    }
}
