//! Delivery: one batch to the sink. Every attempt, first or retry, takes a
//! token from the shared bucket; retryable failures are retried on the
//! policy's backoff; a sink's pushback is obeyed without counting as a
//! failure. Both the lane's sender and the spool's replayer deliver
//! through here.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::warn;

use super::{
    codec::Outgoing,
    retry::{RetryPolicy, SinkHealth, pushback},
    throttle::Throttle,
    transport::Transport,
};
use crate::{
    error::{SendError, is_retryable},
    node::Ledger,
    wire::code_name,
};

/// What every lane shares to deliver its batches.
#[derive(Debug, Clone)]
pub(crate) struct SendContext<T> {
    /// Where batches go.
    pub transport: T,
    /// How failures are retried.
    pub retry: RetryPolicy,
    /// What the lanes know about the sink: retry budget, news of answers.
    pub health: SinkHealth,
    /// The request rate limit, paused while the sink pushes back.
    pub throttle: Throttle,
    /// Counters.
    pub ledger: Arc<Ledger>,
    /// Cancelled when shutdown begins: sleeping retries wake at once and
    /// keep trying, at most every `retry.initial`, until the deadline.
    pub draining: CancellationToken,
}

impl<T: Transport> SendContext<T> {
    /// A token, unless shutdown has begun and none is free: `false` then,
    /// and no token is taken.
    pub(crate) async fn token_unless_draining(&self) -> bool {
        tokio::select! {
            biased;
            () = self.throttle.acquire() => true,
            () = self.draining.cancelled() => false,
        }
    }

    /// One attempt, its token already taken: sends, and tells the others
    /// what the sink did.
    pub(crate) async fn attempt_now(&self, request: Outgoing) -> Result<(), Status> {
        let answer = self.transport.send(request).await;
        match &answer {
            Err(status) if reached_nobody(status) => self.health.failed(),
            _ => self.health.answered(),
        }
        answer
    }
}

/// Whether a failure says nothing was there to answer (or able to):
/// unreachable, timed out, or a connection that broke.
fn reached_nobody(status: &Status) -> bool {
    is_retryable(status.code()) && pushback(status).is_none()
}

/// Sends `request`, repeating retryable failures as the policy allows; the
/// first attempt goes on a token already taken if `token`, and counts its
/// readings as sent if `count` (they had not gone on the wire before).
pub(crate) async fn deliver<T: Transport>(
    context: &SendContext<T>,
    request: Outgoing,
    mut token: bool,
    count: bool,
) -> Result<(), SendError> {
    let policy = &context.retry;
    let mut backoff = policy.backoff();
    let (mut attempts, mut failures, mut waited) = (0, 0, Duration::ZERO);
    loop {
        attempts += 1;
        if !std::mem::take(&mut token) {
            context.throttle.acquire().await;
        }
        if attempts == 1 && count {
            context.ledger.sending(request.readings);
        }
        let status = match context.attempt_now(request.clone()).await {
            Ok(()) => return Ok(()),
            Err(status) if !is_retryable(status.code()) => return Err(SendError::Refused(status)),
            Err(status) => status,
        };
        let draining = context.draining.is_cancelled();
        let asked = pushback(&status);
        let wait = match asked {
            // Flow control, not a failure: every lane pauses as long as
            // asked, and no attempt is used up.
            Some(pause) => {
                context.throttle.pause(pause);
                context.ledger.pushed_back();
                pause
            }
            None => {
                failures += 1;
                if !draining && policy.max_retries.is_some_and(|most| failures > most) {
                    return Err(SendError::Exhausted { attempts, last: status });
                }
                let planned = policy.jittered(backoff.next().unwrap_or(policy.cap));
                if draining { planned.min(policy.initial) } else { planned }
            }
        };
        waited += wait;
        if !draining && policy.max_elapsed.is_some_and(|most| waited > most) {
            return Err(SendError::Exhausted { attempts, last: status });
        }
        if asked.is_none() {
            context.ledger.retried(status.code());
        }
        warn!(
            message = "Failed to send batch, retrying.",
            to = %context.transport.destination(),
            code = code_name(status.code()),
            error = status.message(),
            ?wait
        );
        // A pushback's wait is the throttle's pause, which the next attempt's
        // token waits out.
        if asked.is_none() {
            wait_for_retry(context, wait).await;
        }
    }
}

/// Waits `wait` before a retry, unless the sink answers some other lane
/// first or shutdown begins. While the sink is taken for down, only one
/// lane probes on its backoff; the others wait for news, at most the cap.
async fn wait_for_retry<T>(context: &SendContext<T>, wait: Duration) {
    let draining = context.draining.is_cancelled();
    // Held while this lane waits, so that no other lane probes meanwhile.
    let (_probe, wait) = match context.health.turn() {
        Some(None) if !draining => (None, context.retry.cap),
        Some(probe) => (probe, wait),
        None => (None, wait),
    };
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = context.health.next_answer() => {}
        () = context.draining.cancelled(), if !draining => {}
    }
}
