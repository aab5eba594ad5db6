//! Every variable of both binaries, with its default and one line of
//! meaning: the one table `--help` prints, the start-up log follows, and
//! `docs/configuration.md` is generated from (a test fails when they
//! differ, or when a variable is read but not here, or here but not read).

use std::collections::HashMap;

/// Which binary a table is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// telemetry-node.
    Node,
    /// telemetry-sink.
    Sink,
}

/// One variable.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    /// Its name.
    pub name: &'static str,
    /// Its default in the node, if the node reads it (`unset`: none).
    pub node: Option<&'static str>,
    /// Its default in the sink, if the sink reads it.
    pub sink: Option<&'static str>,
    /// Whether its value is a credential, never logged or shown.
    pub secret: bool,
    /// What it means, in one line.
    pub meaning: &'static str,
}

impl Variable {
    /// Its default in `binary`, if that binary reads it.
    pub fn default_in(&self, binary: Binary) -> Option<&'static str> {
        match binary {
            Binary::Node => self.node,
            Binary::Sink => self.sink,
        }
    }
}

/// Shown as the default of a variable that has none.
pub const UNSET: &str = "unset";

const fn node(name: &'static str, default: &'static str, meaning: &'static str) -> Variable {
    Variable { name, node: Some(default), sink: None, secret: false, meaning }
}

const fn sink(name: &'static str, default: &'static str, meaning: &'static str) -> Variable {
    Variable { name, node: None, sink: Some(default), secret: false, meaning }
}

const fn both(name: &'static str, node: &'static str, sink: &'static str, meaning: &'static str) -> Variable {
    Variable { name, node: Some(node), sink: Some(sink), secret: false, meaning }
}

const fn secret(variable: Variable) -> Variable {
    Variable { secret: true, ..variable }
}

