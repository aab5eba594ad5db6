//! The remote-write output: gathers accepted requests' series into
//! Prometheus remote-write requests (snappy-compressed protobuf over HTTP)
//! and tells each request's sender what the database answered. A request
//! is acknowledged only once the database answered 2xx for all its
//! samples. While the database is down or busy, requests are pushed back to
//! the nodes at once, so the sink holds nothing: the nodes' retries and
//! spools hold the data.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::super::{Chunk, Rendered};
use crate::{
    config::SinkConfig,
    database::{Answer, Database},
    error::OutputError,
    logging::Every,
    receiver::stats::SinkStats,
};

/// Shortest and longest pause asked of the nodes while the database fails.
/// The sink tries the database again only once a pause is over, so the
/// longest pause is also the longest the nodes wait after the database is
/// back: 5 s, as Prometheus' own remote-write backoff at most.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// Longest `Retry-After` honoured.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Most requests taken off the queue to wait for a slot or for their
/// sender's write under way, beyond which a sender with one waiting already
/// is pushed back: a sender with none waiting always gets in line, so that
/// a few busy senders cannot keep the others queued behind them.
const MOST_WAITING: usize = 64;

/// Most of those from one sender: more are pushed back at once, so that
/// one node with many requests queued cannot hold up every other node.
const MOST_WAITING_PER_SENDER: usize = 16;

/// Most requests waiting at all, one per sender beyond [`MOST_WAITING`]:
/// the line is read through for each write.
const MOST_WAITING_AT_ALL: usize = 1024;

/// Sends what the sink accepts to a database.
#[derive(Debug)]
pub(crate) struct RemoteWriter {
    /// The database.
    database: Database,
    /// REMOTE_WRITE_MAX_SAMPLES (counted as readings).
    max_samples: usize,
    /// One permit per request in flight (REMOTE_WRITE_CONCURRENCY).
    slots: Arc<Semaphore>,
    /// REMOTE_WRITE_CONCURRENCY.
    concurrency: u32,
    /// Senders with a write under way.
    busy: Mutex<HashSet<u64>>,
    /// Told when a write ends (its slot and senders free again).
    finished: Notify,
    /// Failures in a row, and no request before this instant.
    pause: Mutex<(u32, Option<Instant>)>,
    /// Counters.
    stats: Arc<SinkStats>,
    /// Failures are logged at most once a second.
    failures: Mutex<Every>,
    /// And so are refusals.
    refused: Mutex<Every>,
}

impl RemoteWriter {
    /// The writer `config` describes; `None` when REMOTE_WRITE_URL is not
    /// a usable URL (the configuration's check refuses that first).
    pub(crate) fn new(config: &SinkConfig, stats: Arc<SinkStats>) -> Option<Self> {
        let database = Database::new(&config.remote_write, concat!("telemetry-sink/", env!("CARGO_PKG_VERSION")))?;
        let concurrency = u32::try_from(config.remote_write_concurrency).ok()?;
        Some(Self {
            database,
            max_samples: config.remote_write_max_samples,
            slots: Arc::new(Semaphore::new(concurrency as usize)),
            concurrency,
            busy: Mutex::default(),
            finished: Notify::new(),
            pause: Mutex::new((0, None)),
            stats,
            failures: Mutex::new(Every::second()),
            refused: Mutex::new(Every::second()),
        })
    }

    /// The database it writes to (its clock is shared by the clones).
    pub(crate) fn database(&self) -> &Database {
        &self.database
    }

