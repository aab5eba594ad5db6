//! How long to wait before the next attempt: exponential backoff with full
//! jitter, the sink's pushback, and a retry budget shared by the lanes.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use backon::ExponentialBuilder;
use tonic::Status;
use tonic_types::StatusExt;

/// Trailer in which a throttling sink says how long to wait, in ms (gRPC's
/// retry design, A6).
pub const PUSHBACK_TRAILER: &str = "grpc-retry-pushback-ms";

/// How a failed send is repeated.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First wait (GRPC_CLIENT_RETRY_SEND_INTERVAL).
    pub initial: Duration,
    /// Growth of the wait from one attempt to the next.
    pub multiplier: f32,
    /// Longest single wait: also the probing interval of a sink that is down.
    pub cap: Duration,
    /// Most waiting for one batch, all attempts together (`None`: no limit).
    pub max_elapsed: Option<Duration>,
    /// Attempts after the first one, at most.
    pub max_retries: usize,
    /// Whether each wait is drawn at random between 0 and the backoff.
    pub jitter: bool,
}

impl RetryPolicy {
    /// The planned waits, before jitter, pushback and budget.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_factor(self.multiplier)
            .with_max_delay(self.cap)
            .with_max_times(self.max_retries)
            .with_total_delay(self.max_elapsed)
    }

    /// The wait before retrying after `status`, where the backoff planned
    /// `planned`: the sink's pushback if it gave one; the cap when the
    /// budget is spent (probe, don't storm); else the planned wait, drawn
    /// between 0 and it with full jitter.
    pub fn wait(&self, status: &Status, planned: Duration, budget: &RetryBudget) -> Duration {
        if let Some(pushback) = pushback(status) {
            return pushback;
        }
        if !budget.allows_retry() {
            return self.cap;
        }
        if self.jitter { planned.mul_f64(fastrand::f64()) } else { planned }
    }
}

/// How long the sink asked the node to wait, if it did: the
/// `grpc-retry-pushback-ms` trailer, or a `google.rpc.RetryInfo` detail.
pub fn pushback(status: &Status) -> Option<Duration> {
    let trailer = status.metadata().get(PUSHBACK_TRAILER).and_then(|value| value.to_str().ok());
    if let Some(ms) = trailer.and_then(|ms| ms.trim().parse::<u64>().ok()) {
        return Some(Duration::from_millis(ms));
    }
    status.get_details_retry_info().and_then(|info| info.retry_delay)
}

/// gRPC-style retry throttling, shared by every lane: each failure costs a
/// token, each success earns a tenth of one; below half the tokens, retries
/// wait the backoff cap, so a dead sink is probed, not stormed.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    /// Tokens left, and the most there can be.
    tokens: Arc<Mutex<(f64, f64)>>,
}

impl RetryBudget {
    /// A full budget of `max_tokens`.
    pub fn new(max_tokens: f64) -> Self {
        Self { tokens: Arc::new(Mutex::new((max_tokens, max_tokens))) }
    }

    /// Counts a failed attempt.
    pub fn failed(&self) {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.0 = (tokens.0 - 1.0).max(0.0);
    }

    /// Counts a successful attempt.
    pub fn succeeded(&self) {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.0 = (tokens.0 + 0.1).min(tokens.1);
    }

    /// Whether retries may follow the backoff rather than wait the cap.
    pub fn allows_retry(&self) -> bool {
        let tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.0 > tokens.1 / 2.0
    }
}

#[cfg(test)]
mod tests {
    use backon::BackoffBuilder;
    use tonic::{Code, metadata::MetadataValue};
    use tonic_types::ErrorDetails;

    use super::*;

    fn policy(jitter: bool) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            cap: Duration::from_secs(5),
            max_elapsed: None,
            max_retries: 20,
            jitter,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let waits: Vec<u128> = policy(false).backoff().build().take(8).map(|d| d.as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn full_jitter_draws_between_zero_and_the_backoff() {
        let budget = RetryBudget::new(10.0);
        let status = Status::unavailable("down");
        let waits: Vec<Duration> =
            (0..1000).map(|_| policy(true).wait(&status, Duration::from_secs(1), &budget)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(1)));
        assert!(waits.iter().any(|w| *w < Duration::from_millis(100)));
        assert!(waits.iter().any(|w| *w > Duration::from_millis(900)));
    }

    #[test]
    fn pushback_wins_from_the_trailer_or_retry_info() {
        let budget = RetryBudget::new(10.0);
        let mut trailer = Status::resource_exhausted("slow down");
        trailer.metadata_mut().insert(PUSHBACK_TRAILER, MetadataValue::from_static("1234"));
        assert_eq!(policy(true).wait(&trailer, Duration::from_secs(9), &budget), Duration::from_millis(1234));
        let details = ErrorDetails::with_retry_info(Some(Duration::from_millis(750)));
        let info = Status::with_error_details(Code::ResourceExhausted, "slow down", details);
        assert_eq!(policy(true).wait(&info, Duration::from_secs(9), &budget), Duration::from_millis(750));
    }

    #[test]
    fn a_spent_budget_waits_the_cap_and_successes_refill_it() {
        let budget = RetryBudget::new(10.0);
        let status = Status::unavailable("down");
        for _ in 0..5 {
            budget.failed();
        }
        assert_eq!(policy(false).wait(&status, Duration::from_millis(100), &budget), Duration::from_secs(5));
        for _ in 0..10 {
            budget.succeeded();
        }
        assert_eq!(policy(false).wait(&status, Duration::from_millis(100), &budget), Duration::from_millis(100));
    }
}
