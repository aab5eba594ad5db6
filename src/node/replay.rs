//! Spooling: how a lane's sender uses the spool, and the replayer that
//! delivers spooled batches, oldest first, ahead of the lane's new data.

use std::{sync::Arc, time::Duration};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{
    codec::Outgoing,
    delivery::{SendContext, deliver},
    spool::Spool,
    transport::Transport,
};
use crate::{
    error::SendError,
    stats::{DropReason, ReasonLabel, count},
};

/// A lane's view of the spool.
#[derive(Debug, Clone)]
pub struct LaneSpool {
    /// The node's spool.
    pub spool: Spool,
    /// Wakes the lane's replayer when a batch is spooled.
    pub wake: Arc<Notify>,
    /// The first batch number of this run: older ones are an earlier run's.
    pub first_of_run: u64,
}

impl LaneSpool {
    /// Whether the lane has batches waiting in the spool: then new batches
    /// must queue behind them, to keep the lane's order.
    pub async fn has_waiting(&self, lane: u32) -> bool {
        // An unreadable spool is as good as empty here: the batch is sent.
        matches!(self.spool.oldest_async(lane).await, Ok(Some(_)))
    }

    /// Stores `request` for the replayer. Returns `false` if the spool
    /// failed, and the caller must deliver the batch itself.
    pub async fn spill<T>(&self, context: &SendContext<T>, request: &Outgoing) -> bool {
        let stats = &context.stats;
        let readings = request.readings;
        let pushed = self.spool.push_async(request.lane, request.batch_sequence, request.items.clone()).await;
        match pushed {
            Ok(evicted) => {
                count(&stats.spooled, readings);
                stats.in_spool.inc_by(readings as i64);
                for (batch, lost) in evicted {
                    if batch >= self.first_of_run {
                        stats.in_spool.dec_by(lost as i64);
                        stats.drop_readings(DropReason::SpoolFull, lost);
                    } else {
                        let label = ReasonLabel { reason: DropReason::SpoolFull };
                        stats.dropped_by_reason.get_or_create(&label).inc_by(lost);
                    }
                    warn!(message = "Spool full, evicted its oldest batch.", batch, readings = lost);
                }
                self.wake.notify_one();
                true
            }
            Err(error) => {
                error!(message = "Cannot spool batch.", %error);
                false
            }
        }
    }
}

/// Delivers the spooled batches of `lane`, oldest first, until `stop`.
/// A batch leaves the spool only once the sink took it, or refused it for
/// good; a damaged one is skipped and counted.
pub async fn replay<T: Transport>(
    context: SendContext<T>,
    spool: LaneSpool,
    lane: u32,
    node_id: Arc<str>,
    stop: CancellationToken,
) {
    let stats = Arc::clone(&context.stats);
    let pause = context.retry.cap;
    loop {
        let stored = match spool.spool.oldest_async(lane).await {
            Ok(Some(stored)) => stored,
            Ok(None) => {
                tokio::select! {
                    () = spool.wake.notified() => continue,
                    () = stop.cancelled() => return,
                }
            }
            Err(error) => {
                error!(message = "Cannot read the spool.", %error);
                if sleep_or_stop(pause, &stop).await {
                    return;
                }
                continue;
            }
        };
        let this_run = stored.batch_sequence >= spool.first_of_run;
        let Some((items, n)) = stored.items else {
            stats.spool_damaged.inc();
            error!(message = "Skipped a damaged spool record.", lane, batch = stored.batch_sequence);
            let _ = spool.spool.remove_async(lane, stored.batch_sequence).await;
            continue;
        };
        let request =
            Outgoing { items, readings: n, node_id: Arc::clone(&node_id), lane, batch_sequence: stored.batch_sequence };
        let delivered = tokio::select! {
            delivered = deliver(&context, request) => delivered,
            () = stop.cancelled() => return,
        };
        match delivered {
            Ok(()) => {
                if let Err(error) = spool.spool.remove_async(lane, stored.batch_sequence).await {
                    // Sent again after a restart; the sink recognises it.
                    error!(message = "Cannot remove a delivered batch from the spool.", %error);
                }
                count(&stats.replayed, n);
                if this_run {
                    stats.in_spool.dec_by(n as i64);
                    stats.ack(n);
                }
            }
            Err(SendError::Refused(status)) => {
                let _ = spool.spool.remove_async(lane, stored.batch_sequence).await;
                stats.refuse(status.code());
                if this_run {
                    stats.in_spool.dec_by(n as i64);
                    stats.drop_readings(DropReason::Refused, n as u64);
                }
                error!(
                    message = "Dropped spooled batch.",
                    reason = "refused",
                    code = crate::wire::code_name(status.code()),
                    error = status.message(),
                    readings = n
                );
            }
            Err(SendError::Exhausted { .. }) => {
                // Kept: tried again after a pause, for as long as it takes.
                if sleep_or_stop(pause, &stop).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps `wait`; `true` if `stop` came first.
async fn sleep_or_stop(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = stop.cancelled() => true,
    }
}
