//! The node's books: what happened to every reading, kept by one type whose
//! methods are the events (produced, sent, acked, dropped, spooled,
//! evicted, replayed), and exported as Prometheus metrics.
//!
//! This run's readings balance once the pipeline has returned:
//! `produced = acked + dropped + in_spool`. Readings that an earlier run
//! left in the spool were produced by that run, so what becomes of them is
//! counted apart (`earlier_acked`, `earlier_dropped`), and each run's books
//! balance on their own.

use std::{
    fmt,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
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
struct ReasonLabel {
    /// Why.
    reason: DropReason,
}

/// Label of a metric split by gRPC status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    /// The code's canonical gRPC name, e.g. `UNAVAILABLE`.
    code: &'static str,
}

/// Label of readings a source could not take.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabel {
    /// The source: `host`, `file` or `exec`.
    source: &'static str,
    /// Why, e.g. `missing`, `not_an_integer`, `timeout`.
    reason: &'static str,
}

/// Label of a metric per source.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    /// The source: `host`, `file` or `exec`.
    source: &'static str,
}

/// Why an earlier run's readings are given up: refused when replayed, or
/// evicted from a full spool.
const EARLIER_DROP_REASONS: [DropReason; 2] = [DropReason::Refused, DropReason::SpoolFull];

/// The count of `family` for `reason`, 0 if it has none yet.
fn count(family: &Family<ReasonLabel, Counter>, reason: DropReason) -> u64 {
    family.get(&ReasonLabel { reason }).map_or(0, |counter| counter.get())
}

/// Which run produced a batch in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// This one: its readings are in this run's books.
    This,
    /// An earlier one: its readings are counted apart.
    Earlier,
}

/// The books of one node, shared by every stage.
///
/// Every counter is private: stages report events, and the ledger keeps
/// the identity `produced = acked + dropped + in_spool` (once
/// [`Ledger::settle`] has run) and the breakdowns that sum to it.
#[derive(Debug)]
pub struct Ledger {
    /// Readings the sources emitted.
    produced: Counter,
    /// Readings the sources could not take on time because the pipeline
    /// was pushing back (OVERFLOW_POLICY=block); never produced.
    missed: Counter,
    /// Readings a source could not take (a missing file, a failed command),
    /// by source and reason; never produced.
    failed: Family<FailureLabel, Counter>,
    /// Every reading counted in `failed`, for the summary.
    failed_total: Counter,
    /// When each host, file or exec source last finished a read, in seconds
    /// since 1970: a source stuck in a read (a hung mount) stops moving it.
    last_read: Family<SourceLabel, Gauge<f64, AtomicU64>>,
    /// Readings handed to the transport at least once.
    sent: Counter,
    /// Batches handed to the transport at least once.
    batches_sent: Counter,
    /// Readings of this run the sink acknowledged.
    acked: Counter,
    /// Batches of this run the sink acknowledged.
    batches_acked: Counter,
    /// Readings of this run given up, by reason (their sum is the total:
    /// kept once, so the two cannot disagree).
    dropped_by_reason: Family<ReasonLabel, Counter>,
    /// Readings of earlier runs, replayed from the spool, that the sink
    /// acknowledged.
    earlier_acked: Counter,
    /// Readings of earlier runs given up, by reason (one of
    /// [`EARLIER_DROP_REASONS`]).
    earlier_dropped: Family<ReasonLabel, Counter>,
    /// Attempts that repeated an earlier, failed attempt.
    retries: Counter,
    /// Retries, by the code of the failure that caused them.
    retries_by_code: Family<CodeLabel, Counter>,
    /// Batches the sink refused for good, by code.
    refused_by_code: Family<CodeLabel, Counter>,
    /// Retries that waited as long as the sink asked.
    pushbacks: Counter,
    /// Readings of this run written to the spool.
    spooled: Counter,
    /// Readings delivered from the spool, of this run or an earlier one.
    replayed: Counter,
    /// Readings of this run in the spool now.
    in_spool: Gauge,
    /// Wakes whoever waits for the spool to empty (the drain) each time
    /// readings leave it.
    unspooled: tokio::sync::Notify,
    /// Spool records found damaged and skipped.
    spool_damaged: Counter,
    /// Readings per batch sent.
    batch_size: Histogram,
    /// Seconds from a batch's first attempt to its outcome.
    send_latency: Histogram,
    /// Readings acked per second, between the last two scrapes.
    send_rate: Gauge<f64, AtomicU64>,
    /// Acked count and time at the previous scrape, for `send_rate`.
    rate_base: Mutex<(Instant, u64)>,
    /// When the sources were told to stop: ticks due after it are not
    /// missed, however late a source is dropped.
    sources_stopped: std::sync::OnceLock<tokio::time::Instant>,
}

