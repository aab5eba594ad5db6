//! The node's pipeline, composed top to bottom, and its shutdown.

use std::{future::Future, sync::Arc};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{batch, sender, sensor, throttle, transport::Transport};
use crate::{config::NodeConfig, stats::NodeStats, stats::Summary};

/// Runs the node until `shutdown` resolves, then delivers what it holds.
///
/// Shutdown follows the data: only the sensors are cancelled; the batcher
/// emits its partial batch when their stream ends, and the sender delivers
/// it and everything before it. That drain is bounded by
/// `SHUTDOWN_TIMEOUT`; readings still held when it runs out are counted as
/// dropped, so the returned summary accounts for every reading.
pub async fn run<T: Transport>(
    config: &NodeConfig,
    transport: T,
    stats: Arc<NodeStats>,
    shutdown: impl Future<Output = ()>,
) -> Summary {
    let stop_sensors = CancellationToken::new();
    let readings = sensor::merged(config.sensor_names(), config.sensor_period(), &stats)
        .take_until(stop_sensors.clone().cancelled_owned());
    let batches = batch::batches(readings, config.batch_size, config.batch_timeout.into());
    let throttled = throttle::throttle(batches, config.request_rate());
    let retry = sender::RetryPolicy { interval: config.retry_interval.into(), max_retries: config.max_retries };
    let delivered = throttled.map(Ok).forward(sender::batch_sender(transport, retry, Arc::clone(&stats)));

    let mut delivered = std::pin::pin!(delivered);
    tokio::select! {
        // The sensors never end by themselves, so this only returns early if
        // the sender's stream does, which it does not; handled for completeness.
        _ = &mut delivered => {}
        () = shutdown => {
            info!(message = "Stopping sensors and flushing.", produced = stats.snapshot().produced);
            stop_sensors.cancel();
            if tokio::time::timeout(config.shutdown_timeout.into(), delivered).await.is_err() {
                let lost = stats.drop_unaccounted();
                warn!(message = "Shutdown timeout ran out before every reading was delivered.", dropped = lost);
            }
        }
    }
    stats.snapshot()
}
