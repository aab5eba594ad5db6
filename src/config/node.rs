//! Configuration of `telemetry-node`.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use envconfig::Envconfig;

use super::sources::{FileSensor, Owned, argv, findable, parse_file_sensors};
use super::{ConfigError, Pem, Secret, ensure, ensure_bounded, ensure_positive, invalid};
use crate::reading::{MAX_SENSOR_NAME_BYTES, sensor_name};

/// Everything `telemetry-node` reads from its environment. Defaults match
/// the Go node's load (one sensor, 5 readings/s, 1 request/s) and a sink
/// started with its own defaults on the same host.
#[derive(Debug, Clone, Envconfig)]
pub struct NodeConfig {
    /// Name of the sensor; with more than one, sensors are `<name>-<i>`.
    #[envconfig(from = "SENSOR_NAME", default = "sensor")]
    pub sensor_name: String,
    /// How many sensors this node runs.
    #[envconfig(from = "SENSOR_COUNT", default = "1")]
    pub sensor_count: usize,
    /// Readings each sensor produces per second.
    #[envconfig(from = "SENSOR_VALUE_RATE_PER_SECOND", default = "5")]
    pub sensor_rate: f64,
    /// How often the host source reads the machine; no host source when
    /// unset.
    #[envconfig(from = "HOST_INTERVAL")]
    pub host_interval: Option<humantime::Duration>,
    /// Sensors that each read a file holding one integer: `name=path` and
    /// globs, comma-separated.
    #[envconfig(from = "FILE_SENSORS")]
    pub file_sensors: Option<String>,
    /// How often the file sensors are read.
    #[envconfig(from = "FILE_INTERVAL", default = "10s")]
    pub file_interval: humantime::Duration,
    /// A command that prints `name value` lines, run each EXEC_INTERVAL.
    #[envconfig(from = "EXEC_COMMAND")]
    pub exec_command: Option<String>,
    /// Run EXEC_COMMAND with `/bin/sh -c` rather than splitting it on
    /// whitespace.
    #[envconfig(from = "EXEC_SHELL", default = "false")]
    pub exec_shell: bool,
    /// How often EXEC_COMMAND runs.
    #[envconfig(from = "EXEC_INTERVAL", default = "10s")]
    pub exec_interval: humantime::Duration,
    /// Longest one run of EXEC_COMMAND may take before it is killed.
    #[envconfig(from = "EXEC_TIMEOUT", default = "5s")]
    pub exec_timeout: humantime::Duration,
    /// Variables of the node's environment EXEC_COMMAND gets besides PATH,
    /// HOME and LANG, comma-separated; it gets no other.
    #[envconfig(from = "EXEC_ENV")]
    pub exec_env: Option<String>,
    /// Requests per second the node sends at most, over all sensors.
    #[envconfig(from = "REQUEST_RATE_PER_SECOND", default = "1")]
    pub request_rate: f64,
    /// Requests that may go out back to back after an idle spell.
    #[envconfig(from = "REQUEST_BURST", default = "1")]
    pub request_burst: u32,
    /// Address of the telemetry sink, `host:port`.
    #[envconfig(from = "GRPC_SERVER_SOCKET", default = "localhost:8000")]
    pub server_socket: String,
    /// Retries of a failed send before its readings are dropped (`inf`: as
    /// long as it takes; the overflow queue then bounds what is held).
    #[envconfig(from = "GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", default = "inf")]
    pub max_retries: Retries,
    /// First wait before a retry; later waits grow by the multiplier.
    #[envconfig(from = "GRPC_CLIENT_RETRY_SEND_INTERVAL", default = "1s")]
    pub retry_interval: humantime::Duration,
    /// Growth of the wait from one retry to the next.
    #[envconfig(from = "GRPC_CLIENT_RETRY_MULTIPLIER", default = "2")]
    pub retry_multiplier: f32,
    /// Longest wait between two attempts; a sink that stays down is probed
    /// this often.
    #[envconfig(from = "GRPC_CLIENT_RETRY_MAX_INTERVAL", default = "5s")]
    pub retry_max_interval: humantime::Duration,
    /// Most time spent waiting to retry one batch (0s: no limit).
    #[envconfig(from = "GRPC_CLIENT_RETRY_MAX_ELAPSED", default = "0s")]
    pub retry_max_elapsed: humantime::Duration,
    /// `full`: each wait is drawn between 0 and the backoff; `none`: exact.
    #[envconfig(from = "GRPC_CLIENT_RETRY_JITTER", default = "full")]
    pub retry_jitter: Jitter,
    /// Retry tokens: a failure spends one, a success earns a tenth; under
    /// half, retries wait the longest interval.
    #[envconfig(from = "GRPC_CLIENT_RETRY_BUDGET", default = "10")]
    pub retry_budget: f64,
    /// The node's identity in every request, for the sink's de-duplication;
    /// a random one per start when unset.
    #[envconfig(from = "NODE_ID")]
    pub node_id: Option<String>,
    /// Requests in flight at once, at most: sensors are spread over this
    /// many lanes, each sending one request at a time.
    #[envconfig(from = "MAX_IN_FLIGHT", default = "4")]
    pub max_in_flight: usize,
    /// What happens when the sender cannot keep up: by default readings
    /// wait in a queue of QUEUE_CAPACITY per lane, which drops its oldest
    /// when full (an outage is ridden out, memory stays bounded).
    #[envconfig(from = "OVERFLOW_POLICY", default = "drop-oldest")]
    pub overflow: Overflow,
    /// Readings a lane may queue under a drop policy.
    #[envconfig(from = "QUEUE_CAPACITY", default = "10000")]
    pub queue_capacity: usize,
    /// Folder of the spool (OVERFLOW_POLICY=spool).
    #[envconfig(from = "SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Most bytes the spool keeps; when full it evicts its oldest batch.
    #[envconfig(from = "SPOOL_MAX_BYTES", default = "1073741824")]
    pub spool_max_bytes: u64,
    /// Readings per request at most; unset, [`NodeConfig::batch_size`].
    #[envconfig(from = "BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Largest request the node sends: the sink's MAX_MESSAGE_BYTES. A batch
    /// whose request would be larger is sent as several.
    #[envconfig(from = "MAX_MESSAGE_BYTES", default = "4194304")]
    pub max_message_bytes: usize,
    /// Longest a reading waits for its batch to fill before it is sent anyway.
    #[envconfig(from = "BATCH_TIMEOUT", default = "1s")]
    pub batch_timeout: humantime::Duration,
    /// Deadline of one attempt at a request.
    #[envconfig(from = "RPC_TIMEOUT", default = "5s")]
    pub rpc_timeout: humantime::Duration,
    /// Longest the node spends delivering what it holds after a stop signal.
    #[envconfig(from = "SHUTDOWN_TIMEOUT", default = "10s")]
    pub shutdown_timeout: humantime::Duration,
    /// Least severe level that is logged.
    #[envconfig(from = "LOGGER_MIN_LOG_LEVEL", default = "info")]
    pub log_level: tracing::Level,
    /// Log line format: human-readable text or JSON for collectors.
    #[envconfig(from = "LOG_FORMAT", default = "text")]
    pub log_format: LogFormat,
    /// Where to serve metrics and health over HTTP; off when unset.
    #[envconfig(from = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Compression of requests.
    #[envconfig(from = "GRPC_COMPRESSION", default = "none")]
    pub compression: super::Compression,
    /// Token sent to the sink as `authorization: Bearer <token>`.
    #[envconfig(from = "SINK_AUTH_TOKEN")]
    pub auth_token: Option<Secret>,
    /// CA that signed the sink's certificate; setting it turns TLS on.
    #[envconfig(from = "TLS_CA_CERT")]
    pub tls_ca_cert: Option<PathBuf>,
    /// Name to check the sink's certificate against; default: the host of
    /// GRPC_SERVER_SOCKET.
    #[envconfig(from = "TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// The node's own certificate, for sinks that require one (mTLS).
    #[envconfig(from = "TLS_CLIENT_CERT")]
    pub tls_client_cert: Option<PathBuf>,
    /// Key of TLS_CLIENT_CERT.
    #[envconfig(from = "TLS_CLIENT_KEY")]
    pub tls_client_key: Option<PathBuf>,
    /// Where batches go: the sink over gRPC, or a database over
    /// Prometheus remote-write.
    #[envconfig(from = "DESTINATION", default = "sink")]
    pub destination: Destination,
    /// The database (DESTINATION=remote-write).
    #[envconfig(nested)]
    pub remote_write: super::RemoteWriteConfig,
}

