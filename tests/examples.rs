//! The documentation's examples run as written. Every shell block marked
//! `<!-- example -->` in README.md and docs/*.md is run here: its variables
//! exactly as given, against real processes (the built binaries, and
//! VictoriaMetrics or Prometheus where the block starts or uses one), with
//! only the ports moved to free ones and the data folders to the test's.
//! Each must run clean: `dropped=0`, `missed=0`, no warning or error in the
//! log, and every acknowledged reading in the file or the database.

mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{
    Process,
    database::{Database, Kind, assert_each_reading_once},
    free_port, scratch, summary_fields,
};

/// One command line of an example, continuation lines joined.
#[derive(Debug, Clone)]
struct Command {
    /// `NAME=value` pairs before the program.
    env: Vec<(String, String)>,
    /// The program and its arguments.
    argv: Vec<String>,
    /// Whether it runs in the background (`&`).
    background: bool,
}

/// The marked examples of the documentation: (where, its text).
fn examples() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    if let Ok(docs) = std::fs::read_dir(root.join("docs")) {
        let mut docs: Vec<PathBuf> = docs.filter_map(Result::ok).map(|e| e.path()).collect();
        docs.sort();
        pages.extend(docs.into_iter().filter(|p| p.extension().is_some_and(|e| e == "md")));
    }
    let mut found = Vec::new();
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        let mut lines = text.lines().enumerate();
        while let Some((number, line)) = lines.next() {
            if line.trim() != "<!-- example -->" {
                continue;
            }
            let fence = lines.next().map(|(_, l)| l.trim().to_owned()).unwrap_or_default();
            assert!(
                fence.starts_with("```"),
                "{}:{}: an example marker before no code block",
                page.display(),
                number + 1
            );
            let body: Vec<&str> = lines.by_ref().map(|(_, l)| l).take_while(|l| !l.trim().starts_with("```")).collect();
            let name = format!("{}:{}", page.file_name().unwrap().to_string_lossy(), number + 1);
            found.push((name, body.join("\n")));
        }
    }
    found
}

/// The commands of a block: comments dropped, `\` continuations joined,
/// `$(hostname)` given a fixed value.
fn commands(block: &str) -> Vec<Command> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.split(" #").next().unwrap_or_default();
        if line.trim_start().starts_with('#') {
            continue;
        }
        match line.trim_end().strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    joined.push(std::mem::take(&mut current));
                }
                current.clear();
            }
        }
    }
    joined.iter().map(|line| parse(&line.replace("$(hostname)", "example-host"))).collect()
}

/// One command line: leading assignments, then the words.
fn parse(line: &str) -> Command {
    let mut words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    let background = words.last().is_some_and(|w| w == "&");
    if background {
        words.pop();
    }
    let assignments = words.iter().take_while(|w| w.contains('=') && !w.starts_with('-')).count();
    let env = words[..assignments]
        .iter()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches(['"', '\'']).to_owned()))
        .collect();
    Command { env, argv: words[assignments..].to_vec(), background }
}

/// The binary a `cargo run --release --bin NAME [-- args]` (or an
/// installed `NAME args`) line runs, and its arguments.
fn our_binary(argv: &[String]) -> Option<(&'static str, &'static str, Vec<String>)> {
    let (name, args) = match argv.first()?.as_str() {
        "cargo" if argv.get(1).is_some_and(|a| a == "run") => {
            let at = argv.iter().position(|a| a == "--bin")?;
            let args = argv.iter().position(|a| a == "--").map_or(Vec::new(), |i| argv[i + 1..].to_vec());
            (argv.get(at + 1)?.as_str(), args)
        }
        other => (other, argv[1..].to_vec()),
    };
    match name {
        "telemetry-node" => Some(("node", env!("CARGO_BIN_EXE_telemetry-node"), args)),
        "telemetry-sink" => Some(("sink", env!("CARGO_BIN_EXE_telemetry-sink"), args)),
        _ => None,
    }
}

/// Where an example's processes run, and the port moves made for it.
struct Run {
    dir: PathBuf,
    /// (documented address, the free one used instead).
    moves: Vec<(String, String)>,
    database: Option<Database>,
    processes: Vec<Process>,
}

impl Run {
    /// `value` with every documented address moved.
    fn moved(&self, value: &str) -> String {
        self.moves.iter().fold(value.to_owned(), |v, (from, to)| v.replace(from, to))
    }

