//! Sensors: streams of readings driven by interval timers, and their merge.

use std::{sync::Arc, time::Duration, time::SystemTime};

use futures::{Stream, StreamExt, stream};
use tokio::time::MissedTickBehavior;
use tokio_stream::wrappers::IntervalStream;

use crate::{
    reading::Reading,
    stats::{NodeStats, count},
};

/// One sensor: a reading every `period`, the first one at once.
///
/// A tick that cannot be taken on time, because the pipeline is pushing back,
/// is skipped rather than bunched up later, as Go's `time.Ticker` does: a
/// sensor samples the present, it does not make up for the past.
pub fn sensor(name: Arc<str>, period: Duration, stats: Arc<NodeStats>) -> impl Stream<Item = Reading> + Unpin {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let seed = seed_of(&name);
    IntervalStream::new(interval).zip(stream::iter(0u64..)).map(move |(_, sequence)| {
        count(&stats.produced, 1);
        Reading { sensor: Arc::clone(&name), sequence, value: value_at(seed, sequence), created_at: SystemTime::now() }
    })
}

/// Every sensor named in `names`, merged into one stream.
pub fn merged(names: Vec<Arc<str>>, period: Duration, stats: &Arc<NodeStats>) -> impl Stream<Item = Reading> {
    stream::select_all(names.into_iter().map(|name| sensor(name, period, Arc::clone(stats))))
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

    #[tokio::test(start_paused = true)]
    async fn emits_at_its_rate_with_increasing_sequence() {
        let stats = Arc::new(NodeStats::default());
        let start = tokio::time::Instant::now();
        let readings: Vec<_> = sensor("t".into(), Duration::from_millis(200), stats.clone()).take(6).collect().await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        let sequences: Vec<u64> = readings.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(stats.snapshot().produced, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn merge_keeps_every_sensor() {
        let stats = Arc::new(NodeStats::default());
        let names: Vec<Arc<str>> = vec!["a".into(), "b".into(), "c".into()];
        let readings: Vec<_> = merged(names, Duration::from_millis(100), &stats).take(30).collect().await;
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
