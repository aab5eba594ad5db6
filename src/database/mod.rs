//! One remote-write request to a database and what its answer means: the
//! client the sink's remote-write output and a node writing to the
//! database itself (`DESTINATION=remote-write`) share.

pub(crate) mod https;
pub(crate) mod names;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
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
use tokio::time::Instant;

use crate::config::RemoteWriteConfig;
use https::Connector;

/// Most bytes of a database's error answer kept for logs and statuses.
const ANSWER_BYTES: usize = 1024;

/// A database reached over Prometheus remote-write 1.0.
#[derive(Debug, Clone)]
pub(crate) struct Database {
    /// Pooled HTTP/1.1 connections to the database.
    client: Client<Connector, Full<Bytes>>,
    /// REMOTE_WRITE_URL.
    url: Uri,
    /// `Authorization` header, from a bearer token or basic credentials.
    authorization: Option<HeaderValue>,
    /// REMOTE_WRITE_TIMEOUT.
    timeout: Duration,
    /// Sent as `User-Agent`.
    agent: &'static str,
    /// The database's clock, as its answers' `Date` headers tell it.
    clock: Arc<Clock>,
    /// Whether the database has ever taken a request (the empty one that
    /// reads its clock included): until it has, a 400 to every request says
    /// the URL is another API's, not that the data is bad.
    took_one: Arc<AtomicBool>,
}

/// The database's clock less this one's, in milliseconds, once an answer
/// told it (to the second: `Date` has no finer unit).
#[derive(Debug, Default)]
struct Clock {
    known: AtomicBool,
    offset_ms: AtomicI64,
    /// Held by the one reading the clock with a GET, so that requests
    /// arriving together before it is known cause one probe, not one each.
    probing: tokio::sync::Mutex<()>,
    /// When the last probe failed, and why: those that waited for it fail
    /// with it rather than each trying again in turn.
    failed: std::sync::Mutex<Option<(Instant, String)>>,
}

/// What the database made of one request.
#[derive(Debug)]
pub(crate) enum Answer {
    /// 2xx: it took every sample.
    Took,
    /// 429, 5xx, no connection, or no answer in time: it cannot take them
    /// now (`class`: `429`, `5xx` or `error`), and asked for `retry_after`
    /// when it said so.
    Busy {
        /// For metrics.
        class: &'static str,
        /// Its `Retry-After`, in seconds.
        retry_after: Option<Duration>,
        /// What happened, for logs.
        message: String,
    },
    /// 401, 403, 404, or any 4xx but 429 before the database has taken a
    /// request: this side's settings are wrong (URL, credentials); the data
    /// is fine and should be kept.
    Misconfigured(String),
    /// Any other 4xx, from a database that has taken a request before (the
    /// empty one that reads its clock, at least): it refused the samples (an
    /// out-of-order sample, a bad label), with its message.
    Refused(String),
}