/// Where a node sends its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The sink at GRPC_SERVER_SOCKET.
    Sink,
    /// The database at REMOTE_WRITE_URL.
    RemoteWrite,
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "sink" => Ok(Self::Sink),
            "remote-write" => Ok(Self::RemoteWrite),
            _ => Err(format!("unknown destination {s:?}")),
        }
    }
}

/// Whether `token` can travel as an HTTP/2 header value.
pub(crate) fn tokenable(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

impl NodeConfig {
    /// Parses and validates the configuration held in `vars`.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        super::load(vars, Self::validate)
    }

    /// Checks every value that parsed but cannot be used.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ensure(self.sensor_count <= 1_000_000, "SENSOR_COUNT", self.sensor_count)?;
        // The longest name made from it, `-N` included, fits where every
        // other source's names fit: a database cuts longer labels (at 16 KiB,
        // VictoriaMetrics), which would merge sensors into one series.
        let suffix = if self.sensor_count > 1 { self.sensor_count.to_string().len() + 1 } else { 0 };
        let fits = !self.sensor_name.is_empty() && self.sensor_name.len() + suffix <= MAX_SENSOR_NAME_BYTES;
        ensure(fits, "SENSOR_NAME", self.sensor_name.escape_debug())?;
        // The rules every other source's names keep: a newline would forge
        // a line in the text log and reach the database verbatim.
        name_rules("SENSOR_NAME", &self.sensor_name)?;
        self.validate_sources()?;
        let rate_ok = (MIN_RATE..=1e9).contains(&self.sensor_rate);
        ensure(rate_ok, "SENSOR_VALUE_RATE_PER_SECOND", self.sensor_rate)?;
        if self.sensor_rate > MAX_SENSOR_RATE {
            return Err(ConfigError::Unusable {
                variable: "SENSOR_VALUE_RATE_PER_SECOND",
                value: self.sensor_rate.to_string(),
                reason: format!(
                    "a sensor gives at most {MAX_SENSOR_RATE} readings a second: a time-series database holds one sample per sensor and millisecond, so faster readings would be refused; use more sensors (SENSOR_COUNT) for more readings"
                ),
            });
        }
        let request_rate_ok =
            (MIN_RATE..=MAX_REQUEST_RATE).contains(&self.request_rate) || self.request_rate == f64::INFINITY;
        ensure(request_rate_ok, "REQUEST_RATE_PER_SECOND", self.request_rate)?;
        ensure(self.request_burst > 0, "REQUEST_BURST", self.request_burst)?;
        self.sink_uri()?;
        ensure_positive("GRPC_CLIENT_RETRY_SEND_INTERVAL", self.retry_interval)?;
        let multiplier_ok = self.retry_multiplier.is_finite() && (1.0..=100.0).contains(&self.retry_multiplier);
        ensure(multiplier_ok, "GRPC_CLIENT_RETRY_MULTIPLIER", self.retry_multiplier)?;
        ensure_positive("GRPC_CLIENT_RETRY_MAX_INTERVAL", self.retry_max_interval)?;
        let cap_ok = Duration::from(self.retry_max_interval) >= Duration::from(self.retry_interval);
        ensure(cap_ok, "GRPC_CLIENT_RETRY_MAX_INTERVAL", self.retry_max_interval)?;
        ensure_bounded("GRPC_CLIENT_RETRY_MAX_ELAPSED", self.retry_max_elapsed)?;
        let budget_ok = self.retry_budget.is_finite() && (1.0..=1_000_000.0).contains(&self.retry_budget);
        ensure(budget_ok, "GRPC_CLIENT_RETRY_BUDGET", self.retry_budget)?;
        if let Some(id) = &self.node_id {
            ensure(!id.is_empty() && id.len() <= 128, "NODE_ID", id.escape_debug())?;
            name_rules("NODE_ID", id)?;
        }
        self.remote_write.validate(self.destination == Destination::RemoteWrite)?;
        if let Some(size) = self.batch_size {
            ensure((1..=1_000_000).contains(&size), "BATCH_SIZE", size)?;
        }
        ensure((1024..=1 << 30).contains(&self.max_message_bytes), "MAX_MESSAGE_BYTES", self.max_message_bytes)?;
        ensure((1..=256).contains(&self.max_in_flight), "MAX_IN_FLIGHT", self.max_in_flight)?;
        ensure((1..=100_000_000).contains(&self.queue_capacity), "QUEUE_CAPACITY", self.queue_capacity)?;
        ensure(self.spool_max_bytes >= 1 << 16, "SPOOL_MAX_BYTES", self.spool_max_bytes)?;
        if self.overflow == Overflow::Spool {
            let dir = self.spool_dir.as_ref().ok_or_else(|| invalid("SPOOL_DIR", ""))?;
            ensure(writable_folder(dir), "SPOOL_DIR", dir.display())?;
        }
        ensure_positive("BATCH_TIMEOUT", self.batch_timeout)?;
        ensure_positive("RPC_TIMEOUT", self.rpc_timeout)?;
        ensure_positive("SHUTDOWN_TIMEOUT", self.shutdown_timeout)?;
        if let Some(address) = &self.metrics_addr {
            super::ensure_socket("METRICS_ADDR", address)?;
        }
        if let Some(token) = &self.auth_token {
            ensure(tokenable(token.expose()), "SINK_AUTH_TOKEN", "(hidden)")?;
        }
        if self.tls_ca_cert.is_none()
            && let Some(name) = &self.tls_server_name
        {
            return Err(invalid("TLS_SERVER_NAME", name.as_str()));
        }
        self.tls()?;
        Ok(())
    }

    /// Checks the host, file and exec sources, and that some source runs.
    fn validate_sources(&self) -> Result<(), ConfigError> {
        // A source's timer ticks at most once a millisecond, as tokio's do.
        let every = |variable, interval: humantime::Duration| ensure_positive(variable, interval);
        if let Some(interval) = self.host_interval {
            every("HOST_INTERVAL", interval)?;
            ensure(cfg!(target_os = "linux"), "HOST_INTERVAL", interval)?;
        }
        every("FILE_INTERVAL", self.file_interval)?;
        every("EXEC_INTERVAL", self.exec_interval)?;
        every("EXEC_TIMEOUT", self.exec_timeout)?;
        let names_ok = self.exec_env().iter().all(|name| variable_name(name));
        ensure(names_ok, "EXEC_ENV", self.exec_env.as_deref().unwrap_or_default())?;
        let files = self.file_sensors()?;
        if let Some(argv) = self.exec_argv() {
            let program = argv.first().map_or("", String::as_str);
            ensure(findable(program), "EXEC_COMMAND", program)?;
        }
        let others = self.host_interval.is_some() || !files.is_empty() || self.exec_argv().is_some();
        ensure(self.sensor_count > 0 || others, "SENSOR_COUNT", self.sensor_count)?;
        self.owned_names(&files).map(drop)
    }

    /// Readings per request at most: BATCH_SIZE, or by default 1,000 to a
    /// sink and 10,000 to a database. A database's cost goes by the
    /// series entries it is sent, and a batch spread over many sensors
    /// holds one sample of each at 1,000: at 10,000 (vmagent's block too) a
    /// series' samples travel together (docs/performance.md).
    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(match self.destination {
            Destination::Sink => DEFAULT_BATCH_SIZE,
            Destination::RemoteWrite => DEFAULT_BATCH_SIZE_TO_A_DATABASE,
        })
    }

    /// About how many requests a second the sources need at least. A lane
    /// lets a batch out when it has a token, and its batch grows, up to
    /// BATCH_SIZE, while it waits; lanes take tokens in turn. So the rate
    /// suffices while the busiest lane's readings fill no more than one
    /// batch per turn: the sources need lanes × (busiest lane's readings a
    /// second) / BATCH_SIZE requests a second. A polled source counts as one
    /// reading per interval (the number it reads is known only once read).
    pub fn requests_needed(&self) -> f64 {
        let count = self.lane_count();
        // Lane i holds every lane_count-th simulated sensor from the i-th.
        let sensors_in = |lane: usize| (self.sensor_count + count - 1 - lane) / count;
        let mut lanes: Vec<f64> = (0..count).map(|lane| sensors_in(lane) as f64 * self.sensor_rate).collect();
        let files = self.file_sensors.as_deref().is_some_and(|spec| spec.split(',').any(|e| !e.trim().is_empty()));
        let polled = [
            self.host_interval.map(Duration::from),
            files.then(|| self.file_interval.into()),
            self.exec_argv().map(|_| self.exec_interval.into()),
        ];
        for (i, interval) in polled.into_iter().flatten().enumerate() {
            lanes[i % count] += 1.0 / interval.as_secs_f64();
        }
        let busiest = lanes.iter().copied().fold(0.0, f64::max);
        count as f64 * busiest / self.batch_size() as f64
    }

    /// The file source's sensors (none when FILE_SENSORS is unset or empty).
    pub fn file_sensors(&self) -> Result<Vec<FileSensor>, ConfigError> {
        self.file_sensors_and_skipped().map(|(sensors, _)| sensors)
    }

    /// The file source's sensors, and the paths its globs matched that are
    /// not UTF-8 (left out: no sensor name can hold them).
    pub(crate) fn file_sensors_and_skipped(&self) -> Result<(Vec<FileSensor>, Vec<std::path::PathBuf>), ConfigError> {
        let spec = self.file_sensors.as_deref().unwrap_or_default();
        parse_file_sensors(spec).map_err(|error| ConfigError::Unusable {
            variable: "FILE_SENSORS",
            value: spec.to_owned(),
            reason: error.to_string(),
        })
    }

    /// The names EXEC_ENV lists.
    pub(crate) fn exec_env(&self) -> Vec<String> {
        let names = self.exec_env.as_deref().unwrap_or_default().split(',');
        names.map(str::trim).filter(|name| !name.is_empty()).map(str::to_owned).collect()
    }

    /// EXEC_COMMAND as a program and its arguments, if set.
    pub fn exec_argv(&self) -> Option<Vec<String>> {
        let command = self.exec_command.as_deref().filter(|command| !command.trim().is_empty())?;
        Some(argv(command, self.exec_shell))
    }

    /// The names the simulated, `files` and host sources own, checked for
    /// clashes between them.
    pub(crate) fn owned_names(&self, files: &[FileSensor]) -> Result<Owned, ConfigError> {
        let simulated = (self.sensor_count > 0).then(|| (self.sensor_name.clone(), self.sensor_count));
        let host = Owned::new(simulated.clone(), HashSet::new(), self.host_interval.is_some());
        let mut named = HashSet::new();
        for sensor in files {
            if host.owns(sensor.name) {
                return Err(ConfigError::Unusable {
                    variable: "FILE_SENSORS",
                    value: self.file_sensors.clone().unwrap_or_default(),
                    reason: format!("sensor name {:?} is taken by the simulated or host sensors", sensor.name),
                });
            }
            named.insert(sensor.name);
        }
        Ok(Owned::new(simulated, named, self.host_interval.is_some()))
    }

    /// The TLS material for the sink connection, read and checked, or
    /// `None` for plaintext.
    pub fn tls(&self) -> Result<Option<ClientTls>, ConfigError> {
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (None, None) => None,
            (Some(cert_path), Some(key_path)) => {
                let cert = super::read_pem("TLS_CLIENT_CERT", Some(cert_path), Pem::Certificates)?.unwrap_or_default();
                let key = super::read_pem("TLS_CLIENT_KEY", Some(key_path), Pem::PrivateKey)?.unwrap_or_default();
                // rustls would refuse what this refuses when the node
                // connects, with a message that names neither variable.
                super::check_identity(("TLS_CLIENT_CERT", cert_path), ("TLS_CLIENT_KEY", key_path), &cert, &key, true)?;
                Some((cert, key))
            }
            (Some(cert), None) => return Err(invalid("TLS_CLIENT_CERT", cert.display().to_string())),
            (None, Some(key)) => return Err(invalid("TLS_CLIENT_KEY", key.display().to_string())),
        };
        let Some(ca) = super::read_pem("TLS_CA_CERT", self.tls_ca_cert.as_deref(), Pem::Certificates)? else {
            return match identity {
                Some(_) => Err(invalid("TLS_CA_CERT", "")),
                None => Ok(None),
            };
        };
        let host = self.server_socket.trim().rsplit_once(':').map_or("", |(host, _)| host);
        let name = self.tls_server_name.as_deref().unwrap_or(host).trim_matches(|c| c == '[' || c == ']');
        let variable = if self.tls_server_name.is_some() { "TLS_SERVER_NAME" } else { "GRPC_SERVER_SOCKET" };
        ensure(rustls_pki_types::ServerName::try_from(name).is_ok(), variable, name)?;
        Ok(Some(ClientTls { ca, server_name: name.to_owned(), identity }))
    }

    /// Names of the sensors: `SENSOR_NAME` alone, or numbered from 1.
    pub(crate) fn sensor_names(&self) -> Vec<&'static str> {
        if self.sensor_count == 1 {
            return vec![sensor_name(&self.sensor_name)];
        }
        (1..=self.sensor_count).map(|i| sensor_name(&format!("{}-{i}", self.sensor_name))).collect()
    }

    /// `NODE_ID`, or a random identity for this run.
    pub fn node_identity(&self) -> Arc<str> {
        match &self.node_id {
            Some(id) => Arc::from(id.as_str()),
            None => {
                use std::hash::{BuildHasher, Hasher};
                // RandomState is seeded from the OS's randomness per process.
                let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
                hasher.write_u32(std::process::id());
                Arc::from(format!("node-{:016x}", hasher.finish()))
            }
        }
    }

    /// How many lanes the node runs: min(MAX_IN_FLIGHT, SENSOR_COUNT), at
    /// least one. (Without making [`Self::lanes`]' names, a million of them
    /// at most.)
    pub(crate) fn lane_count(&self) -> usize {
        self.max_in_flight.min(self.sensor_count).max(1)
    }

    /// The simulated sensors' names, dealt round-robin into min(MAX_IN_FLIGHT,
    /// SENSOR_COUNT) lanes (one when there are none). The other sources share
    /// these lanes: the request rate is the node's, so more lanes would only
    /// split the same rate into smaller batches.
    pub fn lanes(&self) -> Vec<Vec<&'static str>> {
        let count = self.lane_count();
        let mut lanes = vec![Vec::new(); count];
        for (i, name) in self.sensor_names().into_iter().enumerate() {
            lanes[i % count].push(name);
        }
        lanes
    }

    /// The request rate limit, or `None` when the rate is unlimited.
    pub fn request_rate(&self) -> Option<RequestRate> {
        let burst = NonZeroU32::new(self.request_burst)?;
        self.request_rate.is_finite().then_some(RequestRate { per_second: self.request_rate, burst })
    }

    /// The URI of the sink named by `GRPC_SERVER_SOCKET`: https when a CA
    /// is given, http otherwise.
    pub(crate) fn sink_uri(&self) -> Result<String, ConfigError> {
        let socket = self.server_socket.trim();
        let bad = || invalid("GRPC_SERVER_SOCKET", socket);
        let (host, port) = socket.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || !port.parse::<u16>().is_ok_and(|port| port > 0) || socket.contains('/') {
            return Err(bad());
        }
        let scheme = if self.tls_ca_cert.is_some() { "https" } else { "http" };
        let uri = format!("{scheme}://{socket}");
        uri.parse::<hyper::Uri>().map_err(|_| bad())?;
        Ok(uri)
    }
}

