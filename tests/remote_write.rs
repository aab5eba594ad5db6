//! The remote-write output against real databases (Debian's
//! `victoria-metrics` and `prometheus` packages), checked by querying the
//! database back, reading by reading. Where a database is not installed the
//! test says `skipped: … not installed`; under CI (`CI` set) it fails.

mod common;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use common::{
    Pki, Process,
    database::{Database, Kind, assert_each_reading_once, http_get, installed},
    fast_retries, free_port, peak_rss, scratch, summary_fields, wait_for_port,
};
use telemetry_node::proto::{
    SensorValue, SensorValuesRequest, sensor_service_client::SensorServiceClient, sensor_value::Measurement,
};

const NODE: &str = env!("CARGO_BIN_EXE_telemetry-node");

/// What a sink binds to when the kernel may pick its port.
const ANY_PORT: &str = "127.0.0.1:0";

fn sink_env(socket: &str, database: &Database) -> Vec<(&'static str, String)> {
    vec![
        ("GRPC_SERVER_SOCKET", socket.to_owned()),
        ("OUTPUT", "remote-write".into()),
        ("REMOTE_WRITE_URL", database.url()),
    ]
}

/// A busy node with fast retries that never gives a batch up.
fn tuned_node(socket: &str, id: &str) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("GRPC_SERVER_SOCKET", socket.to_owned()),
        ("NODE_ID", id.to_owned()),
        ("SENSOR_COUNT", "4".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "50".into()),
        ("REQUEST_RATE_PER_SECOND", "inf".into()),
        ("BATCH_SIZE", "50".into()),
        ("BATCH_TIMEOUT", "100ms".into()),
        ("RPC_TIMEOUT", "5s".into()),
        ("SHUTDOWN_TIMEOUT", "30s".into()),
    ];
    env.extend(fast_retries());
    env
}

/// Everything as users get it, but the address and a stable identity.
fn default_node(socket: &str, id: &str) -> Vec<(&'static str, String)> {
    vec![("GRPC_SERVER_SOCKET", socket.to_owned()), ("NODE_ID", id.to_owned())]
}

/// Stops a node and returns its summary, checking it dropped nothing.
fn stop_node(node: Process) -> std::collections::HashMap<String, u64> {
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    let summary = summary_fields(&stdout);
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0), "{stdout}");
    summary
}

