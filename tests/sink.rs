//! The sink server on its own: what it refuses, what it throttles, and that
//! it writes out everything it acknowledged when it stops.

mod common;

use std::{sync::Arc, time::Duration};

use common::{read_output, scratch, sink_config};
use telemetry_node::{
    config::SinkConfig,
    proto::{SensorValue, SensorValuesRequest, sensor_service_client::SensorServiceClient, sensor_value::Measurement},
    receiver,
    stats::{SinkStats, SinkSummary},
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
}

impl Running {
    async fn start(name: &str, pairs: &[(&str, String)]) -> Self {
        let mut pairs = pairs.to_vec();
        pairs.push(("FILE_PATH", scratch(name).display().to_string()));
        let config = sink_config(&pairs);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let serving = tokio::spawn({
            let (config, stop) = (config.clone(), stop.clone());
            async move { receiver::serve(&config, listener, Arc::new(SinkStats::default()), stop.cancelled_owned()).await }
        });
        let client = SensorServiceClient::connect(format!("http://{address}")).await.unwrap();
        Self { client, stop, serving, config }
    }

    async fn send(&mut self, items: Vec<SensorValue>) -> Result<(), Code> {
        self.client
            .send_sensor_values(SensorValuesRequest { items, ..Default::default() })
            .await
            .map(drop)
            .map_err(|s| s.code())
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
