//! The connections the sink serves, at most MAX_CONNECTIONS open at once:
//! past it, a new connection waits until one closes. Each connection can
//! make the sink hold memory (a frame sent in part, the first frames of
//! requests waiting for MAX_BYTES_IN_FLIGHT), so their number bounds what
//! peers can make it hold. Kept below the process's open-file limit, it also
//! keeps `accept` from failing for want of descriptors; tonic's accept loop
//! would retry such a failure at once and spin a core, so any accept failure
//! that is not one connection's own is waited out here, with backoff.

use std::{io, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::receiver::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, stats::SinkStats};
use crate::{
    connection::{AcceptFailures, Held, open_files_limit},
    logging::Every,
};

/// A connection whose peer sends nothing for this long is closed, and its
/// place let go: a socket opened and left, or a TLS or HTTP/2 handshake
/// begun and never finished, would otherwise hold it for good. Longer than
/// a PING and its answer take: a live peer (every node) answers the PING
/// the sink sends after [`KEEPALIVE_INTERVAL`] of quiet.
const SILENCE: Duration = Duration::from_secs(60);

const _: () = assert!(SILENCE.as_secs() > KEEPALIVE_INTERVAL.as_secs() + KEEPALIVE_TIMEOUT.as_secs() / 2);

/// Open files kept for everything but connections (the output file, the
/// metrics server's connections, connections to the database, the
/// runtime's own), or half the limit where that is smaller.
const RESERVED_FILES: usize = crate::observe::MOST_CONNECTIONS + 128;

/// `wanted` (MAX_CONNECTIONS), lowered with a warning to what the process's
/// open-file limit leaves after [`RESERVED_FILES`].
pub(crate) fn limit(wanted: usize) -> usize {
    let Some(files) = open_files_limit() else { return wanted };
    let room = files.saturating_sub(RESERVED_FILES.min(files / 2)).max(1);
    if room < wanted {
        warn!(
            message = "MAX_CONNECTIONS lowered to what the open-file limit leaves.",
            max_connections = wanted,
            lowered_to = room,
            open_files_limit = files,
        );
    }
    wanted.min(room)
}

/// The connections `incoming` yields, at most `limit` of them open at once.
/// Accept failures are waited out, never yielded.
pub(crate) fn limited<S, IO>(
    incoming: S,
    limit: usize,
    stats: Arc<SinkStats>,
) -> impl Stream<Item = io::Result<Counted<IO>>>
where
    S: Stream<Item = io::Result<IO>> + Unpin,
{
    let gate = Gate {
        incoming,
        permits: Arc::new(Semaphore::new(limit)),
        limit,
        stats,
        full: Every::new(Duration::from_secs(10)),
        failures: AcceptFailures::new("gRPC"),
    };
    futures::stream::unfold(gate, |mut gate| async move {
        let connection = gate.next().await?;
        Some((Ok(connection), gate))
    })
}

/// The state of [`limited`].
struct Gate<S> {
    /// The accepted connections.
    incoming: S,
    /// One per connection that may be open.
    permits: Arc<Semaphore>,
    /// MAX_CONNECTIONS as applied, for the log.
    limit: usize,
    /// Where connections are counted.
    stats: Arc<SinkStats>,
    /// Log gate of "the limit is reached".
    full: Every,
    /// Accept failures in a row.
    failures: AcceptFailures,
}

impl<S, IO> Gate<S>
where
    S: Stream<Item = io::Result<IO>> + Unpin,
{
    /// The next connection, once there is room for it; `None` when the
    /// listener is gone.
    async fn next(&mut self) -> Option<Counted<IO>> {
        let io = loop {
            match self.incoming.next().await? {
                Ok(io) => break io,
                Err(error) => self.failures.wait_out(&error).await,
            }
        };
        self.failures.succeeded();
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.stats.connection_waited();
                if let Some(suppressed) = self.full.ready() {
                    warn!(
                        message = "MAX_CONNECTIONS connections are open; a new one waits until one closes.",
                        max_connections = self.limit,
                        suppressed,
                    );
                }
                Arc::clone(&self.permits).acquire_owned().await.ok()?
            }
        };
        Some(Held::new(io, Place::new(permit, Arc::clone(&self.stats)), SILENCE))
    }
}

