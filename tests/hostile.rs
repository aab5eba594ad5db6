//! Hostile requests against the real sink binary: memory stays a small
//! multiple of what is in flight, and the sink keeps serving.

mod common;

use std::time::Duration;

use common::{Process, peak_rss, scratch};
use prost::Message;
use telemetry_node::{
    node::GrpcTransport,
    proto::{SensorValue, SensorValuesRequest},
};

/// One test at a time: each measures one sink's peak memory, and two at
/// once would share the machine's two cores and the allocator's pressure.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_requests_of_four_mib_of_empty_items_cost_little_more_than_their_bytes() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = scratch("hostile-memory");
    let env = [("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()), ("FILE_PATH", "out".into())];
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let port = address.port();
    let before = peak_rss(sink.child.id());

    // Two million empty items: 4 MiB on the wire, some 160 MB once decoded.
    let empty = SensorValuesRequest { items: vec![SensorValue::default(); 2 << 20], ..Default::default() };
    let bytes = prost::bytes::Bytes::from(empty.encode_to_vec());
    assert!(bytes.len() <= 4 << 20);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    let transport = GrpcTransport::new(endpoint, Duration::from_secs(60));
    for _round in 0..3 {
        let answers = futures::future::join_all((0..16).map(|_| transport.send_payload(bytes.clone()))).await;
        for answer in answers {
            assert_eq!(answer.unwrap_err().code(), tonic::Code::InvalidArgument);
        }
    }
    let grown = peak_rss(sink.child.id()).saturating_sub(before);
    // In flight at once: 16 × 4 MiB = 64 MiB of request bytes. Decoding them
    // would take some 2.5 GB.
    let in_flight = 16 * bytes.len() as u64;
    assert!(grown <= 3 * in_flight, "the sink grew by {} MiB for {} MiB in flight", grown >> 20, in_flight >> 20);
    eprintln!("peak RSS grew by {} MiB for {} MiB in flight", grown >> 20, in_flight >> 20);

    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    // Refusals are logged, but at most once a second.
    let logged = stderr.matches("Refused a request.").count();
    assert!((1..=10).contains(&logged), "{logged} log lines for 48 refusals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_valid_requests_of_four_mib_cost_a_bounded_multiple_of_their_bytes() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = scratch("valid-memory");
    let env = [
        ("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()),
        ("FILE_PATH", "out".into()),
        ("RATE_PER_SECOND", "1000000000".into()),
    ];
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let port = address.port();
    let before = peak_rss(sink.child.id());
    // 100,000 readings (MAX_ITEMS_PER_REQUEST), as large as fits in 4 MiB.
    let item = |sequence: u64| SensorValue {
        sensor_name: format!("{sequence:0>5}"),
        measurement: Some(telemetry_node::proto::sensor_value::Measurement {
            sensor_value: Some(i64::MAX),
            created_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 999_999_999 }),
        }),
        sequence,
    };
    let valid = SensorValuesRequest { items: (0..100_000).map(item).collect(), ..Default::default() };
    let bytes = prost::bytes::Bytes::from(valid.encode_to_vec());
    assert!(bytes.len() <= 4 << 20);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    let transport = GrpcTransport::new(endpoint, Duration::from_secs(60));
    let answers = futures::future::join_all((0..16).map(|_| transport.send_payload(bytes.clone()))).await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let grown = peak_rss(sink.child.id()).saturating_sub(before);
    let in_flight = 16 * bytes.len() as u64;
    eprintln!("peak RSS grew by {} MiB for {} MiB in flight", grown >> 20, in_flight >> 20);
    // Decoded readings and their JSON lines, beside the request bytes.
    assert!(grown <= 4 * in_flight, "the sink grew by {} MiB for {} MiB in flight", grown >> 20, in_flight >> 20);
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
}

/// A node whose stdout and stderr are closed under it (a log collector
/// that died, `| head`) goes on and stops cleanly: a log line or summary
/// that cannot be written is passed over, not a panic that loses what the
/// node holds.
#[test]
fn a_node_whose_output_is_closed_goes_on_and_stops_cleanly() {
    use std::process::{Command, Stdio};
    let dir = scratch("closed-output");
    // Nothing listens there: the node logs a failed send every second.
    let sink = format!("127.0.0.1:{}", common::free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_telemetry-node"))
        .env_clear()
        .env("GRPC_SERVER_SOCKET", &sink)
        .env("GRPC_CLIENT_RETRY_SEND_INTERVAL", "50ms")
        .env("SHUTDOWN_TIMEOUT", "1s")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "the node went on");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with a PID this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the node did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// A peer on one HTTP/2 connection, until dropped.
struct Peer {
    /// Its connection's task.
    connection: tokio::task::JoinHandle<Result<(), h2::Error>>,
    /// Its requests' bodies, never ended.
    _bodies: Vec<h2::SendStream<prost::bytes::Bytes>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// Opens `streams` requests on one HTTP/2 connection to `port`, each
/// declaring a message of 4 MiB - 100 bytes and sending the first `send`
/// bytes of its body (the 5-byte gRPC prefix included), and never ending
/// the stream: under 4 MiB - 95, the message is never whole.
async fn stalled_requests(port: u16, streams: usize, send: usize) -> Peer {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut bodies = Vec::new();
    for _ in 0..streams {
        let mut client = client.clone().ready().await.unwrap();
        let request = http::Request::post(format!("http://127.0.0.1:{port}/sensor.v1.SensorService/SendSensorValues"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (_answer, mut body) = client.send_request(request, false).unwrap();
        let mut message = vec![0u8];
        message.extend_from_slice(&((4 << 20) - 100u32).to_be_bytes());
        message.resize(send, 0x0a);
        // h2 sends what the sink's flow control lets through and keeps the
        // rest here.
        body.send_data(message.into(), false).unwrap();
        bodies.push(body);
    }
    Peer { connection, _bodies: bodies }
}

/// A peer opening as many requests as it may on one connection, each
/// declaring a 4 MiB message and stalling before its end, and four such
/// peers at once: requests are let in only while their messages fit in
/// MAX_BYTES_IN_FLIGHT (64 MiB), so the sink's memory stays near it (before,
/// 200 such requests on one connection took 792 MB). The stalled requests
/// are let go after 60 s, and a well-behaved request then gets through
/// while the peers are still connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_requests_on_many_streams_hold_no_more_than_the_budget() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = scratch("hostile-streams");
    let env = [("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()), ("FILE_PATH", "out".into())];
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let port = address.port();
    let before = peak_rss(sink.child.id());
    let mut peers = Vec::new();
    for _ in 0..4 {
        // The sink lets a connection open 128 requests at once.
        // Each sends 100 bytes less than its message needs: never whole.
        peers.push(stalled_requests(port, 128, (4 << 20) - 200).await);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let grown = peak_rss(sink.child.id()).saturating_sub(before);
    eprintln!("peak RSS grew by {} MiB under 4 × 128 stalled requests", grown >> 20);
    assert!(grown < 160 << 20, "the sink grew by {} MiB", grown >> 20);

    let started = std::time::Instant::now();
    let answer = answered(port, Duration::from_secs(90)).await;
    assert_eq!(answer, tonic::Code::InvalidArgument, "answered, not stuck");
    eprintln!("a request got through after {:?}", started.elapsed());
    drop(peers);
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("did not arrive whole within 60 s"), "the stalled requests were let go: {stderr}");
}

/// Peers each holding a connection to `port` until dropped, each having
/// sent a DATA frame of 256 KiB (the largest the sink takes) but for its
/// last byte, which the sink holds while it waits for the rest.
struct Flood(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Flood {
    fn drop(&mut self) {
        for peer in &self.0 {
            peer.abort();
        }
    }
}

async fn flood(port: u16, peers: usize) -> Flood {
    use tokio::io::AsyncWriteExt;
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame.
    bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let length: u32 = 256 * 1024;
    bytes.extend_from_slice(&length.to_be_bytes()[1..]);
    // DATA, no flags, stream 1.
    bytes.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
    bytes.resize(bytes.len() + length as usize - 1, 0);
    let bytes = prost::bytes::Bytes::from(bytes);
    let mut held = Vec::new();
    // One after another, as a client opening connections in a loop does:
    // past the listen queue, a connection waits for its SYN to be retried.
    for _ in 0..peers {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        let Ok(Ok(mut tcp)) = tokio::time::timeout(Duration::from_secs(2), connect).await else { break };
        let bytes = bytes.clone();
        held.push(tokio::spawn(async move {
            let _ = tcp.write_all(&bytes).await;
            std::future::pending::<()>().await;
        }));
    }
    Flood(held)
}

/// The value of `metric` on the metrics page at `port`.
fn metric(port: u16, metric: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut page = String::new();
    http.read_to_string(&mut page).ok()?;
    page.lines().find_map(|line| line.strip_prefix(metric)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits up to 30 s for `metric` at `port` to read `value`.
async fn wait_for_metric(port: u16, name: &str, value: f64) {
    for _ in 0..300 {
        if metric(port, name) == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} stayed at {:?}, not {value}", metric(port, name));
}

/// What the sink answers a request with one invalid reading, sent with
/// `deadline`: INVALID_ARGUMENT once it is answered, whatever else the sink
/// is doing.
async fn answered(port: u16, deadline: Duration) -> tonic::Code {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    let transport = GrpcTransport::new(endpoint, deadline);
    let request = SensorValuesRequest { items: vec![SensorValue::default()], ..Default::default() };
    transport.send_payload(prost::bytes::Bytes::from(request.encode_to_vec())).await.unwrap_err().code()
}

/// What the sink answers [`answered`]'s request, asked again while it is
/// UNAVAILABLE or the request's 60 s run out (as a node retries), for up
/// to `limit`.
async fn answered_in_the_end(port: u16, limit: Duration) -> Option<tonic::Code> {
    let tries = async {
        loop {
            match answered(port, Duration::from_secs(60)).await {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                code => return code,
            }
        }
    };
    tokio::time::timeout(limit, tries).await.ok()
}

/// Many more connections than MAX_CONNECTIONS, each stalled mid-frame: the
/// sink serves MAX_CONNECTIONS of them and leaves the rest waiting, so what
/// they make it hold stays bounded (before, 400 such connections took it
/// from 12 MB to 122 MB, and nothing bounded their number). A node arriving
/// meanwhile is served once the flood is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_wait_and_hold_nothing() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = scratch("hostile-connections");
    let env = [
        ("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()),
        ("FILE_PATH", "out".into()),
        ("METRICS_ADDR", "127.0.0.1:0".into()),
        ("MAX_CONNECTIONS", "32".into()),
    ];
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let metrics = sink.metrics_address().port();
    let before = peak_rss(sink.child.id());
    let peers = flood(address.port(), 300).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let grown = peak_rss(sink.child.id()).saturating_sub(before);
    eprintln!("peak RSS grew by {} MiB under 300 connections stalled mid-frame", grown >> 20);
    assert!(grown < 32 << 20, "the sink grew by {} MiB", grown >> 20);
    // Polled, not read once: on a busy machine the last places fill late.
    wait_for_metric(metrics, "telemetry_sink_connections", 32.0).await;
    assert!(metric(metrics, "telemetry_sink_connections_waited_total").is_some_and(|waited| waited >= 1.0));

    let node = tokio::spawn(answered(address.port(), Duration::from_secs(60)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(peers);
    assert_eq!(node.await.unwrap(), tonic::Code::InvalidArgument, "answered once there was room");
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("MAX_CONNECTIONS connections are open; a new one waits"), "{stderr}");
}

/// Sockets that connect and never say anything hold every place under
/// MAX_CONNECTIONS, and give them back once they have been silent for a
/// minute: a node waiting behind them is answered then. Before, they held
/// the places for as long as they stayed open, and the node was never
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_give_their_places_back() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = scratch("hostile-silent");
    let env =
        [("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()), ("FILE_PATH", "out".into()), ("MAX_CONNECTIONS", "4".into())];
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let peers = silent(address.port(), 4).await;
    assert_eq!(peers.len(), 4);
    let started = std::time::Instant::now();
    let answer = answered_in_the_end(address.port(), Duration::from_secs(120)).await;
    assert_eq!(answer, Some(tonic::Code::InvalidArgument), "answered while the silent sockets are still open");
    let waited = started.elapsed();
    eprintln!("a node was answered after {waited:?}");
    assert!(waited >= Duration::from_secs(50), "the node did not wait for the silent sockets: {waited:?}");
    drop(peers);
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
}

/// With the default settings, under an open-file limit of 512 (1024 hard),
/// as containers often start: the sink raises its limit to the hard one and
/// keeps its connections under it, and a flood of 1,000 connections leaves
/// it idle. Before, the 1,021st connection made every accept fail with
/// EMFILE, which the accept loop retried at once: a core spent for as long
/// as the flood stayed. The flood's connections never say anything, so they
/// give their places back after a minute of silence, and a node is answered
/// while the flood is still there; a flood of silent
/// sockets on the metrics port takes no more than its own places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_with_the_default_settings_leaves_the_sink_idle_and_serving() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let prlimit = "/usr/bin/prlimit";
    assert!(std::path::Path::new(prlimit).exists(), "{prlimit} (util-linux) is needed");
    let dir = scratch("hostile-connections-defaults");
    let env = [
        ("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()),
        ("FILE_PATH", "out".into()),
        ("METRICS_ADDR", "127.0.0.1:0".into()),
    ];
    let sink_binary = env!("CARGO_BIN_EXE_telemetry-sink");
    let sink = Process::start("sink", prlimit, &["--nofile=512:1024", sink_binary], &env, &dir);
    let (address, metrics) = (sink.sink_address(), sink.metrics_address().port());
    let pid = sink.child.id();

    let grpc_flood = silent(address.port(), 1000).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        // utime and stime: fields 14 and 15 of stat(5), counted from the
        // state (field 3) here.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let (cpu, started) = (ticks(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let busy = (ticks() - cpu) as f64 / hz;
    eprintln!("the sink used {busy:.2} s of CPU in {:?} of the flood", started.elapsed());
    assert!(busy < 0.5, "the sink spun: {busy:.2} s of CPU in 3 s");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let files = limits.lines().find(|line| line.starts_with("Max open files")).unwrap();
    assert_eq!(files.split_whitespace().nth(3), Some("1024"), "raised to the hard limit: {files}");
    // 1024 open files less 384 kept for the rest (256 of them for the
    // metrics server's connections).
    wait_for_metric(metrics, "telemetry_sink_connections", 640.0).await;

    // More than the files left: without the metrics server's own limit,
    // accepting them would use up every descriptor.
    let metrics_flood = silent(metrics, 400).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    assert!(open < 1000, "{open} files open: the metrics flood took the room kept for the rest");
    let started = std::time::Instant::now();
    let answer = answered_in_the_end(address.port(), Duration::from_secs(180)).await;
    assert_eq!(answer, Some(tonic::Code::InvalidArgument), "answered while the flood is still there");
    eprintln!("a node was answered after {:?}, the flood still there", started.elapsed());
    let scraped = tokio::task::spawn_blocking(move || metric(metrics, "telemetry_sink_connections"));
    let scraped = tokio::time::timeout(Duration::from_secs(60), scraped).await;
    assert!(matches!(scraped, Ok(Ok(Some(_)))), "metrics answered while their flood is still there");
    drop((grpc_flood, metrics_flood));
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("MAX_CONNECTIONS lowered to what the open-file limit leaves."), "{stderr}");
}

/// `peers` sockets connected to `port` that never send anything.
async fn silent(port: u16, peers: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..peers {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        let Ok(Ok(tcp)) = tokio::time::timeout(Duration::from_secs(2), connect).await else { break };
        held.push(tcp);
    }
    held
}

/// SIGTERM while peers never finish, with the default settings: 8 sockets
/// that never send a byte and a request stalled mid-message. The sink
/// closes them once its drain limit (20 s) is up, syncs, exits 0, and what
/// it acknowledged before is in its file. Before, it waited until its 60 s
/// limits closed them (54 s measured), past Kubernetes' 30 s grace period,
/// so it was killed before it could sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_peers_that_never_finish_stops_within_the_drain_limit() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = scratch("hostile-drain");
    let env = [("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()), ("FILE_PATH", "out".into())];
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let port = address.port();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    let transport = GrpcTransport::new(endpoint, Duration::from_secs(10));
    let reading = SensorValue {
        sensor_name: "kept".into(),
        measurement: Some(telemetry_node::proto::sensor_value::Measurement {
            sensor_value: Some(7),
            created_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
        }),
        sequence: 1,
    };
    let request = SensorValuesRequest { items: vec![reading], ..Default::default() };
    transport.send_payload(prost::bytes::Bytes::from(request.encode_to_vec())).await.unwrap();
    let silent = silent(port, 8).await;
    assert_eq!(silent.len(), 8);
    let stalled = stalled_requests(port, 1, 1000).await;
    // The stalled request is under way before the sink is told to stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || sink.terminate(Duration::from_secs(90))).await.unwrap();
    let took = started.elapsed();
    eprintln!("the sink stopped {took:?} after SIGTERM");
    assert_eq!(code, 0, "{stderr}");
    assert!(took < Duration::from_secs(25), "the sink took {took:?} to stop");
    assert!(format!("{stdout}{stderr}").contains("drain limit"), "{stdout}{stderr}");
    let file = std::fs::read_to_string(dir.join("out/readings.jsonl")).unwrap();
    assert_eq!(file.lines().filter(|line| line.contains("\"sensor_name\":\"kept\"")).count(), 1, "{file}");
    drop((silent, stalled));
}

/// A second SIGTERM while the sink waits for peers that never finish ends
/// the wait at once: it syncs and exits 0 (the first alone waits out its
/// 20 s drain limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = scratch("hostile-hurry");
    let env = [("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()), ("FILE_PATH", "out".into())];
    let (sink, address) = Process::start_sink("sink", &env, &dir);
    let silent = silent(address.port(), 8).await;
    assert_eq!(silent.len(), 8);
    let started = std::time::Instant::now();
    sink.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || sink.terminate(Duration::from_secs(60))).await.unwrap();
    let took = started.elapsed();
    eprintln!("the sink stopped {took:?} after the first SIGTERM");
    assert_eq!(code, 0, "{stderr}");
    assert!(took < Duration::from_secs(10), "the sink took {took:?} to stop");
    assert!(stdout.starts_with("summary:") || stdout.contains("\nsummary:"), "{stdout}");
    drop(silent);
}

/// SIGTERM while the sink is still starting (reading back the end of a
/// 64 MiB output file): it stops cleanly once it serves, exit 0 with its
/// summary, where it used to be killed by the signal (status 143).
#[test]
fn a_sigterm_during_start_up_stops_the_sink_cleanly() {
    let dir = scratch("hostile-early-stop");
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let line = "{\"sensor_name\":\"s\",\"value\":1,\"created_at\":\"2026-01-01T00:00:00.000000000Z\",\"sequence\":1,\
                \"node_id\":\"n\",\"lane\":0,\"batch\":1,\"batch_end\":true}\n";
    std::fs::write(dir.join("out/readings.jsonl"), line.repeat((64 << 20) / line.len())).unwrap();
    let env = [("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()), ("FILE_PATH", "out".into())];
    let sink = Process::start("sink", env!("CARGO_BIN_EXE_telemetry-sink"), &[], &env, &dir);
    std::thread::sleep(Duration::from_millis(100));
    let (code, stdout, stderr) = sink.terminate(Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("summary:"), "{stdout}");
}

/// The node's metrics port with the default settings, under an open-file
/// limit of 256 (soft and hard): 256 connections that each send 600
/// pipelined scrapes and never read the answers. Before, each held its
/// place for good (the server reads no more while an answer waits to be
/// written, and only reads were timed): probes went unanswered for as long
/// as the sockets stayed, and the node's 256 descriptors were all taken, so
/// it could not reconnect to a restarted sink. Now a connection whose
/// answers are not read ends 10 s after its last read, at most 64 are
/// served at once under this limit, and the node delivers throughout. An
/// HTTP/2 connection there gets no HTTP/2 (served, its unread streams took
/// a node from 8 to 500 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_never_read_on_the_node_metrics_port_give_their_places_back() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let prlimit = "/usr/bin/prlimit";
    assert!(std::path::Path::new(prlimit).exists(), "{prlimit} (util-linux) is needed");
    let dir = scratch("hostile-metrics-unread");
    let sink_env = [("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()), ("FILE_PATH", "out".into())];
    let (sink, address) = Process::start_sink("sink", &sink_env, &dir);
    let node_env = [
        ("GRPC_SERVER_SOCKET", address.to_string()),
        ("METRICS_ADDR", "127.0.0.1:0".into()),
        ("NODE_ID", "unread".into()),
    ];
    let node_binary = env!("CARGO_BIN_EXE_telemetry-node");
    let node = Process::start("node", prlimit, &["--nofile=256:256", node_binary], &node_env, &dir);
    let metrics = node.metrics_address().port();
    let pid = node.child.id();

    let unread = unread_scrapes(metrics, 256, 600).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    assert!(open < 128, "{open} files open: the metrics port took the files the node needs");
    let started = std::time::Instant::now();
    let probe = tokio::task::spawn_blocking(move || status(metrics, b"GET /healthz HTTP/1.1\r\nHost: n\r\n\r\n"));
    let answer = tokio::time::timeout(Duration::from_secs(120), probe).await;
    let waited = started.elapsed();
    assert!(
        matches!(&answer, Ok(Ok(Some(line))) if line.starts_with("HTTP/1.1 200")),
        "probe: {answer:?} after {waited:?}, the unread scrapes still there"
    );
    eprintln!("a probe was answered after {waited:?}, the unread scrapes still there");
    drop(unread);

    let h2 =
        tokio::task::spawn_blocking(move || status(metrics, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0"));
    let h2 = tokio::time::timeout(Duration::from_secs(30), h2).await;
    assert!(
        matches!(&h2, Ok(Ok(None))) || matches!(&h2, Ok(Ok(Some(line))) if line.starts_with("HTTP/1.1 ")),
        "an HTTP/2 preface got {h2:?}"
    );

    let (code, stdout, stderr) = node.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let summary = common::summary_fields(&stdout);
    assert!(summary["produced"] > 0, "{stdout}");
    assert_eq!(summary["acked"], summary["produced"], "{stdout}");
    let (code, _, stderr) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let lines = std::fs::read_to_string(dir.join("out/readings.jsonl")).unwrap();
    let stored = lines.lines().filter(|line| line.contains("\"unread\"")).count() as u64;
    assert_eq!(stored, summary["acked"], "lines of the node in the sink's file");
}

/// `peers` connections to `port`, each with a small receive buffer, each
/// sending `scrapes` pipelined `GET /metrics` and never reading an answer;
/// held until dropped.
async fn unread_scrapes(port: u16, peers: usize, scrapes: usize) -> Flood {
    use tokio::io::AsyncWriteExt;
    let requests = b"GET /metrics HTTP/1.1\r\nHost: n\r\n\r\n".repeat(scrapes);
    let mut held = Vec::new();
    for _ in 0..peers {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(2048).unwrap();
        let connect = socket.connect(([127, 0, 0, 1], port).into());
        let Ok(Ok(mut tcp)) = tokio::time::timeout(Duration::from_secs(2), connect).await else { break };
        let requests = requests.clone();
        held.push(tokio::spawn(async move {
            let _ = tcp.write_all(&requests).await;
            std::future::pending::<()>().await;
        }));
    }
    Flood(held)
}

/// The status line the server at `port` answers `request` with, `None` if
/// it closes the connection without one; waits up to 120 s.
fn status(port: u16, request: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    http.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    http.write_all(request).ok()?;
    let mut answer = [0; 256];
    let read = http.read(&mut answer).ok()?;
    let text = String::from_utf8_lossy(&answer[..read]);
    (read > 0).then(|| text.lines().next().unwrap_or_default().to_string())
}
