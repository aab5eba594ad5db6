//! Batching: runs of readings in (a sensor tick's readings), batches of at
//! most `max_size` readings out, each sent no later than `timeout` after its
//! first reading arrived.
//!
//! This is `chunks_timeout` (tokio-stream) over the readings one by one, and
//! a property test holds it to exactly that: the same batches at the same
//! instants. It is written out here for one reason: `chunks_timeout` takes
//! one item per poll, so a tick of a thousand readings cost a thousand trips
//! through the stream adapters; here a tick is copied into the batch in one
//! go (what that saves is in the README's Performance section).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures::{Stream, StreamExt, stream::Fuse};
use tokio::time::{Instant, Sleep};

use crate::reading::{Batch, Reading};

/// Groups the readings of `runs` by size and time. When `runs` ends, the
/// partial batch it leaves is emitted at once: this is how shutdown flushes.
pub fn batches<S>(runs: S, max_size: usize, timeout: Duration) -> Batches<S>
where
    S: Stream + Unpin,
    S::Item: IntoIterator<Item = Reading>,
{
    Batches { runs: runs.fuse(), run: None, items: Vec::new(), max_size: max_size.max(1), timeout, deadline: None }
}

/// The stream [`batches`] returns.
pub struct Batches<S: Stream>
where
    S::Item: IntoIterator,
{
    /// Where readings come from, a run at a time.
    runs: Fuse<S>,
    /// The run being taken; what is left of it after a batch filled up.
    run: Option<<S::Item as IntoIterator>::IntoIter>,
    /// The batch being gathered.
    items: Batch,
    /// BATCH_SIZE.
    max_size: usize,
    /// BATCH_TIMEOUT.
    timeout: Duration,
    /// When the batch being gathered is due; made once, then reset.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S: Stream> std::fmt::Debug for Batches<S>
where
    S::Item: IntoIterator,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batches")
            .field("gathered", &self.items.len())
            .field("max_size", &self.max_size)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

// Nothing of a run is ever pinned: it is only iterated.
impl<S: Stream + Unpin> Unpin for Batches<S> where S::Item: IntoIterator {}

impl<S> Stream for Batches<S>
where
    S: Stream + Unpin,
    S::Item: IntoIterator<Item = Reading>,
{
    type Item = Batch;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
        let this = self.get_mut();
        loop {
            if let Some(mut run) = this.run.take() {
                if this.items.is_empty() {
                    // (An empty run starts nothing: the next run starts again.)
                    this.start_batch();
                }
                let room = this.max_size - this.items.len();
                this.items.extend(run.by_ref().take(room));
                if this.items.len() == this.max_size {
                    // What is left of the run starts the next batch.
                    this.run = Some(run);
                    return Poll::Ready(Some(std::mem::take(&mut this.items)));
                }
            }
            match this.runs.poll_next_unpin(cx) {
                Poll::Ready(Some(run)) => this.run = Some(run.into_iter()),
                Poll::Ready(None) => {
                    let last = (!this.items.is_empty()).then(|| std::mem::take(&mut this.items));
                    return Poll::Ready(last);
                }
                Poll::Pending => break,
            }
        }
        if this.items.is_empty() {
            return Poll::Pending;
        }
        if let Some(deadline) = &mut this.deadline {
            ready!(deadline.as_mut().poll(cx));
        }
        Poll::Ready(Some(std::mem::take(&mut this.items)))
    }
}

impl<S: Stream> Batches<S>
where
    S::Item: IntoIterator,
{
    /// The first reading of a batch has arrived: room for the whole batch,
    /// and the clock starts.
    fn start_batch(&mut self) {
        self.items.reserve_exact(self.max_size);
        let due = Instant::now() + self.timeout;
        match &mut self.deadline {
            Some(deadline) => deadline.as_mut().reset(due),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(due))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use futures::stream;
    use proptest::prelude::*;

    use super::*;

    fn reading(sequence: u64) -> Reading {
        Reading { sensor: "s", sequence, value: 0, created_at: SystemTime::UNIX_EPOCH }
    }

    fn single(readings: impl Iterator<Item = Reading>) -> impl Stream<Item = [Reading; 1]> + Unpin {
        stream::iter(readings.map(|r| [r]))
    }

    #[tokio::test(start_paused = true)]
    async fn full_batches_leave_at_once_and_the_rest_on_end() {
        let sizes: Vec<usize> =
            batches(single((0..25).map(reading)), 10, Duration::from_secs(60)).map(|b: Batch| b.len()).collect().await;
        assert_eq!(sizes, vec![10, 10, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_fills_batches_and_its_rest_starts_the_next() {
        let runs = stream::iter(vec![(0..7).map(reading).collect::<Vec<_>>(), (7..30).map(reading).collect()]);
        let batched: Vec<Vec<u64>> = batches(runs, 10, Duration::from_secs(60))
            .map(|b: Batch| b.iter().map(|r| r.sequence).collect())
            .collect()
            .await;
        assert_eq!(batched, vec![(0..10).collect::<Vec<_>>(), (10..20).collect(), (20..30).collect()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_leaves_after_the_timeout() {
        let slow = single((0..3).map(reading)).chain(stream::pending());
        let start = Instant::now();
        let mut out = batches(Box::pin(slow), 10, Duration::from_millis(500));
        let first = out.next().await.expect("a batch");
        assert_eq!(first.len(), 3);
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }

    /// `(wait before the run in ms, readings in the run)` for each run.
    fn timed_runs() -> impl Strategy<Value = Vec<(u64, usize)>> {
        prop::collection::vec((prop_oneof![Just(0u64), 0u64..300], 0usize..40), 0..40)
    }

    /// What `batch` makes of `runs`: each batch's sequences and when it
    /// left, in paused time.
    fn outcome<B, St>(runs: &[(u64, usize)], batch: B) -> Vec<(Duration, Vec<u64>)>
    where
        B: FnOnce(Pin<Box<dyn Stream<Item = Vec<Reading>>>>) -> St,
        St: Stream<Item = Batch>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build();
        let runtime = runtime.expect("a runtime");
        let runs = runs.to_vec();
        runtime.block_on(async move {
            let start = Instant::now();
            let mut next = 0;
            let input = stream::iter(runs).then(move |(wait, len)| {
                let run: Vec<Reading> = (next..next + len as u64).map(reading).collect();
                next += len as u64;
                async move {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    run
                }
            });
            let out = batch(Box::pin(input));
            out.map(|b| (start.elapsed(), b.iter().map(|r| r.sequence).collect())).collect().await
        })
    }

    proptest! {
        #[test]
        fn the_same_batches_at_the_same_instants_as_chunks_timeout(
            runs in timed_runs(),
            max_size in 1usize..=25,
            timeout_ms in 1u64..=500,
        ) {
            let timeout = Duration::from_millis(timeout_ms);
            let ours = outcome(&runs, |input| batches(input, max_size, timeout));
            let theirs = outcome(&runs, |input| {
                tokio_stream::StreamExt::chunks_timeout(input.flat_map(stream::iter), max_size, timeout)
            });
            prop_assert_eq!(ours, theirs);
        }
    }
}