    /// The environment of one of our binaries: the block's variables
    /// (moved), and a sink address of this run's own unless the block set one.
    fn env(&self, command: &Command, sink: &str) -> Vec<(&'static str, String)> {
        let mut env: Vec<(&'static str, String)> =
            command.env.iter().map(|(k, v)| (&*k.clone().leak(), self.moved(v))).collect();
        if !command.env.iter().any(|(k, _)| k == "GRPC_SERVER_SOCKET") {
            env.push(("GRPC_SERVER_SOCKET", sink.to_owned()));
        }
        env
    }
}

/// Runs one example; the foreground node runs 15 s (a demo, its own
/// duration), then gets SIGTERM, and the outcome is checked.
fn run_example(name: &str, block: &str) {
    let dir = scratch(&format!("example-{}", name.replace([':', '.'], "-")));
    let commands = commands(block);
    let mut run = Run { dir: dir.clone(), moves: Vec::new(), database: None, processes: Vec::new() };
    let sink_address = format!("127.0.0.1:{}", free_port());
    let mut node = None;
    if block.contains("127.0.0.1:8428")
        && !commands.iter().any(|c| c.argv.first().is_some_and(|p| p == "victoria-metrics"))
    {
        // A block that uses the database the walk-through started.
        start_database(&mut run, &["-dedup.minScrapeInterval=1ms".to_owned()]);
    }
    for command in &commands {
        let Some(program) = command.argv.first() else { continue };
        match program.as_str() {
            "sudo" | "apt-get" | "curl" | "open" | "xdg-open" => continue,
            "cargo" if command.argv.get(1).is_some_and(|a| a == "test" || a == "install") => continue,
            "prometheus" => {
                // The harness's own configuration and folder; the block's
                // address (127.0.0.1:9099 in the documentation) moved.
                assert!(
                    command.argv.iter().any(|a| a == "--web.enable-remote-write-receiver"),
                    "{name}: Prometheus takes remote-write only with --web.enable-remote-write-receiver"
                );
                if let Some(database) = Database::start(Kind::Prometheus, &run.dir) {
                    run.moves.push(("127.0.0.1:9099".to_owned(), format!("127.0.0.1:{}", database.port)));
                    run.database = Some(database);
                }
                continue;
            }
            "victoria-metrics" => {
                let flags: Vec<String> = command.argv[1..]
                    .iter()
                    .filter(|f| !f.starts_with("-storageDataPath") && !f.starts_with("-httpListenAddr"))
                    .cloned()
                    .collect();
                start_database(&mut run, &flags);
                continue;
            }
            _ => {}
        }
        let Some((role, binary, args)) = our_binary(&command.argv) else {
            panic!("{name}: a command this test cannot run: {:?}", command.argv)
        };
        let env = run.env(command, &sink_address);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let role = if role == "node" { "node" } else { "sink" };
        let process = Process::start(role, binary, &args, &env, &dir);
        if role == "sink" {
            common::wait_for_port(sink_address.rsplit_once(':').unwrap().1.parse().unwrap(), Duration::from_secs(20));
        }
        if command.background {
            run.processes.push(process);
        } else {
            node = Some((process, args.contains(&"demo")));
        }
    }
    let (node, demo) = node.unwrap_or_else(|| panic!("{name}: no command in the foreground"));
    let (_, out, err) = if demo {
        node.wait(Duration::from_secs(120))
    } else {
        std::thread::sleep(Duration::from_secs(15));
        node.terminate(Duration::from_secs(30))
    };
    check(name, &run, &out, &err);
}

/// Starts VictoriaMetrics for `run` with `flags`, on a free port that
/// takes the documented 127.0.0.1:8428's place; `None` where it is not
/// installed (and not under CI).
fn start_database(run: &mut Run, flags: &[String]) {
    let Some(database) = Database::start_with(Kind::VictoriaMetrics, &run.dir, flags) else { return };
    run.moves.push(("127.0.0.1:8428".to_owned(), format!("127.0.0.1:{}", database.port)));
    run.database = Some(database);
}

/// The example ran clean: nothing dropped or missed, no warning or error,
/// and every acknowledged reading where the output keeps it.
fn check(name: &str, run: &Run, out: &str, err: &str) {
    let summary = summary_fields(out);
    assert_eq!((summary["dropped"], summary["missed"]), (0, 0), "{name}: {out}");
    assert!(summary["produced"] > 0 && summary["acked"] == summary["produced"], "{name}: {out}");
    let warned: Vec<&str> = err.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    assert!(warned.is_empty(), "{name}: the node warned:\n{}", warned.join("\n"));
    let real_sources = err.contains("HOST_INTERVAL=") && !err.contains("HOST_INTERVAL=unset");
    match &run.database {
        // The host's readings are not the simulated sensors' known values:
        // counted, not compared.
        Some(database) if real_sources => {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let mut stored = 0;
            while stored < summary["acked"] as usize && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
                stored = database.samples_now().values().map(Vec::len).sum();
            }
            let stored: usize = database.samples().values().map(Vec::len).sum();
            assert_eq!(stored as u64, summary["acked"], "{name}: samples stored vs readings acked");
        }
        Some(database) => assert_each_reading_once(database, summary["acked"]),
        None => {
            let written = written_lines(&run.dir, &format!("{out}\n{err}"));
            assert_eq!(written, summary["acked"], "{name}: lines written vs readings acked");
        }
    }
}

/// The readings the sink wrote: in `data/` of the example's folder, or
/// where the demo says it wrote them (in `said`, its output).
fn written_lines(dir: &Path, said: &str) -> u64 {
    // The demo removes its folder unless kept, and says how many it wrote.
    let removed = said.lines().find_map(|l| {
        l.strip_prefix("demo: sink wrote ")?.strip_suffix(" readings (its folder removed; --keep keeps it)")
    });
    if let Some(count) = removed {
        return count.trim().parse().unwrap();
    }
    let demo = said.lines().find_map(|l| l.split_once(" readings to ").map(|(_, path)| PathBuf::from(path.trim())));
    let path = demo.unwrap_or_else(|| dir.join("data").join("readings.jsonl"));
    std::fs::read_to_string(&path).unwrap_or_default().lines().filter(|l| l.contains("\"sensor_name\"")).count() as u64
}

#[test]
fn every_example_of_the_documentation_runs_clean() {
    let examples = examples();
    assert!(examples.len() >= 3, "the marked examples: {:?}", examples.iter().map(|(n, _)| n).collect::<Vec<_>>());
    let only = std::env::var("EXAMPLE").ok();
    let mut ran = HashMap::new();
    for (name, block) in examples {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        eprintln!("example {name}");
        run_example(&name, &block);
        ran.insert(name, ());
    }
    assert!(!ran.is_empty());
}
