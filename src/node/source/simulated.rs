//! The simulated source: the readings of many sensors, driven by one
//! interval timer and merged into one stream (the Go node's simulator, and
//! the load generator).
//!
//! A lane's sensors all run at the same rate, so they share one timer: at
//! every tick the lane's sensors take their readings in turn, round-robin,
//! each with its own name and sequence. The timer fires at the sensors'
//! combined rate (at most once a millisecond, tokio's resolution), which
//! spreads the sensors evenly over their period instead of waking them all
//! at once, and makes 100,000 sensors cost what 1 sensor costs per reading:
//! no task, no timer, just a name and a seed each. Since the sensors take
//! turns from the first, the number of readings taken fixes whose turn is
//! next and its sequence: no counter per sensor either.
//!
//! Each tick's time falls in a later millisecond than the tick before
//! ([`Stamps`]). A sensor at up to 1000 readings a second takes at most one
//! reading a tick, so its readings are all in milliseconds of their own, as
//! a time-series database needs; a faster one takes several a tick.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures::Stream;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::Stamps;
use crate::{node::Ledger, reading::Reading};

/// The finest step of tokio's timers. Sensors due more often than that take
/// several readings per step instead of asking for a finer timer.
const FINEST_TICK: Duration = Duration::from_millis(1);

/// The most readings a lane's sensors take at one tick: 65 million a
/// second, far more than any wire takes. A tick's readings are all taken at
/// once (produced, to be delivered before the node stops), so without a
/// bound, an absurd rate (10^6 sensors at 10^9 readings/s each is a valid
/// configuration) would take more per millisecond than the node could ever
/// send. Above it, readings are counted as missed.
const MOST_PER_TICK: u64 = 65_536;

/// One sensor.
#[derive(Debug)]
struct Sensor {
    /// The sensor's name, shared with every reading.
    name: &'static str,
    /// Makes this sensor's values differ from other sensors'.
    seed: u64,
}

/// A set of sensors taking `rate` readings per second each, the first
/// reading at once; yields the readings of each tick as a [`Tick`].
///
/// A tick that cannot be taken on time, because the pipeline is pushing back,
/// is skipped rather than bunched up later, as Go's `time.Ticker` does: a
/// sensor samples the present, it does not make up for the past.
#[derive(Debug)]
pub struct Sensors {
    /// Every sensor, in turn order.
    sensors: Arc<[Sensor]>,
    /// Readings taken so far. The sensors take turns from the first, so
    /// this fixes whose turn is next, and that sensor's sequence.
    taken: u64,
    /// Readings per second of all the sensors together.
    total_rate: f64,
    /// Fires every max(1 / total_rate, 1 ms).
    interval: Interval,
    /// When the first tick was due: tick k is due at `start + k × period`.
    start: Instant,
    /// Readings due up to the last tick taken, taken or missed.
    due_taken: u64,
    /// Where `produced` is counted.
    ledger: Arc<Ledger>,
    /// The ticks' times, each in a millisecond of its own.
    stamps: Stamps,
    /// Whether the last poll found no tick due: the sensors were being
    /// polled, so a tick due since is the timer's, not held back.
    waiting: bool,
    /// Whether they were polled yet: the first tick is due then.
    started: bool,
}

impl Sensors {
    /// Sensors named `names`, each taking `rate` readings per second.
    pub fn new(names: Vec<&'static str>, rate: f64, ledger: Arc<Ledger>) -> Self {
        let total_rate = rate * names.len() as f64;
        let period = Duration::from_secs_f64(1.0 / total_rate).max(FINEST_TICK);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let sensors = sensor_set(names);
        let start = Instant::now();
        Self {
            sensors,
            taken: 0,
            total_rate,
            interval,
            start,
            due_taken: 0,
            ledger,
            stamps: Stamps::default(),
            waiting: false,
            started: false,
        }
    }

    /// Readings due from the start up to, not including, tick `k`: one a
    /// tick when the timer runs at the combined rate, else each tick's share.
    fn due_before(&self, k: u64) -> u64 {
        let period = self.interval.period();
        if period > FINEST_TICK || self.total_rate <= 1000.0 {
            return k;
        }
        (k as f64 * self.total_rate * period.as_secs_f64()).floor() as u64
    }