    /// Sends what arrives on `queue` until `stop` is cancelled, then what is
    /// still queued, and waits for every request under way.
    ///
    /// Requests wait in arrival order and go out gathered into writes, as
    /// [`RemoteWriter::start_writes`] says.
    pub(crate) async fn run(self, mut queue: mpsc::Receiver<Chunk>, stop: CancellationToken) {
        let writer = Arc::new(self);
        let mut waiting: VecDeque<Chunk> = VecDeque::new();
        let (mut open, mut stopping) = (true, false);
        loop {
            // Take what is queued, so that it can go out together.
            while open {
                match queue.try_recv() {
                    Ok(chunk) => admit(&mut waiting, chunk, writer.most_samples_waiting()),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            writer.start_writes(&mut waiting);
            if !open && waiting.is_empty() {
                break;
            }
            tokio::select! {
                chunk = queue.recv(), if open => match chunk {
                    Some(chunk) => admit(&mut waiting, chunk, writer.most_samples_waiting()),
                    None => open = false,
                },
                () = writer.finished.notified() => {}
                () = stop.cancelled(), if !stopping => {
                    // What is queued is still sent; nothing more comes.
                    stopping = true;
                    queue.close();
                }
            }
        }
        let _ = writer.slots.acquire_many(writer.concurrency).await;
    }

    /// Starts writes while a slot is free: each takes the waiting requests
    /// in arrival order, up to REMOTE_WRITE_MAX_SAMPLES, one of each sender
    /// at most, skipping senders with a write under way: a sender's requests
    /// go out in the order they came, never two in one write or two at once
    /// (two of one sender may hold one series, and Prometheus keeps only the
    /// samples in order of one write holding it twice, answering OK for
    /// all). A write starts as soon as a slot is free, with what waits:
    /// requests gather while every slot is busy, never by waiting for more
    /// (which, with nodes that are answered only once stored, would hold
    /// back their next requests and slow every node).
    fn start_writes(self: &Arc<Self>, waiting: &mut VecDeque<Chunk>) {
        while !waiting.is_empty() {
            // The slot first: with every slot busy, the line is not read.
            let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else { return };
            let taken = self.next_write(waiting);
            if taken.is_empty() {
                return;
            }
            let mut chunks = Vec::with_capacity(taken.len());
            // Removed from the back, so that the positions before stay put.
            for at in taken.into_iter().rev() {
                chunks.extend(waiting.remove(at));
            }
            chunks.reverse();
            // One request of each sender: the senders are distinct.
            let senders: Vec<u64> = chunks.iter().map(|chunk| chunk.rendered.sender).collect();
            self.busy.lock().unwrap_or_else(PoisonError::into_inner).extend(senders.iter().copied());
            let release = Release { writer: Arc::clone(self), senders, slot: Some(slot) };
            tokio::spawn(Arc::clone(self).deliver(chunks, release));
        }
    }

    /// Which of the `waiting` the next write would take: their positions, in
    /// order; see [`RemoteWriter::start_writes`].
    fn next_write(&self, waiting: &VecDeque<Chunk>) -> Vec<usize> {
        let busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        // Senders taken or passed over: their later requests wait.
        let mut seen: Vec<u64> = Vec::new();
        let (mut taken, mut samples) = (Vec::new(), 0);
        for (at, chunk) in waiting.iter().enumerate() {
            if samples >= self.max_samples {
                break;
            }
            let Rendered { sender, readings, .. } = chunk.rendered;
            if busy.contains(&sender) || seen.contains(&sender) {
                continue;
            }
            seen.push(sender);
            taken.push(at);
            samples += readings;
        }
        taken
    }

    /// Sends `chunks` as one request and answers each. If the database
    /// refuses a request of several, each is sent on its own, so that one
    /// node's bad sample does not refuse the others'.
    async fn deliver(self: Arc<Self>, chunks: Vec<Chunk>, _release: Release) {
        if let Some(wait) = self.paused() {
            let busy = OutputError::Busy { retry_after: wait, message: "the database is not answering".into() };
            self.stats.database_pushed_back("error", chunks.len());
            return answer(chunks, &Err(busy));
        }
        let outcome = self.post(&chunks).await;
        if matches!(outcome, Err(OutputError::Refused(_))) && chunks.len() > 1 {
            for chunk in chunks {
                let outcome = self.post(std::slice::from_ref(&chunk)).await;
                answer(vec![chunk], &outcome);
            }
            return;
        }
        answer(chunks, &outcome);
    }

    /// Most samples let wait for the database: one write's worth per slot,
    /// so that what waits goes out with the next writes. More would only
    /// wait longer than the nodes do (their RPC_TIMEOUT): a node is better
    /// told at once to come back, and its retry and spool hold the data.
    fn most_samples_waiting(&self) -> usize {
        self.max_samples.saturating_mul(self.concurrency as usize)
    }

    /// How long the nodes must still wait, while the database is failing.
    fn paused(&self) -> Option<Duration> {
        let pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
        pause.1.and_then(|until| until.checked_duration_since(Instant::now())).filter(|wait| !wait.is_zero())
    }

    /// POSTs the series of `chunks` as one remote-write request.
    async fn post(&self, chunks: &[Chunk]) -> Result<(), OutputError> {
        let readings: usize = chunks.iter().map(|chunk| chunk.rendered.readings).sum();
        let mut body = Vec::with_capacity(chunks.iter().map(|chunk| chunk.rendered.bytes.len()).sum());
        for chunk in chunks {
            body.extend_from_slice(&chunk.rendered.bytes);
        }
        self.stats.database_sending();
        let (answer, elapsed) = self.database.post(&body).await;
        match answer {
            Answer::Took => {
                self.stats.database_answered("2xx", elapsed);
                self.stats.database_took(readings);
                self.stats.set_misconfigured(false);
                *self.pause.lock().unwrap_or_else(PoisonError::into_inner) = (0, None);
                debug!(message = "The database took the samples.", readings, requests = chunks.len());
                Ok(())
            }
            Answer::Busy { class, retry_after, message } => {
                self.stats.database_answered(class, elapsed);
                Err(self.busy(class, retry_after, message, chunks.len()))
            }
            Answer::Misconfigured(message) => {
                // The sink's own settings are wrong, not the node's data: the
                // nodes keep it and retry until an operator mends the sink.
                self.stats.database_answered("4xx", elapsed);
                self.stats.set_misconfigured(true);
                self.log_failure(&message);
                Err(OutputError::Failed(message.into()))
            }
            Answer::Refused(message) => {
                self.stats.database_answered("4xx", elapsed);
                // Each refused node request is also logged as a refusal, once
                // a second at most; this line says what the database said, as
                // often.
                let gate = self.refused.lock().unwrap_or_else(PoisonError::into_inner).ready();
                if let Some(suppressed) = gate {
                    error!(message = "The database refused samples.", answer = %message, requests = chunks.len(), suppressed);
                }
                Err(OutputError::Refused(message.into()))
            }
        }
    }

    /// Counts and logs a database that cannot take samples now, and sets
    /// the pause the nodes are asked to keep.
    fn busy(&self, class: &'static str, asked: Option<Duration>, message: String, requests: usize) -> OutputError {
        self.stats.database_pushed_back(class, requests);
        self.log_failure(&message);
        let wait = {
            let mut pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
            pause.0 = pause.0.saturating_add(1);
            let backoff = FIRST_PAUSE.saturating_mul(1 << pause.0.min(10)).min(LONGEST_PAUSE);
            let wait = asked.map_or(backoff, |asked| asked.min(LONGEST_RETRY_AFTER));
            pause.1 = Some(Instant::now() + wait);
            wait
        };
        OutputError::Busy { retry_after: wait, message: message.into() }
    }

    fn log_failure(&self, message: &str) {
        let gate = self.failures.lock().unwrap_or_else(PoisonError::into_inner).ready();
        if let Some(suppressed) = gate {
            warn!(message = "The database cannot take samples now; pushing back on the nodes.", answer = %message, suppressed);
        }
    }
}

/// Puts `chunk` among the `waiting`, or pushes it back at once (the
/// service counts it as throttled) when its sender has
/// [`MOST_WAITING_PER_SENDER`] waiting already, when `most_samples` are
/// waiting, or when [`MOST_WAITING`] requests are and its sender has one of
/// them (or [`MOST_WAITING_AT_ALL`] are). So a sender with none waiting
/// gets in line whenever the database is not behind, however busy other
/// senders keep it.
fn admit(waiting: &mut VecDeque<Chunk>, chunk: Chunk, most_samples: usize) {
    let same = waiting.iter().filter(|other| other.rendered.sender == chunk.rendered.sender).count();
    let samples: usize = waiting.iter().map(|other| other.rendered.readings).sum();
    let message = if same >= MOST_WAITING_PER_SENDER {
        format!("{MOST_WAITING_PER_SENDER} requests of this node are already waiting for the database")
    } else if samples >= most_samples {
        format!("the database is behind: {samples} samples are already waiting for it")
    } else if waiting.len() >= MOST_WAITING_AT_ALL || (same > 0 && waiting.len() >= MOST_WAITING) {
        format!("{} requests are already waiting for the database, one of them this node's", waiting.len())
    } else {
        return waiting.push_back(chunk);
    };
    answer(vec![chunk], &Err(OutputError::Busy { retry_after: FIRST_PAUSE, message: message.into() }));
}

/// A write under way: when it ends (however it ends), its senders and its
/// slot are freed, and the writer's loop is told.
struct Release {
    writer: Arc<RemoteWriter>,
    senders: Vec<u64>,
    slot: Option<OwnedSemaphorePermit>,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut busy = self.writer.busy.lock().unwrap_or_else(PoisonError::into_inner);
        for sender in &self.senders {
            busy.remove(sender);
        }
        drop(busy);
        // The slot is free before the loop looks for one.
        drop(self.slot.take());
        self.writer.finished.notify_one();
    }
}

/// Tells each chunk's sender the outcome.
fn answer(chunks: Vec<Chunk>, outcome: &Result<(), OutputError>) {
    for chunk in chunks {
        chunk.answer.send(outcome);
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    #[test]
    fn the_waiting_limits_are_the_documented_ones() {
        // The documented figures (docs/outputs.md): 16 requests of one node waiting, 1,024 at
        // all. A change here is a change there.
        assert_eq!((MOST_WAITING_PER_SENDER, MOST_WAITING_AT_ALL, MOST_WAITING), (16, 1024, 64));
    }

    /// A request of `sender` and where its answer comes.
    fn chunk(sender: u64) -> (Chunk, oneshot::Receiver<crate::receiver::output::Written>) {
        let (written, answer) = oneshot::channel();
        (Chunk::new(Rendered { bytes: Vec::new(), readings: 1, sender }, written), answer)
    }

    #[test]
    fn a_sender_with_nothing_waiting_gets_in_line_while_others_fill_it() {
        let mut waiting = VecDeque::new();
        let mut answers = Vec::new();
        // Eight senders fill the line, 8 requests each.
        for n in 0..MOST_WAITING as u64 {
            let (chunk, answer) = chunk(n % 8);
            admit(&mut waiting, chunk, usize::MAX);
            answers.push(answer);
        }
        assert_eq!(waiting.len(), MOST_WAITING);
        // One more of theirs is pushed back at once...
        let (more, mut pushed_back) = chunk(0);
        admit(&mut waiting, more, usize::MAX);
        assert!(matches!(pushed_back.try_recv(), Ok(Err(OutputError::Busy { .. }))));
        // ...while a sender with nothing waiting gets in, once.
        let (first, mut waits) = chunk(99);
        admit(&mut waiting, first, usize::MAX);
        assert_eq!(waiting.len(), MOST_WAITING + 1);
        assert!(waits.try_recv().is_err(), "not answered: it waits");
        let (second, mut pushed_back) = chunk(99);
        admit(&mut waiting, second, usize::MAX);
        assert!(matches!(pushed_back.try_recv(), Ok(Err(OutputError::Busy { .. }))));
        // With room in line, a sender may have up to 16 waiting.
        let mut waiting = VecDeque::new();
        for _ in 0..MOST_WAITING_PER_SENDER {
            admit(&mut waiting, chunk(5).0, usize::MAX);
        }
        let (over, mut pushed_back) = chunk(5);
        admit(&mut waiting, over, usize::MAX);
        assert_eq!(waiting.len(), MOST_WAITING_PER_SENDER);
        assert!(matches!(pushed_back.try_recv(), Ok(Err(OutputError::Busy { .. }))));
    }

    #[test]
    fn no_more_waits_than_the_next_writes_take() {
        let mut waiting = VecDeque::new();
        // Senders with nothing waiting, each with 1000 samples, while
        // 4 writes of 10,000 may go out: 40 of them wait, then no more.
        let mut answers = Vec::new();
        for sender in 0..50 {
            let (mut chunk, answer) = chunk(sender);
            chunk.rendered.readings = 1000;
            admit(&mut waiting, chunk, 40_000);
            answers.push(answer);
        }
        assert_eq!(waiting.len(), 40);
        for mut answer in answers.drain(40..) {
            let Ok(Err(OutputError::Busy { message, .. })) = answer.try_recv() else { panic!("not pushed back") };
            assert!(message.contains("the database is behind"), "{message}");
        }
        // However many senders there are, the line holds at most 1024.
        let mut waiting = VecDeque::new();
        for sender in 0..2000 {
            admit(&mut waiting, chunk(sender).0, usize::MAX);
        }
        assert_eq!(waiting.len(), MOST_WAITING_AT_ALL);
    }

    /// A writer of `max_samples` a write and `concurrency` writes at once,
    /// to a database that is not there (nothing is sent in these tests).
    fn writer(max_samples: usize, concurrency: usize) -> Arc<RemoteWriter> {
        let vars = std::collections::HashMap::from([
            ("OUTPUT".to_owned(), "remote-write".to_owned()),
            ("REMOTE_WRITE_URL".to_owned(), "http://127.0.0.1:9/api/v1/write".to_owned()),
            ("REMOTE_WRITE_MAX_SAMPLES".to_owned(), max_samples.to_string()),
            ("REMOTE_WRITE_CONCURRENCY".to_owned(), concurrency.to_string()),
        ]);
        let config = SinkConfig::from_vars(&vars).unwrap();
        Arc::new(RemoteWriter::new(&config, Arc::default()).unwrap())
    }

    /// A request of `readings` from `sender`.
    fn request(sender: u64, readings: usize) -> Chunk {
        let (written, _) = oneshot::channel();
        Chunk::new(Rendered { bytes: Vec::new(), readings, sender }, written)
    }

    #[test]
    fn a_write_takes_one_request_per_sender_in_order_and_passes_over_busy_senders() {
        let writer = writer(10_000, 4);
        writer.busy.lock().unwrap().insert(9);
        let waiting: VecDeque<Chunk> = [
            request(1, 100),
            request(9, 100), // its sender is being written: waits
            request(1, 100), // sender 1 again: waits for the next write
            request(2, 100),
        ]
        .into();
        assert_eq!(writer.next_write(&waiting), vec![0, 3]);
        // Full at REMOTE_WRITE_MAX_SAMPLES: the rest waits for the next write.
        let waiting: VecDeque<Chunk> = (0..5).map(|sender| request(sender, 4000)).collect();
        assert_eq!(writer.next_write(&waiting), vec![0, 1, 2], "12,000 samples: full");
    }

    #[tokio::test]
    async fn a_write_starts_while_a_slot_is_free_and_the_rest_gather_for_the_next() {
        let writer = writer(10_000, 2);
        // A slot free: a single small request goes at once, and so does the
        // next sender's beside it.
        let mut waiting: VecDeque<Chunk> = [request(1, 1000)].into();
        writer.start_writes(&mut waiting);
        assert!(waiting.is_empty(), "sent at once");
        waiting.push_back(request(2, 1000));
        writer.start_writes(&mut waiting);
        assert!(waiting.is_empty(), "sent beside the first");
        // Both slots busy: what comes waits, to go out together.
        waiting.extend((3..8).map(|sender| request(sender, 1000)));
        writer.start_writes(&mut waiting);
        assert_eq!(waiting.len(), 5);
        assert_eq!(writer.next_write(&waiting), vec![0, 1, 2, 3, 4]);
    }
}
