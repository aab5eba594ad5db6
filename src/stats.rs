//! Counters that say what happened to every reading, shared by the stages
//! and exported as Prometheus metrics.

use std::{
    fmt,
    sync::{Mutex, atomic::AtomicU64},
    time::Instant,
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

/// Why readings were given up.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum DropReason {
    /// The sink answered with a status that retrying cannot change.
    Refused,
    /// Every allowed attempt failed.
    RetriesExhausted,
    /// Still held when the shutdown timeout ran out.
    Shutdown,
    /// Pushed out of a full queue by a newer reading (drop-oldest).
    OverflowOldest,
    /// Refused by a full queue (drop-newest).
    OverflowNewest,
    /// Evicted from a full spool.
    SpoolFull,
}

impl DropReason {
    /// Every reason, in the order the summary lists them.
    pub const ALL: [DropReason; 6] = [
        Self::Refused,
        Self::RetriesExhausted,
        Self::Shutdown,
        Self::OverflowOldest,
        Self::OverflowNewest,
        Self::SpoolFull,
    ];

    /// The reason's name in metrics and the summary.
    pub fn name(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Shutdown => "shutdown",
            Self::OverflowOldest => "overflow_oldest",
            Self::OverflowNewest => "overflow_newest",
            Self::SpoolFull => "spool_full",
        }
    }
}

impl EncodeLabelValue for DropReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        fmt::Write::write_str(encoder, self.name())
    }
}

/// Label of a metric split by drop reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: DropReason,
}

/// Label of a metric split by gRPC status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The code's canonical gRPC name, e.g. `UNAVAILABLE`.
    pub code: &'static str,
}

/// Label of readings a source could not take.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    /// The source: `host`, `file` or `exec`.
    pub source: &'static str,
    /// Why, e.g. `missing`, `not_an_integer`, `timeout`.
    pub reason: &'static str,
}

/// Label of a metric per source.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// The source: `host`, `file` or `exec`.
    pub source: &'static str,
}

/// Live counters of one node, shared by every stage.
///
/// Once the pipeline has returned, every produced reading is either acked or
/// dropped: `produced == acked + dropped`.
#[derive(Debug)]
pub struct NodeStats {
    /// Readings the sensors emitted.
    pub produced: Counter,
    /// Readings the sensors could not take on time because the pipeline
    /// was pushing back (OVERFLOW_POLICY=block); never produced.
    pub missed: Counter,
    /// Readings a source could not take (a missing file, a failed command),
    /// by source and reason; never produced.
    pub failed: Family<FailureLabel, Counter>,
    /// Every reading counted in `failed`, for the summary.
    failed_total: Counter,
    /// When each host, file or exec source last finished a read, in seconds
    /// since 1970: a source stuck in a read (a hung mount) stops moving it.
    pub last_read: Family<SourceLabel, Gauge<f64, AtomicU64>>,
    /// Readings handed to the transport at least once.
    pub sent: Counter,
    /// Batches handed to the transport at least once.
    pub batches_sent: Counter,
    /// Readings the sink acknowledged.
    pub acked: Counter,
    /// Batches the sink acknowledged.
    pub batches_acked: Counter,
    /// Readings given up, for any reason.
    pub dropped: Counter,
    /// Readings given up, by reason.
    pub dropped_by_reason: Family<ReasonLabel, Counter>,
    /// Attempts that repeated an earlier, failed attempt.
    pub retries: Counter,
    /// Retries, by the code of the failure that caused them.
    pub retries_by_code: Family<CodeLabel, Counter>,
    /// Batches the sink refused for good, by code.
    pub refused_by_code: Family<CodeLabel, Counter>,
    /// Retries that waited as long as the sink asked.
    pub pushbacks: Counter,
    /// Readings of this run written to the spool.
    pub spooled: Counter,
    /// Readings delivered from the spool, of this run or an earlier one.
    pub replayed: Counter,
    /// Readings of this run in the spool now.
    pub in_spool: Gauge,
    /// Wakes whoever waits for the spool to empty (the drain) each time
    /// readings leave it.
    pub unspooled: tokio::sync::Notify,
    /// Spool records found damaged and skipped.
    pub spool_damaged: Counter,
    /// Readings per batch sent.
    pub batch_size: Histogram,
    /// Seconds from a batch's first attempt to its outcome.
    pub send_latency: Histogram,
    /// Readings produced but neither acked nor dropped yet.
    held: Gauge,
    /// Readings acked per second, between the last two scrapes.
    send_rate: Gauge<f64, AtomicU64>,
    /// Acked count and time at the previous scrape, for `send_rate`.
    rate_base: Mutex<(Instant, u64)>,
}

