//! Where and how a database is reached over Prometheus remote-write: the
//! same variables for the sink (`OUTPUT=remote-write`) and for a node that
//! writes to the database itself (`DESTINATION=remote-write`).

use std::{path::PathBuf, time::Duration};

use envconfig::Envconfig;

use super::{ConfigError, Pem, Secret, ensure, ensure_positive};

/// Put where a URL's query or fragment was left out.
pub(crate) const QUERY_NOT_SHOWN: &str = "?(query not shown)";

/// The system's CA bundle (Debian's `ca-certificates`), trusted for an
/// https:// database when REMOTE_WRITE_TLS_CA_CERT is unset.
pub(crate) const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The database, its credentials, and how readings become its samples.
#[derive(Debug, Clone, Envconfig)]
pub struct RemoteWriteConfig {
    /// The database's remote-write endpoint.
    #[envconfig(from = "REMOTE_WRITE_URL")]
    pub url: Option<String>,
    /// Name of the metric every sensor's series carries.
    #[envconfig(from = "REMOTE_WRITE_METRIC", default = "sensor_value")]
    pub metric: String,
    /// Deadline of one request to the database.
    #[envconfig(from = "REMOTE_WRITE_TIMEOUT", default = "4s")]
    pub timeout: humantime::Duration,
    /// Oldest reading sent to the database, by this process' clock: older
    /// ones are refused (a database past its retention drops them and
    /// answers OK).
    #[envconfig(from = "REMOTE_WRITE_MAX_AGE", default = "30d")]
    pub max_age: humantime::Duration,
    /// Furthest a reading sent to the database may be ahead of this
    /// process' clock.
    #[envconfig(from = "REMOTE_WRITE_MAX_AHEAD", default = "10m")]
    pub max_ahead: humantime::Duration,
    /// Bearer token sent to the database.
    #[envconfig(from = "REMOTE_WRITE_BEARER_TOKEN")]
    pub bearer_token: Option<Secret>,
    /// User for basic authentication to the database.
    #[envconfig(from = "REMOTE_WRITE_USERNAME")]
    pub username: Option<String>,
    /// Password for basic authentication to the database.
    #[envconfig(from = "REMOTE_WRITE_PASSWORD")]
    pub password: Option<Secret>,
    /// CAs to check an https:// database against; default: the system's
    /// bundle.
    #[envconfig(from = "REMOTE_WRITE_TLS_CA_CERT")]
    pub tls_ca_cert: Option<PathBuf>,
    /// The certificate shown to an https:// database that asks for one
    /// (mutual TLS); with REMOTE_WRITE_TLS_CLIENT_KEY.
    #[envconfig(from = "REMOTE_WRITE_TLS_CLIENT_CERT")]
    pub tls_client_cert: Option<PathBuf>,
    /// Key of REMOTE_WRITE_TLS_CLIENT_CERT.
    #[envconfig(from = "REMOTE_WRITE_TLS_CLIENT_KEY")]
    pub tls_client_key: Option<PathBuf>,
}

