//! Errors of sending and receiving, and which of them are worth retrying.

use tonic::{Code, Status};

/// Why a batch was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The sink answered with a status that retrying cannot change.
    #[error("the batch was refused: {:?}: {}", .0.code(), .0.message())]
    Refused(Status),
    /// Every allowed attempt failed with a retryable status.
    #[error("gave up after {attempts} attempts, last: {:?}: {}", .last.code(), .last.message())]
    Exhausted {
        /// Attempts made, the first one included.
        attempts: usize,
        /// Status of the last attempt.
        last: Status,
    },
}

/// Whether a call that failed with `code` may succeed if sent again: the sink
/// was unreachable, busy or slow, or asked for the call again (ABORTED).
pub(crate) fn is_retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Aborted)
}

/// Why the sink refused a request. Each maps to one gRPC status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiveError {
    /// A reading has an empty `sensor_name`.
    #[error("item {index}: sensor_name is empty")]
    EmptySensorName {
        /// Position of the reading in the request.
        index: usize,
    },
    /// A reading has no `measurement`.
    #[error("item {index}: measurement is missing")]
    MissingMeasurement {
        /// Position of the reading in the request.
        index: usize,
    },
    /// A reading has no `measurement.sensor_value`.
    #[error("item {index}: measurement.sensor_value is missing")]
    MissingValue {
        /// Position of the reading in the request.
        index: usize,
    },
    /// A reading has no or an impossible `measurement.created_at`.
    #[error("item {index}: measurement.created_at is missing or out of range")]
    BadTimestamp {
        /// Position of the reading in the request.
        index: usize,
    },
    /// A reading falls in the same millisecond as an earlier reading of its
    /// sensor in the request, with another value: a database series holds
    /// one sample per millisecond, so one of them could not be stored.
    #[error(
        "item {index}: sensor {sensor:?} has another reading with another value in the same millisecond \
         ({millis} ms); a time series holds one sample per millisecond"
    )]
    SameMillisecond {
        /// Position of the later reading in the request.
        index: usize,
        /// Its sensor.
        sensor: String,
        /// The millisecond, since 1970.
        millis: i64,
    },
    /// A sensor name or node identity too long to be a database label value
    /// (VictoriaMetrics cuts longer ones, merging series; Mimir and Cortex
    /// refuse them).
    #[error("{what} is {bytes} bytes, longer than a label value in the database may be ({limit} bytes)")]
    LabelTooLong {
        /// Which: `item N: sensor_name` or `node_id`.
        what: String,
        /// Its length.
        bytes: usize,
        /// The most a label value may be.
        limit: usize,
    },
    /// A sensor name reads as a metric with labels a database would refuse.
    #[error("item {index}: {reason}")]
    BadLabels {
        /// Position of the reading in the request.
        index: usize,
        /// What is wrong with its labels.
        reason: String,
    },
    /// A reading older than REMOTE_WRITE_MAX_AGE: a database may drop it
    /// (past its retention) and still answer OK.
    #[error("item {index}: created_at is {age} before the database's clock, older than REMOTE_WRITE_MAX_AGE ({limit})")]
    TooOld {
        /// Position of the reading in the request.
        index: usize,
        /// How far before the database's clock, to the millisecond.
        age: humantime::Duration,
        /// REMOTE_WRITE_MAX_AGE.
        limit: humantime::Duration,
    },
    /// A reading further ahead of the database's clock than
    /// REMOTE_WRITE_MAX_AHEAD: a database may drop it and answer OK, or
    /// (Prometheus) take it and refuse every sample of the present after it.
    #[error(
        "item {index}: created_at is {ahead} after the database's clock, further than REMOTE_WRITE_MAX_AHEAD ({limit})"
    )]
    TooFarAhead {
        /// Position of the reading in the request.
        index: usize,
        /// How far after the database's clock, to the millisecond.
        ahead: humantime::Duration,
        /// REMOTE_WRITE_MAX_AHEAD.
        limit: humantime::Duration,
    },
    /// The request is larger than the sink accepts in one second.
    #[error("request of {bytes} bytes is larger than RATE_PER_SECOND ({limit})")]
    TooLarge {
        /// Encoded size of the request.
        bytes: usize,
        /// The configured bytes per second.
        limit: u32,
    },
    /// The request holds more readings than MAX_ITEMS_PER_REQUEST.
    #[error("request of {items} readings is over MAX_ITEMS_PER_REQUEST ({limit})")]
    TooManyItems {
        /// Readings in the request.
        items: usize,
        /// The configured maximum.
        limit: usize,
    },
    /// The request carries no or the wrong SINK_AUTH_TOKEN.
    #[error("missing or wrong token")]
    Unauthenticated,
    /// Accepting the request now would exceed RATE_PER_SECOND.
    #[error("over RATE_PER_SECOND: retry in {} ms", .retry_after.as_millis())]
    Throttled {
        /// When the request would fit.
        retry_after: std::time::Duration,
    },
    /// The output did not store the readings: nothing of them is in it.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The output writer has stopped, so nothing can be accepted.
    #[error("the sink is shutting down or its output failed")]
    WriterStopped,
}

impl From<ReceiveError> for Status {
    fn from(error: ReceiveError) -> Self {
        let message = error.to_string();
        match error {
            ReceiveError::Throttled { retry_after } | ReceiveError::Output(OutputError::Busy { retry_after, .. }) => {
                let mut status = Status::resource_exhausted(message);
                // At least 1 ms: 0 would read as "retry at once" and spin.
                let ms = retry_after.as_millis().max(1).to_string();
                if let Ok(value) = ms.parse() {
                    status.metadata_mut().insert(crate::wire::PUSHBACK_TRAILER, value);
                }
                status
            }
            ReceiveError::TooLarge { .. } => Status::failed_precondition(message),
            ReceiveError::WriterStopped | ReceiveError::Output(OutputError::Failed(_)) => Status::unavailable(message),
            ReceiveError::Unauthenticated => Status::unauthenticated(message),
            _ => Status::invalid_argument(message),
        }
    }
}

/// Why an output did not store a request's readings. Nothing of them is
/// stored in any case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    /// The write failed (a full disk, a file-size limit); a retry may
    /// succeed.
    #[error("the sink could not write its output: {0}")]
    Failed(std::sync::Arc<str>),
    /// The database is down or busy: come back after `retry_after`.
    #[error("the database cannot take the readings now: {message}; retry in {} ms", .retry_after.as_millis())]
    Busy {
        /// How long the node should wait.
        retry_after: std::time::Duration,
        /// What the database (or the connection) said.
        message: std::sync::Arc<str>,
    },
    /// The database refused the data for good (a 4xx answer).
    #[error("the database refused the readings: {0}")]
    Refused(std::sync::Arc<str>),
}

/// Why the sink could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound or read.
    #[error("cannot listen: {0}")]
    Listen(std::io::Error),
    /// The output folder or file could not be created or written.
    #[error("output {} (FILE_PATH): {source}", .path.display())]
    Output {
        /// The folder or file.
        path: std::path::PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The TLS settings cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The writer task ended abnormally.
    #[error("output writer failed: {0}")]
    Writer(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}
