//! Property tests of the promise that a load within the node's capacity
//! (BATCH_SIZE × REQUEST_RATE_PER_SECOND) loses nothing: batches grow while
//! they wait for a token instead of queueing, no tick is missed, a stop
//! delivers everything, and a reading waits at most BATCH_TIMEOUT plus its
//! lane's wait for a token. Above capacity, what is lost is counted.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{Delivery, Recording, assert_complete_and_ordered, node_config};
use proptest::prelude::*;
use telemetry_node::node::Summary;
use tokio::time::Instant;

/// One random node setup, its sensor rate derived from the share of the
/// capacity it is to use.
#[derive(Debug, Clone)]
struct Setup {
    sensors: usize,
    in_flight: usize,
    batch_size: usize,
    batch_timeout_ms: u64,
    request_rate: f64,
    sensor_rate: f64,
    run_ms: u64,
    /// `None`: the default overflow policy.
    policy: Option<&'static str>,
}

impl Setup {
    fn lanes(&self) -> usize {
        self.in_flight.min(self.sensors)
    }

    /// Sensors in the busiest lane (sensors are dealt round-robin).
    fn busiest(&self) -> usize {
        self.sensors.div_ceil(self.lanes())
    }

    /// The longest a lane can wait for a token: every other lane ahead of
    /// it in line, one token each.
    fn token_wait(&self) -> Duration {
        Duration::from_secs_f64(self.lanes() as f64 / self.request_rate)
    }
}

/// Setups using `share` (0 to 1) of what the busiest lane can carry, where
/// a stop can deliver one batch per lane within the default SHUTDOWN_TIMEOUT
/// (10 s), and no lane's sensors tick more than 1000 times a second (so
/// each reading's due time follows from its sequence).
fn setups(share: impl Strategy<Value = f64>) -> impl Strategy<Value = Setup> {
    (1usize..=1000, 1usize..=8, 1usize..=2000, 10u64..=2_000, 0f64..1.0, share, 500u64..=20_000).prop_map(
        |(sensors, in_flight, batch_size, batch_timeout_ms, rate_draw, share, run_ms)| {
            let lanes = in_flight.min(sensors);
            // At least a lane's batch per 1.25 s each, at most 50/s.
            let request_rate = lanes as f64 / 8.0 + rate_draw * 50.0;
            let mut setup = Setup {
                sensors,
                in_flight,
                batch_size,
                batch_timeout_ms,
                request_rate,
                sensor_rate: 0.0,
                run_ms,
                policy: None,
            };
            // The busiest lane may fill one batch per round of the line.
            let per_lane = batch_size as f64 * request_rate / lanes as f64;
            let rate = (share * per_lane / setup.busiest() as f64).min(1000.0 / setup.busiest() as f64);
            setup.sensor_rate = rate.max(0.01);
            setup
        },
    )
}

/// Runs `setup` against a healthy in-memory sink, then stops it, with every
/// other setting at its default.
fn run(setup: &Setup) -> (Summary, Vec<Delivery>, Instant) {
    let mut pairs = vec![
        ("SENSOR_COUNT", setup.sensors.to_string()),
        ("SENSOR_VALUE_RATE_PER_SECOND", setup.sensor_rate.to_string()),
        ("BATCH_SIZE", setup.batch_size.to_string()),
        ("BATCH_TIMEOUT", format!("{}ms", setup.batch_timeout_ms)),
        ("REQUEST_RATE_PER_SECOND", setup.request_rate.to_string()),
        ("MAX_IN_FLIGHT", setup.in_flight.to_string()),
    ];
    if let Some(policy) = setup.policy {
        pairs.push(("OVERFLOW_POLICY", policy.to_string()));
    }
    let config = node_config(&pairs);
    let recording = Recording::default();
    let (summary, start) = common::run_paused(&config, &recording, Duration::from_millis(setup.run_ms));
    (summary, recording.deliveries(), start)
}

/// When each sensor's reading `sequence` was due: the sensors of a lane
/// take turns on one timer that ticks at their combined rate.
fn due(setup: &Setup, start: Instant) -> impl Fn(&str, u64) -> Instant {
    let lanes = setup.lanes();
    let sensors = setup.sensors;
    let rate = setup.sensor_rate;
    let names: HashMap<String, (usize, usize)> = (1..=sensors)
        .map(|i| {
            let name = if sensors == 1 { "sensor".to_owned() } else { format!("sensor-{i}") };
            let lane = (i - 1) % lanes;
            (name, ((i - 1) / lanes, (sensors - lane).div_ceil(lanes)))
        })
        .collect();
    move |name, sequence| {
        let (turn, in_lane) = names[name];
        let period = Duration::from_secs_f64(1.0 / (rate * in_lane as f64)).max(Duration::from_millis(1));
        start + period * (sequence as u32 * in_lane as u32 + turn as u32)
    }
}

