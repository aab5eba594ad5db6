//! The node and the sink over real loopback gRPC: in one process through the
//! library, and as the two binaries stopped by SIGTERM.

mod common;

use std::{sync::Arc, time::Duration};

use common::{Process, assert_complete_and_ordered, node_config, read_output, scratch, sink_config, summary_fields};
use telemetry_node::{
    node::Ledger,
    node::{self, GrpcTransport},
    receiver,
    receiver::SinkStats,
};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn the_sink_writes_every_reading_the_node_produced() {
    let dir = scratch("library");
    let sink = sink_config(&[("FILE_PATH", dir.display().to_string()), ("BUFFER_FLUSH_INTERVAL", "50ms".into())]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop_sink = CancellationToken::new();
    let serving = tokio::spawn({
        let (sink, stop) = (sink.clone(), stop_sink.clone());
        async move { receiver::serve(&sink, listener, Arc::new(SinkStats::default()), stop.cancelled_owned()).await }
    });

    let config = node_config(&[
        ("GRPC_SERVER_SOCKET", address.to_string()),
        ("SENSOR_COUNT", "4".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "100".into()),
        ("REQUEST_RATE_PER_SECOND", "20".into()),
        ("BATCH_SIZE", "50".into()),
        ("BATCH_TIMEOUT", "100ms".into()),
    ]);
    let transport = GrpcTransport::new(node::transport::endpoint(&config).unwrap(), Duration::from_secs(5));
    let run = node::run(&config, transport, Arc::new(Ledger::default()), tokio::time::sleep(Duration::from_secs(2)));
    let summary = tokio::time::timeout(Duration::from_secs(30), run).await.expect("the node stops in time");
    stop_sink.cancel();
    let sink_summary = tokio::time::timeout(Duration::from_secs(30), serving).await.unwrap().unwrap().unwrap();

    let written = read_output(&sink.output_file());
    let per_sensor = assert_complete_and_ordered(&written);
    assert_eq!(per_sensor.len(), 4);
    assert_eq!(written.len() as u64, summary.produced);
    assert_eq!((summary.acked, summary.dropped), (summary.produced, 0));
    assert_eq!(sink_summary.readings_written, summary.produced);
}

#[test]
fn binaries_stopped_by_sigterm_lose_nothing() {
    let dir = scratch("binaries");
    let (sink, address) = Process::start_sink(
        "sink",
        &[
            ("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()),
            ("FILE_PATH", "out".into()),
            ("BUFFER_FLUSH_INTERVAL", "10s".into()),
        ],
        &dir,
    );
    let socket = address.to_string();
    let node = Process::start(
        "node",
        env!("CARGO_BIN_EXE_telemetry-node"),
        &[],
        &[
            ("GRPC_SERVER_SOCKET", socket),
            ("SENSOR_COUNT", "3".into()),
            ("SENSOR_VALUE_RATE_PER_SECOND", "50".into()),
            ("REQUEST_RATE_PER_SECOND", "20".into()),
            ("BATCH_SIZE", "25".into()),
            ("BATCH_TIMEOUT", "200ms".into()),
        ],
        &dir,
    );
    std::thread::sleep(Duration::from_secs(2));
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "node failed: {stderr}");
    let summary = summary_fields(&stdout);
    assert!(summary["produced"] > 0);
    assert_eq!(summary["acked"], summary["produced"], "{stdout}");

    // The flush interval is long: only the shutdown writes the readings out.
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "sink failed: {stderr}");
    let written = read_output(&dir.join("out/readings.jsonl"));
    let per_sensor = assert_complete_and_ordered(&written);
    assert_eq!(per_sensor.keys().collect::<Vec<_>>(), ["sensor-1", "sensor-2", "sensor-3"]);
    assert_eq!(written.len() as u64, summary["produced"]);
}

#[test]
fn the_demo_ends_with_everything_acknowledged() {
    let dir = scratch("demo");
    let demo = Process::start(
        "demo",
        env!("CARGO_BIN_EXE_telemetry-node"),
        &["demo", "--duration", "2s"],
        &[
            ("SENSOR_COUNT", "2".into()),
            ("SENSOR_VALUE_RATE_PER_SECOND", "20".into()),
            ("TMPDIR", dir.display().to_string()),
        ],
        &dir,
    );
    let (code, stdout, stderr) = demo.wait(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    let last = stdout.lines().last().unwrap();
    assert!(last.starts_with("summary: produced="), "{last}");
    let summary = summary_fields(&stdout);
    assert!(summary["produced"] >= 40, "{last}");
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0), "{last}");
    // It cleans up after itself, and says so.
    assert!(stderr.contains("(its folder removed; --keep keeps it)"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|name| name.to_string_lossy().starts_with("telemetry-node-demo-")), "{left:?}");
}

