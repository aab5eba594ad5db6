//! The sink server on its own: what it refuses, what it throttles, and that
//! it writes out everything it acknowledged when it stops.

mod common;

use std::{sync::Arc, time::Duration};

use prost::Message;

use common::{read_output, scratch, sink_config};
use telemetry_node::{
    config::SinkConfig,
    proto::{SensorValue, SensorValuesRequest, sensor_service_client::SensorServiceClient, sensor_value::Measurement},
    receiver,
    receiver::{SinkStats, SinkSummary},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

/// A sink serving on a free loopback port.
struct Running {
    client: SensorServiceClient<Channel>,
    stop: CancellationToken,
    serving: JoinHandle<Result<SinkSummary, telemetry_node::error::ServeError>>,
    config: SinkConfig,
    address: std::net::SocketAddr,
    stats: Arc<SinkStats>,
}

impl Running {
    async fn start(name: &str, pairs: &[(&str, String)]) -> Self {
        Self::start_in(&scratch(name), pairs).await
    }

    async fn start_in(dir: &std::path::Path, pairs: &[(&str, String)]) -> Self {
        let mut pairs = pairs.to_vec();
        pairs.push(("FILE_PATH", dir.display().to_string()));
        let config = sink_config(&pairs);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let stats = Arc::new(SinkStats::default());
        let serving = tokio::spawn({
            let (config, stop, stats) = (config.clone(), stop.clone(), Arc::clone(&stats));
            async move { receiver::serve(&config, listener, stats, stop.cancelled_owned()).await }
        });
        let client = SensorServiceClient::connect(format!("http://{address}"))
            .await
            .unwrap()
            .max_encoding_message_size(usize::MAX);
        Self { client, stop, serving, config, address, stats }
    }

    async fn send(&mut self, items: Vec<SensorValue>) -> Result<(), Code> {
        self.send_request(SensorValuesRequest { items, ..Default::default() }).await
    }

    async fn send_request(&mut self, request: SensorValuesRequest) -> Result<(), Code> {
        self.client.send_sensor_values(request).await.map(drop).map_err(|s| s.code())
    }

    /// The sink's metrics, as a scrape would show them.
    fn metrics(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        self.stats.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    async fn stop(self) -> (SinkSummary, Vec<(String, u64)>) {
        self.stop.cancel();
        let summary = tokio::time::timeout(Duration::from_secs(30), self.serving).await.unwrap().unwrap().unwrap();
        (summary, read_output(&self.config.output_file()))
    }
}

fn item(name: &str, sequence: u64) -> SensorValue {
    SensorValue {
        sensor_name: name.into(),
        measurement: Some(Measurement {
            sensor_value: Some(42),
            created_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
        }),
        sequence,
    }
}

#[tokio::test]
async fn invalid_requests_get_invalid_argument_and_nothing_is_written() {
    let mut sink = Running::start("invalid", &[]).await;
    let no_measurement = SensorValue { measurement: None, ..item("a", 1) };
    let no_value = SensorValue {
        measurement: Some(Measurement { sensor_value: None, ..item("a", 1).measurement.unwrap() }),
        ..item("a", 1)
    };
    let no_time = SensorValue {
        measurement: Some(Measurement { created_at: None, ..item("a", 1).measurement.unwrap() }),
        ..item("a", 1)
    };
    for bad in [item("", 1), no_measurement, no_value, no_time] {
        // The good reading before the bad one must not be written either.
        assert_eq!(sink.send(vec![item("a", 0), bad]).await, Err(Code::InvalidArgument));
    }
    // Still serving.
    assert_eq!(sink.send(vec![item("ok", 0), item("ok", 1)]).await, Ok(()));
    let (summary, written) = sink.stop().await;
    assert_eq!(written, vec![("ok".to_owned(), 0), ("ok".to_owned(), 1)]);
    assert_eq!((summary.rejected, summary.requests_accepted, summary.readings_written), (4, 1, 2));
}

#[tokio::test]
async fn over_the_byte_rate_requests_get_resource_exhausted() {
    let mut sink = Running::start("throttle", &[("RATE_PER_SECOND", "2000".into())]).await;
    let batch: Vec<SensorValue> = (0..10).map(|i| item("sensor", i)).collect();
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(sink.send(batch.clone()).await);
    }
    let accepted = answers.iter().filter(|a| a.is_ok()).count();
    assert!(accepted >= 1, "{answers:?}");
    assert!(answers.contains(&Err(Code::ResourceExhausted)), "{answers:?}");
    // Larger than a whole second's budget: refused for good, not throttled.
    let huge: Vec<SensorValue> = (0..200).map(|i| item("sensor", i)).collect();
    assert_eq!(sink.send(huge).await, Err(Code::FailedPrecondition));
    let (summary, written) = sink.stop().await;
    assert_eq!(written.len(), accepted * 10);
    assert_eq!(summary.throttled as usize, 10 - accepted);
}

#[tokio::test]
async fn everything_acknowledged_is_written_when_the_sink_stops() {
    // Neither the buffer size nor the flush interval is ever reached: only
    // the shutdown drain writes.
    let mut sink =
        Running::start("drain", &[("BUFFER_SIZE", "1073741824".into()), ("BUFFER_FLUSH_INTERVAL", "1h".into())]).await;
    for batch in 0..50u64 {
        let items = (0..20).map(|i| item("s", batch * 20 + i)).collect();
        assert_eq!(sink.send(items).await, Ok(()));
    }
    let (summary, written) = sink.stop().await;
    let sequences: Vec<u64> = written.iter().map(|(_, s)| *s).collect();
    assert_eq!(sequences, (0..1000).collect::<Vec<_>>());
    assert_eq!(summary.readings_written, 1000);
}

/// A request of `items` from lane 0 of node `n`, batch number `batch`.
fn batch(batch: u64, items: Vec<SensorValue>) -> SensorValuesRequest {
    SensorValuesRequest { items, node_id: "n".into(), lane: 0, batch_sequence: batch }
}

#[tokio::test]
async fn a_first_batch_numbered_zero_is_written() {
    let mut sink = Running::start("batch-zero", &[]).await;
    assert_eq!(sink.send_request(batch(0, vec![item("a", 0)])).await, Ok(()));
    // Its retry is recognised.
    assert_eq!(sink.send_request(batch(0, vec![item("a", 0)])).await, Ok(()));
    assert_eq!(sink.send_request(batch(1, vec![item("a", 1)])).await, Ok(()));
    let (summary, written) = sink.stop().await;
    assert_eq!(written, vec![("a".to_owned(), 0), ("a".to_owned(), 1)]);
    assert_eq!(summary.duplicates, 1);
}

#[tokio::test]
async fn a_batch_cut_short_by_a_crash_is_written_whole_when_it_is_retried() {
    let dir = scratch("partial-batch");
    // What a sink killed mid-write leaves: batch 4 whole, two of batch 5's
    // three lines, and a torn fourth.
    let line = |sequence: u64, batch: u64, end: bool| {
        let end = if end { ",\"batch_end\":true" } else { "" };
        format!(
            "{{\"sensor_name\":\"a\",\"value\":42,\"created_at\":\"2023-11-14T22:13:20Z\",\"sequence\":{sequence},\"node_id\":\"n\",\"lane\":0,\"batch\":{batch}{end}}}\n"
        )
    };
    let left = format!("{}{}{}{{\"sensor_na", line(0, 4, true), line(1, 5, false), line(2, 5, false));
    std::fs::write(dir.join("readings.jsonl"), left).unwrap();
    let mut sink = Running::start_in(&dir, &[]).await;
    // Batch 4 is known as written: a retry of it is recognised.
    assert_eq!(sink.send_request(batch(4, vec![item("a", 0)])).await, Ok(()));
    // The node retries batch 5, whose answer it never got: written whole.
    assert_eq!(sink.send_request(batch(5, vec![item("a", 1), item("a", 2), item("a", 3)])).await, Ok(()));
    let (summary, written) = sink.stop().await;
    let sequences: Vec<u64> = written.iter().map(|(_, s)| *s).collect();
    assert_eq!(sequences, vec![0, 1, 2, 3]);
    assert_eq!(summary.duplicates, 1);
}

/// A batch written, then more than the 16 MiB read back at a start from
/// other nodes, then a clean stop and a start: a retry of the first batch
/// (its answer was lost before the stop) is still known and not written
/// twice. The last batches are saved at the stop, not only read back.
#[tokio::test]
async fn a_retry_of_a_batch_written_long_before_a_restart_is_not_written_twice() {
    let dir = scratch("restart-memory");
    let mut sink = Running::start_in(&dir, &[]).await;
    assert_eq!(sink.send_request(batch(7, vec![item("a", 0)])).await, Ok(()));
    // 17 MiB of another node's batches: 20,000 readings of ~900 bytes a request.
    let long = "x".repeat(800);
    for number in 0..900 {
        let items = (0..20).map(|n| item(&format!("{long}-{n}"), number)).collect();
        let other = SensorValuesRequest { items, node_id: "other".into(), lane: 0, batch_sequence: number };
        assert_eq!(sink.send_request(other).await, Ok(()));
    }
    let (first, _) = sink.stop().await;
    assert_eq!(first.duplicates, 0);
    assert!(std::fs::metadata(dir.join("readings.jsonl")).unwrap().len() > 16 << 20);
    let mut sink = Running::start_in(&dir, &[]).await;
    assert_eq!(sink.send_request(batch(7, vec![item("a", 0)])).await, Ok(()));
    assert_eq!(sink.send_request(batch(8, vec![item("a", 1)])).await, Ok(()));
    let (second, written) = sink.stop().await;
    assert_eq!(second.duplicates, 1, "the retry is known after the restart");
    let own: Vec<u64> = written.iter().filter(|(name, _)| name == "a").map(|(_, s)| *s).collect();
    assert_eq!(own, vec![0, 1]);
}

#[tokio::test]
async fn a_string_that_is_not_utf8_is_the_clients_fault() {
    let mut sink = Running::start("utf8", &[]).await;
    let mut bytes = SensorValuesRequest { items: vec![item("ab", 0)], ..Default::default() }.encode_to_vec();
    let at = bytes.windows(2).position(|w| w == b"ab").unwrap();
    bytes[at] = 0xff;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", sink.address)).unwrap();
    let transport = telemetry_node::node::GrpcTransport::new(endpoint, Duration::from_secs(20));
    let answer = transport.send_payload(prost::bytes::Bytes::from(bytes)).await;
    assert_eq!(answer.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(sink.send(vec![item("ok", 0)]).await, Ok(()));
    let (summary, written) = sink.stop().await;
    assert_eq!(written, vec![("ok".to_owned(), 0)]);
    assert_eq!(summary.rejected, 1);
}

#[tokio::test]
async fn an_oversized_request_is_out_of_range_compressed_or_not_and_counted() {
    let mut sink = Running::start("oversized-gzip", &[("MAX_MESSAGE_BYTES", "65536".into())]).await;
    let big: Vec<SensorValue> = (0..2000).map(|i| item("a-rather-long-sensor-name", i)).collect();
    assert_eq!(sink.send(big.clone()).await, Err(Code::OutOfRange));
    sink.client = sink.client.clone().send_compressed(tonic::codec::CompressionEncoding::Gzip);
    assert_eq!(sink.send(big).await, Err(Code::OutOfRange));
    assert_eq!(sink.send(vec![item("ok", 0)]).await, Ok(()));
    let metrics = sink.metrics();
    let (summary, written) = sink.stop().await;
    assert_eq!(written, vec![("ok".to_owned(), 0)]);
    assert_eq!(summary.rejected, 2);
    assert!(metrics.contains("telemetry_sink_requests_rejected_total{reason=\"too_large\"} 2"), "{metrics}");
}

#[tokio::test]
async fn a_compressed_request_to_a_sink_that_refuses_compression_is_counted() {
    let mut sink = Running::start("no-gzip", &[("GRPC_COMPRESSION", "none".into())]).await;
    sink.client = sink.client.clone().send_compressed(tonic::codec::CompressionEncoding::Gzip);
    assert_eq!(sink.send(vec![item("a", 0)]).await, Err(Code::Unimplemented));
    let metrics = sink.metrics();
    let (summary, written) = sink.stop().await;
    assert!(written.is_empty());
    assert_eq!(summary.rejected, 1);
    assert!(metrics.contains("telemetry_sink_requests_rejected_total{reason=\"compression\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_request_of_empty_items_is_refused_before_it_is_decoded() {
    let mut sink = Running::start("empty-items", &[]).await;
    // 4 MiB of two-byte items: 2 million of them, each costing some 80
    // bytes once decoded. Refused at the first one, from the bytes.
    let empty = SensorValuesRequest { items: vec![SensorValue::default(); 2 << 20], ..Default::default() };
    assert!(empty.encoded_len() <= 4 << 20);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", sink.address)).unwrap();
    let transport = telemetry_node::node::GrpcTransport::new(endpoint, Duration::from_secs(20));
    let answer = transport.send_payload(prost::bytes::Bytes::from(empty.encode_to_vec())).await.unwrap_err();
    assert_eq!(answer.code(), Code::InvalidArgument);
    assert!(answer.message().contains("cannot hold a valid reading"), "{}", answer.message());
    assert_eq!(sink.send(vec![item("ok", 0)]).await, Ok(()));
    let (summary, _) = sink.stop().await;
    assert_eq!(summary.rejected, 1);
}

/// The sink tells clients they may send HTTP/2 frames of up to
/// `MAX_FRAME_BYTES`, in the SETTINGS frame that opens its side of every
/// connection: read here off the wire, as a client sees it.
#[tokio::test]
async fn the_sink_lets_clients_send_large_frames() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let sink = Running::start("large-frames", &[]).await;
    let mut connection = tokio::net::TcpStream::connect(sink.address).await.unwrap();
    // The client preface, then an empty SETTINGS frame.
    connection.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    connection.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), connection.read_exact(&mut head)).await.unwrap().unwrap();
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    assert_eq!((head[3], head[4]), (4, 0), "the server's first frame is a SETTINGS frame, not an ACK");
    let mut payload = vec![0u8; length];
    connection.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|entry| {
            (u16::from_be_bytes([entry[0], entry[1]]), u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
        })
        .collect();
    // SETTINGS_MAX_FRAME_SIZE is setting 5.
    assert!(settings.contains(&(5, receiver::MAX_FRAME_BYTES)), "settings sent: {settings:?}");
    const { assert!(receiver::MAX_FRAME_BYTES > 16_384) };
    drop(connection);
    sink.stop().await;
}

/// A peer that stalls in the middle of a frame (or vanished without a FIN)
/// is pinged once it has sent nothing for `KEEPALIVE_INTERVAL`, and its
/// connection closed when it does not answer within `KEEPALIVE_TIMEOUT`:
/// what it held is let go, and a stalled connection cannot hold the sink's
/// memory for ever.
#[tokio::test]
async fn a_peer_that_stalls_mid_frame_is_pinged_and_let_go() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let sink = Running::start("stalled-peer", &[]).await;
    let mut connection = tokio::net::TcpStream::connect(sink.address).await.unwrap();
    connection.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    connection.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    // The head of a 64 KiB DATA frame on stream 1, and 1000 bytes of it.
    connection.write_all(&[0x01, 0x00, 0x00, 0, 0, 0, 0, 0, 1]).await.unwrap();
    connection.write_all(&[0u8; 1000]).await.unwrap();
    let started = std::time::Instant::now();
    // Read what the sink sends, answering nothing, until it closes.
    let (mut pings, mut buffer) = (0, Vec::new());
    let limit = receiver::KEEPALIVE_INTERVAL + receiver::KEEPALIVE_TIMEOUT + Duration::from_secs(20);
    let closed = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match connection.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the stalled connection was still open after {limit:?}");
    let waited = started.elapsed();
    assert!(waited >= receiver::KEEPALIVE_INTERVAL, "closed after {waited:?}, before any ping was due");
    // Frames: 9-byte heads; PING is type 6.
    let mut at = 0;
    while at + 9 <= buffer.len() {
        let length = u32::from_be_bytes([0, buffer[at], buffer[at + 1], buffer[at + 2]]) as usize;
        pings += usize::from(buffer[at + 3] == 6);
        at += 9 + length;
    }
    assert!(pings >= 1, "the sink closed the connection without pinging it first");
    drop(connection);
    sink.stop().await;
}
