//! A redeploy as users run it, with the default settings and the real
//! binaries: the sink restarted under a running node, a sink that throttles,
//! a node stopped twice, and what the logs and probes show meanwhile.

mod common;

use std::{
    collections::HashMap,
    io::{Read, Write},
    path::Path,
    time::{Duration, Instant},
};

use common::{Process, assert_complete_and_ordered, free_port, read_output, scratch, summary_fields};

const NODE: &str = env!("CARGO_BIN_EXE_telemetry-node");

/// Starts a sink on `socket` (port 0: the kernel picks), and returns it
/// with the address it listens on.
fn start_sink(dir: &Path, name: &'static str, socket: &str, extra: &[(&'static str, String)]) -> (Process, String) {
    let mut env = vec![("GRPC_SERVER_SOCKET", socket.to_owned()), ("FILE_PATH", "out".into())];
    env.extend(extra.iter().cloned());
    let (sink, address) = Process::start_sink(name, &env, dir);
    (sink, address.to_string())
}

/// `name:n` of the summary's `dropped_by=` field.
fn dropped_by(stdout: &str, name: &str) -> u64 {
    stdout
        .split_whitespace()
        .filter_map(|field| field.strip_prefix("dropped_by="))
        .flat_map(|reasons| reasons.split(','))
        .filter_map(|reason| reason.split_once(':'))
        .find(|(reason, _)| *reason == name)
        .map_or(0, |(_, n)| n.parse().unwrap())
}

/// The JSON log lines in `stderr`.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

#[test]
fn a_sink_restart_with_the_default_settings_costs_seconds_and_loses_nothing() {
    let dir = scratch("redeploy-defaults");
    // Restarted on the same port: one drawn where the kernel hands out none.
    let socket = format!("127.0.0.1:{}", free_port());
    let (sink, _) = start_sink(&dir, "sink-1", &socket, &[]);
    // Everything as users get it but the address.
    let node = Process::start("node", NODE, &[], &[("GRPC_SERVER_SOCKET", socket.clone())], &dir);
    std::thread::sleep(Duration::from_secs(3));
    sink.signal(libc::SIGKILL);
    let _ = sink.wait(Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    let (sink, _) = start_sink(&dir, "sink-2", &socket, &[]);
    // A deploy stops the node soon after the sink is back.
    std::thread::sleep(Duration::from_secs(2));
    let stopping = Instant::now();
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    // A drain does not wait out the retry backoff: seconds, within the
    // default SHUTDOWN_TIMEOUT (10 s) with room to spare on a busy machine.
    assert!(stopping.elapsed() < Duration::from_secs(8), "the drain took {:?}", stopping.elapsed());
    let (code, _, stderr) = sink.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");

    let summary = summary_fields(&stdout);
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0), "{stdout}");
    assert!(summary["retries"] > 0, "the outage was felt: {stdout}");
    let written = read_output(&dir.join("out/readings.jsonl"));
    let per_sensor = assert_complete_and_ordered(&written);
    assert_eq!(per_sensor.values().sum::<u64>(), summary["produced"]);
}

#[test]
fn a_throttling_sink_uses_up_no_retries_with_the_default_settings() {
    let dir = scratch("pushback-defaults");
    // 3000 request bytes a second: far less than the node would send.
    let (sink, socket) = start_sink(&dir, "sink", "127.0.0.1:0", &[("RATE_PER_SECOND", "3000".into())]);
    // The default retry settings but for the attempts: none at all, so a
    // pushback taken for a failure would drop its batch at once. Only the
    // load is raised.
    let env = [
        ("GRPC_SERVER_SOCKET", socket),
        ("SENSOR_COUNT", "4".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "40".into()),
        ("REQUEST_RATE_PER_SECOND", "inf".into()),
        ("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", "0".into()),
    ];
    let node = Process::start("node", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(6));
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    let (_, sink_out, _) = sink.terminate(Duration::from_secs(60));

    let summary = summary_fields(&stdout);
    assert!(summary["pushbacks"] > 20, "the sink pushed back: {stdout} / {sink_out}");
    assert_eq!(summary["retries"], 0, "a pushback is no failed attempt: {stdout}");
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0), "{stdout}");
    let written = read_output(&dir.join("out/readings.jsonl"));
    assert_eq!(assert_complete_and_ordered(&written).values().sum::<u64>(), summary["produced"]);
}

