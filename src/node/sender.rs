//! Sending: a `futures::Sink` of batches that delivers each one through a
//! [`Transport`], retrying what is worth retrying, and accounts for every
//! reading as acked or dropped.

use std::{convert::Infallible, sync::Arc, time::Duration};

use backon::{ConstantBuilder, Retryable};
use futures::{Sink, sink};
use tonic::Status;
use tracing::{error, warn};

use super::transport::Transport;
use crate::{
    error::{SendError, is_retryable},
    reading::Batch,
    stats::{DropReason, NodeStats, count},
};

/// How a failed send is repeated.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Wait between two attempts.
    pub interval: Duration,
    /// Attempts after the first one, at most.
    pub max_retries: usize,
}

/// A sink that sends every batch it is given, one at a time, in order.
///
/// It never fails: a batch that cannot be delivered is counted as dropped
/// and logged, and the sink takes the next one.
pub fn batch_sender<T: Transport>(
    transport: T,
    retry: RetryPolicy,
    stats: Arc<NodeStats>,
) -> impl Sink<Batch, Error = Infallible> {
    let state = Arc::new((transport, stats));
    sink::unfold(state, move |state, batch: Batch| async move {
        let (transport, stats) = &*state;
        let readings = batch.len();
        count(&stats.sent, readings);
        stats.batches_sent.inc();
        stats.batch_size.observe(readings as f64);
        let started = tokio::time::Instant::now();
        let outcome = deliver(transport, retry, stats, Arc::new(batch)).await;
        stats.send_latency.observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => stats.ack(readings),
            Err(error) => {
                let reason = match error {
                    SendError::Refused(_) => DropReason::Refused,
                    SendError::Exhausted { .. } => DropReason::RetriesExhausted,
                };
                stats.drop_readings(reason, readings as u64);
                error!(message = "Dropped batch.", %error, readings);
            }
        }
        Ok(state)
    })
}

/// Sends `batch`, repeating retryable failures as `retry` allows.
async fn deliver<T: Transport>(
    transport: &T,
    retry: RetryPolicy,
    stats: &NodeStats,
    batch: Arc<Batch>,
) -> Result<(), SendError> {
    let mut attempts = 0;
    let attempt = || {
        attempts += 1;
        transport.send(Arc::clone(&batch))
    };
    let backoff = ConstantBuilder::default().with_delay(retry.interval).with_max_times(retry.max_retries);
    attempt
        .retry(backoff)
        .when(|status: &Status| is_retryable(status.code()))
        .notify(|status: &Status, wait: Duration| {
            stats.retry(status.code());
            warn!(message = "Failed to send batch, retrying.", code = ?status.code(), error = status.message(), ?wait);
        })
        .await
        .map_err(|last| {
            if is_retryable(last.code()) { SendError::Exhausted { attempts, last } } else { SendError::Refused(last) }
        })
}
