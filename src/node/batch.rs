//! Batching: runs of readings in (a sensor tick's readings), batches of at
//! most `max_size` readings out, each due when full or `timeout` after its
//! first reading arrived, and let out when its [`Gate`] opens.
//!
//! Ungated ([`batches`]), this is `chunks_timeout` (tokio-stream) over the
//! readings one by one, and a property test holds it to exactly that: the
//! same batches at the same instants. It is written out here for two
//! reasons: `chunks_timeout` takes one item per poll, so a tick of a
//! thousand readings cost a thousand trips through the stream adapters
//! (here a tick is copied into the batch in one go); and a due batch must
//! go on growing while the gate is shut (the sender busy, no token from the
//! request rate), the way `ready_chunks` takes whatever has accumulated
//! when its consumer is ready. Only a full batch behind a shut gate stops
//! taking readings, and that is the only push-back the sensors see.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures::{Stream, StreamExt, stream::Fuse};
use tokio::time::{Instant, Sleep};

use crate::reading::{Batch, Reading};

/// What lets a due batch out: the next stage's readiness.
pub trait Gate {
    /// What the batch takes with it when the gate opens (a token, the
    /// sender's turn).
    type Pass;

    /// Polled only while a batch is due; `Ready` lets it out. Polling goes
    /// on from where it left off: a pass waited for is never given up.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<Self::Pass>;
}

/// A gate that is always open: batches leave as soon as they are due.
#[derive(Debug, Clone, Copy, Default)]
pub struct Open;

impl Gate for Open {
    type Pass = ();

    fn poll_open(&mut self, _: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }
}

/// A gate that opens when a future made by `open` resolves; a new one is
/// made for each batch.
pub struct WhenReady<F, Fut> {
    /// Makes the wait for the next opening.
    open: F,
    /// The wait under way, once a batch is due.
    waiting: Option<Pin<Box<Fut>>>,
}

impl<F, Fut> WhenReady<F, Fut> {
    /// The gate of the futures `open` makes.
    pub fn new(open: F) -> Self {
        Self { open, waiting: None }
    }
}

// The maker is only called, never pinned; the wait is boxed.
impl<F, Fut> Unpin for WhenReady<F, Fut> {}

impl<F, Fut> std::fmt::Debug for WhenReady<F, Fut> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhenReady").field("waiting", &self.waiting.is_some()).finish()
    }
}

impl<F: FnMut() -> Fut, Fut: Future> Gate for WhenReady<F, Fut> {
    type Pass = Fut::Output;

    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<Fut::Output> {
        let waiting = self.waiting.get_or_insert_with(|| Box::pin((self.open)()));
        let pass = ready!(waiting.as_mut().poll(cx));
        self.waiting = None;
        Poll::Ready(pass)
    }
}

/// Groups the readings of `runs` by size and time, as `chunks_timeout`
/// does. When `runs` ends, the partial batch it leaves is emitted at once:
/// this is how shutdown flushes.
pub fn batches<S>(runs: S, max_size: usize, timeout: Duration) -> impl Stream<Item = Batch> + Unpin
where
    S: Stream + Unpin,
    S::Item: IntoIterator<Item = Reading>,
{
    gated_batches(runs, max_size, timeout, Open).map(|(batch, ())| batch)
}

/// [`batches`], each let out only when `gate` opens, and growing (up to
/// `max_size`) while it is shut. When `runs` ends, the partial batch is due
/// at once, and leaves when the gate opens.
pub fn gated_batches<S, G>(runs: S, max_size: usize, timeout: Duration, gate: G) -> Batches<S, G>
where
    S: Stream + Unpin,
    S::Item: IntoIterator<Item = Reading>,
    G: Gate,
{
    Batches {
        runs: runs.fuse(),
        run: None,
        items: Vec::new(),
        max_size: max_size.max(1),
        timeout,
        deadline: None,
        gate,
    }
}