impl Default for Ledger {
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
            dropped_by_reason: Family::default(),
            earlier_acked: Counter::default(),
            earlier_dropped: Family::default(),
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
            send_rate: Gauge::default(),
            rate_base: Mutex::new((Instant::now(), 0)),
            sources_stopped: std::sync::OnceLock::new(),
        }
    }
}

/// The sources' events.
impl Ledger {
    /// `n` readings emitted by a source.
    pub(crate) fn produced(&self, n: u64) {
        self.produced.inc_by(n);
    }

    /// `n` readings a source could not take on time (never produced).
    pub(crate) fn missed(&self, n: u64) {
        self.missed.inc_by(n);
    }

    /// The sources are told to stop now.
    pub(crate) fn stop_sources(&self) {
        let _ = self.sources_stopped.set(tokio::time::Instant::now());
    }

    /// Until when a source dropped now was due to take readings: now, or
    /// the moment the sources were told to stop.
    pub(crate) fn sources_due_until(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        self.sources_stopped.get().map_or(now, |stopped| now.min(*stopped))
    }

    /// One reading `source` could not take, for `reason` (never produced).
    pub(crate) fn read_failed(&self, source: &'static str, reason: &'static str) {
        self.failed.get_or_create(&FailureLabel { source, reason }).inc();
        self.failed_total.inc();
    }

    /// `source` finished a read at `at` seconds since 1970.
    pub(crate) fn source_read(&self, source: &'static str, at: f64) {
        self.last_read.get_or_create(&SourceLabel { source }).set(at);
    }
}

/// The sender's events.
impl Ledger {
    /// A batch of `readings` handed to the transport for the first time.
    pub(crate) fn sending(&self, readings: usize) {
        self.sent.inc_by(readings as u64);
        self.batches_sent.inc();
        self.batch_size.observe(readings as f64);
    }

    /// A batch's outcome came `elapsed` after its first attempt.
    pub(crate) fn answered(&self, elapsed: Duration) {
        self.send_latency.observe(elapsed.as_secs_f64());
    }

    /// An attempt failed with `code` and will be repeated.
    pub(crate) fn retried(&self, code: tonic::Code) {
        self.retries.inc();
        self.retries_by_code.get_or_create(&CodeLabel { code: crate::wire::code_name(code) }).inc();
    }

    /// The sink asked for a pause, and got it.
    pub(crate) fn pushed_back(&self) {
        self.pushbacks.inc();
    }

    /// A batch of `n` readings of this run acknowledged.
    pub(crate) fn acked(&self, n: usize) {
        self.acked.inc_by(n as u64);
        self.batches_acked.inc();
    }

    /// A batch of `n` readings of this run refused for good with `code`.
    pub(crate) fn refused(&self, code: tonic::Code, n: u64) {
        self.count_refusal(code);
        self.dropped(DropReason::Refused, n);
    }

    /// `n` readings of this run given up for `reason`.
    pub(crate) fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped_by_reason.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }

    /// One batch refused for good with `code`, of this run or an earlier one.
    fn count_refusal(&self, code: tonic::Code) {
        self.refused_by_code.get_or_create(&CodeLabel { code: crate::wire::code_name(code) }).inc();
    }
}

/// The spool's events.
impl Ledger {
    /// `n` readings of this run written to the spool.
    pub(crate) fn spooled(&self, n: usize) {
        self.spooled.inc_by(n as u64);
        self.in_spool.inc_by(n as i64);
    }

    /// `n` readings of `run` evicted from a full spool.
    pub(crate) fn evicted(&self, run: Run, n: u64) {
        self.settled_from_spool(run, n, Err(DropReason::SpoolFull));
    }