    /// Readings to take at the tick that fired at `at`, counting as missed
    /// the readings of earlier ticks that were skipped, and those above
    /// [`MOST_PER_TICK`].
    fn due_at(&mut self, at: Instant) -> u64 {
        let k = (at.saturating_duration_since(self.start).as_nanos() / self.interval.period().as_nanos()) as u64;
        let (before, through) = (self.due_before(k), self.due_before(k + 1));
        let due = through - before;
        let taken = due.min(MOST_PER_TICK);
        let missed = before.saturating_sub(self.due_taken) + (due - taken);
        if missed > 0 {
            self.ledger.missed(missed);
        }
        self.due_taken = through;
        taken
    }

    /// The next `count` readings, each from the next sensor in turn.
    fn take_readings(&mut self, count: u64) -> Tick {
        let n = self.sensors.len() as u64;
        let tick = Tick {
            sensors: Arc::clone(&self.sensors),
            created_at: self.stamps.next(),
            turn: (self.taken % n) as usize,
            sequence: self.taken / n,
            left: count,
        };
        self.taken += count;
        self.ledger.produced(count);
        tick
    }
}

impl Stream for Sensors {
    type Item = Tick;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Tick>> {
        if self.sensors.is_empty() {
            return Poll::Ready(None);
        }
        if !self.started {
            // The turn starts when the sensors are first asked for readings,
            // not when they were made: the node's start-up is no lateness.
            self.started = true;
            self.start = Instant::now();
            self.interval.reset_immediately();
        }
        loop {
            let Poll::Ready(at) = self.interval.poll_tick(cx) else {
                self.waiting = true;
                return Poll::Pending;
            };
            self.waiting = false;
            let due = self.due_at(at);
            if due > 0 {
                return Poll::Ready(Some(self.take_readings(due)));
            }
        }
    }
}

/// When the sources stop while the pipeline still pushes back, no later
/// tick counts the ticks skipped meanwhile: they are counted here, those
/// due a period or more before the stop (one due later would have been
/// taken on time), however long after it the sensors are dropped. Sensors
/// that were waiting for their timer were not held back: a tick that fell
/// due as they stopped (the timer late, the stop first) is not a miss.
impl Drop for Sensors {
    fn drop(&mut self) {
        if self.sensors.is_empty() || self.waiting || !self.started {
            return;
        }
        let period = self.interval.period().as_nanos();
        let until = self.ledger.sources_due_until();
        let k = (until.saturating_duration_since(self.start).as_nanos() / period) as u64;
        let due = self.due_before(k);
        if due > self.due_taken {
            self.ledger.missed(due - self.due_taken);
        }
    }
}

/// The readings of one tick, made as they are iterated: a tick of thousands
/// of readings costs no buffer of its own.
#[derive(Debug)]
pub struct Tick {
    /// The lane's sensors.
    sensors: Arc<[Sensor]>,
    /// When the tick's readings were taken.
    created_at: SystemTime,
    /// The sensor whose reading comes next.
    turn: usize,
    /// That reading's sequence.
    sequence: u64,
    /// Readings still to come.
    left: u64,
}

impl Tick {
    /// Keeps only the next `n` readings.
    pub(crate) fn truncate(&mut self, n: u64) {
        self.left = self.left.min(n);
    }

    /// Passes over the next `n` readings without making them.
    pub(crate) fn pass_over(&mut self, n: u64) {
        let n = n.min(self.left);
        let sensors = self.sensors.len().max(1) as u64;
        let position = self.turn as u64 + n;
        self.turn = (position % sensors) as usize;
        self.sequence += position / sensors;
        self.left -= n;
    }
}

impl Iterator for Tick {
    type Item = Reading;

