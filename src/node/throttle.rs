//! Throttling: passes items on no faster than a token bucket allows. One
//! bucket is shared by every lane of the node.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use futures::Stream;
use governor::{Quota, RateLimiter, clock::Clock};

use crate::clock::{TokenBucket, TokioClock};

/// Tokens are counted in thousandths of a request, so that the bucket can
/// hold a fraction of a request on top of the burst.
const CELLS_PER_REQUEST: u32 = 1000;

/// Resolution of tokio's timers: a sleep ends on a whole millisecond, up to
/// this much after the instant asked for.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// Highest rate the bucket can hold: one cell per nanosecond.
pub const MAX_RATE: f64 = 1e9 / CELLS_PER_REQUEST as f64;

/// How fast requests may go out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestRate {
    /// Requests per second over the long run; at most [`MAX_RATE`].
    pub per_second: f64,
    /// Requests that may go out back to back after an idle spell.
    pub burst: NonZeroU32,
}

impl RequestRate {
    /// The token bucket for this rate.
    ///
    /// It holds `burst` requests plus [`TIMER_RESOLUTION`]'s worth of rate.
    /// Without that slack, a sender woken up to 1 ms after its token was due
    /// would lose that time for good, and the achieved rate would fall short
    /// by up to 1 ms per period (2.7% at 47 requests/s). With it, the sends
    /// in any window of W never exceed `per_second × (W + 1 ms) + burst`.
    pub fn quota(&self) -> Quota {
        let cells_per_second = self.per_second * f64::from(CELLS_PER_REQUEST);
        let cell_period = Duration::from_secs_f64(1.0 / cells_per_second).max(Duration::from_nanos(1));
        let slack = (cells_per_second * TIMER_RESOLUTION.as_secs_f64()).ceil() as u32;
        let cells = self.burst.get().saturating_mul(CELLS_PER_REQUEST).saturating_add(slack);
        Quota::with_period(cell_period)
            .expect("period is at least 1 ns")
            .allow_burst(NonZeroU32::new(cells).unwrap_or(NonZeroU32::MIN))
    }
}

/// A request-rate limit that any number of streams can share, and that a
/// sink's pushback can pause.
#[derive(Debug, Clone)]
pub struct Throttle {
    /// No request leaves before this instant (a sink asked for the pause).
    paused_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    /// The shared bucket, or `None` for no limit.
    bucket: Option<Arc<TokenBucket>>,
    /// The bucket's clock, to turn its answers into sleeps.
    clock: TokioClock,
}

impl Throttle {
    /// A throttle at `rate`, or one that never waits for `None`.
    pub fn new(rate: Option<RequestRate>) -> Self {
        let clock = TokioClock::new();
        let bucket = rate.map(|rate| Arc::new(RateLimiter::direct_with_clock(rate.quota(), clock)));
        Self { paused_until: Arc::default(), bucket, clock }
    }

    /// Whether requests are limited at all.
    pub fn is_limited(&self) -> bool {
        self.bucket.is_some()
    }

    /// Holds every request back for `wait` from now, or longer if already
    /// paused longer.
    pub fn pause(&self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        let mut paused = self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *paused = Some(paused.map_or(until, |current| current.max(until)));
    }

    /// Yields the items of `input` in order, each once the bucket allows.
    pub fn apply<S: Stream>(&self, input: S) -> impl Stream<Item = S::Item> + use<S> {
        let throttle = self.clone();
        async_stream::stream! {
            for await item in input {
                throttle.until_ready().await;
                yield item;
            }
        }
    }

    /// Waits, on tokio's clock, until the bucket grants one request, and takes it.
    async fn until_ready(&self) {
        let paused = *self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(until) = paused {
            tokio::time::sleep_until(until).await;
        }
        let Some(bucket) = &self.bucket else { return };
        let cost = NonZeroU32::new(CELLS_PER_REQUEST).expect("not zero");
        while let Ok(Err(not_until)) = bucket.check_n(cost) {
            tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::{StreamExt, stream};
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_items_by_the_rate_after_the_burst() {
        let throttle = Throttle::new(Some(RequestRate { per_second: 2.0, burst: NonZeroU32::new(2).unwrap() }));
        let start = Instant::now();
        let times: Vec<Duration> = throttle.apply(stream::iter(0..5)).map(|_| start.elapsed()).collect().await;
        let ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![0, 0, 499, 999, 1499]);
    }

    #[tokio::test(start_paused = true)]
    async fn streams_sharing_a_throttle_share_its_rate() {
        let throttle = Throttle::new(Some(RequestRate { per_second: 10.0, burst: NonZeroU32::MIN }));
        let start = Instant::now();
        let (a, b) =
            futures::join!(throttle.apply(stream::iter(0..10)).count(), throttle.apply(stream::iter(0..10)).count());
        assert_eq!(a + b, 20);
        // 20 requests at 10/s: the last one goes out after about 1.9 s.
        assert!(start.elapsed() >= Duration::from_millis(1880), "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn no_rate_means_no_wait() {
        let start = Instant::now();
        assert_eq!(Throttle::new(None).apply(stream::iter(0..1000)).count().await, 1000);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