impl RemoteWriteConfig {
    /// Checks every value that parsed but cannot be used; the URL and the
    /// TLS files only when the database is `used`.
    pub fn validate(&self, used: bool) -> Result<(), ConfigError> {
        if used {
            let url = self.url.as_deref().unwrap_or("");
            // Credentials in the URL would be logged and not sent: refused,
            // and not echoed.
            if url.contains('@') {
                return Err(super::invalid("REMOTE_WRITE_URL", super::HIDDEN_CREDENTIALS));
            }
            // Shown without its query, which may hold a token.
            let shown = self.shown_url();
            let unusable = |reason: &str| ConfigError::Unusable {
                variable: "REMOTE_WRITE_URL",
                value: shown.clone(),
                reason: reason.to_owned(),
            };
            if url.trim().is_empty() {
                return Err(unusable("not set: the database's remote-write endpoint is required here"));
            }
            let uri = url.parse::<hyper::Uri>().ok().filter(|uri| uri.host().is_some());
            let scheme = uri.as_ref().and_then(|uri| uri.scheme_str()).map(str::to_owned);
            let Some(uri) = uri.filter(|_| matches!(scheme.as_deref(), Some("http" | "https"))) else {
                return Err(unusable("not an http:// or https:// URL with a host"));
            };
            if !port_fits(&uri) {
                return Err(unusable("the port is not from 1 to 65535"));
            }
            if other_protocol(uri.path()) || !remote_write_path(uri.path()) {
                return Err(unusable(
                    "not a remote-write endpoint: its path must end in /write, /push, /receive or /prometheus (e.g. /api/v1/write), and not be another protocol's (/write of InfluxDB, /api/v1/import)",
                ));
            }
            if scheme.as_deref() == Some("https") {
                let host = uri.host().unwrap_or("").trim_matches(['[', ']']);
                if rustls_pki_types::ServerName::try_from(host).is_err() {
                    return Err(unusable("the host is not a DNS name or IP address a certificate can name"));
                }
            }
            self.roots()?;
            self.identity()?;
        }
        let metric = &self.metric;
        let metric_ok = crate::database::names::metric_name(metric) && !metric.starts_with("__");
        ensure(metric_ok, "REMOTE_WRITE_METRIC", metric)?;
        ensure_positive("REMOTE_WRITE_TIMEOUT", self.timeout)?;
        // A window narrower than a second would refuse nearly every reading;
        // readings wait up to BATCH_TIMEOUT and their retries before they are
        // sent, so an age limit under a minute would refuse the data of
        // every short outage as if it were bad.
        for (variable, limit, least) in [
            ("REMOTE_WRITE_MAX_AGE", self.max_age, Duration::from_secs(60)),
            ("REMOTE_WRITE_MAX_AHEAD", self.max_ahead, Duration::from_secs(1)),
        ] {
            ensure_positive(variable, limit)?;
            ensure(*limit >= least, variable, limit)?;
        }
        if let Some(token) = &self.bearer_token {
            ensure(super::tokenable(token.expose()), "REMOTE_WRITE_BEARER_TOKEN", "(hidden)")?;
        }
        let empty_password = self.password.as_ref().is_some_and(|p| p.expose().is_empty());
        ensure(!empty_password, "REMOTE_WRITE_PASSWORD", "(hidden)")?;
        let username = self.username.as_deref().unwrap_or("");
        ensure(!username.chars().any(char::is_control), "REMOTE_WRITE_USERNAME", username.escape_debug())?;
        let basic = (self.username.is_some(), self.password.is_some());
        ensure(basic.0 == basic.1, "REMOTE_WRITE_USERNAME", self.username.as_deref().unwrap_or(""))?;
        ensure(!(basic.0 && self.bearer_token.is_some()), "REMOTE_WRITE_BEARER_TOKEN", "(hidden)")?;
        Ok(())
    }

