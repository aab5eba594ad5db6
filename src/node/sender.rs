//! Sending: a `futures::Sink` of batches that delivers each one through a
//! [`Transport`], retrying what is worth retrying, and accounts for every
//! reading as acked or dropped.

use std::{convert::Infallible, sync::Arc};

use futures::{Sink, sink};
use tracing::{error, warn};

use super::{
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
        let mut requests = Vec::with_capacity(1);
        fitting(&batch, &mut lane, &mut requests);
        // Encoded, the readings are not needed while the sink answers.
        drop(batch);
        for request in requests {
            send(&context, spool.as_ref(), request).await;
        }
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

/// Sends one request (or spools it), and counts its readings as acked or
/// dropped once that is known.
async fn send<T: Transport>(context: &SendContext<T>, spool: Option<&LaneSpool>, request: Outgoing) {
    let readings = request.readings;
    let ledger = &context.ledger;
    ledger.sending(readings);
    let started = tokio::time::Instant::now();
    let outcome = match spool {
        Some(spool) => match send_or_spill(context, spool, request).await {
            Some(outcome) => outcome,
            None => return,
        },
        None => deliver(context, request).await,
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
}

/// With a spool: sends `request` once if nothing of its lane waits in the
/// spool; if something does, or the sink cannot take it now, spools it for
/// the replayer. Once shutdown has begun, a request that would wait for the
/// request rate is spooled at once too: what the rate lets out before the
/// deadline the replayer sends, and the rest stays on disk rather than being
/// dropped. `None` when spooled; the outcome when it was sent (or the spool
/// failed and it was delivered in memory).
async fn send_or_spill<T: Transport>(
    context: &SendContext<T>,
    spool: &LaneSpool,
    request: Outgoing,
) -> Option<Result<(), SendError>> {
    if !spool.has_waiting() && context.token_unless_draining().await {
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
    if spool.spill(context, &request).await { None } else { Some(deliver(context, request).await) }
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
