//! Sending: a `futures::Sink` of batches that delivers each one through a
//! [`Transport`], retrying what is worth retrying, and accounts for every
//! reading as acked or dropped.

use std::{convert::Infallible, sync::Arc, time::Duration};

use backon::Retryable;
use futures::{Sink, sink};
use tonic::Status;
use tracing::{error, warn};

use super::{
    codec::Outgoing,
    replay::LaneSpool,
    retry::{RetryBudget, RetryPolicy, pushback},
    throttle::Throttle,
    transport::Transport,
};
use crate::{
    error::{SendError, is_retryable},
    reading::Batch,
    stats::{DropReason, NodeStats, count},
};

/// Who a lane's batches come from.
#[derive(Debug, Clone)]
pub struct LaneIdentity {
    /// The node's identity.
    pub node_id: Arc<str>,
    /// The lane's number.
    pub lane: u32,
    /// The number of the lane's first batch; later ones count up from it.
    pub first_batch: u64,
}

/// What every lane's sender shares.
#[derive(Debug, Clone)]
pub struct SendContext<T> {
    /// Where batches go.
    pub transport: T,
    /// How failures are retried.
    pub retry: RetryPolicy,
    /// Retry throttling across lanes.
    pub budget: RetryBudget,
    /// The request rate limit, paused while the sink pushes back.
    pub throttle: Throttle,
    /// Counters.
    pub stats: Arc<NodeStats>,
}

/// A sink that sends every batch it is given, one at a time, in order,
/// each under the next batch number of `lane`.
///
/// It never fails: a batch that cannot be delivered is counted as dropped
/// and logged, and the sink takes the next one.
pub fn batch_sender<T: Transport>(
    context: SendContext<T>,
    lane: LaneIdentity,
    spool: Option<LaneSpool>,
) -> impl Sink<Batch, Error = Infallible> {
    let state = (Arc::new(context), lane, spool);
    sink::unfold(state, |(context, mut lane, spool), batch: Batch| async move {
        let readings = batch.len();
        let stats = &context.stats;
        count(&stats.sent, readings);
        stats.batches_sent.inc();
        stats.batch_size.observe(readings as f64);
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
        stats.send_latency.observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => stats.ack(readings),
            Err(error) => {
                let reason = match &error {
                    SendError::Refused(status) => {
                        stats.refuse(status.code());
                        DropReason::Refused
                    }
                    SendError::Exhausted { .. } => DropReason::RetriesExhausted,
                };
                stats.drop_readings(reason, readings as u64);
                error!(message = "Dropped batch.", %error, readings);
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
    if !spool.has_waiting(request.lane).await {
        match context.transport.send(request.clone()).await {
            Ok(()) => {
                context.budget.succeeded();
                return Some(Ok(()));
            }
            Err(status) if !is_retryable(status.code()) => return Some(Err(SendError::Refused(status))),
            Err(status) => {
                context.budget.failed();
                warn!(message = "Failed to send batch, spooling it.", code = ?status.code(), error = status.message());
            }
        }
    }
    if spool.spill(context, &request).await { None } else { Some(deliver(context, request).await) }
}

/// Sends `request`, repeating retryable failures as the policy allows.
pub(crate) async fn deliver<T: Transport>(context: &SendContext<T>, request: Outgoing) -> Result<(), SendError> {
    let mut attempts = 0;
    let attempt = || {
        attempts += 1;
        let request = request.clone();
        async move {
            let answer = context.transport.send(request).await;
            match &answer {
                Ok(()) => context.budget.succeeded(),
                Err(_) => context.budget.failed(),
            }
            answer
        }
    };
    attempt
        .retry(context.retry.backoff())
        .sleep(tokio::time::sleep)
        .when(|status: &Status| is_retryable(status.code()))
        .adjust(|status: &Status, planned: Option<Duration>| {
            let wait = context.retry.wait(status, planned?, &context.budget);
            if pushback(status).is_some() {
                context.throttle.pause(wait);
            }
            Some(wait)
        })
        .notify(|status: &Status, wait: Duration| {
            context.stats.retry(status.code());
            if pushback(status).is_some() {
                context.stats.pushbacks.inc();
            }
            warn!(message = "Failed to send batch, retrying.", code = ?status.code(), error = status.message(), ?wait);
        })
        .await
        .map_err(|last| {
            if is_retryable(last.code()) { SendError::Exhausted { attempts, last } } else { SendError::Refused(last) }
        })
}