/// A closed terminal or SSH session sends SIGHUP: the node stops as on
/// SIGTERM, delivering what it holds and printing its summary (it used to
/// die at once, exit 129, a third of its readings never sent).
#[test]
fn sighup_stops_the_node_cleanly_with_the_default_settings() {
    let dir = scratch("sighup");
    let (sink, socket) = start_sink(&dir, "sink", "127.0.0.1:0", &[]);
    let env = [("GRPC_SERVER_SOCKET", socket), ("SENSOR_COUNT", "4".into())];
    let node = Process::start("node", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(4));
    node.signal(libc::SIGHUP);
    let (code, stdout, stderr) = node.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let summary = summary_fields(&stdout);
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0), "{stdout}");
    let written = read_output(&dir.join("out/readings.jsonl"));
    assert_eq!(assert_complete_and_ordered(&written).values().sum::<u64>(), summary["produced"]);
}

#[test]
fn a_second_signal_stops_the_node_at_once_and_counts_what_it_held() {
    let dir = scratch("second-signal");
    // Nothing listens there.
    let port = free_port();
    let env = [
        ("GRPC_SERVER_SOCKET", format!("127.0.0.1:{port}")),
        ("SHUTDOWN_TIMEOUT", "1h".into()),
        ("LOG_FORMAT", "json".into()),
    ];
    let mut node = Process::start("node", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(2));
    node.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_secs(1));
    assert!(node.child.try_wait().unwrap().is_none(), "still draining after the first signal");
    node.signal(libc::SIGINT);
    let (code, stdout, stderr) = node.wait(Duration::from_secs(5));
    assert_eq!(code, 0, "{stderr}");
    let summary = summary_fields(&stdout);
    assert!(summary["produced"] > 0);
    assert_eq!(summary["dropped"], summary["produced"], "{stdout}");
    assert_eq!(dropped_by(&stdout, "shutdown"), summary["produced"], "{stdout}");
    // The drop is logged at error level with its reason and count.
    let logged: u64 = json_lines(&stderr)
        .iter()
        .filter(|line| line["level"] == "ERROR" && line["reason"] == "shutdown")
        .map(|line| line["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(logged, summary["produced"], "{stderr}");
}

#[test]
fn drops_under_a_drop_policy_are_all_logged_with_their_reason() {
    let dir = scratch("drop-logs");
    let port = free_port();
    let env = [
        ("GRPC_SERVER_SOCKET", format!("127.0.0.1:{port}")),
        ("SENSOR_COUNT", "4".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "200".into()),
        ("OVERFLOW_POLICY", "drop-newest".into()),
        ("QUEUE_CAPACITY", "50".into()),
        ("BATCH_SIZE", "10".into()),
        ("SHUTDOWN_TIMEOUT", "500ms".into()),
        ("LOG_FORMAT", "json".into()),
    ];
    let node = Process::start("node", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_millis(2500));
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    let lines = json_lines(&stderr);
    for reason in ["overflow_newest", "shutdown"] {
        let logged: u64 = lines
            .iter()
            .filter(|line| line["level"] == "ERROR" && line["reason"] == reason)
            .map(|line| line["dropped"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(logged, dropped_by(&stdout, reason), "{reason}: {stdout}");
    }
    assert!(dropped_by(&stdout, "overflow_newest") > 0, "{stdout}");
}

/// GET `path` on `127.0.0.1:port`: the status code and the body.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    let status = page.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = page.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned();
    (status, body)
}

#[test]
fn a_node_with_slow_sensors_stays_ready_while_its_sink_answers() {
    let dir = scratch("ready-slow");
    let (sink, socket) = start_sink(&dir, "sink", "127.0.0.1:0", &[]);
    let env = [
        ("GRPC_SERVER_SOCKET", socket),
        ("SENSOR_VALUE_RATE_PER_SECOND", "0.05".into()),
        ("METRICS_ADDR", "127.0.0.1:0".into()),
    ];
    let node = Process::start("node", NODE, &[], &env, &dir);
    let metrics = node.metrics_address().port();
    let answers: Vec<u16> = (0..15)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(200));
            get(metrics, "/readyz").0
        })
        .collect();
    assert!(answers.iter().all(|status| *status == 200), "{answers:?}");
    // With the sink gone, the next attempt tells.
    let (_, _, _) = sink.terminate(Duration::from_secs(60));
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr} {stdout}");
}

