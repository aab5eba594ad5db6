//! Configuration of `telemetry-sink`.

use std::{collections::HashMap, path::PathBuf};

use envconfig::Envconfig;

use super::{ConfigError, LogFormat, Pem, Secret, ensure, ensure_positive};

/// Everything `telemetry-sink` reads from its environment. Defaults accept
/// what a node started with its own defaults sends.
#[derive(Debug, Clone, Envconfig)]
pub struct SinkConfig {
    /// Address to listen on, `host:port`; `:port` listens on every
    /// interface, IPv6 and IPv4.
    #[envconfig(from = "GRPC_SERVER_SOCKET", default = ":8000")]
    pub server_socket: String,
    /// Request bytes accepted per second; above it requests are refused with
    /// RESOURCE_EXHAUSTED.
    #[envconfig(from = "RATE_PER_SECOND", default = "16777216")]
    pub rate_per_second: u32,
    /// Folder that receives `readings.jsonl`.
    #[envconfig(from = "FILE_PATH", default = "data")]
    pub file_path: PathBuf,
    /// Bytes of output held in memory before they are written.
    #[envconfig(from = "BUFFER_SIZE", default = "65536")]
    pub buffer_size: usize,
    /// Longest output is held in memory before it is written.
    #[envconfig(from = "BUFFER_FLUSH_INTERVAL", default = "1s")]
    pub flush_interval: humantime::Duration,
    /// Least severe level that is logged.
    #[envconfig(from = "LOGGER_MIN_LOG_LEVEL", default = "info")]
    pub log_level: tracing::Level,
    /// Log line format: human-readable text or JSON for collectors.
    #[envconfig(from = "LOG_FORMAT", default = "text")]
    pub log_format: LogFormat,
    /// Where to serve metrics and health over HTTP; off when unset.
    #[envconfig(from = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Whether gzip-compressed requests are accepted.
    #[envconfig(from = "GRPC_COMPRESSION", default = "gzip")]
    pub compression: super::Compression,
    /// Token every request must carry as `authorization: Bearer <token>`.
    #[envconfig(from = "SINK_AUTH_TOKEN")]
    pub auth_token: Option<Secret>,
    /// The sink's certificate; with TLS_KEY it turns TLS on.
    #[envconfig(from = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Key of TLS_CERT.
    #[envconfig(from = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA of node certificates; setting it makes them required (mTLS).
    #[envconfig(from = "TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Largest request accepted, in encoded bytes.
    #[envconfig(from = "MAX_MESSAGE_BYTES", default = "4194304")]
    pub max_message_bytes: usize,
    /// Most readings accepted in one request.
    #[envconfig(from = "MAX_ITEMS_PER_REQUEST", default = "100000")]
    pub max_items: usize,
    /// Where accepted readings go: the JSON-lines file, or a time-series
    /// database over Prometheus remote-write.
    #[envconfig(from = "OUTPUT", default = "file")]
    pub output: OutputKind,
    /// The database's remote-write endpoint (OUTPUT=remote-write).
    #[envconfig(from = "REMOTE_WRITE_URL")]
    pub remote_write_url: Option<String>,
    /// Name of the metric every sensor's series carries.
    #[envconfig(from = "REMOTE_WRITE_METRIC", default = "sensor_value")]
    pub remote_write_metric: String,
    /// Deadline of one request to the database.
    #[envconfig(from = "REMOTE_WRITE_TIMEOUT", default = "4s")]
    pub remote_write_timeout: humantime::Duration,
    /// Requests to the database in flight at once, at most.
    #[envconfig(from = "REMOTE_WRITE_CONCURRENCY", default = "4")]
    pub remote_write_concurrency: usize,
    /// Most samples gathered into one request to the database.
    #[envconfig(from = "REMOTE_WRITE_MAX_SAMPLES", default = "10000")]
    pub remote_write_max_samples: usize,
    /// Oldest reading sent to the database, by the sink's clock: older ones
    /// are refused (a database past its retention drops them and answers OK).
    #[envconfig(from = "REMOTE_WRITE_MAX_AGE", default = "30d")]
    pub remote_write_max_age: humantime::Duration,
    /// Furthest a reading sent to the database may be ahead of the sink's
    /// clock.
    #[envconfig(from = "REMOTE_WRITE_MAX_AHEAD", default = "10m")]
    pub remote_write_max_ahead: humantime::Duration,
    /// Bearer token sent to the database.
    #[envconfig(from = "REMOTE_WRITE_BEARER_TOKEN")]
    pub remote_write_bearer_token: Option<Secret>,
    /// User for basic authentication to the database.
    #[envconfig(from = "REMOTE_WRITE_USERNAME")]
    pub remote_write_username: Option<String>,
    /// Password for basic authentication to the database.
    #[envconfig(from = "REMOTE_WRITE_PASSWORD")]
    pub remote_write_password: Option<Secret>,
    /// CAs to check an https:// database against; default: the system's
    /// bundle.
    #[envconfig(from = "REMOTE_WRITE_TLS_CA_CERT")]
    pub remote_write_tls_ca_cert: Option<std::path::PathBuf>,
    /// The sink's certificate toward an https:// database that asks for
    /// one (mutual TLS); with REMOTE_WRITE_TLS_CLIENT_KEY.
    #[envconfig(from = "REMOTE_WRITE_TLS_CLIENT_CERT")]
    pub remote_write_tls_client_cert: Option<std::path::PathBuf>,
    /// Key of REMOTE_WRITE_TLS_CLIENT_CERT.
    #[envconfig(from = "REMOTE_WRITE_TLS_CLIENT_KEY")]
    pub remote_write_tls_client_key: Option<std::path::PathBuf>,
}

