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

use futures::{SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    batch,
    queue::{self, Drop},
    retry::RetryBudget,
    sender::{self, LaneIdentity, SendContext},
    sensor,
    throttle::Throttle,
    transport::Transport,
};
use crate::{
    config::{NodeConfig, Overflow},
    reading::Reading,
    stats::NodeStats,
    stats::Summary,
};

/// What every lane is built from.
#[derive(Debug, Clone)]
struct LaneSettings {
    /// Readings per second, per sensor.
    sensor_rate: f64,
    /// BATCH_SIZE.
    batch_size: usize,
    /// BATCH_TIMEOUT.
    batch_timeout: Duration,
}

/// Runs the node until `shutdown` resolves, then delivers what it holds.
///
/// Shutdown follows the data: only the sensors are cancelled; each batcher
/// emits its partial batch when their stream ends, and each sender delivers
/// it and everything before it. That drain is bounded by `SHUTDOWN_TIMEOUT`;
/// readings still held when it runs out are counted as dropped, so the
/// returned summary accounts for every reading.
pub async fn run<T: Transport>(
    config: &NodeConfig,
    transport: T,
    stats: Arc<NodeStats>,
    shutdown: impl Future<Output = ()>,
) -> Summary {
    let stop_sensors = CancellationToken::new();
    let throttle = Throttle::new(config.request_rate());
    let settings = LaneSettings {
        sensor_rate: config.sensor_rate,
        batch_size: config.batch_size,
        batch_timeout: config.batch_timeout.into(),
    };
    let context = SendContext {
        transport,
        retry: config.retry_policy(),
        budget: RetryBudget::new(config.retry_budget),
        throttle: throttle.clone(),
        stats: Arc::clone(&stats),
    };
    let node_id = config.node_identity();
    // Batch numbers only grow, across restarts too: each run starts from the
    // clock, in microseconds.
    let first_batch = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
    info!(message = "Node identity.", node_id = %node_id);
    let mut lanes = JoinSet::new();
    for (lane, names) in config.lanes().into_iter().enumerate() {
        let identity = LaneIdentity { node_id: Arc::clone(&node_id), lane: lane as u32, first_batch };
        let ticks =
            sensor::ticks(names, settings.sensor_rate, Arc::clone(&stats), stop_sensors.clone().cancelled_owned());
        let readings = match config.overflow {
            Overflow::Block => ticks.flat_map(futures::stream::iter).left_stream(),
            Overflow::DropOldest | Overflow::DropNewest => {
                let drop = if config.overflow == Overflow::DropOldest { Drop::Oldest } else { Drop::Newest };
                queue::decouple(ticks, config.queue_capacity, drop, Arc::clone(&stats)).right_stream()
            }
        };
        lanes.spawn(run_lane(readings, settings.clone(), context.clone(), identity));
    }

    let drain_deadline = async {
        shutdown.await;
        info!(message = "Stopping sensors and flushing.", produced = stats.snapshot().produced);
        stop_sensors.cancel();
        tokio::time::sleep(config.shutdown_timeout.into()).await;
    };
    let drained = tokio::select! {
        () = join_all(&mut lanes) => true,
        () = drain_deadline => false,
    };
    if !drained {
        lanes.abort_all();
        let lost = stats.drop_unaccounted();
        warn!(message = "Shutdown timeout ran out before every reading was delivered.", dropped = lost);
    }
    stats.snapshot()
}

/// One lane: batches `readings`, paces the batches and sends them, until
/// `readings` ends and the last batch is delivered.
async fn run_lane<T: Transport>(
    readings: impl futures::Stream<Item = Reading>,
    settings: LaneSettings,
    context: SendContext<T>,
    identity: LaneIdentity,
) {
    let batches = batch::batches(readings, settings.batch_size, settings.batch_timeout);
    let paced = context.throttle.apply(batches);
    // One batch waits ready behind the one in flight, so the next batch is
    // gathered while the sink answers instead of after.
    let sender = sender::batch_sender(context, identity).buffer(1);
    let Ok(()) = paced.map(Ok).forward(sender).await;
}

/// Waits for every lane to finish.
async fn join_all(lanes: &mut JoinSet<()>) {
    while let Some(finished) = lanes.join_next().await {
        if let Err(failure) = finished {
            error!(message = "A lane failed.", error = %failure);
        }
    }
}