impl Default for NodeStats {
    fn default() -> Self {
        Self {
            produced: Counter::default(),
            missed: Counter::default(),
            failed: Family::default(),
            failed_total: Counter::default(),
            last_read: Family::default(),
            sent: Counter::default(),
            batches_sent: Counter::default(),
            acked: Counter::default(),
            batches_acked: Counter::default(),
            dropped: Counter::default(),
            dropped_by_reason: Family::default(),
            retries: Counter::default(),
            retries_by_code: Family::default(),
            refused_by_code: Family::default(),
            pushbacks: Counter::default(),
            spooled: Counter::default(),
            replayed: Counter::default(),
            in_spool: Gauge::default(),
            unspooled: tokio::sync::Notify::new(),
            spool_damaged: Counter::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            send_latency: Histogram::new(exponential_buckets(0.0005, 4.0, 10)),
            held: Gauge::default(),
            send_rate: Gauge::default(),
            rate_base: Mutex::new((Instant::now(), 0)),
        }
    }
}

/// Adds `n` to `counter`.
pub fn count(counter: &Counter, n: usize) {
    counter.inc_by(n as u64);
}

impl NodeStats {
    /// Counts `n` readings given up for `reason`.
    pub fn drop_readings(&self, reason: DropReason, n: u64) {
        self.dropped.inc_by(n);
        self.dropped_by_reason.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }

    /// Counts `n` readings of this run as gone from the spool (delivered,
    /// refused or evicted), and wakes whoever waits for it to empty.
    pub fn unspool(&self, n: u64) {
        self.in_spool.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
        self.unspooled.notify_waiters();
    }

    /// Returns once none of this run's readings is in the spool.
    pub async fn spool_emptied(&self) {
        loop {
            let emptied = self.unspooled.notified();
            let mut emptied = std::pin::pin!(emptied);
            // Registered before the check, so no wake-up falls in between.
            emptied.as_mut().enable();
            if self.in_spool.get() <= 0 {
                return;
            }
            emptied.await;
        }
    }

    /// Counts one reading `source` could not take, for `reason`.
    pub fn read_failed(&self, source: &'static str, reason: &'static str) {
        self.failed.get_or_create(&FailureLabel { source, reason }).inc();
        self.failed_total.inc();
    }

    /// Counts one retry caused by a failure with `code`.
    pub fn retry(&self, code: tonic::Code) {
        self.retries.inc();
        self.retries_by_code.get_or_create(&CodeLabel { code: crate::wire::code_name(code) }).inc();
    }

    /// Counts a batch the sink refused for good with `code`.
    pub fn refuse(&self, code: tonic::Code) {
        self.refused_by_code.get_or_create(&CodeLabel { code: crate::wire::code_name(code) }).inc();
    }

    /// Counts an acknowledged batch of `n` readings.
    pub fn ack(&self, n: usize) {
        count(&self.acked, n);
        self.batches_acked.inc();
    }

    /// Counts as dropped every reading that is neither acked nor dropped yet:
    /// called once the pipeline can no longer deliver them.
    pub fn drop_unaccounted(&self) -> u64 {
        let s = self.snapshot();
        let missing = s.produced.saturating_sub(s.acked + s.dropped + s.in_spool);
        self.drop_readings(DropReason::Shutdown, missing);
        missing
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> Summary {
        Summary {
            produced: self.produced.get(),
            sent: self.sent.get(),
            acked: self.acked.get(),
            dropped: self.dropped.get(),
            retries: self.retries.get(),
            pushbacks: self.pushbacks.get(),
            missed: self.missed.get(),
            failed: self.failed_total.get(),
            spooled: self.spooled.get(),
            replayed: self.replayed.get(),
            in_spool: self.in_spool.get().max(0) as u64,
            dropped_by: DropReason::ALL
                .map(|reason| self.dropped_by_reason.get(&ReasonLabel { reason }).map_or(0, |counter| counter.get())),
        }
    }

    /// Brings the derived gauges up to date; called before each scrape.
    pub fn refresh(&self) {
        let s = self.snapshot();
        self.held.set(s.produced.saturating_sub(s.acked + s.dropped + s.in_spool) as i64);
        let mut base = self.rate_base.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = base.0.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            self.send_rate.set((s.acked - base.1) as f64 / elapsed);
        }
        *base = (Instant::now(), s.acked);
    }

