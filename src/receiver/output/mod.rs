//! Where the sink puts what it accepts. Each output lives in a folder of its
//! own and meets the input through one small interface, [`Store`]: it
//! renders a checked request in its own form, may recognise a retry of a
//! batch it stored before, stores what it is given and says when it is
//! stored, and finishes at a stop. [`open`] is the one place that names the
//! outputs: a new one is a folder and a line there.
//!
//! - [`file`]: JSON lines appended to `FILE_PATH/readings.jsonl`, with the
//!   memory of each lane's last batch that tells a retry from new data.
//! - [`remote_write`]: a time-series database over Prometheus
//!   remote-write, written in blocks gathered from many requests.
//! - [`discard`]: checked and rendered, then let go (for measuring).

pub(crate) mod discard;
pub mod file;
pub(crate) mod remote_write;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use futures::future::BoxFuture;
use tokio::{
    sync::{Notify, mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::stats::SinkStats;
use crate::{
    config::{OutputKind, SinkConfig},
    error::{OutputError, ReceiveError, ServeError},
    proto::SensorValuesRequest,
};

/// A request in an output's own form, ready to be stored.
#[derive(Debug, PartialEq)]
pub struct Rendered {
    /// The output's bytes: JSON lines, or encoded remote-write series.
    pub bytes: Vec<u8>,
    /// Readings they hold.
    pub readings: usize,
    /// Whose series they hold (`input::validate::sender`), for an output
    /// that keeps one sender's writes in order; 0 where it does not count.
    pub sender: u64,
}

/// Which batch a request is: the node, its lane and the batch's number.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchId<'a> {
    /// The node's identity (never empty).
    pub node: &'a str,
    /// The lane.
    pub lane: u32,
    /// The batch's number within the lane.
    pub number: u64,
}

/// What an output says of a batch before it is charged and stored.
pub(crate) enum Claim {
    /// Stored before: the request is answered OK and nothing is stored.
    Stored,
    /// Not stored yet. The record, if any, is called once the batch is
    /// stored, and holds the lane until then (a retry waits for this
    /// attempt's outcome, then finds it stored).
    New(Option<Record>),
}

/// Notes a batch as stored; dropped uncalled when it was not.
pub(crate) type Record = Box<dyn FnOnce() + Send + Sync>;

/// One output, as the input sees it.
pub(crate) trait Store: Send + Sync + std::fmt::Debug {
    /// Where it writes, for the start-up log line.
    fn describe(&self) -> String;

    /// Whether it can judge requests now; an error (the node is pushed
    /// back) while it cannot, such as a database whose clock cannot be read.
    fn ready(&self) -> BoxFuture<'_, Result<(), ReceiveError>> {
        Box::pin(async { Ok(()) })
    }

    /// `request` in the output's form, or why the output refuses it (a
    /// refusal is final: the node does not send it again). `peer` is where
    /// the request came from, for an output that tells senders without a
    /// node identity apart by it (`input::validate::address_of`).
    fn render(&self, request: &SensorValuesRequest, peer: Option<SocketAddr>) -> Result<Rendered, ReceiveError>;

    /// The same from the request's encoded bytes, for an output that can
    /// skip decoding them: `None` when it cannot (the input decodes the
    /// request and calls [`Store::render`], which says why). Only for an
    /// output that claims nothing: no batch is claimed for what it renders.
    fn render_bytes(&self, _bytes: &[u8], _peer: Option<SocketAddr>) -> Option<Rendered> {
        None
    }

    /// Whether `batch` was stored before. By default nothing is
    /// remembered: an output whose store takes a repeat as one (a
    /// database) need not.
    fn claim<'a>(&'a self, _batch: BatchId<'a>) -> BoxFuture<'a, Claim> {
        Box::pin(async { Claim::New(None) })
    }

    /// Stores `rendered`; resolves once it is stored (OK means stored), or
    /// with why not, and nothing of it stored. Once it is queued, the store
    /// goes on even if the future is dropped, and `after` is carried out
    /// when it ends.
    fn store(&self, rendered: Rendered, after: AfterStored) -> BoxFuture<'static, Result<(), ReceiveError>>;

    /// Stores what it took before the input stopped, within the output's
    /// limits (less if `hurry` is cancelled: a second stop signal), and
    /// keeps what it must for the next start.
    fn close(&self, hurry: CancellationToken) -> BoxFuture<'_, Result<(), ServeError>>;
}

