//! The remote-write output: gathers accepted requests' series into
//! Prometheus remote-write requests (snappy-compressed protobuf over HTTP)
//! and tells each request's sender what the database answered. A request
//! is acknowledged only once the database answered 2xx for all its
//! samples. While the database is down or busy, requests are pushed back to
//! the nodes at once, so the sink holds nothing: the nodes' retries and
//! spools hold the data.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{
    Request, StatusCode, Uri,
    header::{self, HeaderValue},
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use prost::bytes::Bytes;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::{https::Connector, stats::SinkStats, writer::Chunk};
use crate::{config::SinkConfig, error::OutputError, logging::Every};

/// Shortest and longest pause asked of the nodes while the database fails.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(10);

/// Longest `Retry-After` honoured.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Most bytes of a database's error answer kept for logs and statuses.
const ANSWER_BYTES: usize = 1024;

/// Most requests taken off the queue to wait for a slot or for their
/// sender's write under way.
const MOST_WAITING: usize = 64;

/// Most of those from one sender: more are pushed back at once, so that
/// one node with many requests queued cannot hold up every other node.
const MOST_WAITING_PER_SENDER: usize = 16;

/// Sends what the sink accepts to a database.
#[derive(Debug)]
pub(crate) struct RemoteWriter {
    /// Pooled HTTP/1.1 connections to the database.
    client: Client<Connector, Full<Bytes>>,
    /// REMOTE_WRITE_URL.
    url: Uri,
    /// `Authorization` header, from a bearer token or basic credentials.
    authorization: Option<HeaderValue>,
    /// REMOTE_WRITE_TIMEOUT.
    timeout: Duration,
    /// REMOTE_WRITE_MAX_SAMPLES (counted as readings).
    max_samples: usize,
    /// One permit per request in flight (REMOTE_WRITE_CONCURRENCY).
    slots: Arc<Semaphore>,
    /// REMOTE_WRITE_CONCURRENCY.
    concurrency: u32,
    /// Senders with a write under way.
    busy: Mutex<HashSet<u64>>,
    /// Told when a write ends (its slot and senders free again).
    finished: Notify,
    /// Failures in a row, and no request before this instant.
    pause: Mutex<(u32, Option<Instant>)>,
    /// Counters.
    stats: Arc<SinkStats>,
    /// Failures are logged at most once a second.
    failures: Mutex<Every>,
    /// And so are refusals.
    refused: Mutex<Every>,
}