/// Every variable, in the order the documentation gives them.
pub const VARIABLES: &[Variable] = &[
    // Sources.
    node(
        "SENSOR_NAME",
        "sensor",
        "simulated sensors' name; several are NAME-1 … NAME-N (at most 256 bytes, no control characters)",
    ),
    node("SENSOR_COUNT", "1", "number of simulated sensors, 0 to 1,000,000 (0 only with another source)"),
    node(
        "SENSOR_VALUE_RATE_PER_SECOND",
        "5",
        "readings a second of each simulated sensor, 0.000001 to 1000 (one a millisecond)",
    ),
    node(
        "HOST_INTERVAL",
        UNSET,
        "read the host (/proc: CPU, memory, load, disks, network) this often; unset: no host source",
    ),
    node("FILE_SENSORS", UNSET, "file sensors: name=/path entries and absolute globs, comma-separated"),
    node("FILE_INTERVAL", "10s", "how often the file sensors are read"),
    node("EXEC_COMMAND", UNSET, "a command run every EXEC_INTERVAL, printing `name value` lines"),
    node("EXEC_SHELL", "false", "true: run EXEC_COMMAND with /bin/sh -c"),
    node("EXEC_INTERVAL", "10s", "how often the command runs"),
    node("EXEC_TIMEOUT", "5s", "longest one run may take before it is killed with all it started"),
    node("EXEC_ENV", UNSET, "variables the command gets besides PATH, HOME and LANG, comma-separated names"),
    // Batching and pacing.
    node("BATCH_SIZE", UNSET, "most readings in one batch (one request); unset: 1000 to a sink, 10000 to a database"),
    node("BATCH_TIMEOUT", "1s", "longest a reading waits for its batch to fill"),
    node("MAX_IN_FLIGHT", "4", "lanes, each with one request in flight (1 to 256); a sensor keeps to one lane"),
    node("REQUEST_RATE_PER_SECOND", "1", "requests a second over all lanes, retries included; inf: no limit"),
    node("REQUEST_BURST", "1", "requests that may go back to back after an idle spell"),
    node("OVERFLOW_POLICY", "drop-oldest", "when the sender cannot keep up: drop-oldest, drop-newest, block or spool"),
    node("QUEUE_CAPACITY", "10000", "readings a lane may queue under a drop policy (48 bytes each)"),
    node("SPOOL_DIR", UNSET, "folder of the durable spool, required by OVERFLOW_POLICY=spool"),
    node("SPOOL_MAX_BYTES", "1073741824", "most bytes the spool keeps; when full it evicts its oldest batch"),
    node("NODE_ID", UNSET, "the node's identity (de-duplication, the database's node label); unset: random per start"),
    node("SHUTDOWN_TIMEOUT", "10s", "longest the node spends delivering what it holds after a stop signal"),
    // Where batches go.
    node(
        "DESTINATION",
        "sink",
        "sink: to the sink at GRPC_SERVER_SOCKET; remote-write: to the database at REMOTE_WRITE_URL",
    ),
    both(
        "GRPC_SERVER_SOCKET",
        "localhost:8000",
        ":8000",
        "node: the sink's host:port; sink: where it listens (:8000 is every interface)",
    ),
    node("RPC_TIMEOUT", "5s", "deadline of one attempt"),
    node(
        "GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER",
        "inf",
        "retries of a failed batch before it is dropped; inf: no limit",
    ),
    node("GRPC_CLIENT_RETRY_SEND_INTERVAL", "1s", "first wait before a retry"),
    node("GRPC_CLIENT_RETRY_MULTIPLIER", "2", "growth of the wait from one retry to the next (1 to 100)"),
    node("GRPC_CLIENT_RETRY_MAX_INTERVAL", "5s", "longest wait between attempts"),
    node("GRPC_CLIENT_RETRY_MAX_ELAPSED", "0s", "most time one batch may spend retrying; 0s: no limit"),
    node(
        "GRPC_CLIENT_RETRY_JITTER",
        "full",
        "full: each wait drawn between 0 and the backoff; none: the backoff exactly",
    ),
    node(
        "GRPC_CLIENT_RETRY_BUDGET",
        "10",
        "retry tokens shared by the lanes; below half, one lane probes for the others",
    ),
    both(
        "GRPC_COMPRESSION",
        "none",
        "gzip",
        "node: gzip compresses requests; sink: gzip accepts compressed requests, none refuses them",
    ),
    both(
        "MAX_MESSAGE_BYTES",
        "4194304",
        "4194304",
        "largest request: the node splits a batch that would pass it; the sink refuses one that does",
    ),
    secret(both(
        "SINK_AUTH_TOKEN",
        UNSET,
        UNSET,
        "shared token: the node sends it as a bearer token, the sink requires it",
    )),
    node("TLS_CA_CERT", UNSET, "PEM of the CA of the sink's certificate; setting it turns TLS on"),
    node("TLS_SERVER_NAME", UNSET, "name the sink's certificate must carry; unset: the host of GRPC_SERVER_SOCKET"),
    node("TLS_CLIENT_CERT", UNSET, "the node's certificate, for a sink that requires one"),
    node("TLS_CLIENT_KEY", UNSET, "the key of TLS_CLIENT_CERT (a path)"),
    // The sink's input and file output.
    sink("RATE_PER_SECOND", "16777216", "request bytes accepted a second; above it nodes are pushed back"),
    sink("MAX_BYTES_IN_FLIGHT", "67108864", "most bytes of requests held at once over all connections"),
    sink("MAX_CONNECTIONS", "1024", "most connections open at once; more wait"),
    sink("MAX_ITEMS_PER_REQUEST", "100000", "most readings in one request"),
    sink("TLS_CERT", UNSET, "the sink's certificate; with TLS_KEY, turns TLS on"),
    sink("TLS_KEY", UNSET, "the key of TLS_CERT (a path)"),
    sink("TLS_CLIENT_CA", UNSET, "CA of node certificates; setting it makes them mandatory (mutual TLS)"),
    sink("OUTPUT", "file", "file: JSON lines under FILE_PATH; remote-write: the database at REMOTE_WRITE_URL"),
    sink("FILE_PATH", "data", "folder of readings.jsonl, created if missing"),
    sink("BUFFER_SIZE", "65536", "most bytes of output gathered into one write"),
    sink("BUFFER_FLUSH_INTERVAL", "1s", "how often written output is synced to disk"),
    // The database (the sink's OUTPUT=remote-write, the node's DESTINATION=remote-write).
    both(
        "REMOTE_WRITE_URL",
        UNSET,
        UNSET,
        "the database's remote-write endpoint, e.g. http://127.0.0.1:8428/api/v1/write",
    ),
    both("REMOTE_WRITE_METRIC", "sensor_value", "sensor_value", "metric name of the readings' series"),
    both("REMOTE_WRITE_TIMEOUT", "4s", "4s", "deadline of one write to the database"),
    both(
        "REMOTE_WRITE_MAX_AGE",
        "30d",
        "30d",
        "oldest reading sent (at least 1m), by the database's clock; older refuse their request",
    ),
    both("REMOTE_WRITE_MAX_AHEAD", "10m", "10m", "furthest ahead of the database's clock a reading may be"),
    secret(both("REMOTE_WRITE_BEARER_TOKEN", UNSET, UNSET, "bearer token for the database")),
    both("REMOTE_WRITE_USERNAME", UNSET, UNSET, "basic-authentication user for the database"),
    secret(both("REMOTE_WRITE_PASSWORD", UNSET, UNSET, "basic-authentication password for the database")),
    both("REMOTE_WRITE_TLS_CA_CERT", UNSET, UNSET, "PEM of the CA of the database's certificate"),
    both("REMOTE_WRITE_TLS_CLIENT_CERT", UNSET, UNSET, "certificate shown to a database that asks for one"),
    both("REMOTE_WRITE_TLS_CLIENT_KEY", UNSET, UNSET, "the key of REMOTE_WRITE_TLS_CLIENT_CERT (a path)"),
    sink("REMOTE_WRITE_CONCURRENCY", "4", "writes to the database under way at once"),
    sink("REMOTE_WRITE_MAX_SAMPLES", "10000", "most samples in one write to the database"),
    // Both, for operations.
    both("METRICS_ADDR", UNSET, UNSET, "host:port serving /metrics, /healthz and /readyz; unset: off"),
    both("LOGGER_MIN_LOG_LEVEL", "info", "info", "trace, debug, info, warn or error"),
    both("LOG_FORMAT", "text", "text", "text, or json for log collectors"),
];

