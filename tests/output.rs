//! The sink's output under the faults of a real disk, with the real
//! binaries: a full disk, a file-size limit, a crash while the disk is full,
//! and the file deleted or rotated under a running sink. In each, every
//! reading the node counts as acknowledged is in the output, once.

mod common;

use std::{
    collections::BTreeMap,
    io::Read,
    path::Path,
    time::{Duration, Instant},
};

use common::{
    Process, Tmpfs, assert_complete_and_ordered, fast_retries, fill, free_port, read_output, scratch, summary_fields,
    wait_for_port,
};

const SINK: &str = env!("CARGO_BIN_EXE_telemetry-sink");
const NODE: &str = env!("CARGO_BIN_EXE_telemetry-node");

/// How a scenario's node is configured, and how much output shows that
/// the sink is writing.
#[derive(Clone, Copy)]
enum Node {
    /// A busy node that retries quickly and never gives a batch up.
    Tuned,
    /// Everything as users get it by default (one sensor, 5 readings/s,
    /// 10 retries with backoff from 1 s to 30 s).
    Defaults,
}

impl Node {
    fn env(self, socket: &str) -> Vec<(&'static str, String)> {
        match self {
            Self::Tuned => tuned_env(socket),
            Self::Defaults => vec![("GRPC_SERVER_SOCKET", socket.to_owned())],
        }
    }

    /// Bytes of output that show the sink writing: a few batches' worth.
    fn some_output(self) -> u64 {
        match self {
            Self::Tuned => 20_000,
            Self::Defaults => 500,
        }
    }

    /// The `ulimit -f` (KiB) that this node's output reaches in seconds.
    fn size_limit_kib(self) -> u64 {
        match self {
            Self::Tuned => 512,
            Self::Defaults => 4,
        }
    }
}

/// A node that keeps retrying quickly until the sink takes its batches.
fn tuned_env(socket: &str) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("GRPC_SERVER_SOCKET", socket.to_owned()),
        ("NODE_ID", "node-under-test".into()),
        ("SENSOR_COUNT", "4".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "250".into()),
        ("REQUEST_RATE_PER_SECOND", "inf".into()),
        ("BATCH_SIZE", "100".into()),
        ("BATCH_TIMEOUT", "50ms".into()),
        ("RPC_TIMEOUT", "2s".into()),
        ("SHUTDOWN_TIMEOUT", "30s".into()),
    ];
    env.extend(fast_retries());
    env
}

fn sink_env(socket: &str, dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("GRPC_SERVER_SOCKET", socket.to_owned()),
        ("FILE_PATH", dir.display().to_string()),
        ("BUFFER_FLUSH_INTERVAL", "100ms".into()),
    ]
}

/// Waits up to `limit` for `done`, checking every 20 ms.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Stops the node, then the sink, and returns the node's summary.
fn stop(node: Process, sink: Process) -> BTreeMap<String, u64> {
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let summary = summary_fields(&stdout).into_iter().collect::<BTreeMap<_, _>>();
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0), "{stdout}");
    summary
}

/// Every sensor's readings in `readings` are 0, 1, 2, … once each, and
/// there are `produced` of them in all.
fn assert_all_once(readings: &[(String, u64)], produced: u64) {
    let mut sorted = readings.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let per_sensor = assert_complete_and_ordered(&sorted);
    assert_eq!(per_sensor.values().sum::<u64>(), produced);
}

#[test]
fn a_full_disk_is_refused_cut_back_and_survived_with_and_without_a_restart() {
    full_disk(Node::Tuned, "full-disk");
}

#[test]
fn a_full_disk_with_the_default_settings() {
    full_disk(Node::Defaults, "full-disk-defaults");
}

fn full_disk(kind: Node, name: &str) {
    let Some(disk) = Tmpfs::mount(name, "1m") else { return };
    let dir = disk.0.parent().unwrap().to_owned();
    let port = free_port();
    let socket = format!("127.0.0.1:{port}");
    let output = disk.0.join("readings.jsonl");
    let sink = Process::start("sink-1", SINK, &[], &sink_env(&socket, &disk.0), &dir);
    wait_for_port(port, Duration::from_secs(20));
    let node = Process::start("node", NODE, &[], &kind.env(&socket), &dir);
    wait_until("output written", Duration::from_secs(20), || file_len(&output) > kind.some_output());

    // The disk fills up while the node keeps sending.
    let filler = fill(&disk.0);
    wait_until("a write refused", Duration::from_secs(40), || {
        stderr_of(&dir, "sink-1").contains("Could not write to the output")
    });
    // Space comes back: the same sink process writes again.
    std::fs::remove_file(&filler).unwrap();
    let before = file_len(&output);
    wait_until("writing again", Duration::from_secs(40), || file_len(&output) > before + kind.some_output());

    // Full again, and this time the sink is killed while refusing, and
    // started again once there is room.
    let filler = fill(&disk.0);
    let refusals = stderr_of(&dir, "sink-1").matches("Could not write").count();
    wait_until("a second refusal", Duration::from_secs(40), || {
        stderr_of(&dir, "sink-1").matches("Could not write").count() > refusals
    });
    sink.signal(libc::SIGKILL);
    let _ = sink.wait(Duration::from_secs(10));
    std::fs::remove_file(&filler).unwrap();
    let sink = Process::start("sink-2", SINK, &[], &sink_env(&socket, &disk.0), &dir);
    wait_for_port(port, Duration::from_secs(20));
    let before = file_len(&output);
    wait_until("the restarted sink writes", Duration::from_secs(40), || {
        file_len(&output) > before + kind.some_output()
    });

    let summary = stop(node, sink);
    let written = read_output(&output);
    assert_complete_and_ordered(&written);
    assert_eq!(written.len() as u64, summary["produced"]);
}

