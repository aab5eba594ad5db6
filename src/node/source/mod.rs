//! Sources: where readings come from. Each source is a `Stream` driven by
//! its own interval timer; a lane's sources are merged into the one stream
//! its batcher takes.
//!
//! - [`simulated`]: the load generator, many sensors on one shared timer.
//! - [`host`]: the machine's vital signs, from /proc.
//! - [`file`]: files holding one integer each (/sys thermal zones, hwmon).
//! - [`exec`]: a command that prints `name value` lines.
//!
//! Host, file and exec are [`Probe`]s: something read once a tick, off the
//! runtime's worker threads. [`polled`] turns a probe into a source.

mod children;
pub(crate) mod exec;
pub(crate) mod file;
#[cfg(target_os = "linux")]
pub(crate) mod host;
pub mod simulated;
mod stamp;

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use children::adopt_orphans;
use futures::{Stream, StreamExt, stream::SelectAll};
pub(crate) use stamp::Stamps;
use tokio::time::MissedTickBehavior;
use tracing::warn;

use crate::{
    config::{ConfigError, NodeConfig},
    logging::Every,
    node::Ledger,
    reading::Reading,
};

/// The readings a source took at one tick.
#[derive(Debug)]
pub(crate) enum Readings {
    /// A tick of the simulated sensors, made as it is iterated.
    Simulated(simulated::Tick),
    /// A tick of a polled source.
    Polled(std::vec::IntoIter<Reading>),
}

impl Iterator for Readings {
    type Item = Reading;

    fn next(&mut self) -> Option<Reading> {
        match self {
            Self::Simulated(tick) => tick.next(),
            Self::Polled(readings) => readings.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Self::Simulated(tick) => tick.size_hint(),
            Self::Polled(readings) => readings.size_hint(),
        }
    }
}

impl ExactSizeIterator for Readings {}

impl Readings {
    /// Keeps only the next `n` readings.
    pub(crate) fn truncate(&mut self, n: usize) {
        match self {
            Self::Simulated(tick) => tick.truncate(n as u64),
            Self::Polled(readings) => {
                let kept: Vec<Reading> = readings.take(n).collect();
                *readings = kept.into_iter();
            }
        }
    }

    /// Passes over the next `n` readings (a simulated tick without making
    /// them).
    pub(crate) fn pass_over(&mut self, n: usize) {
        match self {
            Self::Simulated(tick) => tick.pass_over(n as u64),
            Self::Polled(readings) => {
                if let Some(last) = n.checked_sub(1) {
                    readings.nth(last);
                }
            }
        }
    }
}

/// One source, ready to be merged with others.
pub(crate) type Source = Pin<Box<dyn Stream<Item = Readings> + Send>>;

/// The readings of `sources`, each as soon as its source has it: a source
/// that stalls holds back no other, and each source's own order is kept.
pub(crate) fn merge(sources: Vec<Source>) -> SelectAll<Source> {
    futures::stream::select_all(sources)
}

/// What a probe took at one tick.
#[derive(Debug, Default)]
pub(crate) struct Round {
    /// Readings taken: sensor name and value.
    pub values: Vec<(&'static str, i64)>,
    /// Readings that could not be taken.
    pub failures: Vec<Failure>,
}

/// A reading, or a whole round, that could not be taken.
#[derive(Debug)]
pub(crate) struct Failure {
    /// Why, as a metric label: `missing`, `not_an_integer`, `timeout`, …
    pub reason: &'static str,
    /// What failed, for the log: a path, a command's message.
    pub detail: String,
}

impl Failure {
    /// A failure for `reason`, described by `detail`.
    pub(crate) fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }
}

/// Something read once a tick: the machine, a set of files, a command.
pub(crate) trait Probe: Send + 'static {
    /// The source's name in metrics and logs.
    const KIND: &'static str;

    /// Takes one round of readings. Blocking work runs on tokio's blocking
    /// threads, never on a worker.
    fn read(&mut self) -> impl Future<Output = Round> + Send;
}