/// The variables `binary` reads, with their defaults there.
pub fn read_by(binary: Binary) -> impl Iterator<Item = (&'static Variable, &'static str)> {
    VARIABLES.iter().filter_map(move |variable| variable.default_in(binary).map(|default| (variable, default)))
}

/// The table `--help` prints for `binary`.
pub fn help(binary: Binary) -> String {
    let mut text =
        String::from("Environment variables (or a .env file in the working folder; the environment wins):\n\n");
    let width = read_by(binary).map(|(variable, _)| variable.name.len()).max().unwrap_or(0);
    for (variable, default) in read_by(binary) {
        text.push_str(&format!("  {:width$}  {}  [{}]\n", variable.name, variable.meaning, default));
    }
    text.push_str("\nDurations are written like 250ms, 1s, 2m, 1h 30m. A bad value exits 2 naming the variable.\n");
    text
}

/// The reference table of `docs/configuration.md`.
pub fn markdown() -> String {
    let mut text = String::from("| variable | node default | sink default | meaning |\n|---|---|---|---|\n");
    let shown = |default: Option<&str>| match default {
        None => "–".to_owned(),
        Some(UNSET) => UNSET.to_owned(),
        Some(value) => format!("`{value}`"),
    };
    for variable in VARIABLES {
        let meaning = if variable.secret {
            format!("{} (secret: never logged)", variable.meaning)
        } else {
            variable.meaning.to_owned()
        };
        text.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            variable.name,
            shown(variable.node),
            shown(variable.sink),
            meaning.replace('|', "\\|")
        ));
    }
    text
}

/// Every variable `binary` reads, as it is in force: the value set (in the
/// environment or `.env`), else the default; secrets shown only as set or
/// not. One `NAME=value` pair each, for the start-up log.
pub fn in_force(binary: Binary, vars: &HashMap<String, String>) -> String {
    let mut pairs = Vec::new();
    for (variable, default) in read_by(binary) {
        let value = match vars.get(variable.name) {
            Some(_) if variable.secret => "(set, not shown)".to_owned(),
            Some(value) if variable.name == "REMOTE_WRITE_URL" => super::remote_write::shown(value),
            Some(value) => value.escape_debug().to_string(),
            None => default.to_owned(),
        };
        pairs.push(format!("{}={}", variable.name, value));
    }
    pairs.join(" ")
}