#[test]
fn the_demo_with_host_shows_live_host_readings() {
    let dir = scratch("demo-host");
    let demo = Process::start(
        "demo",
        env!("CARGO_BIN_EXE_telemetry-node"),
        &["demo", "--duration", "3s", "--host"],
        &[("TMPDIR", dir.display().to_string())],
        &dir,
    );
    let (code, stdout, stderr) = demo.wait(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("and the host every 1s"), "{stderr}");
    // Space available on / (what df shows, what to alert on), not free.
    let shown = stderr
        .lines()
        .filter(|line| line.contains("| host:") && line.contains("mem_available=") && line.contains("root_available="))
        .count();
    assert!(shown >= 1, "{stderr}");
    let summary = summary_fields(&stdout);
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0), "{stdout}");
}

/// A batch whose request would pass the sink's MAX_MESSAGE_BYTES (4 MiB by
/// default on both sides) is sent as several requests that fit: a large
/// BATCH_SIZE with long sensor names loses nothing.
#[test]
fn a_batch_larger_than_a_request_may_be_is_sent_in_parts() {
    let dir = scratch("large-batches");
    let (sink, address) =
        Process::start_sink("sink", &[("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()), ("FILE_PATH", "out".into())], &dir);
    let name = "x".repeat(200);
    // One lane of 1,000 sensors at 25 a second: a second's batch of 25,000
    // readings of about 240 bytes is some 6 MB.
    let node = Process::start(
        "node",
        env!("CARGO_BIN_EXE_telemetry-node"),
        &[],
        &[
            ("GRPC_SERVER_SOCKET", address.to_string()),
            ("SENSOR_NAME", name.clone()),
            ("SENSOR_COUNT", "1000".into()),
            ("SENSOR_VALUE_RATE_PER_SECOND", "25".into()),
            ("MAX_IN_FLIGHT", "1".into()),
            ("BATCH_SIZE", "100000".into()),
            ("REQUEST_RATE_PER_SECOND", "20".into()),
        ],
        &dir,
    );
    std::thread::sleep(Duration::from_millis(3500));
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "node failed: {stderr}");
    let summary = summary_fields(&stdout);
    assert!(summary["produced"] >= 40_000, "{stdout}");
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0), "{stdout}");
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "sink failed: {stderr}");

    let text = std::fs::read_to_string(dir.join("out/readings.jsonl")).unwrap();
    let mut per_batch: std::collections::BTreeMap<u64, usize> = Default::default();
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        *per_batch.entry(value["batch"].as_u64().unwrap()).or_default() += 1;
    }
    let largest = per_batch.values().max().copied().unwrap_or(0);
    assert!(largest * (name.len() + 40) <= 4 << 20, "a request of {largest} readings passed 4 MiB");
    let written = read_output(&dir.join("out/readings.jsonl"));
    assert_eq!(assert_complete_and_ordered(&written).values().sum::<u64>(), summary["produced"]);
}

/// A database address given without OUTPUT=remote-write writes nothing to
/// the database: the sink says so at start, naming both variables.
#[test]
fn a_sink_given_a_database_url_but_the_file_output_says_so() {
    let dir = scratch("url-without-output");
    let env = [
        ("GRPC_SERVER_SOCKET", "127.0.0.1:0".to_owned()),
        ("FILE_PATH", "out".to_owned()),
        ("REMOTE_WRITE_URL", "http://127.0.0.1:9/api/v1/write".to_owned()),
    ];
    let (sink, _) = Process::start_sink("sink", &env, &dir);
    let (code, _, stderr) = sink.terminate(Duration::from_secs(20));
    assert_eq!(code, 0, "{stderr}");
    let warning = stderr.lines().find(|line| line.contains("REMOTE_WRITE_URL is set but OUTPUT is file"));
    assert!(warning.is_some_and(|line| line.contains("WARN") && line.contains("OUTPUT=remote-write")), "{stderr}");
}
