//! Sensors: streams of readings driven by interval timers, and their merge.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, SystemTime},
};

use futures::{Stream, StreamExt, stream};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::{reading::Reading, stats::NodeStats};

/// The finest step of tokio's timers. A sensor faster than one reading per
/// step takes several readings per step instead of asking for a finer timer.
const FINEST_TICK: Duration = Duration::from_millis(1);

/// One sensor: `rate` readings per second, the first one at once.
///
/// A tick that cannot be taken on time, because the pipeline is pushing back,
/// is skipped rather than bunched up later, as Go's `time.Ticker` does: a
/// sensor samples the present, it does not make up for the past.
#[derive(Debug)]
pub struct Sensor {
    /// The sensor's name, shared with every reading.
    name: Arc<str>,
    /// Readings per second.
    rate: f64,
    /// Fires every max(1 / rate, 1 ms).
    interval: Interval,
    /// When the first tick was due: tick k is due at `start + k × period`.
    start: Instant,
    /// Sequence of the next reading.
    next_sequence: u64,
    /// Makes this sensor's values differ from other sensors'.
    seed: u64,
    /// Where `produced` is counted.
    stats: Arc<NodeStats>,
}

impl Sensor {
    /// A sensor named `name` taking `rate` readings per second.
    pub fn new(name: Arc<str>, rate: f64, stats: Arc<NodeStats>) -> Self {
        let period = Duration::from_secs_f64(1.0 / rate).max(FINEST_TICK);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let seed = seed_of(&name);
        Self { name, rate, interval, start: Instant::now(), next_sequence: 0, seed, stats }
    }

    /// Readings due at the tick that fired at `at`: one at rates up to one
    /// per millisecond; above that, this tick's share of the rate.
    fn due_at(&self, at: Instant) -> u64 {
        let period = self.interval.period();
        if period > FINEST_TICK || self.rate <= 1000.0 {
            return 1;
        }
        let k = (at.saturating_duration_since(self.start).as_nanos() / period.as_nanos()) as f64;
        let per_tick = self.rate * period.as_secs_f64();
        ((k + 1.0) * per_tick).floor() as u64 - (k * per_tick).floor() as u64
    }
}

impl Stream for Sensor {
    type Item = Tick;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Tick>> {
        let mut count = 0;
        while count == 0 {
            let at = ready!(self.interval.poll_tick(cx));
            count = self.due_at(at);
        }
        let first_sequence = self.next_sequence;
        self.next_sequence += count;
        self.stats.produced.inc_by(count);
        Poll::Ready(Some(Tick {
            sensor: Arc::clone(&self.name),
            seed: self.seed,
            first_sequence,
            count,
            created_at: SystemTime::now(),
        }))
    }
}

/// The readings one sensor took at one tick of its timer: one, or several
/// for a sensor faster than the timer. Merging sensors tick by tick rather
/// than reading by reading keeps the cost of the merge off each reading.
#[derive(Debug, Clone)]
pub struct Tick {
    /// The sensor's name.
    sensor: Arc<str>,
    /// The sensor's value seed.
    seed: u64,
    /// Sequence of the first reading.
    first_sequence: u64,
    /// How many readings.
    count: u64,
    /// When the tick fired.
    created_at: SystemTime,
}

impl Tick {
    /// The readings, in sequence order.
    pub fn readings(self) -> impl Iterator<Item = Reading> {
        (self.first_sequence..self.first_sequence + self.count).map(move |sequence| Reading {
            sensor: Arc::clone(&self.sensor),
            sequence,
            value: value_at(self.seed, sequence),
            created_at: self.created_at,
        })
    }
}

/// Every sensor named in `names`, at `rate` readings per second each, merged
/// into one stream of readings that ends when `stop` resolves: the sensors
/// stop at a tick boundary, and every reading of the last ticks is yielded.
pub fn merged<F: Future<Output = ()>>(
    names: Vec<Arc<str>>,
    rate: f64,
    stats: Arc<NodeStats>,
    stop: F,
) -> impl Stream<Item = Reading> + use<F> {
    let sensors: Vec<Sensor> = names.into_iter().map(|name| Sensor::new(name, rate, Arc::clone(&stats))).collect();
    stream::select_all(sensors).take_until(stop).flat_map(|tick| stream::iter(tick.readings()))
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
    use futures::StreamExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn emits_at_its_rate_with_increasing_sequence() {
        let stats = Arc::new(NodeStats::default());
        let start = Instant::now();
        let readings: Vec<_> = Sensor::new("t".into(), 5.0, stats.clone())
            .take(6)
            .flat_map(|t| stream::iter(t.readings()))
            .collect()
            .await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        let sequences: Vec<u64> = readings.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(stats.snapshot().produced, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sensor_faster_than_the_timer_takes_several_readings_per_tick() {
        let stats = Arc::new(NodeStats::default());
        let start = Instant::now();
        let mut sensor = Sensor::new("fast".into(), 2500.0, stats);
        // 2.5 readings per millisecond: 2, 3, 2, 3, ... per tick.
        let mut counts = Vec::new();
        for _ in 0..10 {
            counts.push(sensor.next().await.unwrap().count);
        }
        assert_eq!(counts, vec![2, 3, 2, 3, 2, 3, 2, 3, 2, 3]);
        assert_eq!(start.elapsed(), Duration::from_millis(9));
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_missed_under_backpressure_are_skipped_not_bunched() {
        let stats = Arc::new(NodeStats::default());
        let mut sensor = Sensor::new("slow".into(), 10.0, stats);
        assert_eq!(sensor.next().await.unwrap().first_sequence, 0);
        tokio::time::sleep(Duration::from_millis(1050)).await;
        let start = Instant::now();
        sensor.next().await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO, "the overdue tick fires at once");
        sensor.next().await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(50), "the next one waits for its slot");
    }

    #[tokio::test(start_paused = true)]
    async fn merge_keeps_every_sensor() {
        let stats = Arc::new(NodeStats::default());
        let names: Vec<Arc<str>> = vec!["a".into(), "b".into(), "c".into()];
        let readings: Vec<_> = merged(names, 10.0, stats, std::future::pending()).take(30).collect().await;
        for name in ["a", "b", "c"] {
            let sequences: Vec<u64> = readings.iter().filter(|r| &*r.sensor == name).map(|r| r.sequence).collect();
            assert_eq!(sequences, (0..10).collect::<Vec<_>>(), "sensor {name}");
        }
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