/// The stream [`gated_batches`] returns.
pub struct Batches<S: Stream, G>
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
    /// What lets a due batch out.
    gate: G,
}

impl<S: Stream, G> std::fmt::Debug for Batches<S, G>
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

// Nothing of a run is ever pinned: it is only iterated; the gate's wait is
// boxed.
impl<S: Stream + Unpin, G: Unpin> Unpin for Batches<S, G> where S::Item: IntoIterator {}

impl<S, G> Stream for Batches<S, G>
where
    S: Stream + Unpin,
    S::Item: IntoIterator<Item = Reading>,
    G: Gate + Unpin,
{
    type Item = (Batch, G::Pass);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let ended = this.gather(cx);
        if this.items.is_empty() {
            return if ended { Poll::Ready(None) } else { Poll::Pending };
        }
        let full = this.items.len() == this.max_size;
        if !full
            && !ended
            && let Some(deadline) = &mut this.deadline
        {
            ready!(deadline.as_mut().poll(cx));
        }
        let pass = ready!(this.gate.poll_open(cx));
        Poll::Ready(Some((std::mem::take(&mut this.items), pass)))
    }
}

impl<S, G> Batches<S, G>
where
    S: Stream + Unpin,
    S::Item: IntoIterator<Item = Reading>,
{
    /// Takes readings into the batch until it is full or none are ready;
    /// `true` once `runs` has ended (and nothing of it is left to take).
    fn gather(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if let Some(mut run) = self.run.take() {
                if self.items.is_empty() {
                    // (An empty run starts nothing: the next run starts again.)
                    self.start_batch();
                }
                let room = self.max_size - self.items.len();
                self.items.extend(run.by_ref().take(room));
                if self.items.len() == self.max_size {
                    // What is left of the run starts the next batch.
                    self.run = Some(run);
                    return false;
                }
            }
            match self.runs.poll_next_unpin(cx) {
                Poll::Ready(Some(run)) => self.run = Some(run.into_iter()),
                Poll::Ready(None) => return true,
                Poll::Pending => return false,
            }
        }
    }

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

    #[tokio::test(start_paused = true)]
    async fn a_due_batch_grows_while_its_gate_is_shut_and_a_full_one_stops_taking() {
        // A reading every 100 ms; batches of 10 due after 200 ms.
        let mut interval = tokio::time::interval(Duration::from_millis(100));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let ticks = tokio_stream::wrappers::IntervalStream::new(interval);
        let mut next = 0;
        let runs = ticks.map(move |_| {
            next += 1;
            [reading(next - 1)]
        });
        let openings = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let gate = {
            let openings = openings.clone();
            WhenReady::new(move || {
                let openings = openings.clone();
                async move { openings.acquire_owned().await.expect("never closed").forget() }
            })
        };
        let mut out = gated_batches(Box::pin(runs), 10, Duration::from_millis(200), gate);
        // Driven all along, as a lane drives it.
        let start = Instant::now();
        let (sent, mut batches) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((batch, ())) = out.next().await {
                let _ = sent.send((start.elapsed().as_millis(), batch.len()));
            }
        });
        // Due at 200 ms, shut until 550 ms: the batch grew to 6 readings.
        tokio::time::sleep(Duration::from_millis(550)).await;
        assert!(batches.try_recv().is_err(), "nothing leaves while the gate is shut");
        openings.add_permits(1);
        assert_eq!(batches.recv().await, Some((550, 6)));
        // Shut for 2 s: the next batch fills to 10 by 1500 ms and takes no
        // more; what its source skipped meanwhile is not in the batcher.
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        openings.add_permits(2);
        assert_eq!(batches.recv().await, Some((2550, 10)));
        let (at, third) = batches.recv().await.expect("a third batch");
        assert_eq!(at, 2750, "due 200 ms after its first reading, the gate open");
        assert!((1..=4).contains(&third), "{third}");
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
