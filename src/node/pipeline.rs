//! The node's pipeline, composed top to bottom, and its shutdown.
//!
//! Sensors are split into lanes (MAX_IN_FLIGHT at most); each lane is one
//! chain sensors → batch → throttle → sender, with one request in flight.
//! A sensor belongs to exactly one lane, so its readings reach the sink in
//! order however many requests are in flight; all lanes share one token
//! bucket, so the request rate is the node's, not the lane's.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{Stream, StreamExt, stream::BoxStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    batch,
    delivery::SendContext,
    overflow::{
        queue::{self, Drop},
        replay::{self, LaneSpool},
        spool::{Spool, SpoolError},
    },
    retry::{RetryPolicy, SinkHealth},
    sender::{self, LaneIdentity},
    source::{self, Readings},
    throttle::Throttle,
    transport::Transport,
};
use crate::{
    config::{NodeConfig, Overflow},
    node::{Ledger, Summary},
};

/// What every lane is built from.
#[derive(Debug, Clone)]
struct LaneSettings {
    /// BATCH_SIZE.
    batch_size: usize,
    /// BATCH_TIMEOUT.
    batch_timeout: Duration,
}

/// Runs the node until `shutdown` resolves, then delivers what it holds.
///
/// Shutdown follows the data: only the sources are cancelled; each batcher
/// emits its partial batch when their stream ends, and each sender delivers
/// it and everything before it. That drain is bounded by `SHUTDOWN_TIMEOUT`;
/// readings still held when it runs out are counted as dropped, so the
/// returned summary accounts for every reading.
pub async fn run<T: Transport>(
    config: &NodeConfig,
    transport: T,
    ledger: Arc<Ledger>,
    shutdown: impl Future<Output = ()>,
) -> Summary {
    run_with(config, transport, SinkHealth::new(config.retry_budget), ledger, shutdown, std::future::pending()).await
}

/// [`run`], sharing `health` (what is known of the sink: readiness reads
/// it), and cutting the drain short when `abort` resolves (a second stop
/// signal): what is still held then is counted as dropped, as at the
/// deadline.
///
/// The run in four steps: open the spool and the identity; start the
/// replayers; start the lanes; drain.
pub async fn run_with<T: Transport>(
    config: &NodeConfig,
    transport: T,
    health: SinkHealth,
    ledger: Arc<Ledger>,
    shutdown: impl Future<Output = ()>,
    abort: impl Future<Output = ()>,
) -> Summary {
    let Some((spool, node_id)) = open_spool_and_identity(config) else { return ledger.snapshot() };
    let sources = match source::for_lanes(config, &ledger) {
        Ok(sources) => sources,
        Err(error) => {
            error!(message = "Cannot start the sources; not starting.", %error);
            return ledger.snapshot();
        }
    };
    let context = SendContext {
        transport,
        retry: RetryPolicy::from(config),
        health,
        throttle: Throttle::new(config.request_rate()),
        ledger: Arc::clone(&ledger),
        draining: CancellationToken::new(),
    };
    // Batch numbers only grow, across restarts too: each run starts from the
    // clock, in microseconds.
    let first_batch = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
    let run = Run { config, context, node_id, first_batch };
    let replayers = run.start_replayers(spool.as_ref());
    let stop_sources = CancellationToken::new();
    let lanes = run.start_lanes(sources, &replayers.spools, &stop_sources);
    run.drain(lanes, replayers, stop_sources, shutdown, abort).await
}

/// What the steps of a run share.
struct Run<'a, T> {
    /// The node's configuration.
    config: &'a NodeConfig,
    /// How every lane and replayer delivers a batch.
    context: SendContext<T>,
    /// The node's identity in every request.
    node_id: Arc<str>,
    /// This run's first batch number.
    first_batch: u64,
}

/// The replayers of a run, one per lane with a spool.
struct Replayers {
    /// Their tasks.
    tasks: JoinSet<()>,
    /// Each lane's view of the spool, by lane number.
    spools: Vec<(u32, LaneSpool)>,
    /// Stops them, once the lanes are drained.
    stop: CancellationToken,
}

