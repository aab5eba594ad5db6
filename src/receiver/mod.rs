//! The telemetry sink's server: gRPC in → validate → rate limit → JSON lines out.
//!
//! [`service`] answers each request; [`validate`] turns a request into
//! output lines or refuses it; [`writer`] owns the output file.

mod budget;
mod codec;
mod connections;
pub(crate) mod dedup;
mod output_file;
mod refusals;
mod remote_write;
mod route;
pub(crate) mod service;
pub mod stats;
pub(crate) mod transcode;
pub mod validate;
pub mod writer;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    net::TcpListener,
    sync::{Notify, mpsc},
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};
use tracing::{info, warn};

use crate::{
    config::{Compression, OutputKind, SinkConfig},
    error::ServeError,
};
pub use service::ReceiverService;
pub use stats::{SinkStats, SinkSummary};

/// Chunks of output that may wait for the writer before requests are
/// slowed down: bounds the sink's memory.
const WRITER_QUEUE: usize = 64;

/// Node lanes whose last batch is remembered for de-duplication.
const DEDUP_LANES: usize = 65_536;

/// Bytes at the end of the output read back on start to recover the last
/// batch of each lane.
const RECOVERY_WINDOW: u64 = 16 * 1024 * 1024;

/// HTTP/2 flow-control windows, as large as the node's, so a large batch
/// arrives in one flight.
const WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// Largest HTTP/2 frame a client may send (the protocol's default is
/// 16 KiB): a request of a few thousand readings then comes in one DATA
/// frame, read with fewer system calls. Measured with
/// `benches/remote_write.sh`: the load client's CPU per sample fell by
/// about a sixth, and the sink's throughput rose by about 7%. Memory stays
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
    /// Append them to `FILE_PATH/readings.jsonl`.
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
    let path = config.output_file();
    let stop_writer = CancellationToken::new();
    let dedup = Arc::new(dedup::Deduplicator::new(DEDUP_LANES));
    let remote_write = output == Output::File && config.output == OutputKind::RemoteWrite;
    let mut database = None;
    let (chunks, writing) = if remote_write {
        let writer = remote_write::RemoteWriter::new(config, Arc::clone(&stats)).ok_or_else(|| ServeError::Output {
            path: "REMOTE_WRITE_URL".into(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        database = Some(writer.database().clone());
        let (chunks, queue) = mpsc::channel(WRITER_QUEUE);
        let stop = stop_writer.clone();
        (
            Some(chunks),
            Some(tokio::spawn(async move {
                writer.run(queue, stop).await;
                Ok(())
            })),
        )
    } else if output == Output::File {
        tokio::fs::create_dir_all(&config.file_path)
            .await
            .map_err(|source| ServeError::Output { path: config.file_path.clone(), source })?;
        let recovered = dedup::recover(&path, RECOVERY_WINDOW)
            .map_err(|source| ServeError::Output { path: path.clone(), source })?;
        if recovered.torn > 0 {
            warn!(message = "Cut off an unfinished write at the end of the output.", bytes = recovered.torn);
        }
        // What the last clean stop saved, then what the end of the output
        // shows (written later, so it wins).
        let lanes = config.lanes_file();
        let saved = dedup::load(&lanes).map_err(|source| ServeError::Output { path: lanes, source })?;
        for (node, lane, batch) in saved.iter().chain(&recovered.lanes) {
            dedup.seed(node, *lane, *batch);
        }
        let writer = writer::JsonLinesWriter::open(&path, config.buffer_size, Arc::clone(&stats)).await?;
        let (chunks, queue) = mpsc::channel(WRITER_QUEUE);
        (Some(chunks), Some(tokio::spawn(writer.run(queue, config.flush_interval.into(), reopen, stop_writer.clone()))))
    } else {
        (None, None)
    };

    // Kept to be saved at a clean stop, where the file is the output.
    let memory = (output == Output::File && !remote_write).then(|| Arc::clone(&dedup));
    let refusals = Arc::new(refusals::Refusals::new(Arc::clone(&stats)));
    // Remote-write keeps no memory between requests: a retried batch is the
    // same samples again, which the database takes as one.
    // Its time window follows the database's clock, read at once so that
    // the first request need not wait for it.
    let (dedup, render) = match database {
        Some(database) => {
            let rules = validate::SeriesRules::new(&config.remote_write).following(database);
            let early = rules.clone();
            tokio::spawn(async move { early.read_clock().await });
            (None, service::Render::Series(rules))
        }
        None => (Some(dedup), service::Render::Lines),
    };
    let receiver = ReceiverService::new(config, chunks, dedup, render, Arc::clone(&stats), Arc::clone(&refusals));
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
        output = %if remote_write { config.remote_write.shown_url() } else { path.display().to_string() },
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
    // whatever was acknowledged is queued for the writer, which drains the
    // queue before it returns.
    stop_writer.cancel();
    if let Some(mut writing) = writing {
        let written = if remote_write {
            let limit = at_most(DATABASE_DRAIN_LIMIT);
            match tokio::select! { written = &mut writing => Some(written), () = limit => None } {
                Some(written) => written,
                None => {
                    // What is still queued or under way is not acknowledged.
                    writing.abort();
                    warn!(
                        message = "Stopped waiting for the database at the drain limit (or a second stop signal); the nodes send again what it did not take.",
                        limit_s = DATABASE_DRAIN_LIMIT.as_secs(),
                    );
                    Ok(Ok(()))
                }
            }
        } else {
            writing.await
        };
        let written = written.map_err(|error| ServeError::Writer(error.to_string()))?;
        written.map_err(|source| ServeError::Output { path, source })?;
    }
    if let Some(memory) = memory {
        let lanes = config.lanes_file();
        if let Err(error) = dedup::save(&lanes, &memory.snapshot()) {
            warn!(
                message = "Could not save the lanes' last batches; a retry of a batch written long before this stop may be written again after the restart.",
                path = %lanes.display(),
                %error,
            );
        }
    }
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
