//! Configuration of `telemetry-sink`.

use std::{collections::HashMap, path::PathBuf};

use envconfig::Envconfig;

use super::{ConfigError, LogFormat, ensure, ensure_positive};

/// Everything `telemetry-sink` reads from its environment. Defaults accept
/// what a node started with its own defaults sends.
#[derive(Debug, Clone, Envconfig)]
pub struct SinkConfig {
    /// Address to listen on, `host:port`; `:port` listens on every interface.
    #[envconfig(from = "GRPC_SERVER_SOCKET", default = "0.0.0.0:8000")]
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
        ensure(!self.file_path.as_os_str().is_empty(), "FILE_PATH", "")?;
        ensure((1..=1 << 30).contains(&self.buffer_size), "BUFFER_SIZE", self.buffer_size)?;
        ensure_positive("BUFFER_FLUSH_INTERVAL", self.flush_interval)
    }

    /// The address to bind, with Go's `:port` meaning every interface.
    pub fn listen_address(&self) -> Result<String, ConfigError> {
        let socket = self.server_socket.trim();
        let (host, port) = socket.rsplit_once(':').ok_or_else(|| super::invalid("GRPC_SERVER_SOCKET", socket))?;
        ensure(port.parse::<u16>().is_ok() && !host.contains('/'), "GRPC_SERVER_SOCKET", socket)?;
        Ok(if host.is_empty() { format!("0.0.0.0:{port}") } else { socket.to_owned() })
    }

    /// The file accepted readings are appended to.
    pub fn output_file(&self) -> PathBuf {
        self.file_path.join("readings.jsonl")
    }
}
