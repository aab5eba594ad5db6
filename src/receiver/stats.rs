//! The sink's counters: what it took, refused and wrote, and what the
//! database answered, kept by one type whose methods are the events, and
//! exported as Prometheus metrics.

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// Why the sink refused a request, as a metric label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RejectReason {
    /// A reading failed validation.
    Invalid,
    /// Larger than the sink accepts.
    TooLarge,
    /// Missing or wrong token.
    Unauthenticated,
    /// Compressed with an encoding the sink does not accept.
    Compression,
    /// The output could not be written (full disk, file-size limit).
    WriteFailed,
    /// The database refused the readings (a 4xx answer).
    DatabaseRefused,
}

impl RejectReason {
    /// Every reason, so that each is exported from the start.
    pub const ALL: [RejectReason; 6] = [
        Self::Invalid,
        Self::TooLarge,
        Self::Unauthenticated,
        Self::Compression,
        Self::WriteFailed,
        Self::DatabaseRefused,
    ];

    /// The reason's name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::TooLarge => "too_large",
            Self::Unauthenticated => "unauthenticated",
            Self::Compression => "compression",
            Self::WriteFailed => "write_failed",
            Self::DatabaseRefused => "database_refused",
        }
    }
}

impl EncodeLabelValue for RejectReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        fmt::Write::write_str(encoder, self.name())
    }
}

/// Label of a metric split by rejection reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabel {
    /// Why.
    reason: RejectReason,
}

/// Live counters of one sink.
#[derive(Debug)]
pub struct SinkStats {
    /// Requests answered OK.
    requests_accepted: Counter,
    /// Readings in the requests answered OK.
    readings_accepted: Counter,
    /// Requests refused, for any reason but throttling.
    rejected: Counter,
    /// Requests refused, by reason.
    rejected_by_reason: Family<RejectLabel, Counter>,
    /// Requests refused over RATE_PER_SECOND.
    throttled: Counter,
    /// Retried batches answered OK without writing them again.
    duplicates: Counter,
    /// Encoded bytes of every request received.
    bytes_received: Counter,
    /// Readings written to the output file.
    readings_written: Counter,
    /// Writes to the output that failed (and were cut off again).
    write_errors: Counter,
    /// Seconds one write of the buffer to the file took.
    write_latency: Histogram,
    /// Connections open.
    connections: Gauge,
    /// Times a new connection had to wait because MAX_CONNECTIONS were
    /// open.
    connections_waited: Counter,
    /// Whether the server is accepting requests; backs readiness.
    serving: AtomicBool,
    /// Whether the output's last answer said the sink's own settings are
    /// wrong (a database URL or credentials): not ready until mended.
    misconfigured: AtomicBool,
    /// The remote-write output's counters.
    remote_write: RemoteWriteStats,
}

/// Label of a remote-write metric split by the database's answer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    /// `2xx`, `4xx`, `429`, `5xx`, or `error` (no answer: connection
    /// failed or timed out).
    status: &'static str,
}

/// The answers remote-write metrics are split by.
const REMOTE_WRITE_STATUSES: [&str; 5] = ["2xx", "4xx", "429", "5xx", "error"];

/// Counters of the remote-write output.
#[derive(Debug)]
struct RemoteWriteStats {
    /// Requests made to the database, by its answer.
    requests: Family<StatusLabel, Counter>,
    /// Samples the database took (answered 2xx).
    samples: Counter,
    /// Node requests pushed back because the database could not take them
    /// now, by the database's answer.
    retries: Family<StatusLabel, Counter>,
    /// Seconds from sending a request to the database to its answer.
    latency: Histogram,
    /// Requests to the database under way.
    in_flight: Gauge,
}

impl Default for RemoteWriteStats {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            samples: Counter::default(),
            retries: Family::default(),
            latency: Histogram::new(exponential_buckets(0.0005, 4.0, 10)),
            in_flight: Gauge::default(),
        }
    }
}

