//! The telemetry sink's server: the gRPC input ([`input`]: admit, decode,
//! check, rate-limit) hands each accepted request to one output
//! ([`output`]: the JSON-lines file, or a database over remote-write) and
//! answers OK once the output says it is stored; [`stats`] counts what
//! happened to every request on the way.

pub mod input;
pub mod output;
pub mod stats;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::Notify};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};
use tracing::{info, warn};

use crate::{
    config::{Compression, SinkConfig},
    error::ServeError,
};
pub use input::service::ReceiverService;
use input::{budget, connections, refusals, route};
pub use stats::{SinkStats, SinkSummary};

/// HTTP/2 flow-control windows, as large as the node's, so a large batch
/// arrives in one flight.
const WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// Largest HTTP/2 frame a client may send (the protocol's default is
/// 16 KiB): a request of a few thousand readings then comes in one DATA
/// frame, read with fewer system calls (docs/performance.md). Memory stays
/// bounded: a frame is at most this, and a message at most
/// MAX_MESSAGE_BYTES, as before.
pub const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// Requests one connection may have open at once. A request waiting for its
/// share of MAX_BYTES_IN_FLIGHT holds its first frame (at most
/// MAX_FRAME_BYTES), so this bounds what a connection holds while it
/// waits; a node's further requests wait at the node.
pub const MAX_STREAMS: u32 = 128;

/// A connection that sends nothing for this long is sent an HTTP/2 PING;
/// one that does not answer it within [`KEEPALIVE_TIMEOUT`] is closed, and
/// what it held (a frame or a message sent in part) let go. Nodes answer
/// PINGs on their own; a peer that stalled, or vanished without a FIN,
/// does not.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Longest the sink waits, once told to stop, for its connections to
/// finish their requests and close; those still open then are closed. A
/// request cut off that way was not acknowledged, so its node sends it
/// again. Below Kubernetes' default grace period of 30 s, so that a peer
/// that sends nothing or stalls mid-request (closed only after 60 s) cannot
/// get the sink killed before its output is synced.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(20);

/// Longest a database is then given to take what is still queued for it:
/// the requests of nodes that gave up waiting (their nodes send them again),
/// which a slow database could otherwise take a request at a time, each up
/// to REMOTE_WRITE_TIMEOUT. With [`DRAIN_LIMIT`], within 30 s.
pub const DATABASE_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Serves `listener` until `shutdown` resolves, then finishes the requests
/// under way and writes out everything it acknowledged before returning.
pub async fn serve(
    config: &SinkConfig,
    listener: TcpListener,
    stats: Arc<SinkStats>,
    shutdown: impl Future<Output = ()>,
) -> Result<SinkSummary, ServeError> {
    serve_with(config, listener, stats, shutdown, std::future::pending(), Output::File, Arc::default()).await
}

/// What the sink does with accepted readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Store them in the output the configuration names (OUTPUT): the
    /// file, or a database.
    File,
    /// Check and render them, then let them go: for measuring the sink
    /// without its disk (`telemetry-node bench --writer off`).
    Discard,
}

/// [`serve`], with the choice of what happens to accepted readings, a
/// notification on which the output file is reopened at its path (the
/// binary gives SIGHUP, for log rotation), and `hurry`, which ends the
/// waiting of a shutdown under way (the connections' [`DRAIN_LIMIT`], the
/// database's [`DATABASE_DRAIN_LIMIT`]) at once: the binary gives a second
/// stop signal. The file output is synced all the same.
pub async fn serve_with(
    config: &SinkConfig,
    listener: TcpListener,
    stats: Arc<SinkStats>,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()> + Send + 'static,
    output: Output,
    reopen: Arc<Notify>,
) -> Result<SinkSummary, ServeError> {
    let hurried = CancellationToken::new();
    let _hurrying = {
        let hurried = hurried.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            hurry.await;
            hurried.cancel();
        }))
    };
    let output = output::open(config, output == Output::Discard, &stats, reopen).await?;
    let refusals = Arc::new(refusals::Refusals::new(Arc::clone(&stats)));
    let receiver = ReceiverService::new(config, Arc::clone(&output), Arc::clone(&stats), Arc::clone(&refusals));
    let accept_gzip = config.compression == Compression::Gzip;
    let budget = budget::Budget::new(config.max_bytes_in_flight, config.max_message_bytes);
    let limits = (config.max_message_bytes, config.max_items);
    let service = route::SensorRoute::new(receiver, accept_gzip, limits, budget, refusals);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<route::SensorRoute>().await;
    let tls = config.tls().map_err(|error| ServeError::Tls(error.to_string()))?;
    let mut server = Server::builder();
    if let Some(tls) = tls {
        let mut settings = ServerTlsConfig::new().identity(Identity::from_pem(tls.cert, tls.key));
        if let Some(ca) = tls.client_ca {
            settings = settings.client_ca_root(Certificate::from_pem(ca));
        }
        server = server.tls_config(settings)?;
    }
    info!(
        message = "Sink listening.",
        address = %listener.local_addr().map_err(ServeError::Listen)?,
        output = %output.describe(),
        tls = config.tls_cert.is_some(),
    );
    stats.set_serving(true);
    let stopping = CancellationToken::new();
    let shutdown = async {
        shutdown.await;
        stopping.cancel();
        stats.set_serving(false);
        health.set_not_serving::<route::SensorRoute>().await;
    };
    let max_connections = connections::limit(config.max_connections);
    let stats_of_connections = Arc::clone(&stats);
    let serving = server
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .max_concurrent_streams(Some(MAX_STREAMS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(
            connections::limited(incoming(listener), max_connections, stats_of_connections),
            shutdown,
        );
    // Waits `limit`, or less if a second stop signal comes.
    let at_most = |limit| {
        let sleep = tokio::time::sleep(limit);
        async {
            tokio::select! {
                () = sleep => {}
                () = hurried.cancelled() => {}
            }
        }
    };
    let drained = async {
        stopping.cancelled().await;
        at_most(DRAIN_LIMIT).await;
    };
    let served = tokio::select! {
        served = serving => served,
        () = drained => {
            // The connections still open end with the process.
            warn!(
                message = "Stopped waiting for connections still open at the drain limit (or a second stop signal); their nodes send again what was not acknowledged.",
                limit_s = DRAIN_LIMIT.as_secs(),
            );
            Ok(())
        }
    };

    // Every request has been answered, or the drain limit is over:
    // whatever was acknowledged is handed to the output, which stores it
    // before it returns.
    output.close(hurried.clone()).await?;
    served?;
    Ok(stats.snapshot())
}

/// The connections `listener` accepts, with TCP_NODELAY set on each:
/// `Server::tcp_nodelay` does not reach an incoming stream given to the
/// server, and without it small answers wait on Nagle's algorithm.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod documented {
    use super::*;

    #[test]
    fn the_frame_and_keepalive_limits_are_the_documented_ones() {
        // The documented figures (docs/delivery.md): frames of up to 256 KiB, a PING after 30 s
        // of silence, closed without an answer in 20 s.
        assert_eq!(MAX_FRAME_BYTES, 256 * 1024);
        assert_eq!((KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT), (Duration::from_secs(30), Duration::from_secs(20)));
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_on_nagle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let connection = accepted.next().await.unwrap().unwrap();
        assert!(connection.nodelay().unwrap());
    }
}