    /// The certificate chain and key (PEM) shown to an https:// database
    /// that asks for one; `None` when not set. Both must be set, only for
    /// https://, and the key must be the certificate's.
    pub fn identity(&self) -> Result<Option<(String, String)>, ConfigError> {
        let (cert_path, key_path) = match (&self.tls_client_cert, &self.tls_client_key) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            (Some(cert), None) => {
                return Err(super::invalid("REMOTE_WRITE_TLS_CLIENT_CERT", cert.display().to_string()));
            }
            (None, Some(key)) => return Err(super::invalid("REMOTE_WRITE_TLS_CLIENT_KEY", key.display().to_string())),
        };
        ensure(self.https(), "REMOTE_WRITE_TLS_CLIENT_CERT", cert_path.display())?;
        let cert = super::read_pem("REMOTE_WRITE_TLS_CLIENT_CERT", Some(cert_path), Pem::Certificates)?;
        let key = super::read_pem("REMOTE_WRITE_TLS_CLIENT_KEY", Some(key_path), Pem::PrivateKey)?;
        let (cert, key) = (cert.unwrap_or_default(), key.unwrap_or_default());
        // Databases (Go's TLS) take version 1 certificates too.
        let (cert_var, key_var) = ("REMOTE_WRITE_TLS_CLIENT_CERT", "REMOTE_WRITE_TLS_CLIENT_KEY");
        super::check_identity((cert_var, cert_path), (key_var, key_path), &cert, &key, false)?;
        Ok(Some((cert, key)))
    }

    /// The CAs (PEM) to check the database's certificate against, for an
    /// https:// REMOTE_WRITE_URL; `None` for http://.
    pub fn roots(&self) -> Result<Option<String>, ConfigError> {
        let given = self.tls_ca_cert.as_deref();
        match (self.https(), given) {
            (false, None) => Ok(None),
            (false, Some(path)) => Err(super::invalid("REMOTE_WRITE_TLS_CA_CERT", path.display().to_string())),
            (true, Some(path)) => super::read_pem("REMOTE_WRITE_TLS_CA_CERT", Some(path), Pem::Certificates),
            (true, None) => std::fs::read_to_string(SYSTEM_CA_BUNDLE)
                .ok()
                .filter(|bundle| bundle.contains("-----BEGIN CERTIFICATE-----"))
                .map(Some)
                .ok_or_else(|| super::invalid("REMOTE_WRITE_TLS_CA_CERT", "")),
        }
    }

    /// Logs these settings, secrets as `[redacted]`, under `message`.
    pub fn log(&self, message: &str) {
        let path = |value: &Option<PathBuf>| value.as_ref().map_or("-".into(), |p| p.display().to_string());
        let secret = |value: &Option<Secret>| value.as_ref().map_or("-".into(), ToString::to_string);
        let shown = self.shown_url();
        tracing::info!(
            message,
            remote_write_url = %if shown.is_empty() { "-" } else { shown.as_str() },
            remote_write_metric = %self.metric,
            remote_write_timeout = %self.timeout,
            remote_write_max_age = %self.max_age,
            remote_write_max_ahead = %self.max_ahead,
            remote_write_tls_ca_cert = %path(&self.tls_ca_cert),
            remote_write_tls_client_cert = %path(&self.tls_client_cert),
            remote_write_tls_client_key = %path(&self.tls_client_key),
            remote_write_bearer_token = %secret(&self.bearer_token),
            remote_write_username = %self.username.as_deref().unwrap_or("-"),
            remote_write_password = %secret(&self.password),
        );
    }

    /// REMOTE_WRITE_URL for logs and errors: without its query or
    /// fragment, which may hold a token.
    pub fn shown_url(&self) -> String {
        self.url.as_deref().map(shown).unwrap_or_default()
    }

    /// Whether REMOTE_WRITE_URL is https, read as the client will read it
    /// (`HTTPS://` is https too).
    fn https(&self) -> bool {
        let url = self.url.as_deref().and_then(|url| url.trim().parse::<hyper::Uri>().ok());
        url.is_some_and(|url| url.scheme() == Some(&hyper::http::uri::Scheme::HTTPS))
    }
}

/// Whether the port of `uri`, if it names one, is one a connection can use
/// (the parser reads `:99999` as no port, and the client would use 80).
fn port_fits(uri: &hyper::Uri) -> bool {
    let authority = uri.authority().map_or("", |authority| authority.as_str());
    let after_host = authority.rsplit_once(']').map_or(authority, |(_, rest)| rest);
    match after_host.rsplit_once(':') {
        Some((_, port)) => port.parse::<u16>().is_ok_and(|port| port > 0),
        None => true,
    }
}