impl RemoteWriteStats {
    /// Registers every metric as `telemetry_sink_remote_write_*`.
    fn register(&self, r: &mut Registry) {
        for status in REMOTE_WRITE_STATUSES {
            let _ = self.requests.get_or_create(&StatusLabel { status });
            let _ = self.retries.get_or_create(&StatusLabel { status });
        }
        let r = r.sub_registry_with_prefix("remote_write");
        r.register("requests", "Requests to the database, by its answer", self.requests.clone());
        r.register("samples", "Samples the database took", self.samples.clone());
        r.register("retries", "Node requests pushed back while the database could not take them", self.retries.clone());
        let latency = self.latency.clone();
        r.register_with_unit("latency", "Time a request to the database took", Unit::Seconds, latency);
        r.register("in_flight", "Requests to the database under way", self.in_flight.clone());
    }
}

impl Default for SinkStats {
    fn default() -> Self {
        Self {
            requests_accepted: Counter::default(),
            readings_accepted: Counter::default(),
            rejected: Counter::default(),
            rejected_by_reason: Family::default(),
            throttled: Counter::default(),
            duplicates: Counter::default(),
            bytes_received: Counter::default(),
            readings_written: Counter::default(),
            write_errors: Counter::default(),
            write_latency: Histogram::new(exponential_buckets(0.00005, 4.0, 10)),
            connections: Gauge::default(),
            connections_waited: Counter::default(),
            serving: AtomicBool::new(false),
            misconfigured: AtomicBool::new(false),
            remote_write: RemoteWriteStats::default(),
        }
    }
}

impl SinkStats {
    /// A copy for reporting.
    pub fn snapshot(&self) -> SinkSummary {
        SinkSummary {
            requests_accepted: self.requests_accepted.get(),
            readings_accepted: self.readings_accepted.get(),
            rejected: self.rejected.get(),
            throttled: self.throttled.get(),
            duplicates: self.duplicates.get(),
            bytes_received: self.bytes_received.get(),
            readings_written: self.readings_written.get(),
        }
    }

    /// Registers every metric under the `telemetry_sink` prefix.
    pub fn register(&self, registry: &mut Registry) {
        for reason in RejectReason::ALL {
            let _ = self.rejected_by_reason.get_or_create(&RejectLabel { reason });
        }
        let r = registry.sub_registry_with_prefix("telemetry_sink");
        r.register("requests_accepted", "Requests answered OK", self.requests_accepted.clone());
        r.register("readings_accepted", "Readings in the requests answered OK", self.readings_accepted.clone());
        r.register("requests_rejected", "Requests refused, by reason", self.rejected_by_reason.clone());
        r.register("requests_throttled", "Requests refused over RATE_PER_SECOND", self.throttled.clone());
        r.register("duplicates", "Retried batches answered OK without writing them again", self.duplicates.clone());
        r.register_with_unit("received", "Encoded request bytes received", Unit::Bytes, self.bytes_received.clone());
        r.register("readings_written", "Readings written to the output file", self.readings_written.clone());
        r.register("write_errors", "Writes to the output that failed and were undone", self.write_errors.clone());
        r.register("connections", "Connections open", self.connections.clone());
        let waited = self.connections_waited.clone();
        r.register(
            "connections_waited",
            "Times a new connection had to wait because MAX_CONNECTIONS were open",
            waited,
        );
        let latency = self.write_latency.clone();
        r.register_with_unit("write_latency", "Time one buffer write to the output took", Unit::Seconds, latency);
        self.remote_write.register(r);
    }
}

/// The server's events.
impl SinkStats {
    /// A request of `bytes` encoded bytes arrived.
    pub(crate) fn received(&self, bytes: usize) {
        self.bytes_received.inc_by(bytes as u64);
    }

    /// A request of `readings` answered OK.
    pub(crate) fn accepted(&self, readings: usize) {
        self.requests_accepted.inc();
        self.readings_accepted.inc_by(readings as u64);
    }

    /// A retried request answered OK without writing it again.
    pub(crate) fn duplicate(&self) {
        self.duplicates.inc();
    }