#[test]
fn a_file_size_limit_is_refused_like_a_full_disk_and_rotation_ends_it() {
    file_size_limit(Node::Tuned, "file-size-limit");
}

#[test]
fn a_file_size_limit_with_the_default_settings() {
    file_size_limit(Node::Defaults, "file-size-limit-defaults");
}

fn file_size_limit(kind: Node, name: &str) {
    let dir = scratch(name);
    let out = dir.join("out");
    let output = out.join("readings.jsonl");
    // A limit on the size of every file the sink writes.
    let limit = kind.size_limit_kib();
    let sink = Process::start(
        "sink",
        "bash",
        &["-c", &format!("ulimit -f {limit} && exec {SINK}")],
        &sink_env("127.0.0.1:0", &out),
        &dir,
    );
    let socket = sink.sink_address().to_string();
    let node = Process::start("node", NODE, &[], &kind.env(&socket), &dir);
    wait_until("a write refused", Duration::from_secs(40), || {
        stderr_of(&dir, "sink").contains("Could not write to the output")
    });
    assert!(file_len(&output) <= limit * 1024);
    // Rotated away: the sink reopens on SIGHUP and writes to a new file.
    let rotated = out.join("readings.jsonl.1");
    std::fs::rename(&output, &rotated).unwrap();
    sink.signal(libc::SIGHUP);
    wait_until("writing to the new file", Duration::from_secs(40), || file_len(&output) > kind.some_output());

    let summary = stop(node, sink);
    let mut written = read_output(&rotated);
    written.extend(read_output(&output));
    assert_all_once(&written, summary["produced"]);
}

#[test]
fn the_output_deleted_under_a_running_sink_is_made_again_and_nothing_acked_is_lost() {
    deleted_output(Node::Tuned, "deleted-output");
}

#[test]
fn the_output_deleted_with_the_default_settings() {
    deleted_output(Node::Defaults, "deleted-output-defaults");
}

fn deleted_output(kind: Node, name: &str) {
    let dir = scratch(name);
    let out = dir.join("out");
    let output = out.join("readings.jsonl");
    let (sink, address) = Process::start_sink("sink", &sink_env("127.0.0.1:0", &out), &dir);
    let socket = address.to_string();
    let node = Process::start("node", NODE, &[], &kind.env(&socket), &dir);
    wait_until("output written", Duration::from_secs(20), || file_len(&output) > kind.some_output());
    // Keep the old file readable, as the operator who deleted it cannot.
    let mut deleted = std::fs::File::open(&output).unwrap();
    std::fs::remove_file(&output).unwrap();
    wait_until("a new file at the path", Duration::from_secs(20), || file_len(&output) > kind.some_output());

    let summary = stop(node, sink);
    let mut old = String::new();
    deleted.read_to_string(&mut old).unwrap();
    let new = read_output(&output);
    // From some reading on, each sensor's readings are all in the new file.
    let mut first_new: BTreeMap<&str, u64> = BTreeMap::new();
    let mut count_new: BTreeMap<&str, u64> = BTreeMap::new();
    for (sensor, sequence) in &new {
        first_new.entry(sensor).or_insert(*sequence);
        *count_new.entry(sensor).or_default() += 1;
    }
    let produced: u64 = first_new.iter().map(|(sensor, first)| first + count_new[sensor]).sum();
    assert_eq!(produced, summary["produced"], "the new file holds every sensor's readings to its last");
    let mut sorted = new.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), new.len(), "nothing twice in the new file");
    // And what came before is in the deleted file.
    let old: Vec<(String, u64)> = old
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|v| (v["sensor_name"].as_str().unwrap().to_owned(), v["sequence"].as_u64().unwrap()))
        .filter(|(sensor, sequence)| *sequence < first_new[sensor.as_str()])
        .collect();
    let mut all = old;
    all.extend(new);
    assert_all_once(&all, summary["produced"]);
}
