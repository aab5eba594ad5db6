//! One remote-write request to a database and what its answer means: the
//! client the sink's remote-write output and a node writing to the
//! database itself (`DESTINATION=remote-write`) share.

pub(crate) mod https;

use std::time::Duration;

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
    /// 401, 403, 404: this side's settings are wrong (URL, credentials);
    /// the data is fine and should be kept.
    Misconfigured(String),
    /// Any other 4xx: it refused the samples (an out-of-order sample, a
    /// bad label), with its message.
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
        Some(Self { client, url, authorization: authorization(config), timeout: config.timeout.into(), agent })
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
            let status = response.status();
            let asked = retry_after(response.headers().get(header::RETRY_AFTER));
            let body = response.into_body().collect().await.map(|body| body.to_bytes()).unwrap_or_default();
            Ok::<_, hyper_util::client::legacy::Error>((status, asked, body))
        })
        .await;
        let elapsed = started.elapsed();
        let answer = match answer {
            Ok(Ok((status, _, _))) if status.is_success() => Answer::Took,
            Ok(Ok((status, retry_after, body))) => {
                let text = String::from_utf8_lossy(&body[..body.len().min(ANSWER_BYTES)]).trim().to_owned();
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
