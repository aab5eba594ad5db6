//! How long to wait before the next attempt: exponential backoff with full
//! jitter, the sink's pushback, and what the lanes know together about the
//! sink (a retry budget, and news of its answers).

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::Notify;
use tonic::Status;
use tonic_types::StatusExt;

use crate::{
    config::{Jitter, NodeConfig},
    wire::PUSHBACK_TRAILER,
};

/// How a failed send is repeated.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First wait (GRPC_CLIENT_RETRY_SEND_INTERVAL).
    pub initial: Duration,
    /// Growth of the wait from one attempt to the next.
    pub multiplier: f32,
    /// Longest single wait: also how long a lane waits for news of the
    /// sink while another lane probes it.
    pub cap: Duration,
    /// Most waiting for one batch, all attempts together (`None`: no limit).
    pub max_elapsed: Option<Duration>,
    /// Attempts after the first one, at most (`None`: no limit). A
    /// pushback is not a failed attempt and does not count.
    pub max_retries: Option<usize>,
    /// Whether each wait is drawn at random between 0 and the backoff.
    pub jitter: bool,
}

impl From<&NodeConfig> for RetryPolicy {
    /// The policy the `GRPC_CLIENT_RETRY_*` variables describe.
    fn from(config: &NodeConfig) -> Self {
        let max_elapsed = Duration::from(config.retry_max_elapsed);
        Self {
            initial: config.retry_interval.into(),
            multiplier: config.retry_multiplier,
            cap: config.retry_max_interval.into(),
            max_elapsed: (!max_elapsed.is_zero()).then_some(max_elapsed),
            max_retries: config.max_retries.0,
            jitter: config.retry_jitter == Jitter::Full,
        }
    }
}

impl RetryPolicy {
    /// The planned waits, one per failure, before jitter: exponential up
    /// to the cap, without end (the limits are the sender's to apply).
    pub(crate) fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_factor(self.multiplier)
            .with_max_delay(self.cap)
            .without_max_times()
            .build()
    }

    /// The wait before retrying, where the backoff planned `planned`:
    /// drawn between 0 and it with full jitter, or exactly it.
    pub(crate) fn jittered(&self, planned: Duration) -> Duration {
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

/// What the lanes know together about the sink.
///
/// A retry budget as in gRPC's retry throttling (A6): each failure costs a
/// token, each answer earns a tenth of one. While more than half is left,
/// every lane retries on its own backoff. Below half the sink is taken for
/// down, and retry volume is cut to one lane at a time: that lane probes on
/// its backoff while the others wait for news (or the cap). Whenever the
/// sink answers any lane, every waiting retry is woken at once, so a sink
/// that comes back is used again within one probe, not one cap.
#[derive(Debug, Clone)]
pub struct SinkHealth {
    /// Shared with every lane's copy.
    inner: Arc<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    /// Tokens left, and the most there can be.
    tokens: Mutex<(f64, f64)>,
    /// Woken whenever the sink answers.
    answered: Notify,
    /// Whether a lane is probing a sink taken for down.
    probing: AtomicBool,
    /// Whether the last attempt of any lane reached the sink (or none was
    /// made yet): backs readiness.
    reachable: AtomicBool,
}

/// A lane's turn at probing; handed back when dropped.
#[derive(Debug)]
pub(crate) struct Probe(Arc<HealthInner>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.probing.store(false, Relaxed);
    }
}

