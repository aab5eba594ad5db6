//! Sending: a `futures::Sink` of batches that delivers each one through a
//! [`Transport`], retrying what is worth retrying, and accounts for every
//! reading as acked or dropped.

use std::{convert::Infallible, sync::Arc};

use futures::{FutureExt, Sink, future::BoxFuture, sink};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{error, warn};

use super::{
    batch::WhenReady,
    codec::{Outgoing, Payload},
    delivery::{SendContext, deliver},
    ledger::DropReason,
    overflow::replay::LaneSpool,
    transport::Transport,
};
use crate::{
    error::{SendError, is_retryable},
    reading::{Batch, Reading},
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
    /// MAX_MESSAGE_BYTES: a batch whose request would be larger is sent as
    /// several, each under its own number.
    pub max_bytes: usize,
}

/// What a batch takes from its lane's gate to the sender.
#[derive(Debug)]
pub(crate) struct Ticket {
    /// The lane's sender is this batch's until the ticket is dropped, so
    /// that the next batch grows meanwhile instead of waiting in line.
    _turn: Option<OwnedSemaphorePermit>,
    /// Whether a token of the request rate was taken for the first attempt.
    token: bool,
}

/// The gate of a lane's batcher: open once the lane's sender is done with
/// the batch before and a token of the request rate is taken for this one.
/// No token is taken for a batch that will go to the spool (the lane has
/// batches waiting there), nor once shutdown has begun and none is free
/// (with a spool: the batch is spooled rather than held).
pub(crate) fn turn_and_token<T: Transport>(
    context: SendContext<T>,
    spool: Option<LaneSpool>,
) -> WhenReady<impl FnMut() -> BoxFuture<'static, Ticket>, BoxFuture<'static, Ticket>> {
    let turns = Arc::new(Semaphore::new(1));
    WhenReady::new(move || {
        let (turns, context, spool) = (Arc::clone(&turns), context.clone(), spool.clone());
        async move {
            // The semaphore is never closed: a turn always comes.
            let turn = turns.acquire_owned().await.ok();
            let token = match &spool {
                Some(spool) if spool.has_waiting() => false,
                Some(_) => context.token_unless_draining().await,
                None => {
                    context.throttle.acquire().await;
                    true
                }
            };
            Ticket { _turn: turn, token }
        }
        .boxed()
    })
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
) -> impl Sink<(Batch, Ticket), Error = Infallible> {
    let state = (Arc::new(context), lane, spool);
    sink::unfold(state, |(context, mut lane, spool), (batch, ticket): (Batch, Ticket)| async move {
        let mut requests = Vec::with_capacity(1);
        fitting(&batch, &mut lane, &mut requests);
        // Encoded, the readings are not needed while the sink answers.
        drop(batch);
        let mut token = ticket.token;
        let mut requests = std::collections::VecDeque::from(requests);
        let mut halved = false;
        while let Some(request) = requests.pop_front() {
            let refused = send(&context, spool.as_ref(), request, std::mem::take(&mut token), halved).await;
            // A sink whose byte rate can never take the whole request gets
            // it in halves, as often as it takes.
            if let Some((first, second)) = refused.and_then(|r| r.halves(lane.first_batch, lane.first_batch + 1)) {
                lane.first_batch += 2;
                requests.push_front(second);
                requests.push_front(first);
                halved = true;
            }
        }
        drop(ticket);
        Ok((context, lane, spool))
    })
}

/// `batch` as requests of at most `lane.max_bytes` each (halved until they
/// fit; a single reading always does), numbered in turn from the lane's
/// next batch number.
fn fitting(batch: &[Reading], lane: &mut LaneIdentity, requests: &mut Vec<Outgoing>) {
    let request = Outgoing::new(batch, Arc::clone(&lane.node_id), lane.lane, lane.first_batch);
    if request.encoded_len() <= lane.max_bytes || batch.len() < 2 {
        lane.first_batch += 1;
        requests.push(request);
        return;
    }
    let (first, second) = batch.split_at(batch.len() / 2);
    fitting(first, lane, requests);
    fitting(second, lane, requests);
}