impl Database {
    /// The database `config` names; `None` when REMOTE_WRITE_URL or the TLS
    /// files are not usable (the configuration's check refuses that first).
    pub(crate) fn new(config: &RemoteWriteConfig, agent: &'static str) -> Option<Self> {
        let url: Uri = config.url.as_deref()?.trim().parse().ok()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout.into()));
        let roots = config.roots().ok()?;
        let identity = config.identity().ok()?;
        let identity = identity.as_ref().map(|(chain, key)| (chain.as_str(), key.as_str()));
        let connector = Connector::new(connector, roots.as_deref(), identity).ok()?;
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let clock = Arc::default();
        let took_one = Arc::default();
        let authorization = authorization(config);
        Some(Self { client, url, authorization, timeout: config.timeout.into(), agent, clock, took_one })
    }

    /// POSTs `body`, the encoded `timeseries` of a `WriteRequest`,
    /// snappy-compressed, and says what the answer means and how long it
    /// took.
    pub(crate) async fn post(&self, body: &[u8]) -> (Answer, Duration) {
        let compressed = match snap::raw::Encoder::new().compress_vec(body) {
            Ok(compressed) => compressed,
            Err(error) => return (Answer::Refused(format!("snappy: {error}")), Duration::ZERO),
        };
        let mut request = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header(header::CONTENT_ENCODING, "snappy")
            .header(header::USER_AGENT, self.agent)
            .header("X-Prometheus-Remote-Write-Version", "0.1.0");
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        let request = match request.body(Full::new(Bytes::from(compressed))) {
            Ok(request) => request,
            Err(error) => return (Answer::Misconfigured(error.to_string()), Duration::ZERO),
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, async {
            let response = self.client.request(request).await?;
            self.note_clock(response.headers().get(header::DATE));
            let status = response.status();
            let asked = retry_after(response.headers().get(header::RETRY_AFTER));
            let body = response.into_body().collect().await.map(|body| body.to_bytes()).unwrap_or_default();
            Ok::<_, hyper_util::client::legacy::Error>((status, asked, body))
        })
        .await;
        let elapsed = started.elapsed();
        let answer = match answer {
            Ok(Ok((status, _, _))) if status.is_success() => {
                self.took_one.store(true, Relaxed);
                Answer::Took
            }
            Ok(Ok((status, retry_after, body))) => {
                let text = String::from_utf8_lossy(&body[..body.len().min(ANSWER_BYTES)]).trim().to_owned();
                // A database may echo the request's URL, whose query can
                // hold a token: never logged, never passed to the nodes.
                let text = match self.url.query().filter(|query| !query.is_empty()) {
                    Some(query) => text.replace(query, "(query not shown)"),
                    None => text,
                };
                let message = format!("the database answered {status}: {text}");
                match status {
                    StatusCode::TOO_MANY_REQUESTS => Answer::Busy { class: "429", retry_after, message },
                    status if status.is_server_error() => Answer::Busy { class: "5xx", retry_after, message },
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => {
                        Answer::Misconfigured(format!("{message} (check REMOTE_WRITE_URL and its credentials)"))
                    }
                    // VictoriaMetrics' answer to a path it does not serve, and
                    // Go's to http:// sent to an https server.
                    StatusCode::BAD_REQUEST
                        if text.contains("unsupported path") || text.contains("HTTP request to an HTTPS server") =>
                    {
                        Answer::Misconfigured(format!("{message} (check REMOTE_WRITE_URL)"))
                    }
                    // A database that has taken nothing, not even the empty
                    // request that reads its clock, is not refusing this data:
                    // REMOTE_WRITE_URL is another of its APIs.
                    status if status.is_client_error() && !self.took_one.load(Relaxed) => {
                        Answer::Misconfigured(format!(
                            "{message} (it has taken no request yet, not even an empty one: check that REMOTE_WRITE_URL is its remote-write endpoint)"
                        ))
                    }
                    _ => Answer::Refused(message),
                }
            }
            Ok(Err(error)) => Answer::Busy {
                class: "error",
                retry_after: None,
                message: format!("cannot reach the database: {}", chain(&error)),
            },
            Err(_) => Answer::Busy {
                class: "error",
                retry_after: None,
                message: format!("the database did not answer within REMOTE_WRITE_TIMEOUT ({:?})", self.timeout),
            },
        };
        (answer, elapsed)
    }
}

impl Database {
    /// REMOTE_WRITE_URL as logs show it: without its query.
    pub(crate) fn shown_url(&self) -> String {
        crate::config::shown_url(&self.url.to_string())
    }

    /// The database's clock less this one's, in milliseconds: from its
    /// last answer, or, before the first, from the answer to an empty write
    /// (0 when the answer has no `Date`); an error when the database cannot
    /// be reached.
    pub(crate) async fn clock_offset(&self) -> Result<i64, String> {
        if let Some(offset) = self.known_clock_offset() {
            return Ok(offset);
        }
        let waiting_since = Instant::now();
        let _probing = self.clock.probing.lock().await;
        if let Some(offset) = self.known_clock_offset() {
            return Ok(offset);
        }
        let failed = self.clock.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some((_, error)) = failed.filter(|(at, _)| *at >= waiting_since) {
            return Err(error);
        }
        let probed = self.probe_clock().await;
        if let Err(error) = &probed {
            *self.clock.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some((Instant::now(), error.clone()));
        }
        probed
    }

    /// Reads the database's clock from the answer to a write of no
    /// samples: a valid request every remote-write receiver takes (a GET
    /// of the write endpoint would be a broken write, logged as one), which
    /// also tells whether REMOTE_WRITE_URL takes writes at all.
    async fn probe_clock(&self) -> Result<i64, String> {
        match self.post(&[]).await {
            (Answer::Busy { class: "error", message, .. }, _) => Err(message),
            (answer, _) => {
                if let Answer::Misconfigured(message) | Answer::Refused(message) = &answer {
                    tracing::error!(message = "The database refused a write of no samples: its settings are wrong.", answer = %message);
                }
                if self.known_clock_offset().is_none() {
                    // HTTP servers must send a Date (VictoriaMetrics and
                    // Prometheus do); a proxy may drop it.
                    tracing::warn!(
                        message =
                            "The database's answer carries no usable Date: its clock is taken to be this machine's."
                    );
                    self.clock.known.store(true, Relaxed);
                }
                Ok(self.clock.offset_ms.load(Relaxed))
            }
        }
    }

    /// The database's clock less this one's, if an answer has told it.
    pub(crate) fn known_clock_offset(&self) -> Option<i64> {
        self.clock.known.load(Relaxed).then(|| self.clock.offset_ms.load(Relaxed))
    }

