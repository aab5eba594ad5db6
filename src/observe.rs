//! Metrics and health over HTTP: `/metrics` (Prometheus text), `/healthz`
//! (the process is alive) and `/readyz` (it is doing its job).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::connection::Held;

/// Connections served at once. Scrapers and probes use a few; a flood of
/// connections waits instead of taking the open files the process's other
/// listener needs (the sink keeps 384 for everything but its gRPC
/// connections). As many as this can be held by a flood, each for up to
/// [`LIFETIME`]; the more places, the sooner a probe gets one.
pub const MOST_CONNECTIONS: usize = 256;

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
        let listener = Limited { listener: self.listener, places: Arc::new(Semaphore::new(MOST_CONNECTIONS)) };
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    }
}

/// The listener, with at most [`MOST_CONNECTIONS`] connections open, each
/// closed after [`SILENCE`].
struct Limited {
    /// The bound socket.
    listener: TcpListener,
    /// One per connection that may be open.
    places: Arc<Semaphore>,
}

impl axum::serve::Listener for Limited {
    type Io = Held<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed.
        let Ok(place) = Arc::clone(&self.places).acquire_owned().await else { return std::future::pending().await };
        // Failures (out of descriptors) are waited out by axum.
        let (io, address) = axum::serve::Listener::accept(&mut self.listener).await;
        (Held::new(io, place, SILENCE).with_lifetime(LIFETIME), address)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
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