/// The TLS material for the sink connection, as the configuration names
/// it: PEM text, read and checked.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The CAs the sink's certificate must chain to.
    pub ca: String,
    /// The name the sink's certificate must carry.
    pub server_name: String,
    /// The node's own certificate chain and key, for a sink that asks.
    pub identity: Option<(String, String)>,
}

/// `name` (from `variable`) kept to the rules of sensor names: no
/// whitespace, no control character.
fn name_rules(variable: &'static str, name: &str) -> Result<(), ConfigError> {
    crate::reading::check_sensor_name(name).map_err(|reason| ConfigError::Unusable {
        variable,
        value: name.escape_debug().to_string(),
        reason: format!("the name {reason}"),
    })
}

/// Whether `name` is a variable name a shell would take: a letter or `_`,
/// then letters, digits and `_`.
fn variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `dir` is, or can be made, a folder this process can write a file in.
fn writable_folder(dir: &std::path::Path) -> bool {
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    let written = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    written
}

/// BATCH_SIZE unset, to a sink.
const DEFAULT_BATCH_SIZE: usize = 1000;

/// BATCH_SIZE unset, to a database (DESTINATION=remote-write).
const DEFAULT_BATCH_SIZE_TO_A_DATABASE: usize = 10_000;

/// Highest request rate: the token bucket counts thousandths of a request,
/// one a nanosecond at most.
pub const MAX_REQUEST_RATE: f64 = 1e6;