    /// Registers every metric under the `telemetry_node` prefix.
    pub fn register(&self, registry: &mut Registry) {
        // Every label a counter can have is there from the start, at 0, so
        // that rates and alerts see 0 rather than nothing.
        for reason in DropReason::ALL {
            let _ = self.dropped_by_reason.get_or_create(&ReasonLabel { reason });
        }
        for code in crate::wire::CODES.into_iter().filter(|code| *code != tonic::Code::Ok) {
            let label = CodeLabel { code: crate::wire::code_name(code) };
            if crate::error::is_retryable(code) {
                let _ = self.retries_by_code.get_or_create(&label);
            } else {
                let _ = self.refused_by_code.get_or_create(&label);
            }
        }
        let r = registry.sub_registry_with_prefix("telemetry_node");
        r.register("readings_produced", "Readings the sensors emitted", self.produced.clone());
        let missed = self.missed.clone();
        r.register("readings_missed", "Readings not taken on time because the pipeline pushed back", missed);
        let failed = self.failed.clone();
        r.register("readings_failed", "Readings a source could not take, by source and reason", failed);
        r.register(
            "source_last_read_timestamp_seconds",
            "When each host, file or exec source last finished a read (a stuck read stops it)",
            self.last_read.clone(),
        );
        r.register("readings_sent", "Readings handed to the transport at least once", self.sent.clone());
        r.register("batches_sent", "Batches handed to the transport at least once", self.batches_sent.clone());
        r.register("readings_acked", "Readings the sink acknowledged", self.acked.clone());
        r.register("batches_acked", "Batches the sink acknowledged", self.batches_acked.clone());
        r.register("readings_dropped", "Readings given up, by reason", self.dropped_by_reason.clone());
        r.register(
            "retries",
            "Repeated attempts, by the code that failed the previous one",
            self.retries_by_code.clone(),
        );
        r.register("batches_refused", "Batches the sink refused for good, by code", self.refused_by_code.clone());
        r.register("pushbacks", "Retries that waited as long as the sink asked", self.pushbacks.clone());
        r.register("readings_spooled", "Readings of this run written to the spool", self.spooled.clone());
        r.register("readings_replayed", "Readings delivered from the spool", self.replayed.clone());
        r.register("readings_in_spool", "Readings of this run in the spool now", self.in_spool.clone());
        r.register("spool_damaged", "Spool records found damaged and skipped", self.spool_damaged.clone());
        r.register("readings_held", "Readings produced but not yet acked or dropped", self.held.clone());
        r.register("send_rate", "Readings acked per second since the previous scrape", self.send_rate.clone());
        r.register("batch_size", "Readings per batch sent", self.batch_size.clone());
        let latency = self.send_latency.clone();
        r.register_with_unit(
            "send_latency",
            "Time from a batch's first attempt to its outcome",
            Unit::Seconds,
            latency,
        );
    }
}

/// The node's totals at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Readings the sensors emitted.
    pub produced: u64,
    /// Readings handed to the transport at least once.
    pub sent: u64,
    /// Readings the sink acknowledged.
    pub acked: u64,
    /// Readings given up.
    pub dropped: u64,
    /// Repeated attempts.
    pub retries: u64,
    /// Retries that waited as long as the sink asked.
    pub pushbacks: u64,
    /// Readings the sensors could not take on time (never produced).
    pub missed: u64,
    /// Readings a source could not take: a missing file, a failed command
    /// (never produced).
    pub failed: u64,
    /// Readings of this run written to the spool.
    pub spooled: u64,
    /// Readings delivered from the spool.
    pub replayed: u64,
    /// Readings of this run still in the spool: `produced = acked + dropped
    /// + in_spool`.
    pub in_spool: u64,
    /// Readings given up, by reason, in the order of [`DropReason::ALL`].
    pub dropped_by: [u64; 6],
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "produced={} sent={} acked={} dropped={} retries={} pushbacks={} missed={}",
            self.produced, self.sent, self.acked, self.dropped, self.retries, self.pushbacks, self.missed
        )?;
        if self.dropped > 0 {
            let reasons: Vec<String> = DropReason::ALL
                .iter()
                .zip(self.dropped_by)
                .filter(|(_, n)| *n > 0)
                .map(|(reason, n)| format!("{}:{n}", reason.name()))
                .collect();
            write!(f, " dropped_by={}", reasons.join(","))?;
        }
        if self.failed > 0 {
            write!(f, " failed={}", self.failed)?;
        }
        if self.spooled + self.replayed + self.in_spool > 0 {
            write!(f, " spooled={} replayed={} in_spool={}", self.spooled, self.replayed, self.in_spool)?;
        }
        Ok(())
    }
}

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
pub struct RejectLabel {
    /// Why.
    pub reason: RejectReason,
}

