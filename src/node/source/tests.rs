//! Merged sources keep each sensor's order and each source's pace, and a
//! source that stalls holds back no other.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use proptest::prelude::*;
use tokio::time::Instant;

use super::*;

/// A probe that gives `sensors` readings each round, its values counting up,
/// after `delay` (a source that is slow to read).
struct Counting {
    sensors: Vec<&'static str>,
    delay: Duration,
    rounds: i64,
}

impl Probe for Counting {
    const KIND: &'static str = "test";

    async fn read(&mut self) -> Round {
        tokio::time::sleep(self.delay).await;
        self.rounds += 1;
        Round { values: self.sensors.iter().map(|name| (*name, self.rounds)).collect(), failures: Vec::new() }
    }
}

/// A probe that never answers.
struct Stalled;

impl Probe for Stalled {
    const KIND: &'static str = "stalled";

    async fn read(&mut self) -> Round {
        std::future::pending().await
    }
}

fn names(prefix: &str, n: usize) -> Vec<&'static str> {
    (0..n).map(|i| crate::reading::sensor_name(&format!("{prefix}{i}"))).collect()
}

/// Runs `sources` merged for `run`, in paused time; every reading with the
/// time it came out.
async fn collect(sources: Vec<Source>, run: Duration) -> Vec<(Reading, Duration)> {
    let start = Instant::now();
    let stop = tokio::time::sleep(run);
    let merged = merge(sources).take_until(stop);
    merged.flat_map(|readings| futures::stream::iter(readings.map(move |r| (r, start.elapsed())))).collect().await
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn merged_sources_keep_each_sensors_order_and_each_sources_rate(
        periods in proptest::collection::vec(1u64..500, 1..5),
        simulated in 0usize..4,
        seconds in 1u64..5,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let ledger = Arc::new(Ledger::default());
            let mut sources: Vec<Source> = Vec::new();
            for (i, period) in periods.iter().enumerate() {
                let probe = Counting { sensors: names(&format!("p{i}-"), 2), delay: Duration::ZERO, rounds: 0 };
                sources.push(polled(probe, Duration::from_millis(*period), Arc::clone(&ledger)));
            }
            let sim_names = names("sim-", simulated);
            if !sim_names.is_empty() {
                let sensors = simulated::Sensors::new(sim_names.clone(), 20.0, Arc::clone(&ledger));
                sources.push(Box::pin(sensors.map(Readings::Simulated)));
            }
            let run = Duration::from_secs(seconds);
            let all = collect(sources, run).await;
            // Each source's pace: one round a period, the first at once.
            for (i, period) in periods.iter().enumerate() {
                let rounds = all.iter().filter(|(r, _)| r.sensor == format!("p{i}-0")).count() as u64;
                let expected = (run.as_millis() as u64).div_ceil(*period);
                prop_assert!(rounds.abs_diff(expected) <= 1, "source {i}: {rounds} rounds, expected {expected}");
            }
            if !sim_names.is_empty() {
                let per_sensor = all.iter().filter(|(r, _)| r.sensor == sim_names[0]).count() as u64;
                prop_assert!(per_sensor.abs_diff(20 * seconds) <= 1, "simulated: {per_sensor}");
            }
            // Each sensor's order: sequences (and values) only grow.
            let mut last: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
            for (reading, _) in &all {
                if let Some(before) = last.insert(reading.sensor, reading.sequence) {
                    prop_assert!(reading.sequence > before, "{} went from {before} to {}", reading.sensor, reading.sequence);
                }
            }
            prop_assert_eq!(ledger.snapshot().produced, all.len() as u64);
            Ok(())
        })?;
    }

    /// A time-series database holds one sample per sensor and millisecond:
    /// no source stamps two readings of one sensor in the same one, at any
    /// rate the configuration allows (1000 a second at most), whatever the
    /// timers and the pipeline do (paused time runs the ticks of seconds
    /// within real microseconds: the stamps outrun the clock and must still
    /// differ).
    #[test]
    fn no_source_stamps_two_readings_of_a_sensor_in_one_millisecond(
        sensors in 1usize..40,
        rate in 0.5f64..=crate::config::MAX_SENSOR_RATE,
        periods in proptest::collection::vec((1u64..50, 0u64..80), 0..3),
        pauses in proptest::collection::vec(0u64..5, 1..50),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let ledger = Arc::new(Ledger::default());
            let simulated = simulated::Sensors::new(names("sim-", sensors), rate, Arc::clone(&ledger));
            let mut sources: Vec<Source> = vec![Box::pin(simulated.map(Readings::Simulated))];
            for (i, (period, delay)) in periods.iter().enumerate() {
                let probe =
                    Counting { sensors: names(&format!("p{i}-"), 3), delay: Duration::from_millis(*delay), rounds: 0 };
                sources.push(polled(probe, Duration::from_millis(*period), Arc::clone(&ledger)));
            }
            let mut merged = merge(sources);
            let mut last: std::collections::HashMap<&str, u128> = std::collections::HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut k = 0;
            while Instant::now() < deadline {
                let Some(readings) = merged.next().await else { break };
                for reading in readings {
                    let millis = reading.created_at.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
                    if let Some(before) = last.insert(reading.sensor, millis) {
                        prop_assert!(millis > before, "{} stamped {millis} after {before}", reading.sensor);
                    }
                }
                // The pipeline pushing back, now and then.
                tokio::time::sleep(Duration::from_millis(pauses[k % pauses.len()])).await;
                k += 1;
            }
            Ok(())
        })?;
    }

    #[test]
    fn a_stalled_or_slow_source_does_not_delay_the_others(
        period_ms in 10u64..300,
        slow_ms in 0u64..5_000,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let ledger = Arc::new(Ledger::default());
            let period = Duration::from_millis(period_ms);
            let fast = Counting { sensors: names("fast-", 1), delay: Duration::ZERO, rounds: 0 };
            let slow = Counting { sensors: names("slow-", 1), delay: Duration::from_millis(slow_ms), rounds: 0 };
            let sources = vec![
                polled(Stalled, period, Arc::clone(&ledger)),
                polled(slow, period, Arc::clone(&ledger)),
                polled(fast, period, Arc::clone(&ledger)),
            ];
            let all = collect(sources, Duration::from_secs(10)).await;
            // The fast source's k-th reading comes out at its k-th tick, to
            // the millisecond, whatever the others do.
            let fast: Vec<Duration> = all.iter().filter(|(r, _)| r.sensor == "fast-0").map(|(_, at)| *at).collect();
            prop_assert_eq!(fast.len() as u64, 10_000u64.div_ceil(period_ms));
            for (k, at) in fast.iter().enumerate() {
                prop_assert_eq!(*at, period * k as u32);
            }
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn failures_are_counted_by_source_and_reason_and_give_no_reading() {
    struct Failing;
    impl Probe for Failing {
        const KIND: &'static str = "file";
        async fn read(&mut self) -> Round {
            Round {
                values: vec![("ok", 1)],
                failures: vec![Failure::new("missing", "/gone"), Failure::new("not_an_integer", "/bad")],
            }
        }
    }
    let ledger = Arc::new(Ledger::default());
    let readings =
        collect(vec![polled(Failing, Duration::from_secs(1), Arc::clone(&ledger))], Duration::from_millis(2500)).await;
    assert_eq!(readings.len(), 3);
    let failed = |reason| ledger.failures("file", reason);
    assert_eq!((failed("missing"), failed("not_an_integer")), (3, 3));
    let summary = ledger.snapshot();
    assert_eq!((summary.produced, summary.failed), (3, 6));
    let last_read = ledger.last_read("file");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - 60.0..=now).contains(&last_read), "the last read's time is shown: {last_read}");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_source_delays_no_batch_beyond_the_batch_timeout() {
    let ledger = Arc::new(Ledger::default());
    let fast = Counting { sensors: names("batched-", 3), delay: Duration::ZERO, rounds: 0 };
    let sources = vec![
        polled(Stalled, Duration::from_millis(10), Arc::clone(&ledger)),
        polled(fast, Duration::from_millis(70), ledger),
    ];
    let timeout = Duration::from_millis(250);
    let start = Instant::now();
    let merged = merge(sources).take_until(tokio::time::sleep(Duration::from_secs(5)));
    let batches = crate::node::batch::batches(Box::pin(merged), 1000, timeout);
    let batches: Vec<(Vec<Reading>, Duration)> = batches.map(|batch| (batch, start.elapsed())).collect().await;
    let mut count = 0;
    for (batch, sent_at) in &batches {
        for reading in batch {
            // Round k was read at tick k, 70 ms apart.
            let read_at = Duration::from_millis(70) * reading.sequence as u32;
            assert!(
                *sent_at - read_at <= timeout,
                "round {} read at {read_at:?}, batched at {sent_at:?}",
                reading.sequence
            );
            count += 1;
        }
    }
    assert_eq!(count, 3 * 5000u64.div_ceil(70));
}

