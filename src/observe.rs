//! Metrics and health over HTTP: `/metrics` (Prometheus text), `/healthz`
//! (the process is alive) and `/readyz` (it is doing its job).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get};
use hyper::server::conn::http1;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::sync::CancellationToken;

use crate::connection::{AcceptFailures, Held, open_files_limit};

/// Connections served at once. Scrapers and probes use a few; a flood of
/// connections waits instead of taking the open files the process's other
/// listener needs (the sink keeps 384 for everything but its gRPC
/// connections). As many as this can be held by a flood, each for up to
/// [`LIFETIME`]; the more places, the sooner a probe gets one. Fewer where
/// the open-file limit is low: at most a quarter of it ([`places`]).
pub const MOST_CONNECTIONS: usize = 256;

/// The most a request's head (request line and headers) may take; a
/// larger one is answered 431. Bounds what a connection makes the server
/// hold to a few pages: the endpoints take no body and few headers.
const MOST_REQUEST_BYTES: usize = 16 * 1024;

/// A connection that sends nothing for this long is closed: a scraper that
/// keeps its connection between scrapes opens another, while a socket
/// opened and left gives its place back.
const SILENCE: Duration = Duration::from_secs(10);

/// A connection older than this is closed once the server waits to read
/// from it: a peer sending a request a byte at a time, never finishing it,
/// gives its place back too.
const LIFETIME: Duration = Duration::from_secs(30);

/// What the endpoints read.
struct Observed {
    /// Every metric of the process.
    registry: Registry,
    /// Brings derived metrics up to date before a scrape.
    refresh: Box<dyn Fn() + Send + Sync>,
    /// Whether the process is ready.
    ready: Box<dyn Fn() -> bool + Send + Sync>,
}

/// The HTTP endpoint, bound and ready to serve.
#[derive(Debug)]
pub struct ObserveServer {
    /// The bound socket.
    listener: TcpListener,
}

impl ObserveServer {
    /// Binds `address` (METRICS_ADDR).
    pub async fn bind(address: &str) -> std::io::Result<Self> {
        Ok(Self { listener: crate::listen::bind(address).await? })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `registry` until `shutdown` resolves.
    pub async fn serve(
        self,
        registry: Registry,
        refresh: impl Fn() + Send + Sync + 'static,
        ready: impl Fn() -> bool + Send + Sync + 'static,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let observed = Arc::new(Observed { registry, refresh: Box::new(refresh), ready: Box::new(ready) });
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(observed);
        let places = Arc::new(Semaphore::new(places(open_files_limit())));
        // Ends the connections still open when the server stops.
        let stop = CancellationToken::new();
        let _stop_connections = stop.clone().drop_guard();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut failures = AcceptFailures::new("metrics");
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = accept(&self.listener, &places) => accepted,
            };
            let (stream, place) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = failures.wait_out(&error) => continue,
                    }
                }
            };
            failures.succeeded();
            let io = TokioIo::new(Held::new(stream, place, SILENCE).with_lifetime(LIFETIME));
            // HTTP/1.1 only: an HTTP/2 connection could hold many answers
            // unread, with no bound on what they take.
            let connection = http1::Builder::new()
                .max_buf_size(MOST_REQUEST_BYTES)
                .serve_connection(io, TowerToHyperService::new(app.clone()));
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = connection => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    }
}

/// The next connection, once a place is free for it.
async fn accept(
    listener: &TcpListener,
    places: &Arc<Semaphore>,
) -> std::io::Result<(tokio::net::TcpStream, OwnedSemaphorePermit)> {
    // The semaphore is never closed.
    let Ok(place) = Arc::clone(places).acquire_owned().await else { return std::future::pending().await };
    let (stream, _) = listener.accept().await?;
    Ok((stream, place))
}

/// Connections served at once under an open-file limit of `files`:
/// [`MOST_CONNECTIONS`], or a quarter of the limit where that is fewer, so
/// that a flood of connections here leaves the process the files its work
/// needs (the gRPC connection, the spool, a command's pipes).
fn places(files: Option<usize>) -> usize {
    files.map_or(MOST_CONNECTIONS, |files| MOST_CONNECTIONS.min(files / 4)).max(1)
}

/// Starts serving on `address` in the background, until `stop` is cancelled.
pub async fn spawn(
    address: &str,
    registry: Registry,
    refresh: impl Fn() + Send + Sync + 'static,
    ready: impl Fn() -> bool + Send + Sync + 'static,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<SocketAddr> {
    let server = ObserveServer::bind(address).await?;
    let bound = server.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = server.serve(registry, refresh, ready, stop.cancelled_owned()).await {
            tracing::error!(message = "Metrics endpoint failed.", %error);
        }
    });
    tracing::info!(message = "Serving metrics and health.", address = %bound);
    Ok(bound)
}

async fn metrics(State(observed): State<Arc<Observed>>) -> impl IntoResponse {
    (observed.refresh)();
    let mut body = String::new();
    match encode(&mut body, &observed.registry) {
        Ok(()) => {
            let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            (StatusCode::OK, [(header::CONTENT_TYPE, kind)], body)
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], String::new()),
    }
}

async fn readyz(State(observed): State<Arc<Observed>>) -> impl IntoResponse {
    if (observed.ready)() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_low_open_file_limit_leaves_most_files_to_the_rest() {
        assert_eq!(places(None), MOST_CONNECTIONS);
        assert_eq!(places(Some(1 << 20)), MOST_CONNECTIONS);
        assert_eq!(places(Some(1024)), MOST_CONNECTIONS);
        assert_eq!(places(Some(256)), 64);
        assert_eq!(places(Some(2)), 1);
    }
}
