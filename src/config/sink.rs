//! Configuration of `telemetry-sink`.

use std::{collections::HashMap, path::PathBuf};

use envconfig::Envconfig;

use super::{ConfigError, LogFormat, Pem, RemoteWriteConfig, Secret, ensure, ensure_positive};

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
    /// Most bytes of requests held at once while they are received and
    /// answered, over all connections (at least one largest request).
    #[envconfig(from = "MAX_BYTES_IN_FLIGHT", default = "67108864")]
    pub max_bytes_in_flight: usize,
    /// Most connections open at once; past it a new connection waits in
    /// the listen queue until one closes.
    #[envconfig(from = "MAX_CONNECTIONS", default = "1024")]
    pub max_connections: usize,
    /// Most readings accepted in one request.
    #[envconfig(from = "MAX_ITEMS_PER_REQUEST", default = "100000")]
    pub max_items: usize,
    /// Where accepted readings go: the JSON-lines file, or a time-series
    /// database over Prometheus remote-write.
    #[envconfig(from = "OUTPUT", default = "file")]
    pub output: OutputKind,
    /// Where and how to reach the database (OUTPUT=remote-write).
    #[envconfig(nested)]
    pub remote_write: RemoteWriteConfig,
    /// Requests to the database in flight at once, at most.
    #[envconfig(from = "REMOTE_WRITE_CONCURRENCY", default = "4")]
    pub remote_write_concurrency: usize,
    /// Most samples gathered into one request to the database.
    #[envconfig(from = "REMOTE_WRITE_MAX_SAMPLES", default = "10000")]
    pub remote_write_max_samples: usize,
}

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
        let in_flight = self.max_bytes_in_flight;
        ensure((1 << 20..=1 << 40).contains(&in_flight), "MAX_BYTES_IN_FLIGHT", in_flight)?;
        ensure((1..=1_000_000).contains(&self.max_connections), "MAX_CONNECTIONS", self.max_connections)?;
        self.tls()?;
        self.remote_write.validate(self.output == OutputKind::RemoteWrite)?;
        let concurrency = self.remote_write_concurrency;
        ensure((1..=64).contains(&concurrency), "REMOTE_WRITE_CONCURRENCY", concurrency)?;
        let samples = self.remote_write_max_samples;
        ensure((1..=1_000_000).contains(&samples), "REMOTE_WRITE_MAX_SAMPLES", samples)?;
        Ok(())
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

    /// Where a clean stop saves each node lane's last batch written, for
    /// the de-duplication of retries after a restart.
    pub fn lanes_file(&self) -> PathBuf {
        self.file_path.join("readings.lanes")
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
