//! Every refusal the sink makes is counted by reason and logged, at most
//! one line a second per reason, so a hostile client cannot flood the log.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tonic::Status;
use tracing::warn;

use crate::logging::Every;
use crate::receiver::stats::{RejectReason, SinkStats};

/// Counts and logs refused requests.
#[derive(Debug)]
pub(crate) struct Refusals {
    /// Where refusals are counted.
    stats: Arc<SinkStats>,
    /// One log gate per reason.
    gates: Mutex<HashMap<RejectReason, Every>>,
}

impl Refusals {
    /// Refusals counted in `stats`.
    pub(crate) fn new(stats: Arc<SinkStats>) -> Self {
        Self { stats, gates: Mutex::default() }
    }

    /// Counts a request refused for `reason` with `status`, and logs it
    /// unless a line for the same reason went out within the last second.
    pub(crate) fn refuse(&self, reason: RejectReason, status: &Status) {
        self.stats.reject(reason);
        let mut gates = self.gates.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(suppressed) = gates.entry(reason).or_insert_with(Every::second).ready() {
            warn!(
                message = "Refused a request.",
                reason = reason.name(),
                code = crate::wire::code_name(status.code()),
                error = status.message(),
                suppressed,
            );
        }
    }
}