#[test]
fn metrics_show_every_label_from_the_start_with_canonical_code_names() {
    let dir = scratch("metric-labels");
    // A sink address where nothing listens.
    let env = [("GRPC_SERVER_SOCKET", format!("127.0.0.1:{}", free_port())), ("METRICS_ADDR", "127.0.0.1:0".into())];
    let node = Process::start("node", NODE, &[], &env, &dir);
    let metrics = node.metrics_address().port();
    let (_, page) = get(metrics, "/metrics");
    let _ = node.terminate(Duration::from_secs(60));
    for line in [
        "telemetry_node_readings_dropped_total{reason=\"refused\"} 0",
        "telemetry_node_readings_dropped_total{reason=\"spool_full\"} 0",
        "telemetry_node_retries_total{code=\"UNAVAILABLE\"}",
        "telemetry_node_batches_refused_total{code=\"INVALID_ARGUMENT\"} 0",
    ] {
        assert!(page.contains(line), "{line} in {page}");
    }
    assert!(!page.contains("Unavailable"), "{page}");
}

#[test]
fn the_shared_token_appears_in_no_log_line_summary_or_metric() {
    let dir = scratch("secret");
    let token = "s3cret-T0ken-that-must-not-leak";
    let (sink, socket) = start_sink(
        &dir,
        "sink",
        "127.0.0.1:0",
        &[
            ("SINK_AUTH_TOKEN", token.into()),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("LOGGER_MIN_LOG_LEVEL", "trace".into()),
        ],
    );
    let sink_metrics = sink.metrics_address().port();
    let mut outputs = Vec::new();
    // One node with the right token, one with a wrong one (refused).
    for (name, given) in [("node-right", token.to_owned()), ("node-wrong", format!("{token}-wrong"))] {
        let env: HashMap<&str, String> = HashMap::from([
            ("GRPC_SERVER_SOCKET", socket.clone()),
            ("SINK_AUTH_TOKEN", given),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("LOGGER_MIN_LOG_LEVEL", "trace".into()),
            ("LOG_FORMAT", "json".into()),
        ]);
        let env: Vec<(&str, String)> = env.into_iter().collect();
        let node = Process::start(name, NODE, &[], &env, &dir);
        let node_metrics = node.metrics_address().port();
        std::thread::sleep(Duration::from_secs(2));
        outputs.push(get(node_metrics, "/metrics").1);
        outputs.push(get(sink_metrics, "/metrics").1);
        let (_, stdout, stderr) = node.terminate(Duration::from_secs(60));
        outputs.extend([stdout, stderr]);
    }
    let (_, stdout, stderr) = sink.terminate(Duration::from_secs(60));
    outputs.extend([stdout, stderr]);
    assert!(outputs.iter().any(|text| text.contains("[redacted]")), "the token's setting is shown as redacted");
    for text in &outputs {
        assert!(!text.contains("s3cret-T0ken"), "the token leaked: {text}");
    }
}