impl<T: Transport> Run<'_, T> {
    /// A replayer for each lane of this run and each lane an earlier run
    /// left batches in (OVERFLOW_POLICY=spool).
    fn start_replayers(&self, spool: Option<&Spool>) -> Replayers {
        let mut replayers = Replayers { tasks: JoinSet::new(), spools: Vec::new(), stop: CancellationToken::new() };
        let Some(spool) = spool else { return replayers };
        let mut lane_ids: Vec<u32> = (0..self.config.lane_count() as u32).collect();
        lane_ids.extend(spool.lanes().unwrap_or_default());
        lane_ids.sort_unstable();
        lane_ids.dedup();
        for lane in lane_ids {
            let (size, bytes) = (self.config.batch_size(), self.config.max_message_bytes);
            let lane_spool = LaneSpool::new(spool.clone(), self.first_batch, size, bytes);
            let (context, node_id, stop) = (self.context.clone(), Arc::clone(&self.node_id), replayers.stop.clone());
            replayers.tasks.spawn(replay::replay(context, lane_spool.clone(), lane, node_id, stop));
            replayers.spools.push((lane, lane_spool));
        }
        replayers
    }

    /// A task per lane: its sources merged, until `stop`, into the chain
    /// batch → throttle → sender (through a drop-policy queue when one is set).
    fn start_lanes(
        &self,
        sources: Vec<Vec<source::Source>>,
        spools: &[(u32, LaneSpool)],
        stop: &CancellationToken,
    ) -> JoinSet<()> {
        let settings =
            LaneSettings { batch_size: self.config.batch_size(), batch_timeout: self.config.batch_timeout.into() };
        let mut lanes = JoinSet::new();
        for (lane, sources) in sources.into_iter().enumerate() {
            let lane = lane as u32;
            let identity = LaneIdentity {
                node_id: Arc::clone(&self.node_id),
                lane,
                first_batch: self.first_batch,
                max_bytes: self.config.max_message_bytes,
            };
            let spool = spools.iter().find(|(id, _)| *id == lane).map(|(_, spool)| spool.clone());
            let readings = source::merge(sources).take_until(stop.clone().cancelled_owned());
            let readings = self.overflow_queue(readings);
            lanes.spawn(run_lane(readings, settings.clone(), self.context.clone(), identity, spool));
        }
        lanes
    }

    /// `readings` through a drop-policy queue when OVERFLOW_POLICY is one
    /// (the sources then never wait for the sender), or as they are.
    fn overflow_queue(&self, readings: impl Stream<Item = Readings> + Send + 'static) -> BoxStream<'static, Readings> {
        let drop = match self.config.overflow {
            Overflow::Block | Overflow::Spool => return readings.boxed(),
            Overflow::DropOldest => Drop::Oldest,
            Overflow::DropNewest => Drop::Newest,
        };
        let ledger = Arc::clone(&self.context.ledger);
        queue::decouple(readings, self.config.queue_capacity, drop, ledger).boxed()
    }

    /// Waits for `shutdown`, stops the sources, and lets the lanes and the
    /// replayers deliver what they hold until it is all delivered,
    /// `SHUTDOWN_TIMEOUT` passes or `abort` resolves; then counts what is
    /// left as dropped.
    async fn drain(
        self,
        mut lanes: JoinSet<()>,
        mut replayers: Replayers,
        stop_sources: CancellationToken,
        shutdown: impl Future<Output = ()>,
        abort: impl Future<Output = ()>,
    ) -> Summary {
        let ledger = Arc::clone(&self.context.ledger);
        let deadline = async {
            shutdown.await;
            info!(message = "Stopping sources and flushing.", produced = ledger.snapshot().produced);
            ledger.stop_sources();
            stop_sources.cancel();
            self.context.draining.cancel();
            tokio::select! {
                () = tokio::time::sleep(self.config.shutdown_timeout.into()) => {}
                () = abort => warn!(message = "Stopping at once, as asked by a second signal."),
            }
        };
        let delivered = async {
            join_all(&mut lanes).await;
            // This run's spooled batches go out too if the sink takes them in time.
            ledger.spool_emptied().await;
        };
        let drained = tokio::select! {
            () = delivered => true,
            () = deadline => false,
        };
        replayers.stop.cancel();
        join_all(&mut replayers.tasks).await;
        // Settled only once no lane can ack any more. Drained or not (a lane
        // that failed leaves readings behind too), what is neither acked, nor
        // dropped, nor in the spool is lost now, and counted.
        lanes.shutdown().await;
        let lost = ledger.settle();
        if lost > 0 {
            let in_spool = ledger.in_spool();
            error!(
                message = "Stopped before every reading was delivered.",
                reason = "shutdown",
                dropped = lost,
                in_spool
            );
        }
        if !drained {
            debug!(message = "The drain ran out of time.");
        }
        ledger.snapshot()
    }
}

