//! Batching: readings in, batches of at most `max_size` out, each sent no
//! later than `timeout` after its first reading arrived.

use std::time::Duration;

use futures::Stream;
use tokio_stream::StreamExt;

use crate::reading::{Batch, Reading};

/// Groups `readings` by size and time. When `readings` ends, the partial
/// batch it leaves is emitted at once: this is how shutdown flushes.
pub fn batches(readings: impl Stream<Item = Reading>, max_size: usize, timeout: Duration) -> impl Stream<Item = Batch> {
    readings.chunks_timeout(max_size, timeout)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use futures::stream;
    use tokio::time::Instant;

    use super::*;

    fn reading(sequence: u64) -> Reading {
        Reading { sensor: "s", sequence, value: 0, created_at: SystemTime::UNIX_EPOCH }
    }

    #[tokio::test(start_paused = true)]
    async fn full_batches_leave_at_once_and_the_rest_on_end() {
        let sizes: Vec<usize> =
            batches(stream::iter((0..25).map(reading)), 10, Duration::from_secs(60)).map(|b| b.len()).collect().await;
        assert_eq!(sizes, vec![10, 10, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_leaves_after_the_timeout() {
        let slow = stream::iter((0..3).map(reading)).chain(stream::pending());
        let start = Instant::now();
        let mut out = Box::pin(batches(slow, 10, Duration::from_millis(500)));
        let first = out.next().await.expect("a batch");
        assert_eq!(first.len(), 3);
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }
}