impl RemoteWriter {
    /// The writer `config` describes; `None` when REMOTE_WRITE_URL is not
    /// a usable URL (the configuration's check refuses that first).
    pub(crate) fn new(config: &SinkConfig, stats: Arc<SinkStats>) -> Option<Self> {
        let url: Uri = config.remote_write_url.as_deref()?.parse().ok()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.remote_write_timeout.into()));
        let roots = config.remote_write_roots().ok()?;
        let identity = config.remote_write_identity().ok()?;
        let identity = identity.as_ref().map(|(chain, key)| (chain.as_str(), key.as_str()));
        let connector = Connector::new(connector, roots.as_deref(), identity).ok()?;
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let concurrency = u32::try_from(config.remote_write_concurrency).ok()?;
        Some(Self {
            client,
            url,
            authorization: authorization(config),
            timeout: config.remote_write_timeout.into(),
            max_samples: config.remote_write_max_samples,
            slots: Arc::new(Semaphore::new(concurrency as usize)),
            concurrency,
            busy: Mutex::default(),
            finished: Notify::new(),
            pause: Mutex::new((0, None)),
            stats,
            failures: Mutex::new(Every::second()),
            refused: Mutex::new(Every::second()),
        })
    }

    /// Sends what arrives on `queue` until `stop` is cancelled, then what is
    /// still queued, and waits for every request under way.
    ///
    /// Requests wait in arrival order until a slot is free and no write of
    /// their sender is under way; then as many as fit in
    /// REMOTE_WRITE_MAX_SAMPLES, of distinct senders, go out as one write.
    pub(crate) async fn run(self, mut queue: mpsc::Receiver<Chunk>, stop: CancellationToken) {
        let writer = Arc::new(self);
        let mut waiting: VecDeque<Chunk> = VecDeque::new();
        let (mut open, mut stopping) = (true, false);
        loop {
            // Take what is queued, so that it can go out together.
            while open && waiting.len() < MOST_WAITING {
                match queue.try_recv() {
                    Ok(chunk) => admit(&mut waiting, chunk),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            writer.start_writes(&mut waiting);
            if !open && waiting.is_empty() {
                break;
            }
            let room = waiting.len() < MOST_WAITING;
            tokio::select! {
                chunk = queue.recv(), if open && room => match chunk {
                    Some(chunk) => admit(&mut waiting, chunk),
                    None => open = false,
                },
                () = writer.finished.notified() => {}
                () = stop.cancelled(), if !stopping => {
                    // What is queued is still sent; nothing more comes.
                    stopping = true;
                    queue.close();
                }
            }
        }
        let _ = writer.slots.acquire_many(writer.concurrency).await;
    }

    /// Starts a write while a slot is free and a waiting request's sender
    /// has none under way: that request, and after it the waiting requests
    /// of other senders up to REMOTE_WRITE_MAX_SAMPLES. A sender's requests
    /// go out in the order they came.
    fn start_writes(self: &Arc<Self>, waiting: &mut VecDeque<Chunk>) {
        while !waiting.is_empty() {
            let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else { return };
            let mut chunks = Vec::new();
            {
                let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
                // Senders passed over: their later requests wait too.
                let mut passed = Vec::new();
                let (mut at, mut samples) = (0, 0);
                while at < waiting.len() && samples < self.max_samples {
                    let sender = waiting[at].sender;
                    if busy.contains(&sender) || passed.contains(&sender) {
                        passed.push(sender);
                        at += 1;
                        continue;
                    }
                    if let Some(chunk) = waiting.remove(at) {
                        busy.insert(sender);
                        samples += chunk.readings;
                        chunks.push(chunk);
                    }
                }
            }
            if chunks.is_empty() {
                return;
            }
            let senders = chunks.iter().map(|chunk| chunk.sender).collect();
            let release = Release { writer: Arc::clone(self), senders, slot: Some(slot) };
            tokio::spawn(Arc::clone(self).deliver(chunks, release));
        }
    }

    /// Sends `chunks` as one request and answers each. If the database
    /// refuses a request of several, each is sent on its own, so that one
    /// node's bad sample does not refuse the others'.
    async fn deliver(self: Arc<Self>, chunks: Vec<Chunk>, _release: Release) {
        if let Some(wait) = self.paused() {
            let busy = OutputError::Busy { retry_after: wait, message: "the database is not answering".into() };
            self.stats.database_pushed_back("error", chunks.len());
            return answer(chunks, &Err(busy));
        }
        let outcome = self.post(&chunks).await;
        if matches!(outcome, Err(OutputError::Refused(_))) && chunks.len() > 1 {
            for chunk in chunks {
                let outcome = self.post(std::slice::from_ref(&chunk)).await;
                answer(vec![chunk], &outcome);
            }
            return;
        }
        answer(chunks, &outcome);
    }

    /// How long the nodes must still wait, while the database is failing.
    fn paused(&self) -> Option<Duration> {
        let pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
        pause.1.and_then(|until| until.checked_duration_since(Instant::now())).filter(|wait| !wait.is_zero())
    }

    /// POSTs the series of `chunks` as one remote-write request.
    async fn post(&self, chunks: &[Chunk]) -> Result<(), OutputError> {
        let readings: usize = chunks.iter().map(|chunk| chunk.readings).sum();
        let mut body = Vec::with_capacity(chunks.iter().map(|chunk| chunk.lines.len()).sum());
        for chunk in chunks {
            body.extend_from_slice(&chunk.lines);
        }
        let compressed = snap::raw::Encoder::new()
            .compress_vec(&body)
            .map_err(|error| OutputError::Failed(format!("snappy: {error}").into()))?;
        let mut request = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header(header::CONTENT_ENCODING, "snappy")
            .header(header::USER_AGENT, concat!("telemetry-sink/", env!("CARGO_PKG_VERSION")))
            .header("X-Prometheus-Remote-Write-Version", "0.1.0");
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        let request = request
            .body(Full::new(Bytes::from(compressed)))
            .map_err(|error| OutputError::Failed(error.to_string().into()))?;
        self.stats.database_sending();
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let asked = retry_after(response.headers().get(header::RETRY_AFTER));
            let body = response.into_body().collect().await.map(|body| body.to_bytes()).unwrap_or_default();
            Ok::<_, hyper_util::client::legacy::Error>((status, asked, body))
        })
        .await;
        let elapsed = started.elapsed();
        match answer {
            Ok(Ok((status, _, _))) if status.is_success() => {
                self.stats.database_answered("2xx", elapsed);
                self.stats.database_took(readings);
                *self.pause.lock().unwrap_or_else(PoisonError::into_inner) = (0, None);
                debug!(message = "The database took the samples.", readings, requests = chunks.len());
                Ok(())
            }
            Ok(Ok((status, asked, body))) => {
                let class = match status {
                    StatusCode::TOO_MANY_REQUESTS => "429",
                    status if status.is_server_error() => "5xx",
                    _ => "4xx",
                };
                self.stats.database_answered(class, elapsed);
                Err(self.refused_or_busy(status, class, asked, &body, chunks.len()))
            }
            Ok(Err(error)) => {
                self.stats.database_answered("error", elapsed);
                Err(self.busy("error", None, format!("cannot reach the database: {}", chain(&error)), chunks.len()))
            }
            Err(_) => {
                self.stats.database_answered("error", elapsed);
                let message = format!("the database did not answer within REMOTE_WRITE_TIMEOUT ({:?})", self.timeout);
                Err(self.busy("error", None, message, chunks.len()))
            }
        }
    }

    /// What a non-2xx answer (of `class`: `429`, `5xx` or `4xx`) means for
    /// the nodes.
    fn refused_or_busy(
        &self,
        status: StatusCode,
        class: &'static str,
        asked: Option<Duration>,
        body: &[u8],
        requests: usize,
    ) -> OutputError {
        let text = String::from_utf8_lossy(&body[..body.len().min(ANSWER_BYTES)]).trim().to_owned();
        let message = format!("the database answered {status}: {text}");
        if class != "4xx" {
            return self.busy(class, asked, message, requests);
        }
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND) {
            // The sink's own settings are wrong, not the node's data: the
            // nodes keep it and retry until an operator mends the sink.
            self.log_failure(&message);
            return OutputError::Failed(format!("{message} (check REMOTE_WRITE_URL and its credentials)").into());
        }
        // Each refused node request is also logged as a refusal, once a second
        // at most; this line says what the database said, as often.
        let gate = self.refused.lock().unwrap_or_else(PoisonError::into_inner).ready();
        if let Some(suppressed) = gate {
            error!(message = "The database refused samples.", answer = %message, requests, suppressed);
        }
        OutputError::Refused(message.into())
    }

    /// Counts and logs a database that cannot take samples now, and sets
    /// the pause the nodes are asked to keep.
    fn busy(&self, class: &'static str, asked: Option<Duration>, message: String, requests: usize) -> OutputError {
        self.stats.database_pushed_back(class, requests);
        self.log_failure(&message);
        let wait = {
            let mut pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
            pause.0 = pause.0.saturating_add(1);
            let backoff = FIRST_PAUSE.saturating_mul(1 << pause.0.min(10)).min(LONGEST_PAUSE);
            let wait = asked.map_or(backoff, |asked| asked.min(LONGEST_RETRY_AFTER));
            pause.1 = Some(Instant::now() + wait);
            wait
        };
        OutputError::Busy { retry_after: wait, message: message.into() }
    }

    fn log_failure(&self, message: &str) {
        let gate = self.failures.lock().unwrap_or_else(PoisonError::into_inner).ready();
        if let Some(suppressed) = gate {
            warn!(message = "The database cannot take samples now; pushing back on the nodes.", answer = %message, suppressed);
        }
    }
}