/// How fast requests may go out (`REQUEST_RATE_PER_SECOND`,
/// `REQUEST_BURST`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestRate {
    /// Requests per second over the long run; at most [`MAX_REQUEST_RATE`].
    pub per_second: f64,
    /// Requests that may go out back to back after an idle spell.
    pub burst: NonZeroU32,
}

/// Lowest sensor or request rate: one a million seconds (11.6 days).
/// Slower rates would wait longer than a timer can.
const MIN_RATE: f64 = 1e-6;

/// Most readings a second of one sensor: one a millisecond, the most a
/// time-series database holds of one series.
pub const MAX_SENSOR_RATE: f64 = 1000.0;

/// A number of retries, or `inf` for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retries(pub Option<usize>);

impl FromStr for Retries {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "inf" | "infinite" | "unlimited" => Ok(Self(None)),
            number => number.parse().map(|n| Self(Some(n))).map_err(|_| format!("not a number of retries: {s:?}")),
        }
    }
}

/// What happens when the sender cannot keep up with the sensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Push back to the sensors, which skip the ticks they cannot take on
    /// time and count them as missed. Nothing produced is dropped.
    Block,
    /// Queue up to QUEUE_CAPACITY readings per lane; when full, drop the
    /// oldest queued reading.
    DropOldest,
    /// Queue up to QUEUE_CAPACITY readings per lane; when full, drop the
    /// arriving reading.
    DropNewest,
    /// Keep batches the sink cannot take in a durable spool under
    /// SPOOL_DIR, and deliver them, in order, ahead of newer data.
    Spool,
}

impl FromStr for Overflow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "block" => Ok(Self::Block),
            "drop-oldest" => Ok(Self::DropOldest),
            "drop-newest" => Ok(Self::DropNewest),
            "spool" => Ok(Self::Spool),
            _ => Err(format!("unknown overflow policy {s:?}")),
        }
    }
}

/// Whether retry waits are drawn at random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Each wait between 0 and the backoff ("full jitter").
    Full,
    /// Exactly the backoff.
    None,
}

impl FromStr for Jitter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Self::Full),
            "none" => Ok(Self::None),
            _ => Err(format!("unknown jitter {s:?}")),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("unknown log format {s:?}")),
        }
    }
}
