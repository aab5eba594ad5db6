//! Throttling: passes items on no faster than a token bucket allows. One
//! bucket is shared by every lane of the node.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use governor::{Quota, RateLimiter, clock::Clock};

use crate::{
    clock::{TokenBucket, TokioClock},
    config::{MAX_REQUEST_RATE, RequestRate},
};

/// Tokens are counted in thousandths of a request, so that the bucket can
/// hold a fraction of a request on top of the burst.
const CELLS_PER_REQUEST: u32 = 1000;

/// Resolution of tokio's timers: a sleep ends on a whole millisecond, up to
/// this much after the instant asked for.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

// The configuration's ceiling on the rate is what the bucket can hold:
// one cell a nanosecond.
const _: () = assert!(MAX_REQUEST_RATE == 1e9 / CELLS_PER_REQUEST as f64);

/// The token bucket for `rate`.
///
/// It holds `burst` requests plus [`TIMER_RESOLUTION`]'s worth of rate.
/// Without that slack, a sender woken up to 1 ms after its token was due
/// would lose that time for good, and the achieved rate would fall short
/// by up to 1 ms per period. With it, the sends in any window of W never
/// exceed `per_second × (W + 1 ms) + burst`.
fn quota(rate: &RequestRate) -> Quota {
    let cells_per_second = rate.per_second * f64::from(CELLS_PER_REQUEST);
    let cell_period = Duration::from_secs_f64(1.0 / cells_per_second).max(Duration::from_nanos(1));
    let slack = (cells_per_second * TIMER_RESOLUTION.as_secs_f64()).ceil() as u32;
    let cells = rate.burst.get().saturating_mul(CELLS_PER_REQUEST).saturating_add(slack);
    Quota::with_period(cell_period)
        .expect("period is at least 1 ns")
        .allow_burst(NonZeroU32::new(cells).unwrap_or(NonZeroU32::MIN))
}

/// A request-rate limit that any number of streams can share, and that a
/// sink's pushback can pause.
#[derive(Debug, Clone)]
pub(crate) struct Throttle {
    /// No request leaves before this instant (a sink asked for the pause).
    paused_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    /// The shared bucket, or `None` for no limit.
    bucket: Option<Arc<TokenBucket>>,
    /// The bucket's clock, to turn its answers into sleeps.
    clock: TokioClock,
    /// The line of callers waiting for the bucket. tokio's mutex serves
    /// in arrival order, so lanes get tokens in turn: without it, whichever
    /// lane's timer fires first takes each token, and a lane can wait for
    /// ever while the others send.
    line: Arc<tokio::sync::Mutex<()>>,
}

impl Throttle {
    /// A throttle at `rate`, or one that never waits for `None`.
    pub(crate) fn new(rate: Option<RequestRate>) -> Self {
        let clock = TokioClock::new();
        let bucket = rate.map(|rate| Arc::new(RateLimiter::direct_with_clock(quota(&rate), clock)));
        Self { paused_until: Arc::default(), bucket, clock, line: Arc::default() }
    }

    /// Holds every request back for `wait` from now, or longer if already
    /// paused longer.
    pub(crate) fn pause(&self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        let mut paused = self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *paused = Some(paused.map_or(until, |current| current.max(until)));
    }

    /// Waits, on tokio's clock, until no pause is in force and the bucket
    /// grants one request, and takes it. Every attempt at a request, first
    /// or retry, calls this once.
    pub(crate) async fn acquire(&self) {
        // A pause may be lengthened while it is waited out.
        loop {
            let paused = *self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match paused {
                Some(until) if until > tokio::time::Instant::now() => tokio::time::sleep_until(until).await,
                _ => break,
            }
        }
        let Some(bucket) = &self.bucket else { return };
        let _turn = self.line.lock().await;
        let cost = NonZeroU32::new(CELLS_PER_REQUEST).expect("not zero");
        while let Ok(Err(not_until)) = bucket.check_n(cost) {
            tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lanes_waiting_for_tokens_get_them_in_turn() {
        let throttle = Throttle::new(Some(RequestRate { per_second: 1.0, burst: NonZeroU32::MIN }));
        let granted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let lanes: Vec<_> = (0..4)
            .map(|lane| {
                let (throttle, granted) = (throttle.clone(), Arc::clone(&granted));
                tokio::spawn(async move {
                    for _ in 0..10 {
                        throttle.acquire().await;
                        granted.lock().unwrap().push(lane);
                        // Each lane comes back soon, as a lane with batches
                        // queued does, some a little later than others.
                        tokio::time::sleep(Duration::from_micros(300 * lane)).await;
                    }
                })
            })
            .collect();
        for lane in lanes {
            lane.await.unwrap();
        }
        let granted = granted.lock().unwrap();
        // While every lane still wants tokens, none waits more than one round.
        for window in granted[..32].windows(5) {
            let mut lanes = window.to_vec();
            lanes.sort_unstable();
            lanes.dedup();
            assert_eq!(lanes, [0, 1, 2, 3], "every lane in any five grants: {granted:?}");
        }
    }

    /// When each of `n` acquisitions of `throttle` was granted, in ms.
    async fn grants(throttle: &Throttle, n: usize) -> Vec<u128> {
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..n {
            throttle.acquire().await;
            times.push(start.elapsed().as_millis());
        }
        times
    }

    #[tokio::test(start_paused = true)]
    async fn spaces_requests_by_the_rate_after_the_burst() {
        let throttle = Throttle::new(Some(RequestRate { per_second: 2.0, burst: NonZeroU32::new(2).unwrap() }));
        assert_eq!(grants(&throttle, 5).await, vec![0, 0, 499, 999, 1499]);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_sharing_a_throttle_share_its_rate() {
        let throttle = Throttle::new(Some(RequestRate { per_second: 10.0, burst: NonZeroU32::MIN }));
        let start = Instant::now();
        let (a, b) = futures::join!(grants(&throttle, 10), grants(&throttle, 10));
        assert_eq!(a.len() + b.len(), 20);
        // 20 requests at 10/s: the last one goes out after about 1.9 s.
        assert!(start.elapsed() >= Duration::from_millis(1880), "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn no_rate_means_no_wait_and_a_pause_holds_everyone() {
        let throttle = Throttle::new(None);
        assert_eq!(grants(&throttle, 1000).await.last(), Some(&0));
        throttle.pause(Duration::from_millis(300));
        assert_eq!(grants(&throttle, 2).await, vec![300, 300]);
    }
}
