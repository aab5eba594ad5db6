//! Property tests of the node's pipeline under tokio's paused clock: random
//! sensor counts, rates, batch sizes and timeouts, checked against the
//! promises the node makes.

mod common;

use std::time::Duration;

use common::{Delivery, Recording, assert_complete_and_ordered, node_config};
use proptest::prelude::*;
use telemetry_node::node::Summary;
use tokio::time::Instant;

/// One random node setup.
#[derive(Debug, Clone)]
struct Setup {
    sensors: usize,
    sensor_rate: f64,
    batch_size: usize,
    batch_timeout_ms: u64,
    request_rate: f64,
    burst: u32,
    run_ms: u64,
    in_flight: usize,
}

fn setups() -> impl Strategy<Value = Setup> {
    (1usize..=12, 0.5f64..100.0, 1usize..=40, 10u64..=2_000, 0.5f64..40.0, 1u32..=5, 500u64..=20_000, 1usize..=6)
        .prop_map(|(sensors, sensor_rate, batch_size, batch_timeout_ms, request_rate, burst, run_ms, in_flight)| {
            Setup { sensors, sensor_rate, batch_size, batch_timeout_ms, request_rate, burst, run_ms, in_flight }
        })
}

/// Runs the node described by `setup` against a healthy in-memory sink for
/// `setup.run_ms` of paused time, then shuts it down.
fn run(setup: &Setup) -> (Summary, Vec<Delivery>, Instant) {
    let config = node_config(&[
        ("SENSOR_COUNT", setup.sensors.to_string()),
        ("SENSOR_VALUE_RATE_PER_SECOND", setup.sensor_rate.to_string()),
        ("BATCH_SIZE", setup.batch_size.to_string()),
        ("BATCH_TIMEOUT", format!("{}ms", setup.batch_timeout_ms)),
        ("REQUEST_RATE_PER_SECOND", setup.request_rate.to_string()),
        ("REQUEST_BURST", setup.burst.to_string()),
        ("MAX_IN_FLIGHT", setup.in_flight.to_string()),
        // Long enough that a healthy sink always gets everything.
        ("SHUTDOWN_TIMEOUT", "1h".into()),
    ]);
    let recording = Recording::default();
    let (summary, start) = common::run_paused(&config, &recording, Duration::from_millis(setup.run_ms));
    (summary, recording.deliveries(), start)
}

/// Most sends that may fall in any closed window of `window` seconds: the
/// rate over the window, plus the burst, plus the 1 ms of rate the bucket
/// holds to absorb tokio's millisecond timer resolution.
fn most_sends_in_window(setup: &Setup, window: f64) -> f64 {
    setup.request_rate * (window + 0.001) + f64::from(setup.burst)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn every_batch_holds_one_to_batch_size_readings(setup in setups()) {
        let (_, deliveries, _) = run(&setup);
        prop_assert!(!deliveries.is_empty());
        for delivery in &deliveries {
            prop_assert!((1..=setup.batch_size).contains(&delivery.items.len()), "batch of {}", delivery.items.len());
        }
    }

    #[test]
    fn no_reading_lost_or_duplicated_and_sensor_order_kept(setup in setups()) {
        let (summary, deliveries, _) = run(&setup);
        let readings: Vec<(String, u64)> =
            deliveries.iter().flat_map(|d| d.items.iter().map(|i| (i.sensor_name.clone(), i.sequence))).collect();
        let per_sensor = assert_complete_and_ordered(&readings);
        prop_assert!(per_sensor.len() <= setup.sensors);
        prop_assert_eq!(per_sensor.values().sum::<u64>(), summary.produced);
        prop_assert_eq!(summary.acked, summary.produced);
        prop_assert_eq!(summary.sent, summary.produced);
        prop_assert_eq!(summary.dropped, 0);
    }

    #[test]
    fn sends_never_exceed_rate_times_window_plus_burst(setup in setups(), window_ms in 1u64..=10_000) {
        let (_, deliveries, _) = run(&setup);
        let times: Vec<Instant> = deliveries.iter().map(|d| d.at).collect();
        let window = Duration::from_millis(window_ms);
        let limit = most_sends_in_window(&setup, window.as_secs_f64());
        let mut end = 0;
        for (start, first) in times.iter().enumerate() {
            while end < times.len() && times[end] - *first <= window {
                end += 1;
            }
            let sends = (end - start) as f64;
            prop_assert!(sends <= limit, "{} sends within {:?} from send {}, limit {}", sends, window, start, limit);
        }
    }

    #[test]
    fn achieved_rate_is_within_one_percent_when_readings_are_plentiful(
        request_rate in 0.5f64..50.0,
        burst in 1u32..=5,
        sensors in 1usize..=4,
        in_flight in 1usize..=4,
    ) {
        // Batches of one reading, and more readings than the rate can send.
        let sensor_rate = request_rate * 3.0 / sensors as f64;
        let sends = 400.0;
        let setup = Setup {
            sensors,
            sensor_rate,
            batch_size: 1,
            batch_timeout_ms: 1_000,
            request_rate,
            burst,
            run_ms: (sends / request_rate * 1_000.0) as u64,
            in_flight,
        };
        let (_, deliveries, _) = run(&setup);
        let first = deliveries.first().unwrap().at;
        let last = deliveries.last().unwrap().at;
        // The burst goes out at once; the rate is what follows it.
        let paced = deliveries.len() - setup.burst as usize;
        let achieved = paced as f64 / (last - first).as_secs_f64();
        prop_assert!((achieved / request_rate - 1.0).abs() <= 0.01, "achieved {} for {}", achieved, request_rate);
    }

    #[test]
    fn shutdown_delivers_the_partial_batch_before_returning(
        sensors in 1usize..=8,
        sensor_rate in 0.5f64..50.0,
        run_ms in 100u64..=5_000,
        in_flight in 1usize..=4,
    ) {
        // A batch that never fills and a timeout that never fires: only the
        // shutdown can send the readings.
        let setup = Setup {
            sensors,
            sensor_rate,
            batch_size: 1_000_000,
            batch_timeout_ms: 3_600_000,
            request_rate: 1.0,
            burst: 1,
            run_ms,
            in_flight,
        };
        let (summary, deliveries, start) = run(&setup);
        // One partial batch per lane, every one sent at shutdown.
        prop_assert_eq!(deliveries.len(), sensors.min(in_flight));
        for delivery in &deliveries {
            prop_assert!(delivery.at - start >= Duration::from_millis(run_ms));
        }
        prop_assert_eq!(deliveries.iter().map(|d| d.items.len() as u64).sum::<u64>(), summary.produced);
        prop_assert_eq!(summary.acked, summary.produced);
    }
}
