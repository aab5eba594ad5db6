//! The overflow queue: decouples a lane's sensors from its sender when the
//! policy is to drop rather than to push back. Bounded; every reading it
//! drops is counted by reason and logged, at most once a second.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::{Stream, StreamExt};
use tokio::sync::Notify;
use tracing::error;

use crate::node::{
    ledger::{DropReason, Ledger},
    source::Readings,
};

/// What a full queue gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drop {
    /// The oldest reading queued, to make room.
    Oldest,
    /// The reading arriving.
    Newest,
}

/// The queue and its end-of-input mark.
#[derive(Debug, Default)]
struct State {
    /// Ticks waiting for the batcher, oldest first, kept as the sources made
    /// them (a simulated tick makes its readings only as the batcher copies
    /// them into its batch).
    runs: VecDeque<Readings>,
    /// Readings in `runs`.
    len: usize,
    /// Whether the sensors have stopped.
    closed: bool,
}

/// Shared between the sensors' task and the batcher.
#[derive(Debug)]
struct Queue {
    state: Mutex<State>,
    /// Wakes the batcher when readings arrive or the input ends.
    arrived: Notify,
}

/// Runs `ticks` in a task of its own, so the sensors never wait for the
/// sender, and yields them through a queue of `capacity` readings that
/// drops as `drop` says when full.
pub(crate) fn decouple(
    ticks: impl Stream<Item = Readings> + Send + 'static,
    capacity: usize,
    drop: Drop,
    ledger: Arc<Ledger>,
) -> impl Stream<Item = Readings> {
    let queue = Arc::new(Queue { state: Mutex::default(), arrived: Notify::new() });
    let producer = tokio::spawn(produce(ticks, Arc::clone(&queue), capacity, drop, ledger));
    let guard = AbortOnDrop(producer);
    futures::stream::unfold((queue, guard), |(queue, guard)| async move {
        loop {
            let notified = queue.arrived.notified();
            {
                let mut state = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(run) = state.runs.pop_front() {
                    state.len -= run.len();
                    return Some((run, (Arc::clone(&queue), guard)));
                }
                if state.closed {
                    return None;
                }
            }
            notified.await;
        }
    })
}

/// Stops the sensors' task when the lane is dropped (shutdown timeout).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl std::ops::Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Moves each tick's readings into the queue, dropping as told.
async fn produce(
    ticks: impl Stream<Item = Readings>,
    queue: Arc<Queue>,
    capacity: usize,
    drop: Drop,
    ledger: Arc<Ledger>,
) {
    let reason = match drop {
        Drop::Oldest => DropReason::OverflowOldest,
        Drop::Newest => DropReason::OverflowNewest,
    };
    let mut unreported = 0u64;
    let mut last_report = tokio::time::Instant::now() - Duration::from_secs(1);
    let mut ticks = std::pin::pin!(ticks);
    while let Some(tick) = ticks.next().await {
        let dropped = {
            let mut state = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.take(tick, capacity, drop)
        } as u64;
        queue.arrived.notify_one();
        if dropped > 0 {
            ledger.dropped(reason, dropped);
            unreported += dropped;
        }
        if unreported > 0 && last_report.elapsed() >= Duration::from_secs(1) {
            report(reason, unreported, capacity);
            unreported = 0;
            last_report = tokio::time::Instant::now();
        }
    }
    // What was dropped since the last line is logged too.
    if unreported > 0 {
        report(reason, unreported, capacity);
    }
    queue.state.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
    queue.arrived.notify_one();
}

impl State {
    /// Queues `tick`, making room as `drop` says; returns how many readings
    /// were dropped.
    fn take(&mut self, mut tick: Readings, capacity: usize, drop: Drop) -> usize {
        let arriving = tick.len();
        let over = (self.len + arriving).saturating_sub(capacity);
        let dropped = match drop {
            Drop::Newest => {
                tick.truncate(arriving - over.min(arriving));
                over.min(arriving)
            }
            Drop::Oldest => {
                // The queue's oldest first; a tick larger than the queue
                // gives up its own first readings too.
                let from_queue = over.min(self.len);
                self.drop_oldest(from_queue);
                tick.pass_over(over - from_queue);
                over
            }
        };
        let kept = tick.len();
        if kept > 0 {
            self.len += kept;
            self.runs.push_back(tick);
        }
        dropped
    }

    /// Drops the `n` oldest queued readings.
    fn drop_oldest(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.runs.front_mut() else { return };
            let here = front.len().min(n);
            front.pass_over(here);
            if front.len() == 0 {
                self.runs.pop_front();
            }
            self.len -= here;
            n -= here;
        }
    }
}

/// Logs readings dropped by a full queue, with their reason.
fn report(reason: DropReason, dropped: u64, capacity: usize) {
    error!(message = "Queue full, dropped readings.", reason = reason.name(), dropped, capacity);
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use futures::stream;

    use super::*;
    use crate::reading::Reading;

    fn tick(from: u64, to: u64) -> Readings {
        let readings: Vec<Reading> = (from..to)
            .map(|sequence| Reading { sensor: "s", sequence, value: 0, created_at: SystemTime::UNIX_EPOCH })
            .collect();
        Readings::Polled(readings.into_iter())
    }

    async fn run(drop: Drop) -> (Vec<u64>, u64) {
        let ledger = Arc::new(Ledger::default());
        // 10 readings into a queue of 4 before anyone reads.
        let ticks = stream::iter([tick(0, 10)]);
        let out: Vec<u64> = decouple(ticks, 4, drop, Arc::clone(&ledger))
            .flat_map(futures::stream::iter)
            .map(|r| r.sequence)
            .collect()
            .await;
        (out, ledger.snapshot().dropped)
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_newest_readings_and_counts_the_rest() {
        assert_eq!(run(Drop::Oldest).await, (vec![6, 7, 8, 9], 6));
    }

    #[tokio::test]
    async fn drop_newest_keeps_the_oldest_readings_and_counts_the_rest() {
        assert_eq!(run(Drop::Newest).await, (vec![0, 1, 2, 3], 6));
    }
}