/// The system's CA bundle (Debian's `ca-certificates`), trusted for an
/// https:// database when REMOTE_WRITE_TLS_CA_CERT is unset.
pub(crate) const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the sink puts what it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// FILE_PATH/readings.jsonl.
    File,
    /// A database, over Prometheus remote-write.
    RemoteWrite,
}

impl std::str::FromStr for OutputKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "file" => Ok(Self::File),
            "remote-write" => Ok(Self::RemoteWrite),
            _ => Err(format!("unknown output {s:?}")),
        }
    }
}

impl SinkConfig {
    /// Parses and validates the configuration held in `vars`.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        super::load(vars, Self::validate)
    }

    /// Checks every value that parsed but cannot be used.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_address()?;
        ensure(self.rate_per_second > 0, "RATE_PER_SECOND", self.rate_per_second)?;
        let folder_ok = !self.file_path.as_os_str().is_empty() && (!self.file_path.exists() || self.file_path.is_dir());
        ensure(folder_ok, "FILE_PATH", self.file_path.display())?;
        ensure((1..=1 << 30).contains(&self.buffer_size), "BUFFER_SIZE", self.buffer_size)?;
        ensure_positive("BUFFER_FLUSH_INTERVAL", self.flush_interval)?;
        if let Some(address) = &self.metrics_addr {
            super::ensure_socket("METRICS_ADDR", address)?;
        }
        if let Some(token) = &self.auth_token {
            ensure(super::tokenable(token.expose()), "SINK_AUTH_TOKEN", "(hidden)")?;
        }
        ensure((1024..=1 << 30).contains(&self.max_message_bytes), "MAX_MESSAGE_BYTES", self.max_message_bytes)?;
        ensure((1..=10_000_000).contains(&self.max_items), "MAX_ITEMS_PER_REQUEST", self.max_items)?;
        self.tls()?;
        if self.output == OutputKind::RemoteWrite {
            let url = self.remote_write_url.as_deref().unwrap_or("");
            // Credentials in the URL would be logged and not sent: refused,
            // and not echoed.
            if url.contains('@') {
                return Err(super::invalid("REMOTE_WRITE_URL", super::HIDDEN_CREDENTIALS));
            }
            let uri = url.parse::<hyper::Uri>().ok().filter(|uri| uri.host().is_some());
            let scheme = uri.as_ref().and_then(|uri| uri.scheme_str());
            ensure(matches!(scheme, Some("http" | "https")), "REMOTE_WRITE_URL", url)?;
            if scheme == Some("https") {
                let host = uri.as_ref().and_then(|uri| uri.host()).unwrap_or("").trim_matches(['[', ']']);
                ensure(rustls_pki_types::ServerName::try_from(host).is_ok(), "REMOTE_WRITE_URL", url)?;
            }
            self.remote_write_roots()?;
            self.remote_write_identity()?;
        }
        let metric = &self.remote_write_metric;
        let metric_ok = metric
            .chars()
            .enumerate()
            .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
            && !metric.is_empty()
            && !metric.starts_with("__");
        ensure(metric_ok, "REMOTE_WRITE_METRIC", metric)?;
        ensure_positive("REMOTE_WRITE_TIMEOUT", self.remote_write_timeout)?;
        // A window narrower than a second would refuse nearly every reading.
        for (variable, limit) in [
            ("REMOTE_WRITE_MAX_AGE", self.remote_write_max_age),
            ("REMOTE_WRITE_MAX_AHEAD", self.remote_write_max_ahead),
        ] {
            ensure_positive(variable, limit)?;
            ensure(*limit >= std::time::Duration::from_secs(1), variable, limit)?;
        }
        let concurrency = self.remote_write_concurrency;
        ensure((1..=64).contains(&concurrency), "REMOTE_WRITE_CONCURRENCY", concurrency)?;
        let samples = self.remote_write_max_samples;
        ensure((1..=1_000_000).contains(&samples), "REMOTE_WRITE_MAX_SAMPLES", samples)?;
        if let Some(token) = &self.remote_write_bearer_token {
            ensure(super::tokenable(token.expose()), "REMOTE_WRITE_BEARER_TOKEN", "(hidden)")?;
        }
        let empty_password = self.remote_write_password.as_ref().is_some_and(|p| p.expose().is_empty());
        ensure(!empty_password, "REMOTE_WRITE_PASSWORD", "(hidden)")?;
        let basic = (self.remote_write_username.is_some(), self.remote_write_password.is_some());
        ensure(basic.0 == basic.1, "REMOTE_WRITE_USERNAME", self.remote_write_username.as_deref().unwrap_or(""))?;
        ensure(!(basic.0 && self.remote_write_bearer_token.is_some()), "REMOTE_WRITE_BEARER_TOKEN", "(hidden)")?;
        Ok(())
    }

    /// The certificate chain and key (PEM) the sink shows an https://
    /// database that asks for one; `None` when not set. Both must be set,
    /// only for https://, and the key must be the certificate's.
    pub fn remote_write_identity(&self) -> Result<Option<(String, String)>, ConfigError> {
        let (cert_path, key_path) = match (&self.remote_write_tls_client_cert, &self.remote_write_tls_client_key) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            (Some(cert), None) => {
                return Err(super::invalid("REMOTE_WRITE_TLS_CLIENT_CERT", cert.display().to_string()));
            }
            (None, Some(key)) => return Err(super::invalid("REMOTE_WRITE_TLS_CLIENT_KEY", key.display().to_string())),
        };
        ensure(self.remote_write_https(), "REMOTE_WRITE_TLS_CLIENT_CERT", cert_path.display())?;
        let cert = super::read_pem("REMOTE_WRITE_TLS_CLIENT_CERT", Some(cert_path), Pem::Certificates)?;
        let key = super::read_pem("REMOTE_WRITE_TLS_CLIENT_KEY", Some(key_path), Pem::PrivateKey)?;
        let (cert, key) = (cert.unwrap_or_default(), key.unwrap_or_default());
        ensure(super::key_fits(&cert, &key), "REMOTE_WRITE_TLS_CLIENT_KEY", key_path.display())?;
        Ok(Some((cert, key)))
    }

    /// The CAs (PEM) to check the database's certificate against, for an
    /// https:// REMOTE_WRITE_URL; `None` for http://.
    pub fn remote_write_roots(&self) -> Result<Option<String>, ConfigError> {
        let given = self.remote_write_tls_ca_cert.as_deref();
        match (self.remote_write_https(), given) {
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

    /// Whether REMOTE_WRITE_URL is https, read as the client will read it
    /// (`HTTPS://` is https too).
    fn remote_write_https(&self) -> bool {
        let url = self.remote_write_url.as_deref().and_then(|url| url.trim().parse::<hyper::Uri>().ok());
        url.is_some_and(|url| url.scheme() == Some(&hyper::http::uri::Scheme::HTTPS))
    }

    /// The server's TLS material, read and checked, or `None` for plaintext.
    pub fn tls(&self) -> Result<Option<ServerTls>, ConfigError> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) => {
                return match &self.tls_client_ca {
                    Some(ca) => Err(super::invalid("TLS_CLIENT_CA", ca.display().to_string())),
                    None => Ok(None),
                };
            }
            (Some(cert), Some(key)) => (cert, key),
            (Some(cert), None) => return Err(super::invalid("TLS_CERT", cert.display().to_string())),
            (None, Some(key)) => return Err(super::invalid("TLS_KEY", key.display().to_string())),
        };
        let cert = super::read_pem("TLS_CERT", Some(cert), Pem::Certificates)?.unwrap_or_default();
        let key = super::read_pem("TLS_KEY", Some(key), Pem::PrivateKey)?.unwrap_or_default();
        let client_ca = super::read_pem("TLS_CLIENT_CA", self.tls_client_ca.as_deref(), Pem::Certificates)?;
        Ok(Some(ServerTls { cert, key, client_ca }))
    }

    /// The address to bind: `host:port`, or Go's `:port` for every
    /// interface (see [`crate::listen::bind`]).
    pub fn listen_address(&self) -> Result<String, ConfigError> {
        let socket = self.server_socket.trim();
        let (host, port) = socket.rsplit_once(':').ok_or_else(|| super::invalid("GRPC_SERVER_SOCKET", socket))?;
        ensure(port.parse::<u16>().is_ok() && !host.contains('/'), "GRPC_SERVER_SOCKET", socket)?;
        Ok(socket.to_owned())
    }

    /// The file accepted readings are appended to.
    pub fn output_file(&self) -> PathBuf {
        self.file_path.join("readings.jsonl")
    }
}

/// The server's TLS material, as the configuration names it: PEM text,
/// read and checked.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The sink's certificate chain.
    pub cert: String,
    /// The sink's private key.
    pub key: String,
    /// The CAs a node's certificate must chain to; `None` asks for none.
    pub client_ca: Option<String>,
}