/// An open connection, holding its place under MAX_CONNECTIONS until it is
/// dropped, counted as open meanwhile, and closed after [`SILENCE`].
pub(crate) type Counted<IO> = Held<IO, Place>;

/// A connection's place under MAX_CONNECTIONS, counted as open while held.
#[derive(Debug)]
pub(crate) struct Place {
    /// The place itself.
    _permit: OwnedSemaphorePermit,
    /// Where it is counted.
    stats: Arc<SinkStats>,
}

impl Place {
    /// `permit`, counted as an open connection in `stats`.
    fn new(permit: OwnedSemaphorePermit, stats: Arc<SinkStats>) -> Self {
        stats.connection_opened();
        Self { _permit: permit, stats }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.stats.connection_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::FIRST_PAUSE;

    /// A connection whose accepting failed with `kind`.
    fn failure(kind: io::ErrorKind) -> io::Result<u8> {
        Err(io::Error::from(kind))
    }

    #[tokio::test]
    async fn connections_past_the_limit_wait_until_one_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stats = Arc::new(SinkStats::default());
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let mut connections = Box::pin(limited(incoming, 2, Arc::clone(&stats)));
        let mut peers = Vec::new();
        for _ in 0..3 {
            peers.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        let first = connections.next().await.unwrap().unwrap();
        let _second = connections.next().await.unwrap().unwrap();
        assert_eq!(stats.connections_open(), 2);
        let third = tokio::time::timeout(Duration::from_millis(300), connections.next()).await;
        assert!(third.is_err(), "a third connection was let in past the limit");
        assert_eq!(stats.connections_waited(), 1);
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(30), connections.next()).await;
        assert!(matches!(third, Ok(Some(Ok(_)))), "the third connection got the first one's place");
        assert_eq!(stats.connections_open(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_accept_failure_is_waited_out_with_backoff_not_retried_at_once() {
        use io::ErrorKind::{ConnectionAborted, Other};
        let stats = Arc::new(SinkStats::default());
        let accepted = [failure(Other), failure(Other), failure(ConnectionAborted), failure(Other), Ok(7)];
        let mut connections = Box::pin(limited(futures::stream::iter(accepted), 4, stats));
        let started = tokio::time::Instant::now();
        let connection = connections.next().await.unwrap().unwrap();
        assert_eq!(connection.get_ref(), &7);
        // 5 + 10 + 20 ms after the three failures that are not one
        // connection's own; none after the aborted one.
        assert_eq!(started.elapsed(), Duration::from_millis(35));
    }

    #[tokio::test(start_paused = true)]
    async fn the_pause_after_failures_in_a_row_stops_growing_at_a_second_and_restarts_after_a_success() {
        let stats = Arc::new(SinkStats::default());
        let mut accepted: Vec<io::Result<u8>> = (0..12).map(|_| failure(io::ErrorKind::Other)).collect();
        accepted.extend([Ok(1), failure(io::ErrorKind::Other), Ok(2)]);
        let mut connections = Box::pin(limited(futures::stream::iter(accepted), 4, stats));
        let started = tokio::time::Instant::now();
        let _one = connections.next().await.unwrap().unwrap();
        // 5, 10, 20, …, 640 ms for the first eight, then 1 s for the last four.
        assert_eq!(started.elapsed(), Duration::from_millis(1275 + 4000));
        let started = tokio::time::Instant::now();
        let _two = connections.next().await.unwrap().unwrap();
        assert_eq!(started.elapsed(), FIRST_PAUSE);
    }
}