/// Everything produced was delivered once, in order, with nothing missed
/// or dropped; every request within BATCH_SIZE and every reading delivered
/// within BATCH_TIMEOUT plus the token wait.
fn assert_lossless(setup: &Setup) -> Result<(), TestCaseError> {
    let (summary, deliveries, start) = run(setup);
    prop_assert_eq!(summary.missed, 0, "{}", summary);
    prop_assert_eq!(summary.dropped, 0, "{}", summary);
    prop_assert_eq!(summary.acked, summary.produced, "{}", summary);
    let readings: Vec<(String, u64)> =
        deliveries.iter().flat_map(|d| d.items.iter().map(|i| (i.sensor_name.clone(), i.sequence))).collect();
    let per_sensor = assert_complete_and_ordered(&readings);
    prop_assert_eq!(per_sensor.values().sum::<u64>(), summary.produced);
    let due = due(setup, start);
    // Tokio's timers end on whole milliseconds: a little slack per wait.
    let most =
        Duration::from_millis(setup.batch_timeout_ms) + setup.token_wait().mul_f64(1.01) + Duration::from_millis(5);
    let stop = start + Duration::from_millis(setup.run_ms);
    for delivery in &deliveries {
        prop_assert!(delivery.items.len() <= setup.batch_size, "a request of {}", delivery.items.len());
        // What the stop sends waits for the stop, not for its batch.
        if delivery.at > stop {
            continue;
        }
        for item in &delivery.items {
            let waited = delivery.at - due(&item.sensor_name, item.sequence);
            prop_assert!(waited <= most, "{} #{} waited {:?} > {:?}", item.sensor_name, item.sequence, waited, most);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The defaults' promise: within 90 % of the capacity, nothing is
    /// missed, nothing dropped, and a stop with the default SHUTDOWN_TIMEOUT
    /// delivers everything.
    #[test]
    fn within_capacity_the_defaults_miss_and_drop_nothing(setup in setups(0.01f64..0.9)) {
        assert_lossless(&setup)?;
    }

    /// Under OVERFLOW_POLICY=block too, as long as no batch fills while it
    /// waits for its token (only a full batch holds the sensors back).
    #[test]
    fn batches_that_never_fill_hold_back_no_sensor_under_block(setup in setups(0.01f64..0.9)) {
        let mut setup = setup;
        setup.policy = Some("block");
        // What the busiest lane gathers while a batch is due and waits.
        let gathering = Duration::from_millis(setup.batch_timeout_ms) + setup.token_wait();
        let lane_rate = setup.sensor_rate * setup.busiest() as f64;
        prop_assume!(lane_rate * gathering.as_secs_f64() + 1.0 <= 0.9 * setup.batch_size as f64);
        assert_lossless(&setup)?;
    }

    /// Above capacity, the overflow policy acts (or the sensors miss ticks,
    /// under block), and every reading produced is acked or counted as
    /// dropped: none goes missing.
    #[test]
    fn above_capacity_what_is_lost_is_counted(setup in setups(0.5f64..1.0), over in 2.0f64..10.0, block in any::<bool>()) {
        let mut setup = setup;
        setup.sensors = setup.sensors.min(100);
        // Past the lanes' share of the capacity, whatever the timer allows.
        let per_lane = setup.batch_size as f64 * setup.request_rate / setup.lanes() as f64;
        // A sensor gives at most 1000 readings a second.
        setup.sensor_rate = (over * per_lane / setup.busiest() as f64).min(telemetry_node::config::MAX_SENSOR_RATE);
        prop_assume!(setup.sensor_rate * setup.busiest() as f64 > 1.5 * per_lane);
        setup.run_ms = setup.run_ms.max(5_000);
        setup.policy = block.then_some("block");
        let (summary, deliveries, _) = run(&setup);
        let delivered: u64 = deliveries.iter().map(|d| d.items.len() as u64).sum();
        prop_assert_eq!(delivered, summary.acked);
        prop_assert_eq!(summary.acked + summary.dropped, summary.produced, "{}", summary);
        for delivery in &deliveries {
            prop_assert!(delivery.items.len() <= setup.batch_size, "a request of {}", delivery.items.len());
        }
    }
}
