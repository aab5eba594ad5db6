//! A `governor` clock that follows tokio's clock.
//!
//! governor's default clock reads the system's monotonic time, which tokio's
//! paused test time does not move. Rate limiting on this clock is therefore
//! as deterministic in tests as every other wait in the crate.

use std::time::Duration;

use governor::clock::Clock;

/// Time elapsed since the clock was made, on tokio's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokioClock {
    /// The zero of this clock.
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock that starts now.
    pub(crate) fn new() -> Self {
        Self { start: tokio::time::Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A token bucket without keys, on tokio's clock.
pub(crate) type TokenBucket = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    TokioClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;