/// Live counters of one sink.
#[derive(Debug)]
pub struct SinkStats {
    /// Requests answered OK.
    pub requests_accepted: Counter,
    /// Readings in the requests answered OK.
    pub readings_accepted: Counter,
    /// Requests refused, for any reason but throttling.
    pub rejected: Counter,
    /// Requests refused, by reason.
    pub rejected_by_reason: Family<RejectLabel, Counter>,
    /// Requests refused over RATE_PER_SECOND.
    pub throttled: Counter,
    /// Retried batches answered OK without writing them again.
    pub duplicates: Counter,
    /// Encoded bytes of every request received.
    pub bytes_received: Counter,
    /// Readings written to the output file.
    pub readings_written: Counter,
    /// Writes to the output that failed (and were cut off again).
    pub write_errors: Counter,
    /// Seconds one write of the buffer to the file took.
    pub write_latency: Histogram,
    /// Whether the server is accepting requests; backs readiness.
    pub serving: std::sync::atomic::AtomicBool,
    /// The remote-write output's counters.
    pub remote_write: RemoteWriteStats,
}

/// Label of a remote-write metric split by the database's answer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// `2xx`, `4xx`, `429`, `5xx`, or `error` (no answer: connection
    /// failed or timed out).
    pub status: &'static str,
}

/// The answers remote-write metrics are split by.
pub const REMOTE_WRITE_STATUSES: [&str; 5] = ["2xx", "4xx", "429", "5xx", "error"];

/// Counters of the remote-write output.
#[derive(Debug)]
pub struct RemoteWriteStats {
    /// Requests made to the database, by its answer.
    pub requests: Family<StatusLabel, Counter>,
    /// Samples the database took (answered 2xx).
    pub samples: Counter,
    /// Node requests pushed back because the database could not take them
    /// now, by the database's answer.
    pub retries: Family<StatusLabel, Counter>,
    /// Readings that a later reading of the same sensor in the same
    /// millisecond superseded (a series holds one sample per millisecond).
    pub superseded: Counter,
    /// Seconds from sending a request to the database to its answer.
    pub latency: Histogram,
    /// Requests to the database under way.
    pub in_flight: Gauge,
}

impl Default for RemoteWriteStats {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            samples: Counter::default(),
            retries: Family::default(),
            superseded: Counter::default(),
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
        let superseded = self.superseded.clone();
        r.register("samples_superseded", "Readings superseded within their millisecond", superseded);
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
            serving: std::sync::atomic::AtomicBool::new(false),
            remote_write: RemoteWriteStats::default(),
        }
    }
}

impl SinkStats {
    /// Counts one request refused for `reason`.
    pub fn reject(&self, reason: RejectReason) {
        self.rejected.inc();
        self.rejected_by_reason.get_or_create(&RejectLabel { reason }).inc();
    }

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
        let latency = self.write_latency.clone();
        r.register_with_unit("write_latency", "Time one buffer write to the output took", Unit::Seconds, latency);
        self.remote_write.register(r);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_drain_wakes_when_the_spool_empties_and_not_before() {
        let stats = std::sync::Arc::new(NodeStats::default());
        stats.in_spool.inc_by(5);
        let waiting = tokio::spawn({
            let stats = std::sync::Arc::clone(&stats);
            async move { stats.spool_emptied().await }
        });
        tokio::task::yield_now().await;
        stats.unspool(2);
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        assert!(!waiting.is_finished(), "three readings are still in the spool");
        stats.unspool(3);
        tokio::time::timeout(std::time::Duration::from_millis(1), waiting).await.unwrap().unwrap();
    }
}