    /// `n` readings of `run` replayed from the spool and acknowledged.
    pub(crate) fn replay_acked(&self, run: Run, n: usize) {
        self.replayed.inc_by(n as u64);
        self.settled_from_spool(run, n as u64, Ok(()));
    }

    /// `n` spooled readings of `run` refused for good with `code`.
    pub(crate) fn replay_refused(&self, run: Run, code: tonic::Code, n: u64) {
        self.count_refusal(code);
        self.settled_from_spool(run, n, Err(DropReason::Refused));
    }

    /// A damaged spool record skipped.
    pub(crate) fn damaged(&self) {
        self.spool_damaged.inc();
    }

    /// Readings of this run in the spool now.
    pub(crate) fn in_spool(&self) -> u64 {
        self.in_spool.get().max(0) as u64
    }

    /// Returns once none of this run's readings is in the spool.
    pub(crate) async fn spool_emptied(&self) {
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

    /// `n` readings of `run` left the spool, acked or dropped.
    fn settled_from_spool(&self, run: Run, n: u64, outcome: Result<(), DropReason>) {
        match (run, outcome) {
            (Run::This, outcome) => {
                self.in_spool.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
                match outcome {
                    Ok(()) => self.acked(n as usize),
                    Err(reason) => self.dropped(reason, n),
                }
                self.unspooled.notify_waiters();
            }
            (Run::Earlier, Ok(())) => {
                self.earlier_acked.inc_by(n);
            }
            (Run::Earlier, Err(reason)) => {
                self.earlier_dropped.get_or_create(&ReasonLabel { reason }).inc_by(n);
            }
        }
    }
}

impl Ledger {
    /// Closes the books: every reading of this run that is neither acked,
    /// nor dropped, nor in the spool can no longer be delivered, and is
    /// counted as dropped at shutdown. Returns how many that was. Called
    /// once no stage can report any more.
    pub(crate) fn settle(&self) -> u64 {
        let s = self.snapshot();
        let missing = s.produced.saturating_sub(s.acked + s.dropped + s.in_spool);
        self.dropped(DropReason::Shutdown, missing);
        missing
    }

    /// This run's drops, by reason, in the order of [`DropReason::ALL`].
    fn dropped_by(&self) -> [u64; 6] {
        DropReason::ALL.map(|reason| count(&self.dropped_by_reason, reason))
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> Summary {
        let dropped_by = self.dropped_by();
        Summary {
            produced: self.produced.get(),
            sent: self.sent.get(),
            acked: self.acked.get(),
            dropped: dropped_by.iter().sum(),
            retries: self.retries.get(),
            pushbacks: self.pushbacks.get(),
            missed: self.missed.get(),
            failed: self.failed_total.get(),
            spooled: self.spooled.get(),
            replayed: self.replayed.get(),
            in_spool: self.in_spool(),
            dropped_by,
            earlier_acked: self.earlier_acked.get(),
            earlier_dropped: EARLIER_DROP_REASONS.iter().map(|reason| count(&self.earlier_dropped, *reason)).sum(),
        }
    }

    /// Brings the derived gauges up to date; called before each scrape.
    pub fn refresh(&self) {
        let acked = self.acked.get();
        let mut base = self.rate_base.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = base.0.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            self.send_rate.set((acked - base.1) as f64 / elapsed);
        }
        *base = (Instant::now(), acked);
    }