impl SinkHealth {
    /// A full budget of `max_tokens`.
    pub fn new(max_tokens: f64) -> Self {
        let inner = HealthInner {
            tokens: Mutex::new((max_tokens, max_tokens)),
            answered: Notify::new(),
            probing: AtomicBool::new(false),
            reachable: AtomicBool::new(true),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Counts an attempt that failed to reach the sink, or found it
    /// unable to serve.
    pub fn failed(&self) {
        let mut tokens = self.inner.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.0 = (tokens.0 - 1.0).max(0.0);
        self.inner.reachable.store(false, Relaxed);
    }

    /// Counts an answer of the sink (success, refusal or pushback), and
    /// wakes every retry waiting for news.
    pub(crate) fn answered(&self) {
        {
            let mut tokens = self.inner.tokens.lock().unwrap_or_else(PoisonError::into_inner);
            tokens.0 = (tokens.0 + 0.1).min(tokens.1);
        }
        self.inner.reachable.store(true, Relaxed);
        self.inner.answered.notify_waiters();
    }

    /// Whether the last attempt reached the sink (true before the first).
    pub fn reachable(&self) -> bool {
        self.inner.reachable.load(Relaxed)
    }

    /// `None` while the budget allows every lane its own backoff; once it
    /// is spent, `Some(Some(probe))` for the one lane that probes, and
    /// `Some(None)` for the lanes that wait for news.
    pub(crate) fn turn(&self) -> Option<Option<Probe>> {
        let spent = {
            let tokens = self.inner.tokens.lock().unwrap_or_else(PoisonError::into_inner);
            tokens.0 <= tokens.1 / 2.0
        };
        if !spent {
            return None;
        }
        let claimed = self.inner.probing.compare_exchange(false, true, Relaxed, Relaxed).is_ok();
        Some(claimed.then(|| Probe(Arc::clone(&self.inner))))
    }

    /// Resolves the next time the sink answers any lane.
    pub(crate) async fn next_answer(&self) {
        self.inner.answered.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use tonic::{Code, metadata::MetadataValue};
    use tonic_types::ErrorDetails;

    use super::*;

    fn policy(jitter: bool) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            cap: Duration::from_secs(5),
            max_elapsed: None,
            max_retries: Some(20),
            jitter,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_goes_on() {
        let waits: Vec<u128> = policy(false).backoff().take(30).map(|d| d.as_millis()).collect();
        assert_eq!(waits[..8], [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(waits[29], 5000);
    }

    #[test]
    fn full_jitter_draws_between_zero_and_the_backoff() {
        let waits: Vec<Duration> = (0..1000).map(|_| policy(true).jittered(Duration::from_secs(1))).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(1)));
        assert!(waits.iter().any(|w| *w < Duration::from_millis(100)));
        assert!(waits.iter().any(|w| *w > Duration::from_millis(900)));
        assert_eq!(policy(false).jittered(Duration::from_secs(1)), Duration::from_secs(1));
    }

    #[test]
    fn pushback_comes_from_the_trailer_or_retry_info() {
        let mut trailer = Status::resource_exhausted("slow down");
        trailer.metadata_mut().insert(PUSHBACK_TRAILER, MetadataValue::from_static("1234"));
        assert_eq!(pushback(&trailer), Some(Duration::from_millis(1234)));
        let details = ErrorDetails::with_retry_info(Some(Duration::from_millis(750)));
        let info = Status::with_error_details(Code::ResourceExhausted, "slow down", details);
        assert_eq!(pushback(&info), Some(Duration::from_millis(750)));
        assert_eq!(pushback(&Status::unavailable("down")), None);
    }

    #[test]
    fn a_spent_budget_lets_one_lane_probe_and_answers_refill_it() {
        let health = SinkHealth::new(10.0);
        assert!(health.turn().is_none());
        for _ in 0..5 {
            health.failed();
        }
        assert!(!health.reachable());
        let probe = health.turn().expect("spent").expect("the first lane probes");
        assert!(health.turn().expect("spent").is_none(), "one prober at a time");
        drop(probe);
        assert!(health.turn().expect("spent").is_some(), "the turn is handed back");
        for _ in 0..10 {
            health.answered();
        }
        assert!(health.turn().is_none());
        assert!(health.reachable());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_wakes_every_waiting_lane() {
        let health = SinkHealth::new(10.0);
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let health = health.clone();
                tokio::spawn(async move { health.next_answer().await })
            })
            .collect();
        tokio::task::yield_now().await;
        health.answered();
        for lane in waiting {
            tokio::time::timeout(Duration::from_millis(1), lane).await.expect("woken").unwrap();
        }
    }
}