/// The spool (OVERFLOW_POLICY=spool) and the node's identity, which lives
/// in the spool when there is one, so that the sink recognises the batches
/// this node replays after a restart. `None` if the spool cannot be opened.
fn open_spool_and_identity(config: &NodeConfig) -> Option<(Option<Spool>, Arc<str>)> {
    let spool = match open_spool(config) {
        Ok(spool) => spool,
        Err(error) => {
            error!(message = "Cannot open the spool; not starting.", %error);
            return None;
        }
    };
    let node_id = match &spool {
        Some(spool) if config.node_id.is_none() => match spool.node_id(&config.node_identity()) {
            Ok(id) => Arc::from(id),
            Err(error) => {
                error!(message = "Cannot read the node identity from the spool.", %error);
                config.node_identity()
            }
        },
        _ => config.node_identity(),
    };
    info!(message = "Node identity.", node_id = %node_id);
    Some((spool, node_id))
}

/// The spool, when OVERFLOW_POLICY=spool.
fn open_spool(config: &NodeConfig) -> Result<Option<Spool>, SpoolError> {
    let (Overflow::Spool, Some(dir)) = (config.overflow, &config.spool_dir) else { return Ok(None) };
    let (spool, damage) = Spool::open(dir, config.spool_max_bytes)?;
    if let Some(damage) = damage {
        error!(message = "The spool was damaged; started a new one.", %damage);
    }
    Ok(Some(spool))
}

/// One lane, the card's chain: its sources' `readings` batched, each
/// batch let out by the throttle (a token, and the sender done with the
/// batch before), and sent by the retrying sender, until `readings` ends
/// and the last batch is delivered.
///
/// The batcher and the sender run side by side: while one batch is in
/// flight or waits for a token, the next keeps growing (up to BATCH_SIZE),
/// so the sensors are held back only when a full batch has nowhere to go.
/// A lane holds at most one batch in flight and one growing.
async fn run_lane<T: Transport>(
    readings: BoxStream<'static, Readings>,
    settings: LaneSettings,
    context: SendContext<T>,
    identity: LaneIdentity,
    spool: Option<LaneSpool>,
) {
    let gate = sender::turn_and_token(context.clone(), spool.clone());
    let batches = batch::gated_batches(readings, settings.batch_size, settings.batch_timeout, gate);
    let sender = sender::batch_sender(context, identity, spool);
    side_by_side(batches, sender).await;
}

/// Forwards `items` into `sink`, polling `items` while `sink` works on the
/// one before. What may be handed over at once is up to the items (the
/// lane's gate hands over one batch only when the sender is free).
async fn side_by_side<I: Send>(
    items: impl Stream<Item = I>,
    sink: impl futures::Sink<I, Error = std::convert::Infallible>,
) {
    let (ready, waiting) = tokio::sync::mpsc::channel(1);
    let gathering = async move {
        let mut items = std::pin::pin!(items);
        while let Some(item) = items.next().await {
            // The receiver lives as long as this call: sending cannot fail.
            if ready.send(item).await.is_err() {
                break;
            }
        }
    };
    let sending = tokio_stream::wrappers::ReceiverStream::new(waiting).map(Ok).forward(sink);
    let ((), Ok(())) = futures::join!(gathering, sending);
}

/// Waits for every lane to finish.
async fn join_all(lanes: &mut JoinSet<()>) {
    while let Some(finished) = lanes.join_next().await {
        if let Err(failure) = finished {
            error!(message = "A lane failed.", error = %failure);
        }
    }
}
