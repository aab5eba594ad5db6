//! The load of `benches/remote_write.sh`: sends pre-encoded requests of 1000
//! samples as fast as they are taken, from 4 loops, for a number of seconds,
//! either as remote-write (to a database or to vmagent) or as `sensor.v1`
//! (to the sink), the same samples either way.
//!
//! usage: remote_write_load rw <url> <seconds>
//!        remote_write_load grpc <host:port> <seconds>

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prost::{Message, bytes::Bytes};
use telemetry_node::{
    node::GrpcTransport,
    prompb::{Label, Sample, TimeSeries, WriteRequest},
    proto::{SensorValue, SensorValuesRequest, sensor_value::Measurement},
};

/// Loops sending at once, unless `LOAD_LOOPS` says otherwise: 4, as one
/// node's default MAX_IN_FLIGHT.
const LOOPS: u64 = 4;
/// Distinct requests each loop cycles through.
const POOL: u64 = 64;
/// Sensors per request, and readings of each.
const SENSORS: u64 = 10;
const PER_SENSOR: u64 = 100;

/// The readings of request `index` of loop `lane`: (sensor, ms, value).
fn readings(lane: u64, index: u64, start_ms: i64) -> impl Iterator<Item = (String, i64, i64)> {
    (0..SENSORS).flat_map(move |sensor| {
        (0..PER_SENSOR).map(move |k| {
            let ms = start_ms + (index * PER_SENSOR + k) as i64;
            (format!("sensor-{sensor}"), ms, (lane * 1_000_000 + index * 1000 + sensor * 100 + k) as i64)
        })
    })
}

/// Request `index` of loop `lane` as a snappy-compressed remote-write body.
fn remote_write(lane: u64, index: u64, start_ms: i64) -> Bytes {
    let mut series: Vec<TimeSeries> = Vec::new();
    for (sensor, timestamp, value) in readings(lane, index, start_ms) {
        if series.last().is_none_or(|s| s.labels[2].value != sensor) {
            series.push(TimeSeries {
                labels: vec![
                    Label { name: "__name__".into(), value: "sensor_value".into() },
                    Label { name: "node".into(), value: format!("load-{lane}") },
                    Label { name: "sensor".into(), value: sensor.clone() },
                ],
                samples: Vec::new(),
            });
        }
        if let Some(last) = series.last_mut() {
            last.samples.push(Sample { value: value as f64, timestamp });
        }
    }
    let encoded = WriteRequest { timeseries: series }.encode_to_vec();
    Bytes::from(snap::raw::Encoder::new().compress_vec(&encoded).expect("snappy takes any input"))
}

/// Request `index` of loop `lane` as an encoded `sensor.v1` request.
fn sensor_request(lane: u64, index: u64, start_ms: i64) -> Bytes {
    let items = readings(lane, index, start_ms)
        .map(|(sensor, ms, value)| SensorValue {
            sensor_name: sensor,
            measurement: Some(Measurement {
                sensor_value: Some(value),
                created_at: Some(prost_types::Timestamp { seconds: ms / 1000, nanos: (ms % 1000) as i32 * 1_000_000 }),
            }),
            sequence: index * PER_SENSOR,
        })
        .collect();
    let request =
        SensorValuesRequest { items, node_id: format!("load-{lane}"), lane: lane as u32, batch_sequence: index };
    Bytes::from(request.encode_to_vec())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|arg| !arg.starts_with("--")).collect();
    let [mode, target, seconds] = args.as_slice() else {
        eprintln!("usage: remote_write_load rw|grpc <target> <seconds>");
        std::process::exit(2);
    };
    let seconds: u64 = seconds.parse().expect("seconds");
    let start_ms =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_millis() as i64 - 3_600_000;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let loops = std::env::var("LOAD_LOOPS").ok().and_then(|n| n.parse().ok()).unwrap_or(LOOPS);
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    runtime.block_on(async {
        let loops: Vec<_> = (0..loops)
            .map(|lane| {
                let sent = Arc::clone(&sent);
                let (mode, target) = (mode.clone(), target.clone());
                tokio::spawn(async move {
                    match mode.as_str() {
                        "rw" => rw_loop(lane, &target, start_ms, deadline, &sent).await,
                        _ => grpc_loop(lane, &target, start_ms, deadline, &sent).await,
                    }
                })
            })
            .collect();
        for one in loops {
            one.await.expect("a load loop");
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let samples = sent.load(Relaxed);
    println!("load: mode={mode} samples={samples} seconds={elapsed:.3} rate={:.0}", samples as f64 / elapsed);
}

async fn rw_loop(lane: u64, url: &str, start_ms: i64, deadline: Instant, sent: &AtomicU64) {
    let pool: Vec<Bytes> = (0..POOL).map(|i| remote_write(lane, i, start_ms)).collect();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url: hyper::Uri = url.parse().expect("a URL");
    let mut index = 0;
    while Instant::now() < deadline {
        let request = hyper::Request::post(url.clone())
            .header("content-type", "application/x-protobuf")
            .header("content-encoding", "snappy")
            .header("x-prometheus-remote-write-version", "0.1.0")
            .body(Full::new(pool[index % pool.len()].clone()))
            .expect("a request");
        index += 1;
        let Ok(response) = client.request(request).await else { continue };
        let ok = response.status().is_success();
        let _ = response.into_body().collect().await;
        if ok {
            sent.fetch_add(SENSORS * PER_SENSOR, Relaxed);
        }
    }
}

async fn grpc_loop(lane: u64, address: &str, start_ms: i64, deadline: Instant, sent: &AtomicU64) {
    let pool: Vec<Bytes> = (0..POOL).map(|i| sensor_request(lane, i, start_ms)).collect();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}")).expect("an address");
    let transport = GrpcTransport::new(endpoint, Duration::from_secs(10));
    let mut index = 0;
    while Instant::now() < deadline {
        let answer = transport.send_payload(pool[index % pool.len()].clone()).await;
        index += 1;
        match answer {
            Ok(()) => {
                sent.fetch_add(SENSORS * PER_SENSOR, Relaxed);
            }
            Err(status) => {
                if let Some(wait) = telemetry_node::node::retry::pushback(&status) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