/// The readings of `probe`, read every `period`, the first at once.
///
/// A tick that comes while the previous read is still running, or while the
/// pipeline pushes back, is skipped, as the simulated sensors skip theirs;
/// its readings (as many as the last round gave) are counted as missed.
/// Every reading of one round carries the round's number as its sequence
/// and the tick's time, so each sensor's sequence only grows, and each
/// round's time falls in a later millisecond than the round before
/// ([`Stamps`]). Failures are
/// counted under `readings_failed{source,reason}` and logged at most once a
/// minute per reason and subject (a file, a line).
pub(crate) fn polled<P: Probe>(probe: P, period: Duration, ledger: Arc<Ledger>) -> Source {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let state = Polled {
        probe,
        interval,
        stamps: Stamps::default(),
        round: 0,
        ledger,
        gates: HashMap::new(),
        first: None,
        skipped: 0,
        last_count: 0,
        waiting: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        loop {
            state.waiting = true;
            state.interval.tick().await;
            state.waiting = false;
            state.count_skipped();
            let created_at = state.stamps.next();
            // Counted as taken once begun (a stop mid-read, see `Drop`).
            let sequence = state.round;
            state.round += 1;
            let round = state.probe.read().await;
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            state.ledger.source_read(P::KIND, now.as_secs_f64());
            state.report(round.failures);
            if round.values.is_empty() {
                continue;
            }
            let readings: Vec<Reading> = round
                .values
                .into_iter()
                .map(|(sensor, value)| Reading { sensor, sequence, value, created_at })
                .collect();
            state.ledger.produced(readings.len() as u64);
            state.last_count = readings.len() as u64;
            return Some((Readings::Polled(readings.into_iter()), state));
        }
    }))
}

/// The state of a [`polled`] source.
struct Polled<P> {
    /// What is read.
    probe: P,
    /// The source's timer.
    interval: tokio::time::Interval,
    /// The rounds' times, each in a millisecond of its own.
    stamps: Stamps,
    /// Rounds read so far: the next readings' sequence.
    round: u64,
    /// Where readings and failures are counted.
    ledger: Arc<Ledger>,
    /// One log gate per failure reason and subject (a file, a line), up to
    /// [`MOST_GATES`]; then one per reason.
    gates: HashMap<(&'static str, String), Every>,
    /// When the first tick fired: tick k was due at `first + k × period`.
    first: Option<tokio::time::Instant>,
    /// Ticks skipped so far, counted.
    skipped: u64,
    /// Readings the last round that gave any gave.
    last_count: u64,
    /// Whether the source is waiting for its timer: it is being polled, so a
    /// tick due since is the timer's, not held back.
    waiting: bool,
}

/// When the sources stop while the pipeline still pushes back, no later
/// round counts the ticks skipped meanwhile: they are counted here, as
/// [`Polled::count_skipped`] counts them, those due a period or more before
/// the stop (one due later would have been read on time), however long
/// after it the source is dropped; none if it was waiting for its timer
/// (a tick that fell due as it stopped is not a miss).
impl<P> Drop for Polled<P> {
    fn drop(&mut self) {
        let Some(first) = self.first.filter(|_| !self.waiting) else { return };
        let period = self.interval.period().as_nanos().max(1);
        let until = self.ledger.sources_due_until();
        let past = u64::try_from(until.saturating_duration_since(first).as_nanos() / period).unwrap_or(u64::MAX);
        // Ticks 0..past were due a period ago or more; rounds 0..self.round
        // took theirs (the last may still be reading).
        let skipped = past.saturating_sub(self.round);
        if skipped > self.skipped {
            self.ledger.missed((skipped - self.skipped).saturating_mul(self.last_count));
        }
    }
}

/// Failure subjects a source keeps a log gate for.
const MOST_GATES: usize = 64;

impl<P: Probe> Polled<P> {
    /// Counts as missed, at the last productive round's count, the readings
    /// of the ticks due so far that no round took (a read that ran past the
    /// period, or the pipeline pushing back). Called as a round begins: the
    /// ticks due are those up to now, the rounds taken those before and this
    /// one (a round that failed was taken: its readings count as failed).
    fn count_skipped(&mut self) {
        let now = tokio::time::Instant::now();
        let first = *self.first.get_or_insert(now);
        let period = self.interval.period().as_nanos().max(1);
        let due = u64::try_from(now.saturating_duration_since(first).as_nanos() / period).unwrap_or(u64::MAX);
        // Ticks 0..=due were due; rounds 0..=self.round (this one) took theirs.
        let skipped = due.saturating_sub(self.round);
        if skipped > self.skipped {
            self.ledger.missed((skipped - self.skipped).saturating_mul(self.last_count));
            self.skipped = skipped;
        }
    }