    /// Notes the database's clock from the `Date` of an answer.
    fn note_clock(&self, date: Option<&HeaderValue>) {
        let Some(offset) = date.and_then(|date| offset_ms(date, SystemTime::now())) else { return };
        self.clock.offset_ms.store(offset, Relaxed);
        self.clock.known.store(true, Relaxed);
    }
}

/// The time `date` (an HTTP date) names less `now`, in milliseconds. An
/// HTTP date is to the second, so a clock that agrees reads 0 to 1 s
/// behind; differences under a second are taken as none.
fn offset_ms(date: &HeaderValue, now: SystemTime) -> Option<i64> {
    let date = httpdate::parse_http_date(date.to_str().ok()?).ok()?;
    let millis = |time: SystemTime| match time.duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_millis() as i64,
        Err(before) => -(before.duration().as_millis() as i64),
    };
    let offset = millis(date) - millis(now);
    Some(if (-1000..=1000).contains(&offset) { 0 } else { offset })
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

/// The `Authorization` header for the database, if any is configured.
fn authorization(config: &RemoteWriteConfig) -> Option<HeaderValue> {
    let value = match (&config.bearer_token, &config.username, &config.password) {
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
    fn the_database_clock_is_read_from_date_to_the_second() {
        let now = UNIX_EPOCH + Duration::from_millis(1_764_860_000_500);
        let date = |text: &str| offset_ms(&HeaderValue::from_str(text).unwrap(), now);
        // 2025-12-04 14:53:20 GMT is 1,764,860,000 s: the same second reads as 0.
        assert_eq!(date("Thu, 04 Dec 2025 14:53:20 GMT"), Some(0));
        assert_eq!(date("Thu, 04 Dec 2025 14:53:21 GMT"), Some(0));
        // Three days ahead, ten minutes behind.
        assert_eq!(date("Sun, 07 Dec 2025 14:53:20 GMT"), Some(3 * 86_400_000 - 500));
        assert_eq!(date("Thu, 04 Dec 2025 14:43:20 GMT"), Some(-600_000 - 500));
        assert_eq!(date("not a date"), None);
    }

    /// A server on loopback that answers each request with the next of
    /// `statuses` (the last one again when they run out); it returns the
    /// bodies it was sent through `bodies`.
    async fn answering(statuses: Vec<u16>, bodies: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut answered = 0;
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                // One request per connection: read its head and its body.
                let mut request = Vec::new();
                let mut buffer = [0; 4096];
                while let Ok(n) = stream.read(&mut buffer).await {
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    let Some(end) = text.find("\r\n\r\n") else { continue };
                    let length = text.split("content-length:").nth(1).and_then(|rest| rest.split("\r\n").next());
                    let length: usize = length.and_then(|length| length.trim().parse().ok()).unwrap_or(0);
                    if n == 0 || request.len() >= end + 4 + length {
                        let _ = bodies.send(request[end + 4..].to_vec());
                        break;
                    }
                }
                let status = statuses[answered.min(statuses.len() - 1)];
                answered += 1;
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nDate: Thu, 04 Dec 2025 14:53:20 GMT\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbad"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{address}/api/v1/write")
    }

    fn at(url: &str) -> Database {
        let vars = std::collections::HashMap::from([("REMOTE_WRITE_URL".to_owned(), url.to_owned())]);
        let config: RemoteWriteConfig = envconfig::Envconfig::init_from_hashmap(&vars).unwrap();
        Database::new(&config, "test").unwrap()
    }

    #[tokio::test]
    async fn the_clock_is_read_with_a_write_of_no_samples_not_a_broken_one() {
        let (sent, mut bodies) = tokio::sync::mpsc::unbounded_channel();
        let database = at(&answering(vec![204], sent).await);
        assert!(database.clock_offset().await.is_ok());
        // Snappy's encoding of nothing: an empty WriteRequest, which every
        // receiver takes.
        let body = bodies.recv().await.unwrap();
        assert_eq!(snap::raw::Decoder::new().decompress_vec(&body).unwrap(), Vec::<u8>::new());
        assert_eq!(body, vec![0]);
    }

    #[tokio::test]
    async fn a_400_from_a_database_that_took_nothing_is_its_settings_not_the_data() {
        let (sent, _bodies) = tokio::sync::mpsc::unbounded_channel();
        // Another API at that URL: 400 to everything, the empty write too.
        let database = at(&answering(vec![400], sent.clone()).await);
        assert!(database.clock_offset().await.is_ok());
        assert!(matches!(database.post(b"x").await.0, Answer::Misconfigured(_)));
        assert!(matches!(database.post(b"x").await.0, Answer::Misconfigured(_)));
        // The remote-write endpoint: it took the empty write, so a 400 after
        // is about the data.
        let database = at(&answering(vec![204, 400], sent).await);
        assert!(database.clock_offset().await.is_ok());
        assert!(matches!(database.post(b"x").await.0, Answer::Refused(_)));
    }

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
