//! Spooling: how a lane's sender uses the spool, and the replayer that
//! delivers spooled batches, oldest first, ahead of the lane's new data.

use std::{sync::Arc, time::Duration};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::spool::{Most, Spool};
use crate::node::{
    codec::Outgoing,
    delivery::{SendContext, deliver},
    transport::Transport,
};
use crate::{error::SendError, node::ledger::Run};

/// A lane's view of the spool.
#[derive(Debug, Clone)]
pub(crate) struct LaneSpool {
    /// The node's spool.
    pub spool: Spool,
    /// Wakes the lane's replayer when a batch is spooled.
    pub wake: Arc<Notify>,
    /// The first batch number of this run: older ones are an earlier run's.
    pub first_of_run: u64,
    /// How much one replayed request may carry.
    pub most: Most,
    /// What is known, in memory, of whether the lane has batches waiting.
    pub waiting: Arc<std::sync::Mutex<Waiting>>,
}

/// Whether a lane's spool holds batches, kept in memory so that sending a
/// batch needs no read of the spool: the sender counts what it spills, and
/// the replayer, each time it finds the lane's spool empty, notes how many
/// spills that reading had seen.
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    /// Batches spilled so far.
    spilled: u64,
    /// `spilled` as it was when the replayer last found the spool empty;
    /// `None` until it has looked (an earlier run may have left batches).
    empty_after: Option<u64>,
}

impl LaneSpool {
    /// The lane's view of `spool`, in a run whose batch numbers start at
    /// `first_of_run`, replaying requests of up to `batch_size` readings
    /// and `max_bytes` bytes.
    pub(crate) fn new(spool: Spool, first_of_run: u64, batch_size: usize, max_bytes: usize) -> Self {
        // Room for the request's identity: three fields and NODE_ID (at
        // most 128 bytes).
        let most = Most { readings: batch_size, bytes: max_bytes.saturating_sub(256), run_starts: first_of_run };
        Self { spool, wake: Arc::default(), first_of_run, most, waiting: Arc::default() }
    }

    /// Whether the lane has batches waiting in the spool: then new batches
    /// must queue behind them, to keep the lane's order. Answered from
    /// memory: waiting unless the replayer found the spool empty after the
    /// last spill.
    pub(crate) fn has_waiting(&self) -> bool {
        let waiting = self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        waiting.empty_after != Some(waiting.spilled)
    }

    /// Which run produced batch number `batch`.
    fn run_of(&self, batch: u64) -> Run {
        if batch >= self.first_of_run { Run::This } else { Run::Earlier }
    }

    /// Spills counted so far, read before the replayer looks in the spool.
    fn spilled(&self) -> u64 {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner).spilled
    }

    /// The replayer found the spool empty, having read `spilled` first.
    fn found_empty(&self, spilled: u64) {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner).empty_after = Some(spilled);
    }

    /// Stores `request` for the replayer; `sent` if it was tried once
    /// already (the sink may hold it: it is then replayed alone, under its
    /// number). Returns `false` if the spool failed, and the caller must
    /// deliver the batch itself.
    pub(crate) async fn spill<T>(&self, context: &SendContext<T>, request: &Outgoing, sent: bool) -> bool {
        let ledger = &context.ledger;
        let readings = request.readings;
        let pushed = self
            .spool
            .push_async(request.lane, request.batch_sequence, request.items.clone(), Arc::clone(&request.node_id), sent)
            .await;
        match pushed {
            Ok(evicted) => {
                self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner).spilled += 1;
                ledger.spooled(readings);
                for (batch, lost) in evicted {
                    ledger.evicted(self.run_of(batch), lost);
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

/// How long the replayer waits before it tries again to remove a batch
/// it delivered.
const REMOVAL_PAUSE: Duration = Duration::from_secs(1);

/// Delivers the spooled batches of `lane`, oldest first, until `stop`,
/// each under the identity it was made with (`node_id` where the spool has
/// none recorded). Batches spooled a few readings at a time leave in
/// requests of up to BATCH_SIZE readings ([`Spool::next_request`]), so a
/// backlog drains at the request rate's full capacity.
/// A batch leaves the spool only once the sink took it, or refused it for
/// good; a damaged one is skipped and counted.
pub(crate) async fn replay<T: Transport>(
    context: SendContext<T>,
    spool: LaneSpool,
    lane: u32,
    node_id: Arc<str>,
    stop: CancellationToken,
) {
    let ledger = Arc::clone(&context.ledger);
    let pause = context.retry.cap;
    loop {
        let spilled = spool.spilled();
        // Kept from eviction while it is delivered: an evicted batch is
        // counted as dropped, and must not then be delivered too.
        let (stored, _held) = match spool.spool.next_request_async(lane, spool.most).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                spool.found_empty(spilled);
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
        let run = spool.run_of(stored.batch_sequence);
        let Some((items, n)) = stored.items else {
            ledger.damaged();
            error!(message = "Skipped a damaged spool record.", lane, batch = stored.batch_sequence);
            let _ = spool.spool.remove_async(lane, stored.batch_sequence).await;
            continue;
        };
        // Sent as the run that made it: NODE_ID may have changed since.
        let node_id = stored.node_id.map_or_else(|| Arc::clone(&node_id), Arc::from);
        let request = Outgoing { items, readings: n, node_id, lane, batch_sequence: stored.batch_sequence };
        let delivered = tokio::select! {
            delivered = deliver(&context, request, false, run == Run::This && !stored.sent_before) => delivered,
            () = stop.cancelled() => return,
        };
        match delivered {
            Ok(()) => {
                ledger.replay_acked(run, n);
                // Never delivered twice in a run: the removal is tried again,
                // every second (the disk, not the sink, is in the way), until
                // it is done (a full disk frees up, the spool is opened
                // again). Stopped first, the batch is sent again by the next
                // run.
                while let Err(error) = spool.spool.remove_async(lane, stored.batch_sequence).await {
                    error!(message = "Cannot remove a delivered batch from the spool; trying again.", %error);
                    if sleep_or_stop(REMOVAL_PAUSE, &stop).await {
                        return;
                    }
                }
            }
            Err(SendError::Refused(status)) => {
                let _ = spool.spool.remove_async(lane, stored.batch_sequence).await;
                ledger.replay_refused(run, status.code(), n as u64);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_is_known_from_memory_and_cleared_only_by_an_empty_read_after_the_last_spill() {
        let dir = std::env::temp_dir().join(format!("tn-waiting-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (spool, _) = Spool::open(&dir, 1 << 20).unwrap();
        let lane = LaneSpool::new(spool, 1, 1000, 1 << 20);
        assert!(lane.has_waiting(), "unknown until the replayer has looked");
        lane.found_empty(lane.spilled());
        assert!(!lane.has_waiting());
        // A spill, and a read that started before it: still waiting.
        let before = lane.spilled();
        lane.waiting.lock().unwrap().spilled += 1;
        lane.found_empty(before);
        assert!(lane.has_waiting(), "a read older than the spill proves nothing");
        lane.found_empty(lane.spilled());
        assert!(!lane.has_waiting());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