/// The output `config` names (`discard`: none at all), opened.
pub(crate) async fn open(
    config: &SinkConfig,
    discard: bool,
    stats: &Arc<SinkStats>,
    reopen: Arc<Notify>,
) -> Result<Arc<dyn Store>, ServeError> {
    Ok(match (discard, config.output) {
        (true, _) => Arc::new(discard::Discard),
        (false, OutputKind::File) => Arc::new(file::FileStore::open(config, Arc::clone(stats), reopen).await?),
        (false, OutputKind::RemoteWrite) => Arc::new(remote_write::DatabaseStore::open(config, Arc::clone(stats))?),
    })
}

/// What a chunk's sender is told: stored, or why not.
pub(crate) type Written = Result<(), OutputError>;

/// What is done once a request is stored or refused, whether or not its
/// caller still waits: the record of its batch is made (stored only), and
/// what it held (its share of the input's memory budget) is let go.
#[derive(Default)]
pub(crate) struct AfterStored {
    /// Called once it is stored.
    pub(crate) record: Option<Record>,
    /// Kept until then.
    pub(crate) held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// One accepted request on an output's queue.
#[derive(Debug)]
pub struct Chunk {
    /// The request, rendered.
    pub rendered: Rendered,
    /// Who is told, and what is done, once it is stored or refused.
    pub(crate) answer: Answer,
}

impl Chunk {
    /// `rendered`, whose outcome `written` is told.
    pub fn new(rendered: Rendered, written: oneshot::Sender<Written>) -> Self {
        Self::after(rendered, written, AfterStored::default())
    }

    fn after(rendered: Rendered, written: oneshot::Sender<Written>, after: AfterStored) -> Self {
        Self { rendered, answer: Answer { written, after } }
    }
}

/// Where a chunk's outcome goes.
pub(crate) struct Answer {
    /// Told once it is stored (for the file: handed to the operating
    /// system, so a crash of the sink process cannot lose it), or that it
    /// could not be and nothing of it is stored.
    written: oneshot::Sender<Written>,
    /// Done first.
    after: AfterStored,
}

impl Answer {
    /// Records a stored request, lets go of what it held, and tells its
    /// caller, if it still waits.
    pub(crate) fn send(self, outcome: &Written) {
        let AfterStored { record, held } = self.after;
        if let (Ok(()), Some(record)) = (outcome, record) {
            record();
        }
        drop(held);
        let _ = self.written.send(outcome.clone());
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer").field("record", &self.after.record.is_some()).finish_non_exhaustive()
    }
}

/// Requests that may wait on an output's queue before the input is slowed
/// down: bounds the sink's memory.
const QUEUE: usize = 64;

/// An output's writer: a task taking requests off a bounded queue, and
/// what tells it to stop. Both outputs store through one.
#[derive(Debug)]
pub(crate) struct Worker<T> {
    /// The writer's queue.
    queue: mpsc::Sender<Chunk>,
    /// Tells the writer to store what is queued and stop.
    stop: CancellationToken,
    /// The writer, until it is waited for.
    task: Mutex<Option<JoinHandle<T>>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Starts `run` on a new queue and stop token.
    pub(crate) fn start<F>(run: impl FnOnce(mpsc::Receiver<Chunk>, CancellationToken) -> F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (queue, taken) = mpsc::channel(QUEUE);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(taken, stop.clone()));
        Self { queue, stop, task: Mutex::new(Some(task)) }
    }

    /// Puts `rendered` on the queue and waits until it is stored. Queued, it
    /// is stored (and `after` carried out) even if this future is dropped.
    pub(crate) fn store(&self, rendered: Rendered, after: AfterStored) -> BoxFuture<'static, Result<(), ReceiveError>> {
        let queue = self.queue.clone();
        Box::pin(async move {
            let (written, confirmed) = oneshot::channel();
            queue.send(Chunk::after(rendered, written, after)).await.map_err(|_| ReceiveError::WriterStopped)?;
            confirmed.await.map_err(|_| ReceiveError::WriterStopped)?.map_err(ReceiveError::from)
        })
    }

    /// Tells the writer to store what is queued and stop, and hands over
    /// its task to wait for (`None` once handed over).
    pub(crate) fn stop(&self) -> Option<JoinHandle<T>> {
        self.stop.cancel();
        self.task.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}
