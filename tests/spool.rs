//! The durable spool, with real processes: a node killed while its sink is
//! down, and a sink stopped while the node shuts down.

mod common;

use std::{io::Read, io::Write, path::Path, time::Duration};

use common::{
    Process, assert_complete_and_ordered, fast_retries, free_port, free_ports, read_output, scratch, summary_fields,
    wait_for_port,
};

const NODE: &str = env!("CARGO_BIN_EXE_telemetry-node");

fn node_env(socket: &str, name: &str, spool: Option<&Path>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("GRPC_SERVER_SOCKET", socket.to_owned()),
        ("SENSOR_NAME", name.to_owned()),
        ("SENSOR_COUNT", "3".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "40".into()),
        ("REQUEST_RATE_PER_SECOND", "50".into()),
        ("BATCH_SIZE", "20".into()),
        ("BATCH_TIMEOUT", "100ms".into()),
        ("RPC_TIMEOUT", "1s".into()),
        ("SHUTDOWN_TIMEOUT", "2s".into()),
    ];
    env.extend(fast_retries());
    if let Some(spool) = spool {
        env.push(("OVERFLOW_POLICY", "spool".into()));
        env.push(("SPOOL_DIR", spool.display().to_string()));
    }
    env
}

/// Only the readings of sensors whose name starts with `prefix`.
fn of(written: &[(String, u64)], prefix: &str) -> Vec<(String, u64)> {
    written.iter().filter(|(sensor, _)| sensor.starts_with(prefix)).cloned().collect()
}

/// The value of an unlabelled metric at `127.0.0.1:port`.
/// The node's /metrics page on `port`.
fn metrics_page(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    page
}

