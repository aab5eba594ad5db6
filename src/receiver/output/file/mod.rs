//! The file output (the default): each accepted request becomes JSON lines
//! appended to `FILE_PATH/readings.jsonl` ([`lines`], [`writer`],
//! [`append`]); each lane's last batch is remembered ([`dedup`]), across
//! restarts too, so that a retry of a batch already written is answered OK
//! and not written twice.

pub(crate) mod append;
pub(crate) mod dedup;
pub mod lines;
pub mod writer;

use std::{path::PathBuf, sync::Arc};

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{AfterStored, BatchId, Claim, Rendered, Store, Worker};
use crate::{
    config::SinkConfig,
    error::{ReceiveError, ServeError},
    proto::SensorValuesRequest,
    receiver::stats::SinkStats,
};

/// Node lanes whose last batch is remembered for de-duplication.
const DEDUP_LANES: usize = 65_536;

/// Bytes at the end of the output read back on start to recover the last
/// batch of each lane.
const RECOVERY_WINDOW: u64 = 16 * 1024 * 1024;

/// The output file, its writer and the lanes' memory.
#[derive(Debug)]
pub(crate) struct FileStore {
    /// FILE_PATH/readings.jsonl.
    path: PathBuf,
    /// FILE_PATH/readings.lanes, where a clean stop saves the lanes' memory.
    lanes: PathBuf,
    /// The last batch written per node and lane.
    dedup: Arc<dedup::Deduplicator>,
    /// The writer, which owns the file.
    worker: Worker<std::io::Result<()>>,
}

impl FileStore {
    /// Opens the output `config` names, after reading back what the last
    /// run left: each lane's last batch (saved at a clean stop, then the end
    /// of the file, written later, so it wins), and a write a crash left
    /// unfinished, which is cut off. `reopen` is notified to reopen the file
    /// at its path (SIGHUP, for log rotation).
    pub(crate) async fn open(
        config: &SinkConfig,
        stats: Arc<SinkStats>,
        reopen: Arc<Notify>,
    ) -> Result<Self, ServeError> {
        let path = config.output_file();
        tokio::fs::create_dir_all(&config.file_path)
            .await
            .map_err(|source| ServeError::Output { path: config.file_path.clone(), source })?;
        let recovered = dedup::recover(&path, RECOVERY_WINDOW)
            .map_err(|source| ServeError::Output { path: path.clone(), source })?;
        if recovered.torn > 0 {
            warn!(message = "Cut off an unfinished write at the end of the output.", bytes = recovered.torn);
        }
        let lanes = config.lanes_file();
        let saved = dedup::load(&lanes).map_err(|source| ServeError::Output { path: lanes.clone(), source })?;
        let memory = dedup::Deduplicator::new(DEDUP_LANES);
        for (node, lane, batch) in saved.iter().chain(&recovered.lanes) {
            memory.seed(node, *lane, *batch);
        }
        let writer = writer::JsonLinesWriter::open(&path, config.buffer_size, stats).await?;
        let sync_interval = config.flush_interval.into();
        let worker = Worker::start(|queue, stop| writer.run(queue, sync_interval, reopen, stop));
        Ok(Self { path, lanes, dedup: Arc::new(memory), worker })
    }
}

impl Store for FileStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn render(
        &self,
        request: &SensorValuesRequest,
        _peer: Option<std::net::SocketAddr>,
    ) -> Result<Rendered, ReceiveError> {
        // The file takes every request in turn: no sender to tell apart.
        Ok(Rendered { bytes: lines::to_json_lines(request)?, readings: request.items.len(), sender: 0 })
    }

    /// A lane sends one batch at a time and retries only that one, so a
    /// repeat is exactly the last batch written. A lower number (a node
    /// restarted with its clock set back) is new data, not a retry.
    fn claim<'a>(&'a self, batch: BatchId<'a>) -> BoxFuture<'a, Claim> {
        Box::pin(async move {
            let (mut last, number) = (self.dedup.lock(batch.node, batch.lane).await, batch.number);
            if *last == Some(number) {
                return Claim::Stored;
            }
            Claim::New(Some(Box::new(move || *last = Some(number))))
        })
    }

    fn store(&self, rendered: Rendered, after: AfterStored) -> BoxFuture<'static, Result<(), ReceiveError>> {
        self.worker.store(rendered, after)
    }

    /// Writes out everything queued and syncs it (however long that takes:
    /// it was acknowledged, or its senders wait for it), then saves the
    /// lanes' memory.
    fn close(&self, _hurry: CancellationToken) -> BoxFuture<'_, Result<(), ServeError>> {
        Box::pin(async move {
            if let Some(writing) = self.worker.stop() {
                let written = writing.await.map_err(|error| ServeError::Writer(error.to_string()))?;
                written.map_err(|source| ServeError::Output { path: self.path.clone(), source })?;
            }
            if let Err(error) = dedup::save(&self.lanes, &self.dedup.snapshot()) {
                warn!(
                    message = "Could not save the lanes' last batches; a retry of a batch written long before this stop may be written again after the restart.",
                    path = %self.lanes.display(),
                    %error,
                );
            }
            Ok(())
        })
    }
}