    /// One request refused for `reason`.
    pub(crate) fn reject(&self, reason: RejectReason) {
        self.rejected.inc();
        self.rejected_by_reason.get_or_create(&RejectLabel { reason }).inc();
    }

    /// One request refused over RATE_PER_SECOND.
    pub(crate) fn throttled(&self) {
        self.throttled.inc();
    }

    /// A connection was accepted.
    pub(crate) fn connection_opened(&self) {
        self.connections.inc();
    }

    /// A connection closed.
    pub(crate) fn connection_closed(&self) {
        self.connections.dec();
    }

    /// Connections open now.
    #[cfg(test)]
    pub(crate) fn connections_open(&self) -> i64 {
        self.connections.get()
    }

    /// Connections that had to wait for room under MAX_CONNECTIONS.
    #[cfg(test)]
    pub(crate) fn connections_waited(&self) -> u64 {
        self.connections_waited.get()
    }

    /// A connection had to wait for one of MAX_CONNECTIONS to close.
    pub(crate) fn connection_waited(&self) {
        self.connections_waited.inc();
    }

    /// Whether the server takes requests.
    pub(crate) fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Relaxed);
    }

    /// Whether the server is accepting requests and its output is not
    /// known to be misconfigured: backs readiness.
    pub fn is_ready(&self) -> bool {
        self.serving.load(Relaxed) && !self.misconfigured.load(Relaxed)
    }

    /// Whether the output's settings were last found wrong (`true`) or
    /// working (`false`).
    pub(crate) fn set_misconfigured(&self, misconfigured: bool) {
        self.misconfigured.store(misconfigured, Relaxed);
    }
}

/// The outputs' events.
impl SinkStats {
    /// A write of `readings` to the output file took `elapsed`;
    /// `ok` says whether it succeeded (a failed one is cut off again).
    pub(crate) fn wrote(&self, readings: usize, elapsed: Duration, ok: bool) {
        self.write_latency.observe(elapsed.as_secs_f64());
        if ok {
            self.readings_written.inc_by(readings as u64);
        } else {
            self.write_errors.inc();
        }
    }

    /// A request to the database is on its way.
    pub(crate) fn database_sending(&self) {
        self.remote_write.in_flight.inc();
    }

    /// The database answered with `status` (`2xx`, `4xx`, `429`, `5xx`,
    /// or `error` for no answer) after `elapsed`.
    pub(crate) fn database_answered(&self, status: &'static str, elapsed: Duration) {
        let rw = &self.remote_write;
        rw.in_flight.dec();
        rw.latency.observe(elapsed.as_secs_f64());
        rw.requests.get_or_create(&StatusLabel { status }).inc();
    }

    /// The database took `samples`: they are written.
    pub(crate) fn database_took(&self, samples: usize) {
        self.remote_write.samples.inc_by(samples as u64);
        self.readings_written.inc_by(samples as u64);
    }

    /// `requests` node requests pushed back because the database answered
    /// `status`.
    pub(crate) fn database_pushed_back(&self, status: &'static str, requests: usize) {
        self.remote_write.retries.get_or_create(&StatusLabel { status }).inc_by(requests as u64);
    }
}

/// The sink's totals at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SinkSummary {
    /// Requests answered OK.
    pub requests_accepted: u64,
    /// Readings in the requests answered OK.
    pub readings_accepted: u64,
    /// Requests refused as invalid, too large or unauthenticated.
    pub rejected: u64,
    /// Requests refused over RATE_PER_SECOND.
    pub throttled: u64,
    /// Retried batches answered OK without writing them again.
    pub duplicates: u64,
    /// Encoded bytes of every request received.
    pub bytes_received: u64,
    /// Readings written to the output file.
    pub readings_written: u64,
}

impl fmt::Display for SinkSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests={} accepted={} written={} rejected={} throttled={} duplicates={} bytes={}",
            self.requests_accepted,
            self.readings_accepted,
            self.readings_written,
            self.rejected,
            self.throttled,
            self.duplicates,
            self.bytes_received
        )
    }
}