/// The sum of the samples on `page` whose name (labels included) starts
/// with `prefix`.
fn sum_of(page: &str, prefix: &str) -> u64 {
    page.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

fn metric(port: u16, name: &str) -> u64 {
    let page = metrics_page(port);
    page.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
        .unwrap_or_else(|| panic!("{name} in {page}"))
}

/// Starts a sink on `socket`, and returns it once it listens, with the
/// address it got (the kernel's choice for port 0).
fn start_sink(dir: &Path, socket: &str, name: &'static str) -> (Process, String) {
    let (sink, address) =
        Process::start_sink(name, &[("GRPC_SERVER_SOCKET", socket.to_owned()), ("FILE_PATH", "out".into())], dir);
    (sink, address.to_string())
}

fn stop(process: Process) -> std::collections::HashMap<String, u64> {
    let (code, stdout, stderr) = process.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    if stdout.contains("summary:") { summary_fields(&stdout) } else { Default::default() }
}

#[test]
fn a_node_killed_while_the_sink_is_down_delivers_its_spool_after_restart() {
    let dir = scratch("spool-kill");
    let spool = dir.join("spool");
    let [port, metrics] = free_ports();
    let socket = format!("127.0.0.1:{port}");

    // The sink is down: everything goes to the spool; then SIGKILL. The
    // node is named, as a pod is, and comes back under another name.
    let mut env = node_env(&socket, "first", Some(&spool));
    env.push(("METRICS_ADDR", format!("127.0.0.1:{metrics}")));
    env.push(("NODE_ID", "pod-a".into()));
    let first = Process::start("node-1", NODE, &[], &env, &dir);
    wait_for_port(metrics, Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(2));
    let spooled = metric(metrics, "telemetry_node_readings_spooled_total");
    assert!(spooled > 0);
    first.signal(libc::SIGKILL);
    let _ = first.wait(Duration::from_secs(10));
    // What the spool holds after the kill, read from the file itself: the
    // next run must deliver exactly that, a lost tail included.
    let in_file = {
        let (opened, damage) = telemetry_node::node::overflow::spool::Spool::open(&spool, u64::MAX).unwrap();
        assert!(damage.is_none(), "{damage:?}");
        opened.readings().unwrap()
    };
    assert!(in_file >= spooled, "the spool holds what it committed: {in_file} < {spooled}");

    // The sink is back; a new node on the same spool replays it.
    let (sink, _) = start_sink(&dir, &socket, "sink");
    let mut env = node_env(&socket, "second", Some(&spool));
    env.push(("NODE_ID", "pod-b".into()));
    let second = Process::start("node-2", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(3));
    let summary = stop(second);
    stop(sink);

    let written = read_output(&dir.join("out/readings.jsonl"));
    let replayed = assert_complete_and_ordered(&of(&written, "first-"));
    let replayed: u64 = replayed.values().sum();
    assert_eq!(replayed, in_file, "every reading the spool held after the kill arrived, once");
    // The second node's own batches may queue in the spool behind the
    // first node's (every attempt takes a token, replays too): those are
    // replayed as well.
    assert_eq!(replayed, summary["replayed"] - summary["spooled"]);
    let own = assert_complete_and_ordered(&of(&written, "second-"));
    assert_eq!(own.values().sum::<u64>(), summary["produced"]);
    assert_eq!((summary["acked"], summary["dropped"], summary["in_spool"]), (summary["produced"], 0, 0));
    // Each reading is its maker's: the spooled ones the first pod's.
    assert_eq!(node_ids(&dir.join("out/readings.jsonl"), "first-"), ["pod-a"]);
    assert_eq!(node_ids(&dir.join("out/readings.jsonl"), "second-"), ["pod-b"]);
}

/// The node identities the sink wrote for sensors starting with `prefix`.
fn node_ids(path: &Path, prefix: &str) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|value| value["sensor_name"].as_str().is_some_and(|name| name.starts_with(prefix)))
        .filter_map(|value| value["node_id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[test]
fn the_sink_stopped_while_the_node_shuts_down_loses_nothing_with_a_spool() {
    let dir = scratch("spool-shutdown");
    let spool = dir.join("spool");
    let port = free_port();
    let socket = format!("127.0.0.1:{port}");
    let (sink, _) = start_sink(&dir, &socket, "sink-1");
    let first = Process::start("node-1", NODE, &[], &node_env(&socket, "first", Some(&spool)), &dir);
    std::thread::sleep(Duration::from_secs(2));
    stop(sink);
    let first = stop(first);
    assert_eq!(first["dropped"], 0);
    assert!(first["in_spool"] > 0, "the last batches waited in the spool: {first:?}");
    assert_eq!(first["acked"] + first["in_spool"], first["produced"]);

    let (sink, _) = start_sink(&dir, &socket, "sink-2");
    let second = Process::start("node-2", NODE, &[], &node_env(&socket, "second", Some(&spool)), &dir);
    std::thread::sleep(Duration::from_secs(2));
    let second = stop(second);
    stop(sink);
    let written = read_output(&dir.join("out/readings.jsonl"));
    let delivered = assert_complete_and_ordered(&of(&written, "first-"));
    assert_eq!(delivered.values().sum::<u64>(), first["produced"], "every reading of the first run, once");
    assert!(second["replayed"] >= first["in_spool"]);
}

/// With the default request rate (1 a second) and shutdown timeout, the
/// batches a stopping node holds outnumber what the rate lets out before the
/// deadline: with a spool they wait on disk for the next start instead of
/// being dropped (3,577 of 9,600 readings were, in this scenario, before).
#[test]
fn readings_waiting_for_the_request_rate_at_shutdown_go_to_the_spool() {
    let dir = scratch("spool-rate-shutdown");
    let spool = dir.join("spool");
    let (sink, address) = start_sink(&dir, "127.0.0.1:0", "sink");
    let spool_env = |name: &str| {
        vec![
            ("GRPC_SERVER_SOCKET", address.clone()),
            ("SENSOR_NAME", name.to_owned()),
            ("OVERFLOW_POLICY", "spool".to_owned()),
            ("SPOOL_DIR", spool.display().to_string()),
        ]
    };
    let mut env = spool_env("first");
    // More than the rate carries, and a stop too short for the replayer to
    // send what the lanes spool at the stop.
    env.extend([
        ("SENSOR_COUNT", "8".to_owned()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "200".to_owned()),
        ("REQUEST_RATE_PER_SECOND", "0.2".to_owned()),
        ("SHUTDOWN_TIMEOUT", "1s".to_owned()),
    ]);
    // Named as pods are, and back under another name.
    env.push(("NODE_ID", "pod-a".to_owned()));
    let first = Process::start("node-1", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(5));
    let first = stop(first);
    assert_eq!(first["dropped"], 0, "{first:?}");
    assert!(first["in_spool"] > 0, "more was held than the rate let out: {first:?}");
    assert_eq!(first["acked"] + first["in_spool"], first["produced"]);

    // The next start sends them, at the same rate.
    let mut env = spool_env("second");
    env.push(("NODE_ID", "pod-b".to_owned()));
    let second = Process::start("node-2", NODE, &[], &env, &dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let delivered = || of(&read_output(&dir.join("out/readings.jsonl")), "first-").len() as u64;
    while delivered() < first["produced"] && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    stop(second);
    stop(sink);
    let written = read_output(&dir.join("out/readings.jsonl"));
    let delivered = assert_complete_and_ordered(&of(&written, "first-"));
    assert_eq!(delivered.values().sum::<u64>(), first["produced"], "every reading of the first run, once");
    // The spooled ones under the name they were made under.
    assert_eq!(node_ids(&dir.join("out/readings.jsonl"), "first-"), ["pod-a"]);
    assert_eq!(node_ids(&dir.join("out/readings.jsonl"), "second"), ["pod-b"]);
}

/// Whether the node's summary line in `dir` lists its drops by reason.
fn stdout_has_reasons(dir: &Path) -> bool {
    let out = std::fs::read_to_string(dir.join("node.out")).unwrap_or_default();
    out.lines().any(|l| l.starts_with("summary:") && l.contains(" dropped_by="))
}

#[test]
fn the_sink_stopped_while_the_node_shuts_down_loses_exactly_what_the_summary_says_without_one() {
    let dir = scratch("no-spool-shutdown");
    let (sink, socket) = start_sink(&dir, "127.0.0.1:0", "sink");
    let node = Process::start("node", NODE, &[], &node_env(&socket, "only", None), &dir);
    std::thread::sleep(Duration::from_secs(2));
    stop(sink);
    let summary = stop(node);
    let written = read_output(&dir.join("out/readings.jsonl"));
    assert!(summary["dropped"] > 0, "{summary:?}");
    assert!(stdout_has_reasons(&dir), "the summary says why");
    assert_eq!(written.len() as u64, summary["produced"] - summary["dropped"]);
    assert_eq!(written.len() as u64, summary["acked"]);
}

#[test]
fn a_full_spool_evicting_while_the_sink_comes_back_keeps_the_books() {
    let dir = scratch("spool-full");
    let spool = dir.join("spool");
    // The node starts before its sink, at an address drawn for it.
    let socket = format!("127.0.0.1:{}", free_port());
    let mut env = vec![
        ("GRPC_SERVER_SOCKET", socket.clone()),
        ("SENSOR_NAME", "full".to_owned()),
        ("SENSOR_COUNT", "100".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "50".into()),
        ("BATCH_SIZE", "100".into()),
        ("REQUEST_RATE_PER_SECOND", "inf".into()),
        ("OVERFLOW_POLICY", "spool".into()),
        ("SPOOL_DIR", spool.display().to_string()),
        ("SPOOL_MAX_BYTES", "65536".into()),
        ("METRICS_ADDR", "127.0.0.1:0".into()),
    ];
    env.extend(fast_retries());
    let node = Process::start("node", NODE, &[], &env, &dir);
    let metrics = node.metrics_address().port();
    // Four seconds without a sink fill the 64 KiB spool over and over.
    std::thread::sleep(Duration::from_secs(4));
    let (sink, _) = start_sink(&dir, &socket, "sink");
    // While the replayers deliver the oldest batches and new ones still
    // evict, every page balances.
    for _ in 0..25 {
        let page = metrics_page(metrics);
        let produced = sum_of(&page, "telemetry_node_readings_produced_total ");
        let accounted = sum_of(&page, "telemetry_node_readings_acked_total ")
            + sum_of(&page, "telemetry_node_readings_dropped_total{")
            + sum_of(&page, "telemetry_node_readings_in_spool ")
            + sum_of(&page, "telemetry_node_readings_held ");
        assert_eq!(produced, accounted, "{page}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let summary = stop(node);
    stop(sink);

    let written = read_output(&dir.join("out/readings.jsonl"));
    let mut distinct = written.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), written.len(), "nothing written twice");
    assert!(summary["dropped"] > 0, "the spool evicted: {summary:?}");
    assert_eq!(summary["produced"], summary["acked"] + summary["dropped"] + summary["in_spool"], "{summary:?}");
    assert_eq!(written.len() as u64, summary["acked"], "what was acked is what the sink wrote: {summary:?}");
}

/// A spool filling while the sink is down costs disk, not memory: the
/// node's memory stays flat while its spool grows past 64 MiB (redb would
/// cache up to 1 GiB of it by default).
#[test]
fn a_spool_filling_while_the_sink_is_down_keeps_the_node_memory_flat() {
    let dir = scratch("spool-memory");
    let spool = dir.join("spool");
    // Nothing listens there: every batch goes to the spool.
    let socket = format!("127.0.0.1:{}", free_port());
    let mut env = node_env(&socket, "busy", Some(&spool));
    env.extend([
        ("SENSOR_COUNT", "100".to_owned()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "1000".into()),
        ("REQUEST_RATE_PER_SECOND", "inf".into()),
        ("BATCH_SIZE", "1000".into()),
        ("SHUTDOWN_TIMEOUT", "1s".into()),
    ]);
    let node = Process::start("node", NODE, &[], &env, &dir);
    let file = spool.join("spool.redb");
    let size = || std::fs::metadata(&file).map_or(0, |meta| meta.len());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while size() < 64 << 20 {
        assert!(std::time::Instant::now() < deadline, "the spool reached only {} MiB", size() >> 20);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (rss, spooled) = (common::peak_rss(node.child.id()), size());
    let summary = stop(node);
    assert!(rss < 32 << 20, "the node held {} MiB with a {} MiB spool", rss >> 20, spooled >> 20);
    assert_eq!(summary["in_spool"], summary["produced"], "{summary:?}");
}

/// The spool's disk fills up while the sink is down, and frees up while the
/// node runs: redb refuses every operation after its first I/O error, so
/// the spool is opened again; a delivered batch whose removal fails is not
/// delivered again, its removal is retried (before: batches written 6 times
/// at the sink, 909 duplicate lines, and books that balanced only by
/// counting them).
#[test]
fn a_full_spool_disk_duplicates_nothing_and_keeps_the_books() {
    full_spool_disk("spool-full-disk", false);
}

#[test]
fn a_full_spool_disk_with_the_default_settings() {
    full_spool_disk("spool-full-disk-defaults", true);
}

/// The scenario of [`a_full_spool_disk_duplicates_nothing_and_keeps_the_books`],
/// with a busy, quickly retrying node, or with everything but the spool as
/// users get it (one sensor, 5 readings a second, one request a second).
fn full_spool_disk(name: &str, defaults: bool) {
    let Some(disk) = common::Tmpfs::mount(name, "8m") else { return };
    let dir = disk.0.parent().unwrap().to_owned();
    let port = free_port();
    let socket = format!("127.0.0.1:{port}");
    let name = "n".repeat(200);
    let mut env = node_env(&socket, &name, Some(&disk.0));
    env.retain(|(key, _)| !["SENSOR_COUNT", "SENSOR_VALUE_RATE_PER_SECOND", "SHUTDOWN_TIMEOUT"].contains(key));
    env.extend([("SENSOR_COUNT", "2".into()), ("SENSOR_VALUE_RATE_PER_SECOND", "100".into())]);
    if defaults {
        env.retain(|(key, _)| ["GRPC_SERVER_SOCKET", "SENSOR_NAME", "OVERFLOW_POLICY", "SPOOL_DIR"].contains(key));
    }
    env.push(("NODE_ID", "first".into()));
    let node = Process::start("node-1", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(3));
    let filler = common::fill(&disk.0);
    std::thread::sleep(Duration::from_secs(3));
    let (sink, _) = start_sink(&dir, &socket, "sink-1");
    std::thread::sleep(Duration::from_secs(4));
    // Room again while the node runs.
    std::fs::remove_file(filler).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let first = stop(node);
    assert_eq!(first["acked"] + first["dropped"] + first["in_spool"], first["produced"], "{first:?}");
    let written = read_output(&dir.join("out/readings.jsonl"));
    let mut seen = std::collections::HashSet::new();
    for reading in &written {
        assert!(seen.insert(reading.clone()), "{reading:?} written twice");
    }
    assert_eq!(written.len() as u64, first["acked"], "every reading acked is at the sink once: {first:?}");

    // The next run delivers what the spool kept, once.
    env.retain(|(key, _)| !["NODE_ID", "SENSOR_NAME"].contains(key));
    env.extend([("NODE_ID", "second".into()), ("SENSOR_NAME", "second".into())]);
    let second = Process::start("node-2", NODE, &[], &env, &dir);
    // Running (its signal handler set) before it may be stopped.
    std::thread::sleep(Duration::from_secs(2));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let expected = first["produced"] - first["dropped"];
    let delivered = || {
        let written = read_output(&dir.join("out/readings.jsonl"));
        written.iter().filter(|(sensor, _)| sensor.starts_with(&name)).count() as u64
    };
    while delivered() < expected && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    stop(second);
    stop(sink);
    let written = read_output(&dir.join("out/readings.jsonl"));
    let mut seen = std::collections::HashSet::new();
    for reading in &written {
        assert!(seen.insert(reading.clone()), "{reading:?} written twice");
    }
    assert_eq!(delivered(), expected, "every reading of the first run not counted as dropped: {first:?}");
    drop(disk);
}

/// The shipped Kubernetes base settings (one sensor, one request a second,
/// the spool), a sink down for the node's first 10 s: the backlog leaves in
/// requests of up to BATCH_SIZE once the sink is back, within the retry
/// probe's wait and a few requests, not a few readings a request.
#[test]
fn a_backlog_drains_within_seconds_of_the_sinks_return_with_the_shipped_settings() {
    let dir = scratch("spool-backlog");
    let [port, metrics] = free_ports::<2>();
    let socket = format!("127.0.0.1:{port}");
    let node_env = [
        ("GRPC_SERVER_SOCKET", socket.clone()),
        ("NODE_ID", "backlog".to_owned()),
        ("SENSOR_COUNT", "1".into()),
        ("REQUEST_RATE_PER_SECOND", "1".into()),
        ("OVERFLOW_POLICY", "spool".into()),
        ("SPOOL_DIR", dir.join("spool").display().to_string()),
        ("METRICS_ADDR", format!("127.0.0.1:{metrics}")),
    ];
    let node = Process::start("node", NODE, &[], &node_env, &dir);
    wait_for_port(metrics, Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(10));
    let backlog = metric(metrics, "telemetry_node_readings_in_spool");
    assert!(backlog >= 40, "10 s at 5 readings/s were spooled: {backlog}");
    let (sink, _) = start_sink(&dir, &socket, "sink");
    let back = std::time::Instant::now();
    // The probe waits at most the backoff reached after 10 s of failures
    // (1 + 2 + 4 s, then at most 8 s, jittered below it); then the backlog
    // is one or two requests.
    while metric(metrics, "telemetry_node_readings_in_spool") > 10 {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "the backlog still holds {}",
            metric(metrics, "telemetry_node_readings_in_spool")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let drained = back.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let summary = stop(node);
    stop(sink);
    let written = read_output(&dir.join("out/readings.jsonl"));
    let per_sensor = assert_complete_and_ordered(&written);
    assert_eq!(per_sensor.values().sum::<u64>(), summary["produced"]);
    assert_eq!((summary["acked"], summary["dropped"], summary["in_spool"]), (summary["produced"], 0, 0), "{summary:?}");
    eprintln!("backlog of {backlog} drained {drained:?} after the sink came back");
}
