//! Retrying: transient failures are retried until the batch gets through;
//! a refusal is not retried and its readings are counted as dropped, with a
//! log line.

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Recording, assert_complete_and_ordered, node_config, serve_recording};
use proptest::prelude::*;
use telemetry_node::{
    node::{self, GrpcTransport},
    node::{Ledger, Summary},
};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const RETRYABLE: [Code; 3] = [Code::Unavailable, Code::ResourceExhausted, Code::DeadlineExceeded];

/// A node of 2 sensors at 10/s sending batches of 5 at 4 requests/s, one
/// request at a time, so that the scripted failures meet a known batch.
fn config(max_retries: usize) -> telemetry_node::config::NodeConfig {
    config_with(max_retries, &[])
}

/// [`config`], with `extra` settings on top.
fn config_with(max_retries: usize, extra: &[(&str, String)]) -> telemetry_node::config::NodeConfig {
    let mut pairs = vec![
        ("SENSOR_COUNT", "2".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "10".into()),
        ("BATCH_SIZE", "5".into()),
        ("MAX_IN_FLIGHT", "1".into()),
        ("REQUEST_RATE_PER_SECOND", "4".into()),
        ("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", max_retries.to_string()),
        ("GRPC_CLIENT_RETRY_SEND_INTERVAL", "200ms".into()),
        // A constant, exact wait, so that the tests can count on it.
        ("GRPC_CLIENT_RETRY_MULTIPLIER", "1".into()),
        ("GRPC_CLIENT_RETRY_JITTER", "none".into()),
        ("SHUTDOWN_TIMEOUT", "1h".into()),
    ];
    pairs.extend(extra.iter().cloned());
    node_config(&pairs)
}

/// Runs the node against `recording` for `run` of paused time.
fn run_paused(recording: &Recording, max_retries: usize, run: Duration) -> (Summary, tokio::time::Instant) {
    common::run_paused(&config(max_retries), recording, run)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn a_sink_failing_the_first_calls_still_gets_every_batch(
        codes in proptest::collection::vec(proptest::sample::select(RETRYABLE.to_vec()), 0..=10),
    ) {
        let recording = Recording::failing_with(codes.clone());
        let (summary, _) = run_paused(&recording, 10, Duration::from_secs(5));
        let per_sensor = assert_complete_and_ordered(&recording.readings());
        prop_assert_eq!(per_sensor.values().sum::<u64>(), summary.produced);
        prop_assert_eq!(summary.acked, summary.produced);
        prop_assert_eq!(summary.dropped, 0);
        prop_assert_eq!(summary.retries, codes.len() as u64);
        prop_assert_eq!(recording.calls(), recording.deliveries().len() + codes.len());
    }
}

/// When the first batch arrived, after three UNAVAILABLE answers, with
/// the node stopped at 100 ms and `extra` settings.
fn first_delivery_after_three_failures(extra: &[(&str, String)]) -> Duration {
    let recording = Recording::failing_with([Code::Unavailable; 3]);
    let (_, start) = common::run_paused(&config_with(10, extra), &recording, Duration::from_millis(100));
    recording.deliveries()[0].at - start
}

#[test]
fn retries_wait_the_retry_interval() {
    // The partial batch leaves at the 100 ms shutdown; three failed
    // attempts follow, each followed by a 200 ms wait (tokio's timers end
    // on the next whole millisecond, hence the slack).
    let waited = first_delivery_after_three_failures(&[("REQUEST_RATE_PER_SECOND", "inf".into())]);
    assert!((700..=705).contains(&waited.as_millis()), "delivered after {waited:?}");
}

#[test]
fn every_retry_takes_a_token() {
    // At 4 requests/s the bucket, not the 200 ms retry interval, spaces the
    // attempts: 250 ms each (the bucket holds 1 ms of slack, hence 849).
    let waited = first_delivery_after_three_failures(&[]);
    assert!((845..=855).contains(&waited.as_millis()), "delivered after {waited:?}");
}

