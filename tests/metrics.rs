//! Metrics and health endpoints of both binaries, scraped during a run and
//! checked against the sink's output file.

mod common;

use std::{
    collections::HashMap,
    io::{Read, Write},
    time::Duration,
};

use common::{Process, read_output, scratch, summary_fields};

/// GETs `path` from `127.0.0.1:port`; returns the status code and body.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// Unlabelled samples of a Prometheus text page.
fn samples(page: &str) -> HashMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(name, value)| Some((name.to_owned(), value.trim().parse().ok()?)))
        .collect()
}

#[test]
fn scraped_counters_agree_with_the_sink_file() {
    let dir = scratch("metrics");
    let (sink, grpc) = Process::start_sink(
        "sink",
        &[
            ("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("FILE_PATH", "out".into()),
        ],
        &dir,
    );
    let sink_http = sink.metrics_address().port();
    assert_eq!(get(sink_http, "/healthz").0, 200);
    assert_eq!(get(sink_http, "/readyz").0, 200);

    let node = Process::start(
        "node",
        env!("CARGO_BIN_EXE_telemetry-node"),
        &[],
        &[
            ("GRPC_SERVER_SOCKET", grpc.to_string()),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("SENSOR_COUNT", "4".into()),
            ("SENSOR_VALUE_RATE_PER_SECOND", "50".into()),
            ("REQUEST_RATE_PER_SECOND", "20".into()),
            ("BATCH_TIMEOUT", "100ms".into()),
        ],
        &dir,
    );
    let node_http = node.metrics_address().port();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(node_http, "/readyz").0, 200, "the node has reached the sink");
    // The books are read once per scrape, produced last: each page balances
    // while the node runs on.
    for _ in 0..5 {
        let (status, page) = get(node_http, "/metrics");
        assert_eq!(status, 200);
        let during = samples(&page);
        let produced = during["telemetry_node_readings_produced_total"];
        let acked = during["telemetry_node_readings_acked_total"];
        assert!(produced > 0.0 && acked > 0.0 && acked <= produced, "{page}");
        let dropped: f64 = during
            .iter()
            .filter(|(name, _)| name.starts_with("telemetry_node_readings_dropped_total{"))
            .map(|(_, v)| v)
            .sum();
        let (held, in_spool) = (during["telemetry_node_readings_held"], during["telemetry_node_readings_in_spool"]);
        assert_eq!(produced, acked + dropped + in_spool + held, "{page}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let (code, stdout, stderr) = node.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let summary = summary_fields(&stdout);

    // The sink still runs: its counters must match the node's totals.
    let sink_page = samples(&get(sink_http, "/metrics").1);
    assert_eq!(sink_page["telemetry_sink_readings_accepted_total"] as u64, summary["acked"]);
    assert_eq!(sink_page["telemetry_sink_requests_throttled_total"], 0.0);

    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let written = read_output(&dir.join("out/readings.jsonl"));
    assert_eq!(written.len() as u64, summary["acked"]);
    assert_eq!(summary["acked"], summary["produced"]);
}