/// Puts `chunk` among the `waiting`, or pushes it back at once when its
/// sender has [`MOST_WAITING_PER_SENDER`] waiting already.
/// (The service counts it as throttled.)
fn admit(waiting: &mut VecDeque<Chunk>, chunk: Chunk) {
    if waiting.iter().filter(|other| other.sender == chunk.sender).count() < MOST_WAITING_PER_SENDER {
        return waiting.push_back(chunk);
    }
    let message = format!("{MOST_WAITING_PER_SENDER} requests of this node are already waiting for the database");
    answer(vec![chunk], &Err(OutputError::Busy { retry_after: FIRST_PAUSE, message: message.into() }));
}

/// A write under way: when it ends (however it ends), its senders and its
/// slot are freed, and the writer's loop is told.
struct Release {
    writer: Arc<RemoteWriter>,
    senders: Vec<u64>,
    slot: Option<OwnedSemaphorePermit>,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut busy = self.writer.busy.lock().unwrap_or_else(PoisonError::into_inner);
        for sender in &self.senders {
            busy.remove(sender);
        }
        drop(busy);
        // The slot is free before the loop looks for one.
        drop(self.slot.take());
        self.writer.finished.notify_one();
    }
}

/// `error` and every error under it, as one line: hyper's own message
/// ("client error (Connect)") says little without its causes (a refused
/// connection, an unknown certificate).
fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        line.push_str(": ");
        line.push_str(&error.to_string());
        cause = error.source();
    }
    line
}

/// A `Retry-After` in seconds (the HTTP-date form is not honoured: the
/// backoff applies then).
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let seconds: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

/// Tells each chunk's sender the outcome.
fn answer(chunks: Vec<Chunk>, outcome: &Result<(), OutputError>) {
    for chunk in chunks {
        let _ = chunk.written.send(outcome.clone());
    }
}

/// The `Authorization` header for the database, if any is configured.
fn authorization(config: &SinkConfig) -> Option<HeaderValue> {
    let value = match (&config.remote_write_bearer_token, &config.remote_write_username, &config.remote_write_password)
    {
        (Some(token), _, _) => format!("Bearer {}", token.expose()),
        (None, Some(user), Some(password)) => format!("Basic {}", base64(&format!("{user}:{}", password.expose()))),
        _ => return None,
    };
    let mut value = HeaderValue::from_str(&value).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Standard base64 with padding, for basic authentication.
fn base64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_the_rfc_gives_it() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("user:pass", "dXNlcjpwYXNz"),
        ];
        for (text, encoded) in cases {
            assert_eq!(base64(text), encoded);
        }
    }
}
