//! The remote-write output (`OUTPUT=remote-write`): each accepted request
//! becomes remote-write series ([`series`], or straight from its bytes,
//! [`transcode`]), which [`writer`] gathers from many requests into blocks
//! for the database and acknowledges once the database took them. No memory
//! of batches is kept: a retried batch is the same samples again, which the
//! database stores once.

pub(crate) mod series;
pub(crate) mod transcode;
pub(crate) mod writer;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{AfterStored, Rendered, Store, Worker};
use crate::{
    config::SinkConfig,
    error::{OutputError, ReceiveError, ServeError},
    logging::Every,
    proto::SensorValuesRequest,
    receiver::{
        DATABASE_DRAIN_LIMIT,
        input::validate::{address_of, owner, sender},
        stats::SinkStats,
    },
};

/// How long a node waits when the database could not be reached to read
/// its clock.
const CLOCK_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The database, its writer, and the rules that make readings samples.
#[derive(Debug)]
pub(crate) struct DatabaseStore {
    /// REMOTE_WRITE_METRIC and the window of times, by the database's clock.
    rules: series::SeriesRules,
    /// REMOTE_WRITE_URL as logs may show it.
    shown_url: String,
    /// The writer, which sends to the database.
    worker: Worker<()>,
    /// Counters.
    stats: Arc<SinkStats>,
    /// Failures to read the database's clock are logged at most once a
    /// second.
    clock_failures: Mutex<Every>,
}

impl DatabaseStore {
    /// The output `config` describes, its writer started and the database's
    /// clock being read (so that the first request need not wait for it).
    pub(crate) fn open(config: &SinkConfig, stats: Arc<SinkStats>) -> Result<Self, ServeError> {
        let writer = writer::RemoteWriter::new(config, Arc::clone(&stats)).ok_or_else(|| ServeError::Output {
            path: "REMOTE_WRITE_URL".into(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        let rules = series::SeriesRules::new(&config.remote_write).following(writer.database().clone());
        let early = rules.clone();
        tokio::spawn(async move { early.read_clock().await });
        let worker = Worker::start(|queue, stop| writer.run(queue, stop));
        Ok(Self {
            rules,
            shown_url: config.remote_write.shown_url(),
            worker,
            stats,
            clock_failures: Mutex::new(Every::second()),
        })
    }
}

impl Store for DatabaseStore {
    fn describe(&self) -> String {
        self.shown_url.clone()
    }

    /// Reads the database's clock before the first request is judged by
    /// it. While the database cannot be reached the node is pushed back, as
    /// while the database fails: nothing is judged by the sink's clock
    /// where the database's may differ.
    fn ready(&self) -> BoxFuture<'_, Result<(), ReceiveError>> {
        Box::pin(async move {
            self.rules.read_clock().await.map_err(|message| {
                self.stats.database_pushed_back("error", 1);
                let gate = self.clock_failures.lock().unwrap_or_else(PoisonError::into_inner).ready();
                if let Some(suppressed) = gate {
                    warn!(message = "Cannot read the database's clock; pushing back on the nodes.", error = %message, suppressed);
                }
                ReceiveError::Output(OutputError::Busy { retry_after: CLOCK_PAUSE, message: message.into() })
            })
        })
    }

    fn render(&self, request: &SensorValuesRequest, peer: Option<SocketAddr>) -> Result<Rendered, ReceiveError> {
        let address = address_of(peer);
        let bytes = series::to_series(request, &self.rules.metric, self.rules.window(), &address)?;
        let sender = sender(owner(&request.node_id, &address));
        Ok(Rendered { bytes, readings: request.items.len(), sender })
    }

    fn render_bytes(&self, bytes: &[u8], peer: Option<SocketAddr>) -> Option<Rendered> {
        transcode::transcode(bytes, &self.rules.metric, self.rules.window(), &address_of(peer))
    }

    fn store(&self, rendered: Rendered, after: AfterStored) -> BoxFuture<'static, Result<(), ReceiveError>> {
        self.worker.store(rendered, after)
    }

    /// Sends what is queued, for at most DATABASE_DRAIN_LIMIT (less if
    /// hurried); what is still queued or under way then is not
    /// acknowledged, and its nodes send it again.
    fn close(&self, hurry: CancellationToken) -> BoxFuture<'_, Result<(), ServeError>> {
        Box::pin(async move {
            let Some(mut writing) = self.worker.stop() else { return Ok(()) };
            let limit = async {
                tokio::select! {
                    () = tokio::time::sleep(DATABASE_DRAIN_LIMIT) => {}
                    () = hurry.cancelled() => {}
                }
            };
            tokio::select! {
                written = &mut writing => written.map_err(|error| ServeError::Writer(error.to_string())),
                () = limit => {
                    writing.abort();
                    warn!(
                        message = "Stopped waiting for the database at the drain limit (or a second stop signal); the nodes send again what it did not take.",
                        limit_s = DATABASE_DRAIN_LIMIT.as_secs(),
                    );
                    Ok(())
                }
            }
        })
    }
}
