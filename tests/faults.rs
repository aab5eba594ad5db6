//! Fault tests: the sink killed and restarted, the connection cut and
//! stalled, the sink pushing back, responses lost, and bad input. Each
//! checks at the sink, reading by reading, that nothing was lost, nothing
//! duplicated, and each sensor's order kept.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    Process, assert_complete_and_ordered, fast_retries, free_port, node_config, read_output, scratch, sink_config,
    summary_fields, wait_for_port,
};
use prost::Message;
use telemetry_node::{
    config::NodeConfig,
    node::Ledger,
    node::{self, GrpcTransport, Transport, codec::Outgoing},
    proto::{SensorValue, SensorValuesRequest},
    receiver,
    receiver::{SinkStats, SinkSummary},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// The most batches a lane holds under OVERFLOW_POLICY=block: the one in
/// flight, and one growing (while it waits for a token or for the sender).
const LANE_BATCHES: u64 = 2;

/// Samples, every 2 ms until aborted, the most readings the node held at
/// once (produced, neither acked nor dropped).
fn sample_most_held(stats: &Arc<Ledger>) -> (JoinHandle<()>, Arc<Mutex<u64>>) {
    let most_held = Arc::new(Mutex::new(0u64));
    let sampler = tokio::spawn({
        let (stats, most_held) = (Arc::clone(stats), Arc::clone(&most_held));
        async move {
            loop {
                let s = stats.snapshot();
                let held = s.produced - s.acked - s.dropped;
                {
                    let mut most = most_held.lock().unwrap();
                    *most = (*most).max(held);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    (sampler, most_held)
}

/// Settings that never give a batch up: retries until the sink is back.
fn patient(socket: String, extra: &[(&'static str, String)]) -> NodeConfig {
    node_config(&patient_env(socket, extra))
}

/// The variables of [`patient`], with `extra` overriding them (later
/// entries win, in a configuration map as in a process environment).
fn patient_env(socket: String, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut pairs = vec![
        ("GRPC_SERVER_SOCKET", socket),
        ("SENSOR_COUNT", "4".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "50".into()),
        ("REQUEST_RATE_PER_SECOND", "50".into()),
        ("BATCH_SIZE", "20".into()),
        ("BATCH_TIMEOUT", "50ms".into()),
        ("RPC_TIMEOUT", "500ms".into()),
        ("SHUTDOWN_TIMEOUT", "20s".into()),
    ];
    pairs.extend(fast_retries());
    pairs.extend(extra.iter().cloned());
    pairs
}

/// A sink served by the library in this process.
struct Sink {
    stop: CancellationToken,
    serving: JoinHandle<SinkSummary>,
    output: std::path::PathBuf,
}

impl Sink {
    async fn start(listener: TcpListener, dir: &std::path::Path, extra: &[(&str, String)]) -> Self {
        let mut pairs = vec![("FILE_PATH", dir.display().to_string())];
        pairs.extend(extra.iter().cloned());
        let config = sink_config(&pairs);
        let stop = CancellationToken::new();
        let output = config.output_file();
        let serving = tokio::spawn({
            let stop = stop.clone();
            async move {
                let stats = Arc::new(SinkStats::default());
                receiver::serve(&config, listener, stats, stop.cancelled_owned()).await.expect("the sink serves")
            }
        });
        Self { stop, serving, output }
    }

    async fn stop(self) -> (SinkSummary, Vec<(String, u64)>) {
        self.stop.cancel();
        let summary = tokio::time::timeout(Duration::from_secs(30), self.serving).await.unwrap().unwrap();
        (summary, read_output(&self.output))
    }
}

async fn run_node(config: &NodeConfig, transport: impl Transport, run: Duration) -> telemetry_node::node::Summary {
    let stats = Arc::new(Ledger::default());
    let node = node::run(config, transport, stats, tokio::time::sleep(run));
    tokio::time::timeout(Duration::from_secs(60), node).await.expect("the node stops in time")
}

/// A transport that loses the sink's answer to the first `lose` requests
/// that succeed, as a network would after the sink wrote them.
#[derive(Clone)]
struct LosingAnswers {
    inner: GrpcTransport,
    lose: Arc<Mutex<usize>>,
}

impl Transport for LosingAnswers {
    async fn send(&self, request: Outgoing) -> Result<(), Status> {
        self.inner.send(request).await?;
        let mut lose = self.lose.lock().unwrap();
        if *lose > 0 {
            *lose -= 1;
            return Err(Status::deadline_exceeded("answer lost on the way back"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_retry_after_a_lost_answer_is_not_written_twice() {
    let dir = scratch("lost-answers");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let sink = Sink::start(listener, &dir, &[]).await;
    let config = patient(address.to_string(), &[]);
    let transport =
        LosingAnswers { inner: GrpcTransport::from_config(&config).unwrap(), lose: Arc::new(Mutex::new(10)) };
    let summary = run_node(&config, transport, Duration::from_secs(2)).await;
    let (sink_summary, written) = sink.stop().await;

    let per_sensor = assert_complete_and_ordered(&written);
    assert_eq!(per_sensor.values().sum::<u64>(), summary.produced);
    assert_eq!((summary.acked, summary.dropped), (summary.produced, 0));
    // Ten answers were lost; a slow moment of the machine can add a timeout
    // or two, each also retried and recognised.
    assert!(summary.retries >= 10, "{summary}");
    assert!(sink_summary.duplicates >= 10, "each retried batch was recognised: {sink_summary}");
}

/// How a [`Proxy`] treats traffic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Forward both ways.
    Pass,
    /// Close every connection and refuse new ones.
    Cut,
    /// Keep connections open but forward nothing.
    Stall,
}

/// A TCP proxy on loopback between a node and a sink.
struct Proxy {
    mode: Arc<Mutex<Mode>>,
    address: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accepting: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        Self::swallowing(upstream, 0).await
    }

    /// A proxy that takes its first `swallowed` connections and never
    /// forwards a byte of them (a flow a NAT forgot, a replica that hangs):
    /// their peer is not told, and waits.
    async fn swallowing(upstream: SocketAddr, swallowed: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accepting = tokio::spawn({
            let (mode, connections) = (Arc::clone(&mode), Arc::clone(&connections));
            async move {
                let mut held = Vec::new();
                while let Ok((client, _)) = listener.accept().await {
                    if held.len() < swallowed {
                        held.push(client);
                        continue;
                    }
                    if *mode.lock().unwrap() == Mode::Cut {
                        continue; // dropped: closed at once
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else { continue };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = tokio::spawn(pump(client_read, server_write, Arc::clone(&mode)));
                    let down = tokio::spawn(pump(server_read, client_write, Arc::clone(&mode)));
                    connections.lock().unwrap().extend([up, down]);
                }
            }
        });
        Self { mode, address, connections, accepting }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
        if mode == Mode::Cut {
            for connection in self.connections.lock().unwrap().drain(..) {
                connection.abort();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

/// Copies `from` to `to`, holding the bytes while the mode is `Stall`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<Mutex<Mode>>,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        while *mode.lock().unwrap() == Mode::Stall {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *mode.lock().unwrap() == Mode::Stall {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn connections_cut_and_stalled_by_a_proxy_lose_and_duplicate_nothing() {
    let dir = scratch("proxy");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_address = listener.local_addr().unwrap();
    let sink = Sink::start(listener, &dir, &[]).await;
    let proxy = Proxy::start(sink_address).await;
    let config = patient(proxy.address.to_string(), &[]);
    let transport = GrpcTransport::from_config(&config).unwrap();
    let stats = Arc::new(Ledger::default());
    let node = tokio::spawn({
        let (config, stats) = (config.clone(), Arc::clone(&stats));
        async move { node::run(&config, transport, stats, tokio::time::sleep(Duration::from_secs(7))).await }
    });

    for (mode, hold) in
        [(Mode::Pass, 1000), (Mode::Cut, 1000), (Mode::Pass, 1000), (Mode::Stall, 2000), (Mode::Pass, 0)]
    {
        proxy.set(mode);
        tokio::time::sleep(Duration::from_millis(hold)).await;
    }
    let summary = tokio::time::timeout(Duration::from_secs(60), node).await.expect("the node stops in time").unwrap();
    let (_, written) = sink.stop().await;

    let per_sensor = assert_complete_and_ordered(&written);
    assert_eq!(per_sensor.values().sum::<u64>(), summary.produced);
    assert_eq!((summary.acked, summary.dropped), (summary.produced, 0));
    assert!(summary.retries > 0, "the faults were felt: {summary}");
}

/// A connection whose requests get no answer is given up after one
/// RPC_TIMEOUT and the next attempt opens another, rather than waiting on it
/// until HTTP/2 keep-alive gives it up (40 s).
#[tokio::test]
async fn a_connection_that_never_answers_is_replaced_after_one_rpc_timeout() {
    let dir = scratch("swallowed");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_address = listener.local_addr().unwrap();
    let sink = Sink::start(listener, &dir, &[]).await;
    let proxy = Proxy::swallowing(sink_address, 1).await;
    let config = patient(proxy.address.to_string(), &[("RPC_TIMEOUT", "1s".into())]);
    let transport = GrpcTransport::from_config(&config).unwrap();
    let stats = Arc::new(Ledger::default());
    let node = tokio::spawn({
        let (config, stats, transport) = (config.clone(), Arc::clone(&stats), transport.clone());
        async move { node::run(&config, transport, stats, tokio::time::sleep(Duration::from_secs(4))).await }
    });
    let summary = tokio::time::timeout(Duration::from_secs(30), node).await.expect("the node stops in time").unwrap();
    let (_, written) = sink.stop().await;

    assert_eq!(transport.replaced(), 1, "one connection swallowed, one replacement: {summary}");
    let per_sensor = assert_complete_and_ordered(&written);
    assert_eq!(per_sensor.values().sum::<u64>(), summary.produced);
    assert_eq!((summary.acked, summary.dropped), (summary.produced, 0), "{summary}");
    assert!(summary.retries > 0, "{summary}");
    drop(proxy);
}

#[tokio::test]
async fn a_throttling_sink_is_obeyed_with_bounded_memory_and_nothing_lost() {
    let dir = scratch("pushback");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    // About 40 readings' worth of bytes a second, against 200 readings/s:
    // under block, the sensors are held back (the default policy would
    // queue, and drop its oldest once the queue is full).
    let sink = Sink::start(listener, &dir, &[("RATE_PER_SECOND", "2000".into())]).await;
    let config =
        patient(address.to_string(), &[("REQUEST_RATE_PER_SECOND", "inf".into()), ("OVERFLOW_POLICY", "block".into())]);
    let transport = GrpcTransport::from_config(&config).unwrap();
    let stats = Arc::new(Ledger::default());
    let (sampler, most_held) = sample_most_held(&stats);
    let run = node::run(&config, transport, Arc::clone(&stats), tokio::time::sleep(Duration::from_secs(4)));
    let summary = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the node stops in time");
    sampler.abort();
    let (sink_summary, written) = sink.stop().await;

    let per_sensor = assert_complete_and_ordered(&written);
    assert_eq!(per_sensor.values().sum::<u64>(), summary.produced);
    assert_eq!((summary.acked, summary.dropped), (summary.produced, 0));
    assert!(sink_summary.throttled > 0 && summary.pushbacks > 0, "{summary} / {sink_summary}");
    // 4 lanes, each with a batch in flight and one growing: the node held
    // no more than that.
    let bound = 4 * LANE_BATCHES * 20;
    assert!(*most_held.lock().unwrap() <= bound, "held {} readings", most_held.lock().unwrap());
}

/// What a sink outage did: the node's summary, its standard output, and
/// the readings the sink wrote.
struct Outage {
    summary: std::collections::HashMap<String, u64>,
    stdout: String,
    written: Vec<(String, u64)>,
}

/// Runs a node made by `node_env` (given the sink's socket) against a sink
/// that is SIGKILLed after `up`, started again on the same port after
/// `down`, and kept for `after` before both stop.
fn sink_killed(
    name: &str,
    node_env: impl FnOnce(String) -> Vec<(&'static str, String)>,
    up: Duration,
    down: Duration,
    after: Duration,
) -> Outage {
    let dir = scratch(name);
    let port = free_port();
    let socket = format!("127.0.0.1:{port}");
    let sink_env = [("GRPC_SERVER_SOCKET", socket.clone()), ("FILE_PATH", "out".into())];
    let sink_binary = env!("CARGO_BIN_EXE_telemetry-sink");
    let sink = Process::start("sink-1", sink_binary, &[], &sink_env, &dir);
    wait_for_port(port, Duration::from_secs(20));
    let node = Process::start("node", env!("CARGO_BIN_EXE_telemetry-node"), &[], &node_env(socket), &dir);
    std::thread::sleep(up);
    sink.signal(libc::SIGKILL);
    let _ = sink.wait(Duration::from_secs(10));
    std::thread::sleep(down);
    let sink = Process::start("sink-2", sink_binary, &[], &sink_env, &dir);
    wait_for_port(port, Duration::from_secs(20));
    std::thread::sleep(after);

    let (code, stdout, stderr) = node.terminate(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    // Each retry warning says where the node failed to reach.
    let retried: Vec<&str> = stderr.lines().filter(|line| line.contains("Failed to send batch, retrying.")).collect();
    assert!(!retried.is_empty(), "{stderr}");
    assert!(retried.iter().all(|line| line.contains(&format!("to=http://127.0.0.1:{port}"))), "{retried:?}");
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let summary = summary_fields(&stdout);
    let written = read_output(&dir.join("out/readings.jsonl"));
    Outage { summary, stdout, written }
}

#[test]
fn the_sink_killed_and_restarted_on_the_same_port_loses_and_duplicates_nothing() {
    let node_env = |socket| {
        patient_env(
            socket,
            &[
                ("NODE_ID", "node-under-test".into()),
                ("GRPC_CLIENT_RETRY_SEND_INTERVAL", "50ms".into()),
                ("GRPC_CLIENT_RETRY_MAX_INTERVAL", "500ms".into()),
            ],
        )
    };
    let seconds = Duration::from_secs;
    let Outage { summary, stdout, written } = sink_killed("sink-kill", node_env, seconds(2), seconds(5), seconds(3));
    let per_sensor = assert_complete_and_ordered(&written);
    assert_eq!(per_sensor.values().sum::<u64>(), summary["produced"], "{stdout}");
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0), "{stdout}");
    assert!(summary["retries"] > 0, "the outage was felt: {stdout}");
}

/// The scenario with every setting at its default (the README's
/// quick-start: four sensors): the sink killed, down for 20 s, and started
/// again. The default overflow queue rides the outage out: nothing missed,
/// nothing dropped, every reading in the sink once.
#[test]
fn a_twenty_second_outage_leaves_no_hole_with_the_default_settings() {
    let node_env = |socket| vec![("GRPC_SERVER_SOCKET", socket), ("SENSOR_COUNT", "4".into())];
    // After 20 s of failures the next probe is at most 5 s away (the
    // backoff 1, 2, 4, 5, 5 s, jittered below it); then the queued readings
    // leave in a request per lane.
    let seconds = Duration::from_secs;
    let Outage { summary, stdout, written } =
        sink_killed("outage-defaults", node_env, seconds(5), seconds(20), seconds(24));
    assert_eq!((summary["missed"], summary["dropped"]), (0, 0), "{stdout}");
    assert!(summary["retries"] > 0, "the outage was felt: {stdout}");
    let per_sensor = assert_complete_and_ordered(&written);
    assert_eq!(per_sensor.values().sum::<u64>(), summary["produced"], "{stdout}");
    assert_eq!(summary["acked"], summary["produced"], "{stdout}");
}

/// Sends `body` as the raw bytes of a SendSensorValues request.
async fn send_raw(address: SocketAddr, body: Vec<u8>) -> Result<(), Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap();
    GrpcTransport::new(endpoint, Duration::from_secs(20)).send_payload(prost::bytes::Bytes::from(body)).await
}

#[tokio::test]
async fn bad_input_gets_an_error_status_writes_nothing_and_the_sink_stays_up() {
    let dir = scratch("bad-input");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let sink = Sink::start(listener, &dir, &[]).await;

    // Garbage that is not protobuf.
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    assert!(send_raw(address, garbage).await.is_err());
    // Larger than MAX_MESSAGE_BYTES.
    let oversized = SensorValuesRequest {
        items: vec![SensorValue { sensor_name: "x".repeat(5 << 20), ..Default::default() }],
        ..Default::default()
    };
    assert_eq!(send_raw(address, oversized.encode_to_vec()).await.unwrap_err().code(), tonic::Code::OutOfRange);
    // A million readings, all without a measurement.
    let million = SensorValuesRequest { items: vec![SensorValue::default(); 1_000_000], ..Default::default() };
    assert_eq!(send_raw(address, million.encode_to_vec()).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    // A valid request still gets through.
    let ok = telemetry_node::reading::Reading {
        sensor: "ok",
        sequence: 0,
        value: 1,
        created_at: std::time::SystemTime::now(),
    };
    let good = Outgoing::new(&[ok], Arc::from(""), 0, 0);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap();
    GrpcTransport::new(endpoint, Duration::from_secs(20)).send(good).await.unwrap();

    let (summary, written) = sink.stop().await;
    assert_eq!(written, vec![("ok".to_owned(), 0)]);
    assert_eq!(summary.readings_written, 1);
}

/// Runs a fast node against a sink that takes 200 ms per call, under
/// `policy`; returns the node's summary, its most readings held at once,
/// and the readings the sink got.
async fn against_a_slow_sink(policy: &str) -> (telemetry_node::node::Summary, u64, Vec<(String, u64)>) {
    let recording = common::Recording::default();
    recording.0.lock().unwrap().delay = Duration::from_millis(200);
    let stop = CancellationToken::new();
    let address = common::serve_recording(recording.clone(), stop.clone()).await;
    let config = patient(
        address.to_string(),
        &[
            ("SENSOR_VALUE_RATE_PER_SECOND", "500".into()),
            ("BATCH_SIZE", "50".into()),
            ("MAX_IN_FLIGHT", "2".into()),
            ("REQUEST_RATE_PER_SECOND", "inf".into()),
            ("RPC_TIMEOUT", "5s".into()),
            ("OVERFLOW_POLICY", policy.into()),
            ("QUEUE_CAPACITY", "200".into()),
        ],
    );
    let stats = Arc::new(Ledger::default());
    let (sampler, most_held) = sample_most_held(&stats);
    let transport = GrpcTransport::from_config(&config).unwrap();
    let run = node::run(&config, transport, Arc::clone(&stats), tokio::time::sleep(Duration::from_secs(3)));
    let summary = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the node stops in time");
    sampler.abort();
    stop.cancel();
    let most = *most_held.lock().unwrap();
    (summary, most, recording.readings())
}

/// Checks each sensor's readings only ever move forward, gaps allowed.
fn assert_in_order(readings: &[(String, u64)]) {
    let mut last: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for (sensor, sequence) in readings {
        if let Some(previous) = last.insert(sensor, *sequence) {
            assert!(*sequence > previous, "sensor {sensor}: {sequence} after {previous}");
        }
    }
}

#[tokio::test]
async fn a_slow_sink_under_block_loses_nothing_and_memory_stays_bounded() {
    let (summary, most_held, delivered) = against_a_slow_sink("block").await;
    let per_sensor = assert_complete_and_ordered(&delivered);
    assert_eq!(per_sensor.values().sum::<u64>(), summary.produced);
    assert_eq!((summary.acked, summary.dropped), (summary.produced, 0));
    assert!(most_held <= 2 * LANE_BATCHES * 50, "held {most_held}");
    assert!(summary.missed > 0, "the sensors were held back and said so: {summary}");
}

#[tokio::test]
async fn a_slow_sink_under_drop_policies_drops_exactly_what_is_missing() {
    for policy in ["drop-oldest", "drop-newest"] {
        let (summary, most_held, delivered) = against_a_slow_sink(policy).await;
        assert_in_order(&delivered);
        assert!(summary.dropped > 0, "{policy}: the queue overflowed: {summary}");
        assert_eq!(summary.produced - delivered.len() as u64, summary.dropped, "{policy}: {summary}");
        assert_eq!(summary.acked, delivered.len() as u64, "{policy}");
        // Per lane: the queue, plus the lane's batches and the batch's worth
        // the batcher took from the queue beside its full batch.
        assert!(most_held <= 2 * (200 + (LANE_BATCHES + 1) * 50), "{policy}: held {most_held}");
    }
}

/// A sink that stores each request, then holds the lane's thread for a
/// second before answering: a lane that is in the middle of being polled.
#[derive(Debug, Clone, Default)]
struct Answering {
    /// Readings stored.
    received: Arc<Mutex<u64>>,
    /// Requests that arrived.
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl Transport for Answering {
    async fn send(&self, request: Outgoing) -> Result<(), Status> {
        let items = SensorValuesRequest::decode(request.items).map_err(|error| Status::internal(error.to_string()))?;
        *self.received.lock().unwrap() += items.items.len() as u64;
        self.requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Blocks the worker thread on purpose: the drain is ended while this
        // lane's task is still being polled, and the lane acks when the poll
        // ends.
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_answered_after_the_drain_was_cut_short_is_counted_once() {
    lane_answered_after_the_drain_was_cut_short(&node_config(&[
        ("SENSOR_COUNT", "1".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "100".into()),
        ("REQUEST_RATE_PER_SECOND", "inf".into()),
        ("BATCH_TIMEOUT", "10ms".into()),
    ]))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_answered_after_the_drain_was_cut_short_with_the_default_settings() {
    lane_answered_after_the_drain_was_cut_short(&node_config(&[])).await;
}

/// Runs the node on `config` against [`Answering`], cuts its drain short
/// while a lane is mid-poll, and checks the books were settled after it.
async fn lane_answered_after_the_drain_was_cut_short(config: &NodeConfig) {
    let transport = Answering::default();
    let requests = Arc::clone(&transport.requests);
    let second_arrived = move || requests.load(std::sync::atomic::Ordering::SeqCst) >= 2;
    // Stops the node as its second request reaches the sink, and ends the
    // drain at once (a second signal) 100 ms later, from a thread of its
    // own, while that request's lane is still mid-poll.
    let shutdown = {
        let second_arrived = second_arrived.clone();
        async move {
            while !second_arrived() {
                tokio::task::yield_now().await;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let (abort, aborted) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        while !second_arrived() {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(100));
        let _ = abort.send(());
    });
    let ledger = Arc::new(Ledger::default());
    let health = node::retry::SinkHealth::new(config.retry_budget);
    let abort = async move {
        let _ = aborted.await;
    };
    let returned = node::run_with(config, transport.clone(), health, Arc::clone(&ledger), shutdown, abort).await;
    // A lane still running after the books were settled would ack later:
    // the books, read again once any such lane has finished, must not move.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let summary = ledger.snapshot();
    assert_eq!(summary, returned, "the books moved after they were settled");
    let received = *transport.received.lock().unwrap();
    assert_eq!(summary.produced, summary.acked + summary.dropped, "{summary}");
    assert_eq!(summary.acked, received, "every stored reading is acked, once: {summary}");
}
