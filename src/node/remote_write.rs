//! A node writing to the database itself (`DESTINATION=remote-write`): each
//! batch becomes one Prometheus remote-write request, with the series, the
//! checks and the answers the sink's remote-write output uses. The node's
//! retry, pushback and spool then serve the database as they serve a sink.

use std::time::Duration;

use prost::Message;
use tonic::Status;

use super::{
    codec::{Outgoing, Payload},
    transport::Transport,
};
use crate::{
    config::{ConfigError, NodeConfig},
    database::{Answer, Database},
    proto::SensorValuesRequest,
    receiver::output::remote_write::{series, transcode::transcode},
};

/// Delivers one batch to the database, once, and says what its answer means
/// in the terms the node's sender knows: OK only for a 2xx.
#[derive(Debug, Clone)]
pub struct RemoteWriteTransport {
    /// The database.
    database: Database,
    /// REMOTE_WRITE_METRIC and the window of times sent.
    rules: series::SeriesRules,
}

impl RemoteWriteTransport {
    /// The transport to the database `config` names.
    pub fn from_config(config: &NodeConfig) -> Result<Self, ConfigError> {
        let agent = concat!("telemetry-node/", env!("CARGO_PKG_VERSION"));
        // The configuration's check passed, so what fails here is TLS.
        let database = Database::new(&config.remote_write, agent).ok_or_else(|| {
            let cert = config.remote_write.tls_client_cert.as_ref().or(config.remote_write.tls_ca_cert.as_ref());
            let variable = if config.remote_write.tls_client_cert.is_some() {
                "REMOTE_WRITE_TLS_CLIENT_CERT"
            } else {
                "REMOTE_WRITE_TLS_CA_CERT"
            };
            crate::config::invalid(variable, cert.map(|path| path.display().to_string()).unwrap_or_default())
        })?;
        let rules = series::SeriesRules::new(&config.remote_write);
        Ok(Self { database, rules })
    }

    /// The series of `request`, or the reason it cannot be sent (a reading
    /// outside REMOTE_WRITE_MAX_AGE / REMOTE_WRITE_MAX_AHEAD, two values of
    /// a sensor in one millisecond): INVALID_ARGUMENT, never retried.
    /// The window is the database's clock's, not the node's: a node whose
    /// clock is far off would otherwise send readings VictoriaMetrics drops
    /// and answers OK for, or that poison Prometheus for every other writer.
    fn series(&self, request: &Outgoing, clock_offset_ms: i64) -> Result<Vec<u8>, Status> {
        let mut bytes = Vec::with_capacity(request.encoded_len());
        request.write_to(&mut bytes);
        let window = self.rules.window_offset(clock_offset_ms);
        // The node always sends its identity: no other node label.
        if let Some(series) = transcode(&bytes, &self.rules.metric, window, "") {
            return Ok(series.bytes);
        }
        let decoded = SensorValuesRequest::decode(bytes.as_slice())
            .map_err(|error| Status::internal(format!("the node's own batch cannot be read back: {error}")))?;
        series::to_series(&decoded, &self.rules.metric, window, "").map_err(Status::from)
    }
}

/// Failures are not logged here: the sender logs every failed attempt with
/// its status, which carries the database's answer.
impl Transport for RemoteWriteTransport {
    async fn send(&self, request: Outgoing) -> Result<(), Status> {
        let offset = self.database.clock_offset().await.map_err(Status::unavailable)?;
        let series = self.series(&request, offset)?;
        match self.database.post(&series).await.0 {
            Answer::Took => Ok(()),
            Answer::Busy { retry_after: Some(wait), message, .. } => Err(pushed_back(message, wait)),
            Answer::Busy { retry_after: None, message, .. } | Answer::Misconfigured(message) => {
                Err(Status::unavailable(message))
            }
            Answer::Refused(message) => Err(Status::invalid_argument(message)),
        }
    }

    fn destination(&self) -> String {
        self.database.shown_url()
    }
}

/// RESOURCE_EXHAUSTED asking the sender to wait `wait` (the database's
/// `Retry-After`, at most a minute), as a sink's pushback does.
fn pushed_back(message: String, wait: Duration) -> Status {
    let mut status = Status::resource_exhausted(message);
    let ms = wait.min(Duration::from_secs(60)).as_millis().max(1).to_string();
    if let Ok(value) = ms.parse() {
        status.metadata_mut().insert(crate::wire::PUSHBACK_TRAILER, value);
    }
    status
}