    /// Registers every metric under the `telemetry_node` prefix.
    ///
    /// The books (produced, acked, dropped by reason, in the spool, held)
    /// are read once per scrape, produced last (see [`Books`]), so that a
    /// scrape shows `produced = acked + dropped + in_spool + held` while
    /// the node runs.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        // Every label a counter can have is there from the start, at 0, so
        // that rates and alerts see 0 rather than nothing.
        for reason in DropReason::ALL {
            let _ = self.dropped_by_reason.get_or_create(&ReasonLabel { reason });
        }
        for reason in EARLIER_DROP_REASONS {
            let _ = self.earlier_dropped.get_or_create(&ReasonLabel { reason });
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
        r.register_collector(Box::new(Books(Arc::clone(self))));
        let missed = self.missed.clone();
        r.register("readings_missed", "Readings not taken on time because the pipeline pushed back", missed);
        let failed = self.failed.clone();
        r.register("readings_failed", "Readings a source could not take, by source and reason", failed);
        r.register(
            "source_last_read_timestamp_seconds",
            "When each host, file or exec source last finished a read (a stuck read stops it)",
            self.last_read.clone(),
        );
        r.register("readings_sent", "Readings of this run that went on the wire at least once", self.sent.clone());
        r.register("batches_sent", "Requests of this run's readings sent at least once", self.batches_sent.clone());
        r.register("batches_acked", "Batches the sink acknowledged", self.batches_acked.clone());
        let earlier_acked = self.earlier_acked.clone();
        r.register("earlier_run_readings_acked", "Readings of earlier runs replayed and acknowledged", earlier_acked);
        let earlier_dropped = self.earlier_dropped.clone();
        r.register("earlier_run_readings_dropped", "Readings of earlier runs given up, by reason", earlier_dropped);
        r.register(
            "retries",
            "Attempts repeated after a failure (not a pushback), by the code that failed the previous one",
            self.retries_by_code.clone(),
        );
        r.register("batches_refused", "Batches the sink refused for good, by code", self.refused_by_code.clone());
        r.register("pushbacks", "Retries that waited as long as the sink asked", self.pushbacks.clone());
        r.register("readings_spooled", "Readings of this run written to the spool", self.spooled.clone());
        r.register("readings_replayed", "Readings delivered from the spool", self.replayed.clone());
        r.register("spool_damaged", "Spool records found damaged and skipped", self.spool_damaged.clone());
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

/// The books as metrics, read once per scrape.
#[derive(Debug)]
struct Books(Arc<Ledger>);

impl Collector for Books {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let ledger = &self.0;
        // Produced is read last: a reading leaves `held` for acked, dropped
        // or the spool, and leaves the spool before it is counted as acked
        // or dropped, so what is read first never exceeds what is produced
        // after it, and the page balances with `held` the difference. The
        // drops are summed from the reasons the page shows.
        let acked = ledger.acked.get();
        let dropped_by = ledger.dropped_by();
        let in_spool = ledger.in_spool();
        let produced = ledger.produced.get();
        let held = produced.saturating_sub(acked + dropped_by.iter().sum::<u64>() + in_spool);
        let counters = [
            ("readings_produced", "Readings the sources emitted", produced),
            ("readings_acked", "Readings of this run the sink acknowledged", acked),
        ];
        for (name, help, value) in counters {
            ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        let help = "Readings of this run given up, by reason";
        let mut dropped = encoder.encode_descriptor("readings_dropped", help, None, MetricType::Counter)?;
        for (reason, value) in DropReason::ALL.into_iter().zip(dropped_by) {
            ConstCounter::new(value).encode(dropped.encode_family(&ReasonLabel { reason })?)?;
        }
        let gauges = [
            ("readings_in_spool", "Readings of this run in the spool now", in_spool),
            ("readings_held", "Readings produced but not yet acked, dropped or spooled", held),
        ];
        for (name, help, value) in gauges {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
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
    /// Readings of earlier runs, replayed from the spool and acknowledged.
    pub earlier_acked: u64,
    /// Readings of earlier runs given up.
    pub earlier_dropped: u64,
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
        if self.earlier_acked + self.earlier_dropped > 0 {
            write!(f, " earlier_acked={} earlier_dropped={}", self.earlier_acked, self.earlier_dropped)?;
        }
        Ok(())
    }
}

#[cfg(test)]
impl Ledger {
    /// Readings `source` could not take for `reason`.
    pub(crate) fn failures(&self, source: &'static str, reason: &'static str) -> u64 {
        self.failed.get(&FailureLabel { source, reason }).map_or(0, |counter| counter.get())
    }

    /// When `source` last finished a read, in seconds since 1970.
    pub(crate) fn last_read(&self, source: &'static str) -> f64 {
        self.last_read.get(&SourceLabel { source }).map_or(0.0, |gauge| gauge.get())
    }
}

#[cfg(test)]
mod tests;
