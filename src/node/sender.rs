//! Sending: a `futures::Sink` of batches that delivers each one through a
//! [`Transport`], retrying what is worth retrying, and accounts for every
//! reading as acked or dropped.

use std::{convert::Infallible, sync::Arc};

use futures::{Sink, sink};
use tracing::{error, warn};

use super::{
    codec::Outgoing,
    delivery::{SendContext, deliver},
    ledger::DropReason,
    overflow::replay::LaneSpool,
    transport::Transport,
};
use crate::{
    error::{SendError, is_retryable},
    reading::Batch,
    wire::code_name,
};

/// Who a lane's batches come from.
#[derive(Debug, Clone)]
pub(crate) struct LaneIdentity {
    /// The node's identity.
    pub node_id: Arc<str>,
    /// The lane's number.
    pub lane: u32,
    /// The number of the lane's first batch; later ones count up from it.
    pub first_batch: u64,
}

/// A sink that sends every batch it is given, one at a time, in order,
/// each under the next batch number of `lane`.
///
/// It never fails: a batch that cannot be delivered is counted as dropped
/// and logged, and the sink takes the next one.
pub(crate) fn batch_sender<T: Transport>(
    context: SendContext<T>,
    lane: LaneIdentity,
    spool: Option<LaneSpool>,
) -> impl Sink<Batch, Error = Infallible> {
    let state = (Arc::new(context), lane, spool);
    sink::unfold(state, |(context, mut lane, spool), batch: Batch| async move {
        let readings = batch.len();
        let ledger = &context.ledger;
        ledger.sending(readings);
        let request = Outgoing::new(&batch, Arc::clone(&lane.node_id), lane.lane, lane.first_batch);
        // Encoded, the readings are not needed while the sink answers.
        drop(batch);
        lane.first_batch += 1;
        let started = tokio::time::Instant::now();
        let outcome = match &spool {
            Some(spool) => match send_or_spill(&context, spool, request).await {
                Some(outcome) => outcome,
                None => return Ok((context, lane, Some(spool.clone()))),
            },
            None => deliver(&context, request).await,
        };
        ledger.answered(started.elapsed());
        match outcome {
            Ok(()) => ledger.acked(readings),
            Err(error) => {
                let reason = match &error {
                    SendError::Refused(status) => {
                        ledger.refused(status.code(), readings as u64);
                        DropReason::Refused
                    }
                    SendError::Exhausted { .. } => {
                        ledger.dropped(DropReason::RetriesExhausted, readings as u64);
                        DropReason::RetriesExhausted
                    }
                };
                error!(message = "Dropped batch.", reason = reason.name(), %error, readings);
            }
        }
        Ok((context, lane, spool))
    })
}

/// With a spool: sends `request` once if nothing of its lane waits in the
/// spool; if something does, or the sink cannot take it now, spools it for
/// the replayer. `None` when spooled; the outcome when it was sent (or the
/// spool failed and it was delivered in memory).
async fn send_or_spill<T: Transport>(
    context: &SendContext<T>,
    spool: &LaneSpool,
    request: Outgoing,
) -> Option<Result<(), SendError>> {
    if !spool.has_waiting() {
        match context.attempt(request.clone()).await {
            Ok(()) => return Some(Ok(())),
            Err(status) if !is_retryable(status.code()) => return Some(Err(SendError::Refused(status))),
            Err(status) => {
                warn!(
                    message = "Failed to send batch, spooling it.",
                    code = code_name(status.code()),
                    error = status.message()
                );
            }
        }
    }
    if spool.spill(context, &request).await { None } else { Some(deliver(context, request).await) }
}