/// Whether `path` is an endpoint of another protocol, as VictoriaMetrics
/// and Prometheus serve them beside `/api/v1/write`: one that answers OK to
/// a remote-write request and stores nothing of it (InfluxDB's line
/// protocol `/write`, `/influx/write`, `/api/v2/write`; an import API
/// `/api/v1/import…`), or one that refuses every remote-write request
/// (DataDog's `/datadog/api/v1/series`, OpenTSDB's `/api/put`, New Relic,
/// OpenTelemetry, Loki's push, and the query and read APIs).
/// The path is read as a server reads it: percent-decoded (`/%77rite` is
/// `/write`), and in any case.
fn other_protocol(path: &str) -> bool {
    let path = percent_decoded(path).to_ascii_lowercase();
    let segments: Vec<&str> = path.split('/').filter(|segment| !segment.is_empty()).collect();
    let last = segments.last().copied().unwrap_or("");
    let influx = last == "write" && segments.iter().rev().nth(1) != Some(&"v1");
    let others = ["import", "datadog", "opentsdb", "newrelic", "opentelemetry", "otlp", "loki", "graphite"];
    let reads = ["series", "put", "query", "query_range", "export", "federate", "read", "labels", "values", "metrics"];
    influx || segments.iter().any(|segment| others.contains(segment)) || reads.contains(&last)
}

/// Whether `path` ends as remote-write endpoints do: `/api/v1/write`
/// (VictoriaMetrics, Prometheus, vmagent), `/api/v1/push` and
/// `/api/prom/push` (Mimir, Cortex), `/api/v1/receive` (Thanos),
/// `/insert/0/prometheus` (VictoriaMetrics' cluster). A database answers OK
/// to a write sent to many of its other endpoints (a health check, a
/// status page, an admin action) and stores nothing, so the rest are
/// refused at start.
fn remote_write_path(path: &str) -> bool {
    let path = percent_decoded(path).to_ascii_lowercase();
    let last = path.split('/').rfind(|segment| !segment.is_empty()).unwrap_or("");
    ["write", "push", "receive", "prometheus"].contains(&last)
}

/// `path` with each `%XX` decoded (bytes that are not UTF-8 are replaced).
fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|hex| std::str::from_utf8(hex).ok());
        match hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
            Some(byte) if bytes[i] == b'%' => {
                out.push(byte);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` as logs and errors show it: without its query or fragment, which
/// may hold a token.
pub(crate) fn shown(url: &str) -> String {
    match url.split_once(['?', '#']) {
        Some((base, _)) => format!("{base}{QUERY_NOT_SHOWN}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_protocols_paths_and_unusable_ports_are_told_apart() {
        for path in
            ["/api/v1/write", "/prometheus/api/v1/write", "/api/v1/push", "/api/prom/push", "/insert/0/prometheus"]
        {
            assert!(!other_protocol(path), "{path}");
        }
        for path in [
            "/write",
            "/influx/write",
            "/api/v2/write",
            "/api/v1/import",
            "/api/v1/import/native",
            "/%77rite",
            "/api/v1/%69mport",
            "/influx/%57RITE",
            "/WRITE",
            "/datadog/api/v1/series",
            "/datadog/api/v2/series",
            "/api/v1/series",
            "/api/put",
            "/opentsdb/api/put",
            "/newrelic/infra/v2/metrics/events/bulk",
            "/opentelemetry/v1/metrics",
            "/opentelemetry/api/v1/push",
            "/api/v1/otlp/v1/metrics",
            "/loki/api/v1/push",
            "/api/v1/query",
            "/api/v1/query_range",
            "/api/v1/export",
            "/federate",
            "/api/v1/read",
            "/api/v1/labels",
            "/api/v1/label/x/values",
            "/metrics",
        ] {
            assert!(other_protocol(path), "{path}");
        }
        for path in ["/api/v1/write", "/api/v1/push", "/api/prom/push", "/api/v1/receive", "/insert/0/prometheus/"] {
            assert!(remote_write_path(path), "{path}");
        }
        for path in
            ["/", "/snapshot/create", "/snapshot/delete_all", "/internal/force_merge", "/api/v1/status/tsdb", "/health"]
        {
            assert!(!remote_write_path(path), "{path}");
        }
        let fits = |url: &str| port_fits(&url.parse().unwrap());
        assert!(fits("http://db/api/v1/write") && fits("http://db:8428/w") && fits("http://[::1]:8428/w"));
        assert!(fits("http://[::1]/w"));
        assert!(!fits("http://db:99999/w") && !fits("http://db:0/w") && !fits("http://[::1]:70000/w"));
    }
}