    fn next(&mut self) -> Option<Reading> {
        self.left = self.left.checked_sub(1)?;
        let sensor = &self.sensors[self.turn];
        let reading = Reading {
            sensor: sensor.name,
            sequence: self.sequence,
            value: value_at(sensor.seed, self.sequence),
            created_at: self.created_at,
        };
        self.turn += 1;
        if self.turn == self.sensors.len() {
            self.turn = 0;
            self.sequence += 1;
        }
        Some(reading)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.left).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Tick {}

/// The `count` readings sensors `names` take from the `sequence`-th reading
/// of each on, taking turns as a lane's sensors do: what a lane sends once
/// it has run for a while, made without the wait.
pub fn readings_from(names: Vec<&'static str>, sequence: u64, count: u64) -> impl Iterator<Item = Reading> {
    Tick { sensors: sensor_set(names), created_at: SystemTime::now(), turn: 0, sequence, left: count }
}

/// Sensors named `names`, in turn order.
fn sensor_set(names: Vec<&'static str>) -> Arc<[Sensor]> {
    names.into_iter().map(|name| Sensor { seed: seed_of(name), name }).collect()
}

/// A stable per-sensor seed, so that two sensors do not report the same series.
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// A synthetic measurement between 0 and 999: splitmix64 of the sequence.
fn value_at(seed: u64, sequence: u64) -> i64 {
    let mut z = seed.wrapping_add(sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) % 1000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// The sensors' readings, one at a time.
    fn readings(
        names: Vec<&'static str>,
        rate: f64,
        ledger: Arc<Ledger>,
        stop: impl std::future::Future<Output = ()>,
    ) -> impl Stream<Item = Reading> {
        Sensors::new(names, rate, ledger).take_until(stop).flat_map(futures::stream::iter)
    }

    #[tokio::test(start_paused = true)]
    async fn one_sensor_emits_at_its_rate_with_increasing_sequence() {
        let ledger = Arc::new(Ledger::default());
        let start = Instant::now();
        let readings: Vec<_> = readings(vec!["t"], 5.0, ledger.clone(), std::future::pending()).take(6).collect().await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        let sequences: Vec<u64> = readings.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(ledger.snapshot().produced, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn sensors_take_turns_spread_over_their_period() {
        let ledger = Arc::new(Ledger::default());
        let start = Instant::now();
        let mut sensors = Sensors::new(vec!["a", "b", "c"], 5.0, ledger);
        let mut seen = Vec::new();
        for _ in 0..6 {
            let tick: Vec<Reading> = sensors.next().await.unwrap().collect();
            assert_eq!(tick.len(), 1);
            seen.push((tick[0].sensor.to_string(), tick[0].sequence, start.elapsed().as_millis()));
        }
        // Every 66.7 ms, on the next whole millisecond.
        let expected = [("a", 0, 0), ("b", 0, 67), ("c", 0, 134), ("a", 1, 201), ("b", 1, 267), ("c", 1, 334)];
        let expected: Vec<_> = expected.iter().map(|&(n, s, t)| (n.to_owned(), s, t)).collect();
        assert_eq!(seen, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn sensors_faster_than_the_timer_take_several_readings_per_tick() {
        let ledger = Arc::new(Ledger::default());
        let start = Instant::now();
        // Two sensors at 1250/s: 2.5 readings per millisecond together.
        let mut sensors = Sensors::new(vec!["x", "y"], 1250.0, ledger);
        let mut counts = Vec::new();
        for _ in 0..10 {
            counts.push(sensors.next().await.unwrap().len());
        }
        assert_eq!(counts, vec![2, 3, 2, 3, 2, 3, 2, 3, 2, 3]);
        assert_eq!(start.elapsed(), Duration::from_millis(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tick_takes_at_most_its_bound_and_counts_the_rest_as_missed() {
        let ledger = Arc::new(Ledger::default());
        // 100 sensors at 10^9/s: 10^8 readings due every millisecond.
        let names: Vec<&'static str> = (0..100).map(|i| crate::reading::sensor_name(&format!("fast-{i}"))).collect();
        let mut sensors = Sensors::new(names, 1e9, Arc::clone(&ledger));
        assert_eq!(sensors.next().await.unwrap().len() as u64, MOST_PER_TICK);
        assert_eq!(sensors.next().await.unwrap().len() as u64, MOST_PER_TICK);
        assert_eq!(ledger.snapshot().produced, 2 * MOST_PER_TICK);
        assert_eq!(ledger.snapshot().missed, 2 * (100_000_000 - MOST_PER_TICK));
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_missed_under_backpressure_are_skipped_not_bunched() {
        let ledger = Arc::new(Ledger::default());
        let mut sensors = Sensors::new(vec!["slow"], 10.0, ledger);
        assert_eq!(sensors.next().await.unwrap().next().unwrap().sequence, 0);
        tokio::time::sleep(Duration::from_millis(1050)).await;
        let start = Instant::now();
        assert_eq!(sensors.next().await.unwrap().next().unwrap().sequence, 1);
        assert_eq!(start.elapsed(), Duration::ZERO, "the overdue tick fires at once");
        sensors.next().await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(50), "the next one waits for its slot");
        // Ticks at 100 ms ... 1000 ms were due while the stream was not
        // polled; the one at 1000 ms was taken late, the other 9 missed.
        assert_eq!(sensors.ledger.snapshot().produced, 3);
        assert_eq!(sensors.ledger.snapshot().missed, 9);
    }

    /// Sensors held back by the pipeline until the stop: no later tick
    /// counts the ticks skipped, so they are counted when the sensors are
    /// dropped (before, the summary said missed=0 for them).
    #[tokio::test(start_paused = true)]
    async fn ticks_held_back_until_the_stop_are_counted_as_missed() {
        let ledger = Arc::new(Ledger::default());
        let mut sensors = Sensors::new(vec!["held"], 10.0, Arc::clone(&ledger));
        sensors.next().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1050)).await;
        ledger.stop_sources();
        // The lane drains for a while before it drops its sensors.
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(sensors);
        // Ticks at 100 ms ... 900 ms were due a period or more before the
        // stop and never taken; the one at 1000 ms was still on time, and
        // those after the stop were not due.
        assert_eq!((ledger.snapshot().produced, ledger.snapshot().missed), (1, 9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tick_that_falls_due_as_the_sensors_stop_is_not_a_miss() {
        let ledger = Arc::new(Ledger::default());
        let mut sensors = Sensors::new(vec!["late"], 10.0, Arc::clone(&ledger));
        for _ in 0..10 {
            sensors.next().await.unwrap();
        }
        // Polled, and waiting for the tick at 1000 ms, which comes while the
        // runtime is busy elsewhere: the stop at 1100 ms is seen first.
        assert!(futures::poll!(sensors.next()).is_pending());
        tokio::time::sleep(Duration::from_millis(200)).await;
        ledger.stop_sources();
        drop(sensors);
        assert_eq!((ledger.snapshot().produced, ledger.snapshot().missed), (10, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn every_sensor_gets_its_readings_in_order() {
        let ledger = Arc::new(Ledger::default());
        let all: Vec<_> = readings(vec!["a", "b", "c"], 10.0, ledger, std::future::pending()).take(30).collect().await;
        for name in ["a", "b", "c"] {
            let sequences: Vec<u64> = all.iter().filter(|r| r.sensor == name).map(|r| r.sequence).collect();
            assert_eq!(sequences, (0..10).collect::<Vec<_>>(), "sensor {name}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn readings_from_a_sequence_are_those_the_sensors_take_then() {
        let ledger = Arc::new(Ledger::default());
        let taken: Vec<_> =
            readings(vec!["a", "b", "c"], 10.0, ledger, std::future::pending()).take(15).collect().await;
        let made: Vec<_> = readings_from(vec!["a", "b", "c"], 2, 9).collect();
        let fields = |r: &Reading| (r.sensor.to_string(), r.sequence, r.value);
        assert_eq!(made.iter().map(fields).collect::<Vec<_>>(), taken[6..].iter().map(fields).collect::<Vec<_>>());
    }

    #[test]
    fn values_stay_in_range_and_differ_between_sensors() {
        let (a, b) = (seed_of("a"), seed_of("b"));
        assert!((0..1000).all(|i| (0..1000).contains(&value_at(a, i))));
        assert_ne!(
            (0..10).map(|i| value_at(a, i)).collect::<Vec<_>>(),
            (0..10).map(|i| value_at(b, i)).collect::<Vec<_>>()
        );
    }
}