#[test]
fn a_sink_that_always_fails_sees_no_more_attempts_than_the_rate() {
    // REQUEST_RATE_PER_SECOND=1, one lane, 50 ms retry waits, a sink that
    // never recovers: over 10 s, at most 11 attempts (the burst and one a
    // second), not the 200 that the retry waits alone would allow.
    let recording = Recording::failing_with([Code::Unavailable; 10_000]);
    let config = node_config(&[
        ("REQUEST_RATE_PER_SECOND", "1".into()),
        ("MAX_IN_FLIGHT", "1".into()),
        ("BATCH_TIMEOUT", "50ms".into()),
        ("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", "inf".into()),
        ("GRPC_CLIENT_RETRY_SEND_INTERVAL", "50ms".into()),
        ("GRPC_CLIENT_RETRY_MAX_INTERVAL", "50ms".into()),
        ("SHUTDOWN_TIMEOUT", "1ms".into()),
    ]);
    let _ = common::run_paused(&config, &recording, Duration::from_secs(10));
    let calls = recording.calls();
    assert!((9..=11).contains(&calls), "{calls} attempts in 10 s at 1 request/s");
}

#[test]
fn a_sink_failing_more_than_the_retries_allow_drops_the_batch_and_counts_it() {
    let recording = Recording::failing_with([Code::Unavailable; 4]);
    let (summary, _) = run_paused(&recording, 3, Duration::from_secs(3));
    let readings = recording.readings();
    assert_eq!(summary.retries, 3);
    assert_eq!(summary.dropped, 5, "the first batch of 5 is given up");
    assert!(summary.to_string().contains(" dropped_by=retries_exhausted:5"), "{summary}");
    assert_eq!(readings.len() as u64, summary.produced - 5);
    assert_eq!(summary.acked + summary.dropped, summary.produced);
}

/// A `tracing` writer that keeps what it is given.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn invalid_argument_is_not_retried_and_is_dropped_with_a_log_line() {
    let recording = Recording::failing_with([Code::InvalidArgument]);
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer({
        let logs = logs.clone();
        move || logs.clone()
    });
    let (summary, _) =
        tracing::subscriber::with_default(subscriber.finish(), || run_paused(&recording, 10, Duration::from_secs(2)));
    assert_eq!(summary.retries, 0);
    assert_eq!(summary.dropped, 5);
    assert_eq!(summary.acked, summary.produced - 5);
    assert_eq!(recording.calls(), recording.deliveries().len() + 1);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text.lines().find(|l| l.contains("Dropped batch.")).expect("a log line for the drop");
    assert!(line.contains("ERROR") && line.contains("readings=5") && line.contains("InvalidArgument"), "{line}");
}

#[tokio::test]
async fn over_real_grpc_every_batch_survives_failing_calls() {
    let recording = Recording::failing_with([Code::Unavailable, Code::ResourceExhausted, Code::DeadlineExceeded]);
    let stop = CancellationToken::new();
    let address = serve_recording(recording.clone(), stop.clone()).await;
    let config = node_config(&[
        ("GRPC_SERVER_SOCKET", address.to_string()),
        ("SENSOR_COUNT", "3".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "50".into()),
        ("BATCH_SIZE", "20".into()),
        ("BATCH_TIMEOUT", "50ms".into()),
        ("REQUEST_RATE_PER_SECOND", "100".into()),
        ("GRPC_CLIENT_RETRY_SEND_INTERVAL", "10ms".into()),
    ]);
    let transport = GrpcTransport::new(node::transport::endpoint(&config).unwrap(), Duration::from_secs(5));
    let run = node::run(&config, transport, Arc::new(Ledger::default()), tokio::time::sleep(Duration::from_secs(1)));
    let summary = tokio::time::timeout(Duration::from_secs(30), run).await.expect("the node stops in time");
    stop.cancel();
    let per_sensor = assert_complete_and_ordered(&recording.readings());
    assert_eq!(per_sensor.values().sum::<u64>(), summary.produced);
    assert_eq!((summary.acked, summary.dropped, summary.retries), (summary.produced, 0, 3));
}