/// Sends one request (or spools it), its first attempt on a token already
/// taken if `token`, and counts its readings as acked or dropped once that
/// is known. A request of several readings that the sink refused as larger
/// than it can ever take is handed back, uncounted, to be sent in halves
/// (`halved`: this is such a half, whose readings were counted as sent).
async fn send<T: Transport>(
    context: &SendContext<T>,
    spool: Option<&LaneSpool>,
    request: Outgoing,
    token: bool,
    halved: bool,
) -> Option<Outgoing> {
    let readings = request.readings;
    let ledger = &context.ledger;
    let started = tokio::time::Instant::now();
    let kept = (readings > 1).then(|| request.clone());
    // A half's readings went on the wire with the whole.
    let count = !halved;
    let outcome = match spool {
        Some(spool) => send_or_spill(context, spool, request, token, count).await?,
        None => deliver(context, request, token, count).await,
    };
    ledger.answered(started.elapsed());
    match outcome {
        Ok(()) => ledger.acked(readings),
        Err(SendError::Refused(status)) if too_large_for_the_sink(&status) && kept.is_some() => {
            warn!(
                message = "The sink refused a request as too large for its byte rate; sending it in halves.",
                readings
            );
            return kept;
        }
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
    None
}

/// Whether the sink refused a request because it is larger than the sink
/// takes in a second (RATE_PER_SECOND): it would never take it whole.
fn too_large_for_the_sink(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition && status.message().contains("larger than RATE_PER_SECOND")
}

/// With a spool: sends `request` once (on the token already taken if
/// `token`) if nothing of its lane waits in the spool; if something does, or the sink cannot take it now, spools it for
/// the replayer. Once shutdown has begun, a request that would wait for the
/// request rate is spooled at once too: what the rate lets out before the
/// deadline the replayer sends, and the rest stays on disk rather than being
/// dropped. `None` when spooled; the outcome when it was sent (or the spool
/// failed and it was delivered in memory).
async fn send_or_spill<T: Transport>(
    context: &SendContext<T>,
    spool: &LaneSpool,
    request: Outgoing,
    token: bool,
    count: bool,
) -> Option<Result<(), SendError>> {
    let mut sent = false;
    if !spool.has_waiting() && (token || context.token_unless_draining().await) {
        sent = true;
        if count {
            context.ledger.sending(request.readings);
        }
        match context.attempt_now(request.clone()).await {
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
    if spool.spill(context, &request, sent).await {
        None
    } else {
        Some(deliver(context, request, false, count && !sent).await)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::{proto::SensorValuesRequest, reading::sensor_name};

    proptest! {
        /// However long the names, every request fits, the readings keep
        /// their order, and the numbers count up one by one.
        #[test]
        fn a_batch_too_large_for_one_request_is_sent_as_several_that_fit(
            names in proptest::collection::vec(1usize..=256, 1..400),
            max_bytes in 1024usize..20_000,
        ) {
            let batch: Vec<Reading> = names
                .iter()
                .enumerate()
                .map(|(i, &len)| Reading {
                    sensor: sensor_name(&"s".repeat(len)),
                    sequence: i as u64,
                    value: -(i as i64),
                    created_at: UNIX_EPOCH + Duration::from_millis(i as u64),
                })
                .collect();
            let mut lane = LaneIdentity { node_id: Arc::from("n".repeat(128)), lane: 3, first_batch: 7, max_bytes };
            let mut requests = Vec::new();
            fitting(&batch, &mut lane, &mut requests);
            let mut sequences = Vec::new();
            for (i, request) in requests.iter().enumerate() {
                let mut bytes = Vec::new();
                request.write_to(&mut bytes);
                prop_assert!(bytes.len() <= max_bytes, "{} bytes > {max_bytes}", bytes.len());
                prop_assert_eq!(request.batch_sequence, 7 + i as u64);
                let decoded = SensorValuesRequest::decode(bytes.as_slice()).unwrap();
                prop_assert_eq!(decoded.items.len(), request.readings);
                sequences.extend(decoded.items.iter().map(|item| item.sequence));
            }
            prop_assert_eq!(sequences, (0..batch.len() as u64).collect::<Vec<_>>());
            prop_assert_eq!(lane.first_batch, 7 + requests.len() as u64);
            // Nothing is split that fits whole.
            let whole = Outgoing::new(&batch, Arc::from("n".repeat(128)), 3, 7).encoded_len();
            prop_assert_eq!(requests.len() == 1, whole <= max_bytes);
        }
    }
}