    /// Counts `failures` and logs each reason at most once a minute.
    fn report(&mut self, failures: Vec<Failure>) {
        for failure in failures {
            self.ledger.read_failed(P::KIND, failure.reason);
            let mut key = (failure.reason, failure.detail.clone());
            if self.gates.len() >= MOST_GATES && !self.gates.contains_key(&key) {
                key.1.clear();
            }
            let gate = self.gates.entry(key).or_insert_with(|| Every::new(Duration::from_secs(60)));
            if let Some(suppressed) = gate.ready() {
                warn!(
                    message = "A source could not take a reading.",
                    source = P::KIND,
                    reason = failure.reason,
                    error = %failure.detail,
                    suppressed,
                );
            }
        }
    }
}

/// Runs blocking `read` on tokio's blocking threads, handing it `state` and
/// taking it back: how the host and file probes read without holding up a
/// worker thread.
async fn off_the_runtime<S: Send + 'static>(
    state: &mut Option<S>,
    read: fn(&mut S) -> Round,
    kind: &'static str,
) -> Round {
    let Some(mut taken) = state.take() else {
        // Only if an earlier read panicked: there is nothing left to read with.
        return Round { values: Vec::new(), failures: vec![Failure::new("unreadable", format!("{kind} source lost"))] };
    };
    match tokio::task::spawn_blocking(move || {
        let round = read(&mut taken);
        (taken, round)
    })
    .await
    {
        Ok((taken, round)) => {
            *state = Some(taken);
            round
        }
        Err(error) => Round { values: Vec::new(), failures: vec![Failure::new("unreadable", error.to_string())] },
    }
}

/// The sources `config` asks for, dealt into its lanes: lane i gets the
/// i-th share of the simulated sensors; the host, file and exec sources
/// (those set, in that order) go to lanes 0, 1, 2, … round-robin. Each source lives in one
/// lane, so each sensor's readings keep their order.
pub(crate) fn for_lanes(config: &NodeConfig, ledger: &Arc<Ledger>) -> Result<Vec<Vec<Source>>, ConfigError> {
    let mut lanes: Vec<Vec<Source>> = config
        .lanes()
        .into_iter()
        .map(|names| {
            if names.is_empty() {
                return Vec::new();
            }
            let sensors = simulated::Sensors::new(names, config.sensor_rate, Arc::clone(ledger));
            vec![Box::pin(sensors.map(Readings::Simulated)) as Source]
        })
        .collect();
    let mut polled_sources = Vec::new();
    #[cfg(target_os = "linux")]
    if let Some(interval) = config.host_interval {
        polled_sources.push(polled(host::Host::new(), interval.into(), Arc::clone(ledger)));
    }
    let (files, skipped) = config.file_sensors_and_skipped()?;
    for path in &skipped {
        tracing::warn!(
            message = "FILE_SENSORS: a glob matched a path that is not UTF-8; it is left out, as no sensor name can hold it.",
            path = %path.to_string_lossy(),
        );
    }
    let owned = config.owned_names(&files)?;
    if !files.is_empty() {
        polled_sources.push(polled(file::Files::new(files), config.file_interval.into(), Arc::clone(ledger)));
    }
    if let Some(argv) = config.exec_argv() {
        let exec = exec::Exec::new(argv, config.exec_timeout.into(), config.exec_env(), owned);
        polled_sources.push(polled(exec, config.exec_interval.into(), Arc::clone(ledger)));
    }
    let count = lanes.len();
    for (i, source) in polled_sources.into_iter().enumerate() {
        lanes[i % count].push(source);
    }
    Ok(lanes)
}

#[cfg(test)]
mod tests;
