//! The output writer: appends JSON lines to one file and confirms each
//! chunk once it is written, gathering chunks that queue up meanwhile into
//! one write. A write that fails is refused to its senders and leaves
//! nothing behind; the writer keeps serving and the next write tries again.

use std::{fs::File, io, path::Path, sync::Arc, time::Duration};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::{
    super::{Answer, Chunk},
    append::OutputFile,
};
use crate::{
    error::{OutputError, ServeError},
    logging::Every,
    receiver::stats::SinkStats,
};

/// Owns the output file.
#[derive(Debug)]
pub struct JsonLinesWriter {
    /// The output, opened for appending.
    output: OutputFile,
    /// Lines gathered for the next write.
    buffer: Vec<u8>,
    /// Confirmations owed once `buffer` is written.
    pending: Vec<Answer>,
    /// Readings in `buffer`.
    buffered_readings: usize,
    /// BUFFER_SIZE: the most bytes gathered into one write.
    buffer_size: usize,
    /// Whether something was written since the last sync to disk.
    unsynced: bool,
    /// Counters for logs and summaries.
    stats: Arc<SinkStats>,
    /// Failed writes are logged at most once a second.
    failures: Every,
}

impl JsonLinesWriter {
    /// Opens `path` for appending, creating it if needed.
    pub async fn open(path: &Path, buffer_size: usize, stats: Arc<SinkStats>) -> Result<Self, ServeError> {
        let output = OutputFile::open(path).map_err(|source| ServeError::Output { path: path.to_owned(), source })?;
        let buffer = Vec::with_capacity(buffer_size.min(1 << 20));
        Ok(Self {
            output,
            buffer,
            pending: Vec::new(),
            buffered_readings: 0,
            buffer_size,
            unsynced: false,
            stats,
            failures: Every::second(),
        })
    }

    /// Writes what arrives on `queue` until `stop` is cancelled, then
    /// everything still queued, and syncs the file. Written data is synced
    /// to disk every `sync_interval`; at the same pace, and whenever
    /// `reopen` is notified (SIGHUP), the file is reopened if its path no
    /// longer names it (deleted, or rotated away).
    pub async fn run(
        mut self,
        mut queue: mpsc::Receiver<Chunk>,
        sync_interval: Duration,
        reopen: Arc<Notify>,
        stop: CancellationToken,
    ) -> io::Result<()> {
        let mut sync = tokio::time::interval(sync_interval);
        loop {
            tokio::select! {
                chunk = queue.recv() => match chunk {
                    Some(chunk) => {
                        self.gather(chunk, &mut queue);
                        self.write();
                    }
                    None => break,
                },
                _ = sync.tick() => {
                    self.sync().await;
                    if self.output.moved() {
                        self.reopen("The output file was moved or deleted; reopened it at its path.").await;
                    }
                }
                () = reopen.notified() => self.reopen("Reopened the output file, as asked.").await,
                () = stop.cancelled() => break,
            }
        }
        queue.close();
        while let Some(chunk) = queue.recv().await {
            self.gather(chunk, &mut queue);
            self.write();
        }
        self.sync_file().await
    }

    /// Syncs what was written, then opens the file at its path again.
    async fn reopen(&mut self, message: &'static str) {
        self.sync().await;
        match self.output.reopen() {
            Ok(()) => info!(message = %message, path = %self.output.path().display()),
            Err(error) => error!(message = "Could not reopen the output file.", %error),
        }
    }

    /// Takes `chunk` and whatever else is already queued, up to BUFFER_SIZE.
    fn gather(&mut self, chunk: Chunk, queue: &mut mpsc::Receiver<Chunk>) {
        self.push(chunk);
        while self.buffer.len() < self.buffer_size {
            match queue.try_recv() {
                Ok(chunk) => self.push(chunk),
                Err(_) => break,
            }
        }
    }

    /// Adds one chunk's lines to the next write.
    fn push(&mut self, chunk: Chunk) {
        self.buffer.extend_from_slice(&chunk.rendered.bytes);
        self.buffered_readings += chunk.rendered.readings;
        self.pending.push(chunk.answer);
    }

    /// Writes the gathered lines, then tells their chunks' senders. A write
    /// that fails leaves nothing in the file, and every chunk in it is
    /// refused: the requests fail and their senders retry.
    fn write(&mut self) {
        let outcome = if self.buffer.is_empty() {
            Ok(())
        } else {
            let started = std::time::Instant::now();
            // A write to the page cache takes microseconds: done in place
            // rather than on the blocking pool, whose hand-over cost more
            // than the write. Syncing to disk, which can take milliseconds,
            // goes to the blocking pool.
            let appended = self.output.append(&self.buffer);
            self.stats.wrote(self.buffered_readings, started.elapsed(), appended.is_ok());
            match appended {
                Ok(()) => {
                    debug!(message = "Wrote readings.", readings = self.buffered_readings, bytes = self.buffer.len());
                    self.unsynced = true;
                    Ok(())
                }
                Err(error) => {
                    if let Some(suppressed) = self.failures.ready() {
                        error!(message = "Could not write to the output; refusing the requests.", %error, readings = self.buffered_readings, suppressed);
                    }
                    Err(OutputError::Failed(error.to_string().into()))
                }
            }
        };
        for answer in self.pending.drain(..) {
            answer.send(&outcome);
        }
        self.buffer.clear();
        self.buffered_readings = 0;
    }

    /// Syncs written data to disk, if there is any new, and then lets go of
    /// its pages in memory. A failure is logged: the data is written (in the
    /// operating system's hands), only not yet known to be on disk.
    async fn sync(&mut self) {
        if let Err(error) = self.sync_file().await {
            error!(message = "Could not sync the output to disk.", %error);
        }
    }

    async fn sync_file(&mut self) -> io::Result<()> {
        if self.unsynced {
            let file = self.output.file().try_clone()?;
            let synced = move || -> io::Result<()> {
                file.sync_data()?;
                release_cached(&file);
                Ok(())
            };
            tokio::task::spawn_blocking(synced).await.map_err(io::Error::other)??;
            self.unsynced = false;
        }
        Ok(())
    }
}

/// Tells the kernel that the file's pages, now on disk, will not be read
/// again: the sink never reads its output back while it runs. Its page cache
/// then stays at about one sync interval of output instead of growing with
/// the file, and new writes land in pages just freed rather than in memory
/// the machine has not touched for a while, which on a virtual machine can
/// cost more than the copy itself. Advice only: a failure changes nothing
/// that was written.
#[cfg(target_os = "linux")]
fn release_cached(file: &File) {
    if let Err(error) = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed) {
        debug!(message = "Could not release the output's cached pages.", %error);
    }
}

#[cfg(not(target_os = "linux"))]
fn release_cached(_file: &File) {}