fn stop_sink(sink: Process) -> String {
    let (code, stdout, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    stdout
}

/// Starts a sink on `socket` (on [`ANY_PORT`], the kernel picks the port),
/// and returns it with the address it reports listening on.
fn start_sink(dir: &Path, name: &'static str, socket: &str, database: &Database) -> (Process, String) {
    let (sink, address) = Process::start_sink(name, &sink_env(socket, database), dir);
    (sink, address.to_string())
}

/// A tuned node, with `extra` settings on top, runs for 3 s into a sink
/// writing to `kind`: it produces more than `least` readings, the sink
/// refuses none, and each is in the database once.
fn every_reading_once(kind: Kind, name: &str, extra: &[(&'static str, &str)], least: u64) {
    let dir = scratch(name);
    let Some(database) = Database::start(kind, &dir) else { return };
    let (sink, socket) = start_sink(&dir, "sink", ANY_PORT, &database);
    let mut env = tuned_node(&socket, "node-a");
    env.extend(extra.iter().map(|(variable, value)| (*variable, (*value).to_owned())));
    let node = Process::start("node", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(3));
    let summary = stop_node(node);
    let (code, _, log) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(summary["produced"] > least, "{summary:?}");
    assert!(!log.contains("Refused a request."), "{log}");
    assert_each_reading_once(&database, summary["produced"]);
    // The sink read the database's clock with a write of no samples, which
    // the database takes without a word (a GET of the write endpoint was
    // logged by VictoriaMetrics as a corrupt snappy body at every start).
    let logged = database.log();
    assert!(!logged.contains("snappy") && !logged.contains("cannot"), "{logged}");
}

#[test]
fn every_reading_lands_in_victoria_metrics_once() {
    every_reading_once(Kind::VictoriaMetrics, "rw-vm", &[], 300);
}

#[test]
fn every_reading_lands_in_prometheus_once_and_in_order() {
    every_reading_once(Kind::Prometheus, "rw-prometheus", &[], 300);
}

/// Sensors at 1000 readings a second each, a reading every millisecond: a
/// late tick of the node's timer fires in the same millisecond as the next,
/// yet each reading is in a millisecond of its own, so that every one is
/// stored (Prometheus refuses a second sample in a millisecond;
/// VictoriaMetrics with its 1 ms de-duplication keeps one).
const A_READING_EVERY_MILLISECOND: [(&str, &str); 3] =
    [("SENSOR_COUNT", "8"), ("SENSOR_VALUE_RATE_PER_SECOND", "1000"), ("BATCH_SIZE", "1000")];

#[test]
fn a_reading_every_millisecond_lands_in_prometheus_every_one() {
    every_reading_once(Kind::Prometheus, "rw-ms-prometheus", &A_READING_EVERY_MILLISECOND, 8000);
}

#[test]
fn a_reading_every_millisecond_lands_in_victoria_metrics_every_one() {
    every_reading_once(Kind::VictoriaMetrics, "rw-ms-vm", &A_READING_EVERY_MILLISECOND, 8000);
}

/// How a database fails for ten seconds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// Stopped, then started again.
    Down,
    /// Stalled (SIGSTOP) with the connections open, then let go on: the
    /// sink's requests time out, and the database applies them afterwards.
    Stalled,
}

/// The database out for ten seconds mid-run, under a node writing through
/// a sink (`through_sink`) or to the database itself: nothing is lost or
/// stored twice, and whoever holds the data meanwhile (the node) is told to
/// wait (pushed back by the sink, or retrying) with bounded memory.
fn database_out_for_ten_seconds(
    outage: Outage,
    kind: Kind,
    name: &str,
    node_env: fn(&str, &str) -> Vec<(&'static str, String)>,
    through_sink: bool,
) {
    let dir = scratch(name);
    let Some(mut database) = Database::start(kind, &dir) else { return };
    let (sink, node) = if through_sink {
        let (sink, socket) = start_sink(&dir, "sink", ANY_PORT, &database);
        (Some(sink), Process::start("node", NODE, &[], &node_env(&socket, "node-a"), &dir))
    } else {
        (None, Process::start("node", NODE, &[], &direct(node_env("", "node-a"), &database), &dir))
    };
    std::thread::sleep(Duration::from_secs(2));
    match outage {
        Outage::Down => database.stop(),
        Outage::Stalled => database.signal(libc::SIGSTOP),
    }
    std::thread::sleep(Duration::from_secs(10));
    let holder = sink.as_ref().map_or(node.child.id(), |sink| sink.child.id());
    let rss = peak_rss(holder);
    match outage {
        Outage::Down => database.run(),
        Outage::Stalled => database.signal(libc::SIGCONT),
    }
    std::thread::sleep(Duration::from_secs(4));
    let summary = stop_node(node);
    let sink_summary = sink.map(stop_sink).unwrap_or_default();
    let told = if through_sink { summary["pushbacks"] } else { summary["retries"] };
    assert!(told > 0, "the node was pushed back or retried: {summary:?} / {sink_summary}");
    assert!(rss < 64 << 20, "the sink or node held {} MiB", rss >> 20);
    assert_each_reading_once(&database, summary["produced"]);
}

#[test]
fn the_database_down_for_ten_seconds_loses_nothing_and_pushes_back() {
    database_out_for_ten_seconds(Outage::Down, Kind::VictoriaMetrics, "rw-db-down", tuned_node, true);
}

#[test]
fn the_database_down_for_ten_seconds_with_the_default_settings() {
    database_out_for_ten_seconds(Outage::Down, Kind::Prometheus, "rw-db-down-defaults", default_node, true);
}

/// A stalled database applies, once let go on, requests the sink gave up
/// on: the node's retries of them are the same samples, which
/// VictoriaMetrics (1 ms de-duplication) stores once. (Prometheus without an
/// out-of-order window refuses such retries; the README says so.)
#[test]
fn the_database_stalled_for_ten_seconds_loses_nothing_and_pushes_back() {
    database_out_for_ten_seconds(Outage::Stalled, Kind::VictoriaMetrics, "rw-db-stalled", tuned_node, true);
}

#[test]
fn the_database_stalled_for_ten_seconds_with_the_default_settings() {
    database_out_for_ten_seconds(Outage::Stalled, Kind::VictoriaMetrics, "rw-db-stalled-defaults", default_node, true);
}

fn sink_killed(kind: Kind, name: &str, node_env: fn(&str, &str) -> Vec<(&'static str, String)>) {
    let dir = scratch(name);
    let Some(database) = Database::start(kind, &dir) else { return };
    // Restarted on the same port: one drawn where the kernel hands out none.
    let socket = format!("127.0.0.1:{}", free_port());
    let (sink, _) = start_sink(&dir, "sink-1", &socket, &database);
    let node = Process::start("node", NODE, &[], &node_env(&socket, "node-a"), &dir);
    std::thread::sleep(Duration::from_secs(3));
    sink.signal(libc::SIGKILL);
    let _ = sink.wait(Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let (sink, _) = start_sink(&dir, "sink-2", &socket, &database);
    std::thread::sleep(Duration::from_secs(3));
    let summary = stop_node(node);
    stop_sink(sink);
    assert_each_reading_once(&database, summary["produced"]);
    // Sent again, besides the readings: at most what was in flight when the
    // sink was killed (one batch per lane), whose answers the kill lost.
    let batch =
        node_env("", "").iter().find(|(name, _)| *name == "BATCH_SIZE").map_or(1000, |(_, v)| v.parse().unwrap());
    let lanes =
        node_env("", "").iter().find(|(name, _)| *name == "SENSOR_COUNT").map_or(1, |(_, v)| v.parse().unwrap());
    common::database::assert_sent_at_most(&database, summary["produced"] + lanes * batch);
}

#[test]
fn the_sink_killed_and_restarted_loses_and_double_counts_nothing() {
    sink_killed(Kind::VictoriaMetrics, "rw-sink-kill", tuned_node);
}

#[test]
fn the_sink_killed_and_restarted_with_the_default_settings() {
    // A kill can lose the answer to a batch the database took: the node sends
    // it again, which Prometheus takes only with an out-of-order window.
    sink_killed(Kind::PrometheusWithWindow, "rw-sink-kill-defaults", default_node);
}

/// Forwards each connection accepted on `listener` to the next of
/// `backends` in turn, until the test ends.
fn round_robin(listener: std::net::TcpListener, backends: Vec<u16>) {
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { continue };
            let Ok(backend) = std::net::TcpStream::connect(("127.0.0.1", backends[n % backends.len()])) else {
                continue;
            };
            for (mut from, mut to) in [(client.try_clone().unwrap(), backend.try_clone().unwrap()), (backend, client)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
}

#[test]
fn two_sink_replicas_behind_a_round_robin_store_everything_once() {
    two_sink_replicas("rw-replicas", tuned_node);
}

#[test]
fn two_sink_replicas_with_the_default_settings() {
    two_sink_replicas("rw-replicas-defaults", default_node);
}

fn two_sink_replicas(name: &str, node_env: fn(&str, &str) -> Vec<(&'static str, String)>) {
    let dir = scratch(name);
    let Some(database) = Database::start(Kind::VictoriaMetrics, &dir) else { return };
    let (one, two) = (start_sink(&dir, "sink-1", ANY_PORT, &database), start_sink(&dir, "sink-2", ANY_PORT, &database));
    let port = |address: &str| address.parse::<std::net::SocketAddr>().map(|address| address.port()).unwrap();
    let (one, two, sinks) = (port(&one.1), port(&two.1), [one.0, two.0]);
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let socket = front.local_addr().unwrap().to_string();
    round_robin(front, vec![one, two]);
    let nodes: Vec<Process> = ["node-a", "node-b", "node-c", "node-d"]
        .into_iter()
        .map(|id| {
            let name: &'static str = Box::leak(id.to_owned().into_boxed_str());
            Process::start(name, NODE, &[], &node_env(&socket, id), &dir)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let produced: u64 = nodes.into_iter().map(|node| stop_node(node)["produced"]).sum();
    let accepted: Vec<u64> = sinks
        .into_iter()
        .map(|sink| {
            let summary = stop_sink(sink);
            summary_fields(&summary)["accepted"]
        })
        .collect();
    assert!(accepted.iter().all(|n| *n > 0), "both replicas took readings: {accepted:?}");
    assert_each_reading_once(&database, produced);
    // Nothing failed: nothing was sent twice either.
    common::database::assert_sent_at_most(&database, produced);
}

fn reading(sensor: &str, value: i64, at: SystemTime) -> SensorValue {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    SensorValue {
        sensor_name: sensor.into(),
        measurement: Some(Measurement {
            sensor_value: Some(value),
            created_at: Some(prost_types::Timestamp {
                seconds: since.as_secs() as i64,
                nanos: since.subsec_nanos() as i32,
            }),
        }),
        sequence: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_database_refuses_is_refused_counted_and_logged_and_the_rest_flows() {
    let dir = scratch("rw-refused");
    let Some(database) = Database::start(Kind::Prometheus, &dir) else { return };
    let mut env = sink_env(ANY_PORT, &database);
    env.push(("METRICS_ADDR", ANY_PORT.into()));
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let port = address.port();
    let metrics = sink.metrics_address().port();
    let mut client = SensorServiceClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
    let now = SystemTime::now();
    let at = |ms: u64| now - Duration::from_secs(60) + Duration::from_millis(ms);
    let send = |items: Vec<SensorValue>, batch: u64| SensorValuesRequest {
        items,
        node_id: "n".into(),
        lane: 0,
        batch_sequence: batch,
    };
    let mut client2 = client.clone();
    client.send_sensor_values(send(vec![reading("x", 1, at(100)), reading("x", 2, at(200))], 1)).await.unwrap();
    // Older than what the series holds: Prometheus refuses the request.
    let refused = client2.send_sensor_values(send(vec![reading("x", 3, at(50))], 2)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("400"), "{}", refused.message());
    // The rest flows.
    client.send_sensor_values(send(vec![reading("x", 4, at(300)), reading("y", 5, at(300))], 3)).await.unwrap();
    let (_, page) = http_get(metrics, "/metrics").unwrap();
    drop((client, client2));
    let stdout = stop_sink(sink);
    let stderr = std::fs::read_to_string(dir.join("sink.err")).unwrap();
    assert!(stderr.contains("The database refused samples"), "{stderr}");
    assert!(page.contains("telemetry_sink_requests_rejected_total{reason=\"database_refused\"} 1"), "{page}");
    assert!(page.contains("telemetry_sink_remote_write_requests_total{status=\"4xx\"} 1"), "{page}");
    assert!(stdout.contains("rejected=1"), "{stdout}");
    let series = database.samples();
    let x: Vec<f64> = series[&("n".to_owned(), "x".to_owned())].iter().map(|(_, v)| *v).collect();
    assert_eq!(x, vec![1.0, 2.0, 4.0]);
    assert_eq!(series[&("n".to_owned(), "y".to_owned())].len(), 1);
}

/// Two readings of one sensor in one millisecond: with the same value they
/// are one sample, stored and acknowledged; with two values one of them
/// could not be stored, so the request is refused and nothing of it stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_values_of_a_sensor_in_one_millisecond_are_refused_and_nothing_of_them_is_stored() {
    let dir = scratch("rw-same-ms");
    let Some(database) = Database::start(Kind::Prometheus, &dir) else { return };
    let mut env = sink_env(ANY_PORT, &database);
    env.push(("METRICS_ADDR", ANY_PORT.into()));
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let metrics = sink.metrics_address().port();
    let mut client = SensorServiceClient::connect(format!("http://{address}")).await.unwrap();
    // On a millisecond boundary, so that 0 to 999 µs after it are one millisecond.
    let ago = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap() - Duration::from_secs(60);
    let start = SystemTime::UNIX_EPOCH + Duration::from_millis(ago.as_millis() as u64);
    let at = |ms: u64, us: u64| start + Duration::from_millis(ms) + Duration::from_micros(us);
    let send = |items: Vec<SensorValue>, batch: u64| SensorValuesRequest {
        items,
        node_id: "n".into(),
        lane: 0,
        batch_sequence: batch,
    };
    let twice = vec![reading("x", 1, at(10, 100)), reading("y", 5, at(10, 0)), reading("x", 1, at(10, 900))];
    client.send_sensor_values(send(twice, 1)).await.unwrap();
    let clash = vec![reading("x", 2, at(20, 100)), reading("y", 6, at(20, 0)), reading("x", 3, at(20, 900))];
    let refused = client.send_sensor_values(send(clash, 2)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("item 2: sensor \"x\""), "{}", refused.message());
    assert!(refused.message().contains("one sample per millisecond"), "{}", refused.message());
    let (_, page) = http_get(metrics, "/metrics").unwrap();
    drop(client);
    stop_sink(sink);
    assert!(page.contains("telemetry_sink_requests_rejected_total{reason=\"invalid\"} 1"), "{page}");
    assert!(page.contains("telemetry_sink_readings_accepted_total 3"), "{page}");
    let series = database.samples();
    let base = start.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert_eq!(series[&("n".to_owned(), "x".to_owned())], vec![(base + 10, 1.0)]);
    assert_eq!(series[&("n".to_owned(), "y".to_owned())], vec![(base + 10, 5.0)]);
}

/// What another sender may send that a database would drop while answering
/// OK, or that would stop it taking anything (Prometheus): a sensor's
/// readings out of time order are stored in order; the same millisecond
/// with another value further on, a reading from 1970 or from the year
/// 9999 refuse the request; and the database takes the present after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_out_of_order_or_out_of_time_are_stored_in_order_or_refused() {
    let dir = scratch("rw-out-of-order");
    let Some(database) = Database::start(Kind::Prometheus, &dir) else { return };
    let (sink, address) = start_sink(&dir, "sink", ANY_PORT, &database);
    let mut client = SensorServiceClient::connect(format!("http://{address}")).await.unwrap();
    let ago = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap() - Duration::from_secs(60);
    let start = SystemTime::UNIX_EPOCH + Duration::from_millis(ago.as_millis() as u64);
    let at = |ms: u64| start + Duration::from_millis(ms);
    let send = |items: Vec<SensorValue>, batch: u64| SensorValuesRequest {
        items,
        node_id: "n".into(),
        lane: 0,
        batch_sequence: batch,
    };
    let backwards =
        vec![reading("x", 9, at(9)), reading("x", 8, at(8)), reading("y", 1, at(8)), reading("x", 5, at(5))];
    client.send_sensor_values(send(backwards, 1)).await.unwrap();
    let apart = vec![reading("x", 1, at(20)), reading("x", 2, at(21)), reading("x", 3, at(20))];
    let refused = client.send_sensor_values(send(apart, 2)).await.unwrap_err();
    assert!(refused.message().contains("item 2: sensor \"x\""), "{}", refused.message());
    let year_9999 = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    let ahead = vec![reading("x", 4, at(30)), reading("x", 5, year_9999)];
    let refused = client.send_sensor_values(send(ahead, 3)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("REMOTE_WRITE_MAX_AHEAD (10m)"), "{}", refused.message());
    let old = vec![reading("x", 6, SystemTime::UNIX_EPOCH + Duration::from_secs(1))];
    let refused = client.send_sensor_values(send(old, 4)).await.unwrap_err();
    assert!(refused.message().contains("REMOTE_WRITE_MAX_AGE (30days)"), "{}", refused.message());
    // The present is still taken.
    client.send_sensor_values(send(vec![reading("x", 7, at(40))], 5)).await.unwrap();
    drop(client);
    stop_sink(sink);
    let series = database.samples();
    let base = start.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
    let x = &series[&("n".to_owned(), "x".to_owned())];
    assert_eq!(x, &vec![(base + 5, 5.0), (base + 8, 8.0), (base + 9, 9.0), (base + 40, 7.0)]);
    assert_eq!(series[&("n".to_owned(), "y".to_owned())], vec![(base + 8, 1.0)]);
}

/// Requests of one node that queue up while the database stalls: the sink
/// sends them one after another, never two in one write or two at once
/// (Prometheus would keep only the samples in order, and answer OK for
/// all). So exactly the readings of the requests answered OK are stored: for
/// a node whose requests go back in time, one whose requests clash in the
/// same milliseconds, and one that sends a sensor on two lanes. A node with
/// more requests waiting than its share is pushed back at once, and holds
/// up no other node: while the database stalls, each node has a write under
/// way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_one_node_queued_behind_a_stalled_database_are_stored_exactly_as_answered() {
    let dir = scratch("rw-one-sender");
    let Some(database) = Database::start(Kind::Prometheus, &dir) else { return };
    let mut env = sink_env(ANY_PORT, &database);
    env.push(("METRICS_ADDR", ANY_PORT.into()));
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let metrics = sink.metrics_address().port();
    let client = SensorServiceClient::connect(format!("http://{address}")).await.unwrap();
    let ago = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap() - Duration::from_secs(30);
    let base = ago.as_millis() as u64;
    let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(base + ms);
    // Request i of "back": 5 readings, each request earlier than the one
    // before. Of "clash": the same 5 milliseconds, other values; of
    // "lanes" the same, on lanes 0 and 1 in turn.
    let request = |node: &str, i: u64| {
        let start = if node == "back" { (100 - i) * 5 } else { 0 };
        let items = (0..5).map(|k| reading("x", (1000 * i + k) as i64, at(start + k))).collect();
        let lane = if node == "lanes" { (i % 2) as u32 } else { 0 };
        SensorValuesRequest { items, node_id: node.into(), lane, batch_sequence: i }
    };
    // The sink has heard from the database (and knows its clock) before it
    // stalls.
    let mut sends = vec![{
        let (mut client, request) = (client.clone(), request("warm", 0));
        let answer = client.send_sensor_values(request.clone()).await;
        tokio::spawn(async move { (request, answer) })
    }];
    database.signal(libc::SIGSTOP);
    // "back" first, with more requests than the sink keeps waiting at all.
    for (node, count) in [("back", 80), ("clash", 20), ("lanes", 20)] {
        for i in 0..count {
            let (mut client, request) = (client.clone(), request(node, i));
            sends.push(tokio::spawn(async move { (request.clone(), client.send_sensor_values(request).await) }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Polled with a deadline: on a busy machine a write may get under way
    // late.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut page = String::new();
    while !page.contains("telemetry_sink_remote_write_in_flight 3") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        page = http_get(metrics, "/metrics").map(|(_, page)| page).unwrap_or_default();
    }
    database.signal(libc::SIGCONT);
    assert!(page.contains("telemetry_sink_remote_write_in_flight 3"), "each node has a write under way: {page}");
    let mut answered: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    let mut pushed_back = 0;
    for send in sends {
        let (request, answer) = send.await.unwrap();
        let stored = answered.entry(request.node_id.clone()).or_default();
        match answer {
            Ok(_) => {
                for item in &request.items {
                    let measurement = item.measurement.as_ref().unwrap();
                    let time = measurement.created_at.unwrap();
                    let millis = time.seconds * 1000 + i64::from(time.nanos) / 1_000_000;
                    stored.push((millis, measurement.sensor_value.unwrap() as f64));
                }
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => pushed_back += 1,
            Err(_) => {}
        }
    }
    // Of "back", at most 16 wait and one is under way.
    assert!(pushed_back >= 80 - 17, "{pushed_back} pushed back");
    drop(client);
    stop_sink(sink);
    let series = database.samples();
    for (node, mut expected) in answered {
        expected.sort_by_key(|(millis, _)| *millis);
        assert!(!expected.is_empty(), "{node}: some request was answered OK");
        let stored = series.get(&(node.clone(), "x".to_owned())).cloned().unwrap_or_default();
        assert_eq!(stored, expected, "{node}: the database holds exactly what was answered OK");
    }
}

/// Sends the same batch twice, as a node does when the sink's answer is
/// lost, and checks that the database holds it once.
async fn a_batch_sent_again_is_stored_once(kind: Kind, name: &str) {
    let dir = scratch(name);
    let Some(database) = Database::start(kind, &dir) else { return };
    let (sink, address) = start_sink(&dir, "sink", ANY_PORT, &database);
    let mut client = SensorServiceClient::connect(format!("http://{address}")).await.unwrap();
    let start = SystemTime::now() - Duration::from_secs(60);
    let items = (0..10).map(|i| reading("x", i, start + Duration::from_millis(10 * i as u64))).collect();
    let batch = SensorValuesRequest { items, node_id: "n".into(), lane: 0, batch_sequence: 7 };
    client.send_sensor_values(batch.clone()).await.unwrap();
    client.send_sensor_values(batch).await.unwrap();
    drop(client);
    stop_sink(sink);
    let series = database.samples();
    let values: Vec<f64> = series[&("n".to_owned(), "x".to_owned())].iter().map(|(_, v)| *v).collect();
    assert_eq!(values, (0..10).map(|i| i as f64).collect::<Vec<_>>());
    // The sink keeps no memory in remote-write mode: the database was sent
    // the batch twice and its 1 ms de-duplication (the setting docs/outputs.md
    // asks for) kept it once; no more than that was sent.
    common::database::assert_sent_at_most(&database, 20);
    if let Some(sent) = common::database::samples_sent(&database) {
        assert_eq!(sent, 20, "the database saw both copies, and stored one");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_is_stored_once_in_victoria_metrics() {
    a_batch_sent_again_is_stored_once(Kind::VictoriaMetrics, "rw-again-vm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_is_stored_once_in_prometheus_with_a_window() {
    a_batch_sent_again_is_stored_once(Kind::PrometheusWithWindow, "rw-again-prometheus").await;
}

/// vmagent serving https on a loopback port, relaying into `database`.
fn tls_relay(dir: &Path, database: &Database, cert: &str, key: &str) -> Option<(Process, u16)> {
    if !installed("vmagent") {
        assert!(std::env::var_os("CI").is_none(), "vmagent must be installed under CI");
        eprintln!("skipped: vmagent not installed");
        return None;
    }
    let port = free_port();
    let args = [
        format!("-remoteWrite.url={}", database.url()),
        format!("-httpListenAddr=127.0.0.1:{port}"),
        format!("-remoteWrite.tmpDataPath={}", dir.join("vmagent").display()),
        "-tls".into(),
        format!("-tlsCertFile={cert}"),
        format!("-tlsKeyFile={key}"),
        "-loggerLevel=WARN".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = Process::start("vmagent", "vmagent", &args, &[], dir);
    wait_for_port(port, Duration::from_secs(30));
    Some((relay, port))
}

#[test]
fn the_sink_writes_to_a_database_over_https_and_refuses_an_unknown_certificate() {
    let dir = scratch("rw-tls");
    let Some(database) = Database::start(Kind::VictoriaMetrics, &dir) else { return };
    let pki = Pki::new(&dir, "ca");
    let (cert, key) = pki.issue("relay", "127.0.0.1");
    let Some((relay, relay_port)) = tls_relay(&dir, &database, &cert, &key) else { return };
    let url = format!("https://127.0.0.1:{relay_port}/api/v1/write");

    // A CA the relay's certificate does not come from: nothing is taken,
    // and the sink says why.
    Pki::new(&dir, "other-ca");
    let mut env = sink_env(ANY_PORT, &database);
    env.retain(|(name, _)| *name != "REMOTE_WRITE_URL");
    env.push(("REMOTE_WRITE_URL", url.clone()));
    let mut wrong = env.clone();
    wrong.push(("REMOTE_WRITE_TLS_CA_CERT", dir.join("other-ca.pem").display().to_string()));
    let (sink, address) = Process::start_sink("sink-wrong-ca", &wrong, &dir);
    // A node as users get it (the right-CA run below is the tuned one).
    let node = Process::start("node-wrong-ca", NODE, &[], &default_node(&address.to_string(), "node-tls"), &dir);
    std::thread::sleep(Duration::from_secs(2));
    let (_, stdout, _) = node.terminate(Duration::from_secs(60));
    assert_eq!(summary_fields(&stdout)["acked"], 0, "{stdout}");
    let (_, _, sink_log) = sink.terminate(Duration::from_secs(30));
    assert!(sink_log.contains("certificate"), "the sink names the TLS failure: {sink_log}");

    // The right CA: every reading lands once.
    let mut env = sink_env(ANY_PORT, &database);
    env.retain(|(name, _)| *name != "REMOTE_WRITE_URL");
    env.push(("REMOTE_WRITE_URL", url));
    env.push(("REMOTE_WRITE_TLS_CA_CERT", dir.join("ca.pem").display().to_string()));
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let node = Process::start("node", NODE, &[], &tuned_node(&address.to_string(), "node-tls-ok"), &dir);
    std::thread::sleep(Duration::from_secs(3));
    let summary = stop_node(node);
    stop_sink(sink);
    let _ = relay.terminate(Duration::from_secs(30));
    assert!(summary["produced"] > 300);
    let only_this = database.samples().keys().filter(|(node, _)| node == "node-tls").count();
    assert_eq!(only_this, 0, "nothing went through with the wrong CA");
    assert_each_reading_once(&database, summary["produced"]);
}

/// A database that asks every client for a certificate (Prometheus with
/// `client_auth_type: RequireAndVerifyClientCert`): without one the sink
/// gets nothing in, the nodes keep their readings and the sink says why;
/// with REMOTE_WRITE_TLS_CLIENT_CERT and _KEY every reading lands once.
#[test]
fn the_sink_shows_its_certificate_to_a_database_that_asks_for_one() {
    let dir = scratch("rw-mtls");
    let Some(database) = Database::start(Kind::PrometheusMutualTls, &dir) else { return };
    let path = |name: &str| dir.join(name).display().to_string();
    let mut env = sink_env(ANY_PORT, &database);
    env.push(("REMOTE_WRITE_TLS_CA_CERT", path("db-ca.pem")));

    // No certificate: nothing is taken, and the sink says why.
    let (sink, address) = Process::start_sink("sink-no-cert", &env, &dir);
    let node = Process::start("node-no-cert", NODE, &[], &default_node(&address.to_string(), "node-no-cert"), &dir);
    std::thread::sleep(Duration::from_secs(2));
    let (_, stdout, _) = node.terminate(Duration::from_secs(60));
    let summary = summary_fields(&stdout);
    assert_eq!(summary["acked"], 0, "{stdout}");
    assert!(summary["produced"] > 0, "{stdout}");
    let (_, _, sink_log) = sink.terminate(Duration::from_secs(30));
    // Prometheus answers a missing certificate with a bad_certificate alert.
    assert!(sink_log.contains("BadCertificate"), "the sink names the TLS failure: {sink_log}");

    // With its certificate: every reading lands once.
    env.push(("REMOTE_WRITE_TLS_CLIENT_CERT", path("sink.crt")));
    env.push(("REMOTE_WRITE_TLS_CLIENT_KEY", path("sink.key")));
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let node = Process::start("node", NODE, &[], &tuned_node(&address.to_string(), "node-mtls"), &dir);
    std::thread::sleep(Duration::from_secs(3));
    let summary = stop_node(node);
    stop_sink(sink);
    assert!(summary["produced"] > 300);
    assert_each_reading_once(&database, summary["produced"]);
}

// A node writing to the database itself (DESTINATION=remote-write), no sink
// between them.

/// A node's settings `env` (made for a sink) turned to write to `database`
/// itself.
fn direct(mut env: Vec<(&'static str, String)>, database: &Database) -> Vec<(&'static str, String)> {
    env.retain(|(variable, _)| *variable != "GRPC_SERVER_SOCKET");
    env.push(("DESTINATION", "remote-write".into()));
    env.push(("REMOTE_WRITE_URL", database.url()));
    env
}

/// A node (`node_env`, `extra` on top) writes to `kind` itself for 3 s: it
/// produces more than `least` readings, every one acknowledged, and each
/// is in the database once.
fn written_by_the_node(
    kind: Kind,
    name: &str,
    node_env: fn(&str, &str) -> Vec<(&'static str, String)>,
    extra: &[(&'static str, &str)],
    least: u64,
) {
    let dir = scratch(name);
    let Some(database) = Database::start(kind, &dir) else { return };
    let mut env = direct(node_env("", "node-a"), &database);
    env.extend(extra.iter().map(|(variable, value)| (*variable, (*value).to_owned())));
    let node = Process::start("node", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(3));
    let summary = stop_node(node);
    assert!(summary["produced"] > least, "{summary:?}");
    assert_each_reading_once(&database, summary["produced"]);
}

#[test]
fn a_node_writing_to_victoria_metrics_itself_lands_every_reading_once() {
    written_by_the_node(Kind::VictoriaMetrics, "direct-vm", tuned_node, &[], 300);
}

#[test]
fn a_node_writing_to_prometheus_itself_lands_every_reading_once_and_in_order() {
    written_by_the_node(Kind::Prometheus, "direct-prometheus", tuned_node, &[], 300);
}

#[test]
fn a_node_writing_to_prometheus_itself_with_the_default_settings() {
    written_by_the_node(Kind::Prometheus, "direct-prometheus-defaults", default_node, &[], 10);
}

#[test]
fn a_node_writing_a_reading_every_millisecond_to_prometheus_itself_lands_every_one() {
    written_by_the_node(Kind::Prometheus, "direct-ms-prometheus", tuned_node, &A_READING_EVERY_MILLISECOND, 8000);
}

#[test]
fn the_database_down_for_ten_seconds_under_a_node_writing_itself_loses_nothing() {
    database_out_for_ten_seconds(Outage::Down, Kind::VictoriaMetrics, "direct-db-down", tuned_node, false);
}

#[test]
fn the_database_down_for_ten_seconds_under_a_node_writing_itself_with_the_default_settings() {
    database_out_for_ten_seconds(Outage::Down, Kind::Prometheus, "direct-db-down-defaults", default_node, false);
}

#[test]
fn the_database_stalled_for_ten_seconds_under_a_node_writing_itself_loses_nothing() {
    database_out_for_ten_seconds(Outage::Stalled, Kind::VictoriaMetrics, "direct-db-stalled", tuned_node, false);
}

#[test]
fn the_database_stalled_for_ten_seconds_under_a_node_writing_itself_with_the_default_settings() {
    database_out_for_ten_seconds(
        Outage::Stalled,
        Kind::VictoriaMetrics,
        "direct-db-stalled-defaults",
        default_node,
        false,
    );
}

/// POSTs one remote-write sample of the series the node's `sensor` is
/// stored in (`sensor_value{node, sensor}`, or, for a sensor named as a
/// metric, `sensor{node}`) straight to the database, as another writer
/// would.
fn write_one_sample(database: &Database, node: &str, sensor: &str, value: f64, at: SystemTime) {
    use prost::Message;
    use telemetry_node::prompb::{Label, Sample, TimeSeries, WriteRequest};
    let label = |name: &str, value: &str| Label { name: name.into(), value: value.into() };
    let timestamp = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
    let request = WriteRequest {
        timeseries: vec![TimeSeries {
            labels: if sensor.contains('-') {
                vec![label("__name__", "sensor_value"), label("node", node), label("sensor", sensor)]
            } else {
                vec![label("__name__", sensor), label("node", node)]
            },
            samples: vec![Sample { value, timestamp }],
        }],
    };
    let body = snap::raw::Encoder::new().compress_vec(&request.encode_to_vec()).unwrap();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", database.port)).unwrap();
    let head = format!(
        "POST /api/v1/write HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/x-protobuf\r\n\
         Content-Encoding: snappy\r\nX-Prometheus-Remote-Write-Version: 0.1.0\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 204") || answer.starts_with("HTTP/1.1 204"), "{answer}");
}

/// Another writer put a sample of the node's series of `poisoned` a minute
/// ahead: Prometheus (no out-of-order window) refuses every later batch
/// holding that series (400). The node counts those readings as refused and
/// logs the database's message; the `others` sensors' readings flow and are
/// stored, and what the node counts as acknowledged is exactly what the
/// database holds from it.
fn refused_by_the_database(
    name: &str,
    node_env: fn(&str, &str) -> Vec<(&'static str, String)>,
    poisoned: &str,
    others: &[&str],
) {
    let dir = scratch(name);
    let Some(database) = Database::start(Kind::Prometheus, &dir) else { return };
    let ahead = SystemTime::now() + Duration::from_secs(60);
    write_one_sample(&database, "node-a", poisoned, -1.0, ahead);
    let node = Process::start("node", NODE, &[], &direct(node_env("", "node-a"), &database), &dir);
    std::thread::sleep(Duration::from_secs(3));
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    let summary = summary_fields(&stdout);
    assert!(summary["dropped"] > 0 && (others.is_empty() || summary["acked"] > 0), "{stdout}");
    assert_eq!(summary["acked"] + summary["dropped"], summary["produced"], "{stdout}");
    assert!(stdout.contains(&format!("dropped_by=refused:{}", summary["dropped"])), "{stdout}");
    assert!(stderr.contains("the database answered 400 Bad Request") && stderr.contains("out of order"), "{stderr}");
    // The query reads up to now: the other writer's sample is ahead of it.
    let series = database.samples();
    let stored: usize = series.values().map(Vec::len).sum();
    assert_eq!(stored as u64, summary["acked"], "acknowledged = stored");
    let sensors: Vec<&str> = series.keys().map(|(_, sensor)| sensor.as_str()).collect();
    assert_eq!(sensors, others, "none of {poisoned}'s readings was taken");
}

#[test]
fn batches_the_database_refuses_are_counted_as_refused_by_the_node_and_the_rest_flows() {
    refused_by_the_database("direct-refused", tuned_node, "sensor-1", &["sensor-2", "sensor-3", "sensor-4"]);
}

#[test]
fn batches_the_database_refuses_are_counted_as_refused_with_the_default_settings() {
    refused_by_the_database("direct-refused-defaults", default_node, "sensor", &[]);
}

/// A URL whose path the database does not serve is the node's own setting
/// gone wrong, not bad data: VictoriaMetrics answers it 400 (`unsupported
/// path`), which the node retries like an outage instead of dropping the
/// readings as refused.
fn a_path_the_database_does_not_serve(name: &str, node_env: fn(&str, &str) -> Vec<(&'static str, String)>) {
    let dir = scratch(name);
    let Some(database) = Database::start(Kind::VictoriaMetrics, &dir) else { return };
    let mut env = direct(node_env("", "node-a"), &database);
    for (variable, value) in env.iter_mut() {
        if *variable == "REMOTE_WRITE_URL" {
            *value = value.replace("/api/v1/write", "/nowhere/api/v1/write");
        }
    }
    let node = Process::start("node", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(3));
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    let summary = summary_fields(&stdout);
    assert!(summary["retries"] > 0 && summary["acked"] == 0, "{stdout}");
    assert!(!stdout.contains("refused:"), "{stdout}");
    assert!(stderr.contains("unsupported path"), "{stderr}");
}

#[test]
fn a_path_the_database_does_not_serve_is_retried_not_refused() {
    a_path_the_database_does_not_serve("direct-wrong-path", |socket, id| {
        let mut env = tuned_node(socket, id);
        env.push(("SHUTDOWN_TIMEOUT", "1s".into()));
        env
    });
}

#[test]
fn a_path_the_database_does_not_serve_is_retried_with_the_default_settings() {
    a_path_the_database_does_not_serve("direct-wrong-path-defaults", default_node);
}

/// Mutual TLS from a node writing to the database itself: without its
/// certificate nothing is taken (kept and retried, the alert logged); with
/// it every reading lands once.
#[test]
fn a_node_writing_itself_shows_its_certificate_to_a_database_that_asks_for_one() {
    let dir = scratch("direct-mtls");
    let Some(database) = Database::start(Kind::PrometheusMutualTls, &dir) else { return };
    let path = |name: &str| dir.join(name).display().to_string();
    // With the default settings, as the sink's run without one.
    let mut env = direct(default_node("", "node-no-cert"), &database);
    env.push(("REMOTE_WRITE_TLS_CA_CERT", path("db-ca.pem")));
    let node = Process::start("node-no-cert", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(3));
    let (_, stdout, stderr) = node.terminate(Duration::from_secs(60));
    let summary = summary_fields(&stdout);
    assert!(summary["produced"] > 0 && summary["acked"] == 0 && summary["retries"] > 0, "{stdout}");
    assert!(!stdout.contains("refused:"), "{stdout}");
    assert!(stderr.contains("BadCertificate"), "the node names the TLS failure: {stderr}");

    let mut env = direct(tuned_node("", "node-mtls"), &database);
    env.push(("REMOTE_WRITE_TLS_CA_CERT", path("db-ca.pem")));
    env.push(("REMOTE_WRITE_TLS_CLIENT_CERT", path("sink.crt")));
    env.push(("REMOTE_WRITE_TLS_CLIENT_KEY", path("sink.key")));
    let node = Process::start("node", NODE, &[], &env, &dir);
    std::thread::sleep(Duration::from_secs(3));
    let summary = stop_node(node);
    assert!(summary["produced"] > 300);
    assert_each_reading_once(&database, summary["produced"]);
}

/// Serves, on a loopback port, a stand-in for a database whose clock is
/// `behind` the machine's: every answer (204) carries that clock as its
/// `Date` (none with `None`). Counts the POSTs it answers.
async fn database_with_a_clock_behind(
    behind: Option<Duration>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let posts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&posts);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let posts = std::sync::Arc::clone(&counted);
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let (mut line, mut length, mut post) = (String::new(), 0usize, false);
                    while stream.read_line(&mut line).await.unwrap_or(0) > 0 && line != "\r\n" {
                        post |= line.starts_with("POST ");
                        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                        line.clear();
                    }
                    if line != "\r\n" {
                        return;
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    // Writes of samples; the empty write that reads the clock
                    // (snappy's one byte for nothing) is not one.
                    if post && body != [0] {
                        posts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    let date = behind.map_or(String::new(), |behind| {
                        format!("Date: {}\r\n", httpdate::fmt_http_date(SystemTime::now() - behind))
                    });
                    let answer = format!("HTTP/1.1 204 No Content\r\n{date}Content-Length: 0\r\n\r\n");
                    if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, posts)
}

/// The sink checks REMOTE_WRITE_MAX_AGE / _MAX_AHEAD by the database's
/// clock, read from its answers' `Date` (and, before the first request, a
/// GET): a reading in time by the sink's clock but 40 days ahead of a
/// database's (VictoriaMetrics would drop it and answer OK) is refused, and
/// one in time by the database's clock is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_judges_readings_by_the_databases_clock() {
    let dir = scratch("rw-database-clock");
    let behind = Duration::from_secs(40 * 24 * 3600);
    let (port, posts) = database_with_a_clock_behind(Some(behind)).await;
    let env = |port: u16| {
        [
            ("GRPC_SERVER_SOCKET", ANY_PORT.to_owned()),
            ("OUTPUT", "remote-write".to_owned()),
            ("REMOTE_WRITE_URL", format!("http://127.0.0.1:{port}/api/v1/write")),
        ]
    };
    let (sink, address) = Process::start_sink("sink", &env(port), &dir);
    let mut client = SensorServiceClient::connect(format!("http://{address}")).await.unwrap();
    let send = |items: Vec<SensorValue>, batch: u64| SensorValuesRequest {
        items,
        node_id: "n".into(),
        lane: 0,
        batch_sequence: batch,
    };
    let now = SystemTime::now();
    let refused = client.send_sensor_values(send(vec![reading("x", 1, now)], 1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("after the database's clock"), "{}", refused.message());
    assert_eq!(posts.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing of it was sent");
    client.send_sensor_values(send(vec![reading("x", 2, now - behind)], 2)).await.unwrap();
    assert_eq!(posts.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(client);
    stop_sink(sink);

    // Answers without a Date: the sink's clock is taken, and it says so.
    let (port, _) = database_with_a_clock_behind(None).await;
    let (sink, address) = Process::start_sink("sink-no-date", &env(port), &dir);
    let mut client = SensorServiceClient::connect(format!("http://{address}")).await.unwrap();
    client.send_sensor_values(send(vec![reading("x", 3, SystemTime::now())], 3)).await.unwrap();
    drop(client);
    let (_, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert!(stderr.contains("carries no usable Date"), "{stderr}");
}

/// Connections to the sink at `1` from `0`, another address of this host
/// (127.0.0.2 is as much loopback as 127.0.0.1): a node on another host, as
/// the sink sees it.
#[derive(Clone)]
struct From(std::net::IpAddr, std::net::SocketAddr);

impl tonic::codegen::Service<http::Uri> for From {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let Self(source, sink) = *self;
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((source, 0).into())?;
            Ok(hyper_util::rt::TokioIo::new(socket.connect(sink).await?))
        })
    }
}

/// Two senders without a node identity (Go nodes) on two hosts, with the
/// same sensor names and reading times, over plain TCP or TLS, and a node
/// whose `NODE_ID` is the second host's address: each gets series of its
/// own, the first two under their IP addresses as `address` label, and
/// nothing is refused or lost. (With one series for the two hosts,
/// Prometheus refused the second host's requests, and VictoriaMetrics kept
/// one value of each millisecond and answered OK; with the address as
/// `node` label, so did the node named as the address.)
async fn unnamed_senders_on_two_hosts(kind: Kind, name: &str, tls: bool) {
    let dir = scratch(name);
    let Some(database) = Database::start(kind, &dir) else { return };
    let mut env = sink_env(ANY_PORT, &database);
    let pki = Pki::new(&dir, "ca");
    let mut client_tls = None;
    if tls {
        let (cert, key) = pki.issue("sink", "localhost");
        env.extend([("TLS_CERT", cert), ("TLS_KEY", key)]);
        let ca = tonic::transport::Certificate::from_pem(std::fs::read(dir.join("ca.pem")).unwrap());
        client_tls = Some(tonic::transport::ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost"));
    }
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let ago = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap() - Duration::from_secs(60);
    let start = SystemTime::UNIX_EPOCH + Duration::from_millis(ago.as_millis() as u64);
    let base = ago.as_millis() as i64;
    // (source address, node_id, the series it must land in)
    let senders = [
        ("127.0.0.1", "", "address 127.0.0.1"),
        ("127.0.0.2", "", "address 127.0.0.2"),
        ("127.0.0.1", "127.0.0.2", "127.0.0.2"),
    ];
    for (n, (host, node_id, _)) in senders.iter().enumerate() {
        let scheme = if tls { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}")).unwrap();
        if let Some(settings) = &client_tls {
            endpoint = endpoint.tls_config(settings.clone()).unwrap();
        }
        let channel = endpoint.connect_with_connector(From(host.parse().unwrap(), address)).await.unwrap();
        let mut client = SensorServiceClient::new(channel);
        for batch in 0..2u64 {
            let items = (0..3)
                .map(|k| {
                    let ms = batch * 3 + k;
                    reading("temp", (n as i64 + 1) * 100 + ms as i64, start + Duration::from_millis(ms))
                })
                .collect();
            let request = SensorValuesRequest { items, node_id: node_id.to_string(), lane: 0, batch_sequence: batch };
            let answer = client.send_sensor_values(request).await;
            assert!(answer.is_ok(), "{host} {node_id:?}, batch {batch}: {answer:?}");
        }
    }
    let stdout = stop_sink(sink);
    assert!(stdout.contains("rejected=0"), "{stdout}");
    let series = database.samples();
    assert_eq!(series.len(), senders.len(), "{series:?}");
    for (n, (_, _, owner)) in senders.iter().enumerate() {
        let expected: Vec<(i64, f64)> = (0..6).map(|ms| (base + ms, ((n as i64 + 1) * 100 + ms) as f64)).collect();
        assert_eq!(series[&(owner.to_string(), "temp".to_owned())], expected, "{owner}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_without_an_identity_on_two_hosts_get_series_of_their_own_in_prometheus() {
    unnamed_senders_on_two_hosts(Kind::Prometheus, "rw-unnamed-prometheus", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_without_an_identity_on_two_hosts_get_series_of_their_own_in_victoria_metrics() {
    unnamed_senders_on_two_hosts(Kind::VictoriaMetrics, "rw-unnamed-vm", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_without_an_identity_over_tls_get_series_of_their_own() {
    unnamed_senders_on_two_hosts(Kind::Prometheus, "rw-unnamed-tls", true).await;
}

/// A slow way to `upstream`: an HTTP/1.1 proxy on a loopback port that
/// holds each POST for `delay` before passing it on, one connection per
/// request (it asks `upstream` to close, and so closes too). Runs until the
/// test ends.
fn slow_proxy(upstream: u16, delay: Duration) -> u16 {
    use std::io::BufRead;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut reader = std::io::BufReader::new(client.try_clone()?);
                let mut head = Vec::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 {
                        return Ok(());
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(value) = lower.strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        head.extend_from_slice(b"Connection: close\r\n\r\n");
                        break;
                    }
                    if !lower.starts_with("connection:") {
                        head.extend_from_slice(line.as_bytes());
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body)?;
                if head.starts_with(b"POST") {
                    std::thread::sleep(delay);
                }
                let mut server = std::net::TcpStream::connect(("127.0.0.1", upstream))?;
                server.write_all(&head)?;
                server.write_all(&body)?;
                let mut answer = Vec::new();
                server.read_to_end(&mut answer)?;
                (&client).write_all(&answer)
            });
        }
    });
    port
}

/// (node, sensor, time, value) of each request answered OK.
type Acked = std::sync::Arc<std::sync::Mutex<Vec<(String, String, i64, f64)>>>;

/// `senders` nodes (`s0`, `s1`, ...) sending to the sink at `address` from
/// `streams` loops each, a request of one reading at a time, each loop its
/// own sensor, noting in `acked` what is answered OK. Runs until aborted.
async fn keep_busy(address: &str, senders: u32, streams: u32, acked: &Acked) -> Vec<tokio::task::JoinHandle<()>> {
    let base = SystemTime::now() - Duration::from_secs(60);
    let client = SensorServiceClient::connect(format!("http://{address}")).await.unwrap();
    let mut load = Vec::new();
    for sender in 0..senders {
        for sensor in 0..streams {
            let (mut client, acked) = (client.clone(), std::sync::Arc::clone(acked));
            load.push(tokio::spawn(async move {
                for n in 0u64.. {
                    let at = base + Duration::from_millis(n);
                    let request = SensorValuesRequest {
                        items: vec![reading(&format!("x{sensor}"), n as i64, at)],
                        node_id: format!("s{sender}"),
                        lane: sensor,
                        batch_sequence: n,
                    };
                    if client.send_sensor_values(request).await.is_ok() {
                        let ms = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
                        acked.lock().unwrap().push((format!("s{sender}"), format!("x{sensor}"), ms, n as f64));
                    }
                }
            }));
        }
    }
    load
}

/// A sink with the default settings writing through [`slow_proxy`] (3 s a
/// write, under the default 4 s REMOTE_WRITE_TIMEOUT) to VictoriaMetrics.
fn sink_before_a_slow_database(dir: &Path, database: &Database) -> (Process, std::net::SocketAddr) {
    let proxy = slow_proxy(database.port, Duration::from_secs(3));
    let env = [
        ("GRPC_SERVER_SOCKET", ANY_PORT.to_owned()),
        ("OUTPUT", "remote-write".into()),
        ("REMOTE_WRITE_URL", format!("http://127.0.0.1:{proxy}/api/v1/write")),
    ];
    Process::start_sink("sink", &env, dir)
}

/// Every request in `acked` is in the database.
fn assert_stored(database: &Database, acked: &Acked) {
    let stored = database.samples();
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    for (node, sensor, ms, value) in &acked {
        let series = stored.get(&(node.clone(), sensor.clone()));
        let kept = series.is_some_and(|samples| samples.contains(&(*ms, *value)));
        assert!(kept, "{node} {sensor} {ms} acknowledged, not stored");
    }
    eprintln!("{} requests acknowledged, all stored", acked.len());
}

/// A database that takes each write slowly (3 s) while 4 senders keep 16
/// requests each waiting for it, then SIGTERM, with the default settings:
/// the sink exits 0 within Kubernetes' 30 s grace period (20 s for its
/// connections, 5 s for the database), and every request it answered OK is
/// in the database. Before, it sent everything still queued, a write at a
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_stopped_while_a_slow_database_has_requests_queued_stops_in_time() {
    let dir = scratch("rw-slow-stop");
    let Some(database) = Database::start(Kind::VictoriaMetrics, &dir) else { return };
    let (sink, address) = sink_before_a_slow_database(&dir, &database);
    let acked = Acked::default();
    let load = keep_busy(&address.to_string(), 4, 16, &acked).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let started = Instant::now();
    let (code, _, stderr) =
        tokio::task::spawn_blocking(move || sink.terminate(Duration::from_secs(120))).await.unwrap();
    let took = started.elapsed();
    eprintln!("the sink stopped {took:?} after SIGTERM");
    for one in load {
        one.abort();
    }
    assert_eq!(code, 0, "{stderr}");
    assert!(took < Duration::from_secs(28), "the sink took {took:?} to stop");
    assert_stored(&database, &acked);
}

/// Eight nodes keeping 16 requests each waiting for a slow database (3 s a
/// write), with the default settings: another node's request is written
/// within a few writes, not after the others' whole queue (29 s measured
/// before: their requests filled the line and the newcomer waited behind
/// them, where now a sender with nothing waiting always gets in line), and
/// every request answered OK is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_nodes_do_not_hold_up_another_node_behind_a_slow_database() {
    let dir = scratch("rw-slow-fair");
    let Some(database) = Database::start(Kind::VictoriaMetrics, &dir) else { return };
    let (sink, address) = sink_before_a_slow_database(&dir, &database);
    let acked = Acked::default();
    let load = keep_busy(&address.to_string(), 8, 16, &acked).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut client = SensorServiceClient::connect(format!("http://{address}")).await.unwrap();
    let at = SystemTime::now() - Duration::from_secs(30);
    let request =
        SensorValuesRequest { items: vec![reading("v", 1, at)], node_id: "other".into(), ..Default::default() };
    let started = Instant::now();
    let answer = client.send_sensor_values(request).await;
    let took = started.elapsed();
    eprintln!("the other node was answered after {took:?}");
    for one in load {
        one.abort();
    }
    assert!(answer.is_ok(), "{answer:?}");
    assert!(took < Duration::from_secs(12), "the other node waited {took:?}");
    stop_sink(sink);
    assert_stored(&database, &acked);
    assert_eq!(database.samples()[&("other".to_owned(), "v".to_owned())].len(), 1);
}

/// Whole requests of 1000 readings, each from a node of its own, given up
/// on 150 ms after they are sent (their streams reset, as a node's
/// RPC_TIMEOUT does), 32 at a time for 30 s, while the database takes 3 s a
/// write, with the default settings: the sink's memory stays bounded, and a
/// node is answered afterwards. (Before, the requests given up on stayed
/// queued for the database without counting against MAX_BYTES_IN_FLIGHT,
/// and the line had no bound on samples: a hostile pass saw the sink grow
/// by about 4 MB/s, to 138 MB after 30 s and 256 MB after 60 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_given_up_on_behind_a_slow_database_hold_bounded_memory() {
    use prost::Message;
    let dir = scratch("rw-given-up");
    let Some(database) = Database::start(Kind::VictoriaMetrics, &dir) else { return };
    let (sink, address) = sink_before_a_slow_database(&dir, &database);
    let at = SystemTime::now() - Duration::from_secs(60);
    let mut warm = SensorServiceClient::connect(format!("http://{address}")).await.unwrap();
    let request =
        SensorValuesRequest { items: vec![reading("w", 1, at)], node_id: "warm".into(), ..Default::default() };
    warm.send_sensor_values(request).await.unwrap();
    let before = peak_rss(sink.child.id());
    let flood = async {
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        let ends = Instant::now() + Duration::from_secs(30);
        let mut sent = 0u64;
        while Instant::now() < ends {
            let mut streams = Vec::new();
            for _ in 0..32 {
                let items =
                    (0..1000).map(|k| reading(&format!("x{k}"), k, at + Duration::from_millis(k as u64))).collect();
                let message = SensorValuesRequest { items, node_id: format!("given-up-{sent}"), ..Default::default() }
                    .encode_to_vec();
                let mut body = vec![0u8];
                body.extend_from_slice(&(message.len() as u32).to_be_bytes());
                body.extend_from_slice(&message);
                let request = http::Request::post(format!("http://{address}/sensor.v1.SensorService/SendSensorValues"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .unwrap();
                let Ok(mut ready) = client.clone().ready().await else { break };
                let Ok((answer, mut stream)) = ready.send_request(request, false) else { break };
                let _ = stream.send_data(body.into(), true);
                streams.push((answer, stream));
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            for (_answer, mut stream) in streams {
                stream.send_reset(h2::Reason::CANCEL);
            }
        }
        connection.abort();
        sent
    };
    let sent = flood.await;
    let grew = peak_rss(sink.child.id()).saturating_sub(before);
    eprintln!("{sent} requests given up on; the sink grew by {} MiB", grew >> 20);
    let request =
        SensorValuesRequest { items: vec![reading("a", 1, at)], node_id: "after".into(), ..Default::default() };
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match warm.send_sensor_values(request.clone()).await {
                Ok(_) => return,
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    stop_sink(sink);
    assert!(sent > 1000, "only {sent} requests sent");
    assert!(answered.is_ok(), "a node was not answered within 60 s of the flood");
    assert!(grew < 80 << 20, "the sink grew by {} MiB", grew >> 20);
}

/// A remote-write URL the database answers 400 to every request, the empty
/// one that reads its clock included (VictoriaMetrics with a malformed
/// `extra_label`; the same for another of its APIs), is the sink's own
/// setting gone wrong: the sink keeps its nodes' data (they retry), says so,
/// and is not ready; nothing is dropped as refused.
#[test]
fn a_database_that_refuses_every_request_from_the_start_is_a_setting_not_bad_data() {
    let dir = scratch("never-took");
    let Some(database) = Database::start(Kind::VictoriaMetrics, &dir) else { return };
    let mut env = sink_env(ANY_PORT, &database);
    env.retain(|(variable, _)| *variable != "REMOTE_WRITE_URL");
    // The query may hold a token; the database echoes it in its answer.
    env.push(("REMOTE_WRITE_URL", format!("{}?extra_label=bad&authKey=S3cretQ", database.url())));
    env.push(("METRICS_ADDR", "127.0.0.1:0".into()));
    let (sink, socket) = Process::start_sink("sink", &env, &dir);
    let metrics = sink.metrics_address();
    let node = Process::start("node", NODE, &[], &default_node(&socket.to_string(), "node-a"), &dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while common::database::http_get(metrics.port(), "/readyz").map(|(status, _)| status) != Some(503) {
        assert!(std::time::Instant::now() < deadline, "the sink stayed ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    let summary = summary_fields(&stdout);
    assert!(summary["produced"] > 0 && summary["acked"] == 0, "{stdout}");
    assert!(!stdout.contains("refused:"), "nothing is dropped as refused: {stdout}");
    assert!(!stderr.contains("S3cretQ"), "the URL's query reached the node: {stderr}");
    let (_, _, log) = sink.terminate(Duration::from_secs(30));
    assert!(!log.contains("S3cretQ"), "the URL's query was logged: {log}");
    assert!(log.contains("check that REMOTE_WRITE_URL is its remote-write endpoint"), "{log}");
    // The nodes are told to come back (UNAVAILABLE), not that their data
    // is bad (INVALID_ARGUMENT, which they would drop).
    assert!(log.contains("UNAVAILABLE") && !log.contains("INVALID_ARGUMENT"), "{log}");
}
