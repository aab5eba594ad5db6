//! Throttling: passes items on no faster than a token bucket allows.

use futures::Stream;
use governor::{Quota, RateLimiter, clock::Clock};

use crate::clock::{TokenBucket, TokioClock};

/// Yields the items of `input` in order, each once a token is free, or at
/// once when `quota` is `None`.
pub fn throttle<S: Stream>(input: S, quota: Option<Quota>) -> impl Stream<Item = S::Item> {
    let clock = TokioClock::new();
    let bucket = quota.map(|quota| RateLimiter::direct_with_clock(quota, clock));
    async_stream::stream! {
        for await item in input {
            if let Some(bucket) = &bucket {
                until_ready(bucket, &clock).await;
            }
            yield item;
        }
    }
}

/// Waits, on tokio's clock, until `bucket` grants a token, and takes it.
async fn until_ready(bucket: &TokenBucket, clock: &TokioClock) {
    while let Err(not_until) = bucket.check() {
        tokio::time::sleep(not_until.wait_time_from(clock.now())).await;
    }
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU32, time::Duration};

    use futures::{StreamExt, stream};
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_items_by_the_rate_after_the_burst() {
        let quota = Quota::with_period(Duration::from_millis(500)).unwrap().allow_burst(NonZeroU32::new(2).unwrap());
        let start = Instant::now();
        let times: Vec<Duration> = throttle(stream::iter(0..5), Some(quota)).map(|_| start.elapsed()).collect().await;
        let ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![0, 0, 500, 1000, 1500]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_quota_means_no_wait() {
        let start = Instant::now();
        assert_eq!(throttle(stream::iter(0..1000), None).count().await, 1000);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
