//! Counters that say what happened to every reading a node produced.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

/// Live counters of one node, shared by every stage.
///
/// Once the pipeline has returned, every produced reading is either acked or
/// dropped: `produced == acked + dropped`.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Readings the sensors emitted.
    pub produced: AtomicU64,
    /// Readings handed to the transport at least once.
    pub sent: AtomicU64,
    /// Readings the sink acknowledged.
    pub acked: AtomicU64,
    /// Readings given up: rejected by the sink, out of retries, or still held
    /// when the shutdown timeout ran out.
    pub dropped: AtomicU64,
    /// Attempts that repeated an earlier, failed attempt.
    pub retries: AtomicU64,
}

/// Adds `n` to `counter`.
pub fn count(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Relaxed);
}

impl NodeStats {
    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> Summary {
        Summary {
            produced: self.produced.load(Relaxed),
            sent: self.sent.load(Relaxed),
            acked: self.acked.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            retries: self.retries.load(Relaxed),
        }
    }

    /// Counts as dropped every reading that is neither acked nor dropped yet:
    /// called once the pipeline can no longer deliver them.
    pub fn drop_unaccounted(&self) -> u64 {
        let s = self.snapshot();
        let missing = s.produced.saturating_sub(s.acked + s.dropped);
        self.dropped.fetch_add(missing, Relaxed);
        missing
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
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "produced={} sent={} acked={} dropped={} retries={}",
            self.produced, self.sent, self.acked, self.dropped, self.retries
        )
    }
}

/// Live counters of one sink.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Requests answered OK.
    pub requests_accepted: AtomicU64,
    /// Readings in the requests answered OK.
    pub readings_accepted: AtomicU64,
    /// Requests refused as invalid.
    pub rejected: AtomicU64,
    /// Requests refused over RATE_PER_SECOND.
    pub throttled: AtomicU64,
    /// Encoded bytes of every request received.
    pub bytes_received: AtomicU64,
    /// Readings written to the output file.
    pub readings_written: AtomicU64,
}

impl SinkStats {
    /// A copy for reporting.
    pub fn snapshot(&self) -> SinkSummary {
        SinkSummary {
            requests_accepted: self.requests_accepted.load(Relaxed),
            readings_accepted: self.readings_accepted.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            throttled: self.throttled.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            readings_written: self.readings_written.load(Relaxed),
        }
    }
}

/// The sink's totals at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SinkSummary {
    /// Requests answered OK.
    pub requests_accepted: u64,
    /// Readings in the requests answered OK.
    pub readings_accepted: u64,
    /// Requests refused as invalid.
    pub rejected: u64,
    /// Requests refused over RATE_PER_SECOND.
    pub throttled: u64,
    /// Encoded bytes of every request received.
    pub bytes_received: u64,
    /// Readings written to the output file.
    pub readings_written: u64,
}

impl fmt::Display for SinkSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests={} accepted={} written={} rejected={} throttled={} bytes={}",
            self.requests_accepted,
            self.readings_accepted,
            self.readings_written,
            self.rejected,
            self.throttled,
            self.bytes_received
        )
    }
}