#[tokio::test(start_paused = true)]
async fn ticks_skipped_while_a_read_runs_long_are_counted_as_missed() {
    let ledger = Arc::new(Ledger::default());
    // Reads take 2.5 periods: of every three ticks, two are skipped.
    let slow = Counting { sensors: names("long-", 2), delay: Duration::from_millis(250), rounds: 0 };
    let readings =
        collect(vec![polled(slow, Duration::from_millis(100), Arc::clone(&ledger))], Duration::from_secs(3)).await;
    let rounds = readings.len() as u64 / 2;
    let summary = ledger.snapshot();
    assert!((9..=12).contains(&rounds), "{rounds} rounds");
    // 30 ticks were due in 3 s: each was read or counted as missed (2
    // readings each), but for the round cut short by the end of the run
    // and the ticks after it began, which the next round would count.
    let accounted = rounds + summary.missed / 2;
    assert!((26..=30).contains(&accounted), "{rounds} rounds, {summary}");
}

/// A source held back by the pipeline until the stop: no later round
/// counts the ticks it skipped, so they are counted when it is dropped
/// (before, the summary said missed=0 for them).
#[tokio::test(start_paused = true)]
async fn ticks_held_back_until_the_stop_are_counted_as_missed() {
    let ledger = Arc::new(Ledger::default());
    let probe = Counting { sensors: names("held-", 2), delay: Duration::ZERO, rounds: 0 };
    let mut source = polled(probe, Duration::from_millis(100), Arc::clone(&ledger));
    assert!(source.next().await.is_some());
    tokio::time::sleep(Duration::from_millis(1050)).await;
    ledger.stop_sources();
    // The lane drains for a while before it drops its sources.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(source);
    // Ticks at 100 ms ... 900 ms were due a period or more before the stop
    // and never read: 9 rounds of 2 readings. The one at 1000 ms was still
    // on time, and those after the stop were not due.
    let summary = ledger.snapshot();
    assert_eq!((summary.produced, summary.missed), (2, 18), "{summary}");
    // A source stopped mid-read counts the round under way as read.
    let ledger = Arc::new(Ledger::default());
    let slow = Counting { sensors: names("long-", 2), delay: Duration::from_millis(350), rounds: 0 };
    let mut source = polled(slow, Duration::from_millis(100), Arc::clone(&ledger));
    assert!(source.next().await.is_some());
    // Round 1 begins at 350 ms (ticks at 100 and 200 ms skipped) and is cut
    // at 500 ms: ticks 300 and 400 ms were due meanwhile, the one at 300 ms
    // being the round's own.
    let _ = tokio::time::timeout(Duration::from_millis(150), source.next()).await;
    drop(source);
    let summary = ledger.snapshot();
    assert_eq!((summary.produced, summary.missed), (2, 6), "{summary}");
}

#[tokio::test(start_paused = true)]
async fn a_failing_read_counts_as_failed_not_as_missed() {
    // Two good rounds, then nothing but failures.
    struct Breaking(u32);
    impl Probe for Breaking {
        const KIND: &'static str = "file";
        async fn read(&mut self) -> Round {
            self.0 += 1;
            if self.0 <= 2 {
                return Round { values: vec![("v", 1)], failures: Vec::new() };
            }
            Round { values: Vec::new(), failures: vec![Failure::new("not_an_integer", "/v")] }
        }
    }
    let ledger = Arc::new(Ledger::default());
    let source = polled(Breaking(0), Duration::from_millis(100), Arc::clone(&ledger));
    let readings = collect(vec![source], Duration::from_millis(2050)).await;
    let summary = ledger.snapshot();
    assert_eq!((readings.len(), summary.failed, summary.missed), (2, 19, 0), "{summary}");
}
