//! The output writer: appends JSON lines to one file and confirms each
//! chunk once it is written, gathering chunks that queue up meanwhile into
//! one write.

use std::{
    fs::File,
    io::{self, Write},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    error::ServeError,
    stats::{SinkStats, count},
};

/// The lines of one accepted request.
#[derive(Debug)]
pub struct Chunk {
    /// JSON lines, each ending in `\n`.
    pub lines: Vec<u8>,
    /// How many readings the lines hold.
    pub readings: usize,
    /// Told once the lines are in the file (handed to the operating system,
    /// so a crash of the sink process cannot lose them).
    pub written: oneshot::Sender<()>,
}

/// Owns the output file.
#[derive(Debug)]
pub struct JsonLinesWriter {
    /// The output, opened for appending.
    file: File,
    /// Lines gathered for the next write.
    buffer: Vec<u8>,
    /// Confirmations owed once `buffer` is written.
    pending: Vec<oneshot::Sender<()>>,
    /// Readings in `buffer`.
    buffered_readings: usize,
    /// BUFFER_SIZE: the most bytes gathered into one write.
    buffer_size: usize,
    /// Whether something was written since the last sync to disk.
    unsynced: bool,
    /// Counters for logs and summaries.
    stats: Arc<SinkStats>,
}

impl JsonLinesWriter {
    /// Opens `path` for appending, creating it if needed.
    pub async fn open(path: &Path, buffer_size: usize, stats: Arc<SinkStats>) -> Result<Self, ServeError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| ServeError::Output { path: path.to_owned(), source })?;
        let buffer = Vec::with_capacity(buffer_size.min(1 << 20));
        Ok(Self { file, buffer, pending: Vec::new(), buffered_readings: 0, buffer_size, unsynced: false, stats })
    }

    /// Writes what arrives on `queue` until `stop` is cancelled, then
    /// everything still queued, and syncs the file. Written data is synced
    /// to disk every `sync_interval`.
    pub async fn run(
        mut self,
        mut queue: mpsc::Receiver<Chunk>,
        sync_interval: Duration,
        stop: CancellationToken,
    ) -> io::Result<()> {
        let mut sync = tokio::time::interval(sync_interval);
        loop {
            tokio::select! {
                chunk = queue.recv() => match chunk {
                    Some(chunk) => {
                        self.gather(chunk, &mut queue);
                        self.write().await?;
                    }
                    None => break,
                },
                _ = sync.tick() => self.sync().await?,
                () = stop.cancelled() => break,
            }
        }
        queue.close();
        while let Some(chunk) = queue.recv().await {
            self.gather(chunk, &mut queue);
            self.write().await?;
        }
        self.sync().await
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

    fn push(&mut self, chunk: Chunk) {
        self.buffer.extend_from_slice(&chunk.lines);
        self.buffered_readings += chunk.readings;
        self.pending.push(chunk.written);
    }

    /// Writes the gathered lines, then confirms their chunks. On an error
    /// nothing is confirmed: the requests fail and their senders retry.
    async fn write(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            let started = std::time::Instant::now();
            // A write to the page cache takes microseconds: done in place
            // rather than on the blocking pool, whose hand-over cost more
            // than the write. Syncing to disk, which can take milliseconds,
            // goes to the blocking pool.
            self.file.write_all(&self.buffer)?;
            self.stats.write_latency.observe(started.elapsed().as_secs_f64());
            debug!(message = "Wrote readings.", readings = self.buffered_readings, bytes = self.buffer.len());
            count(&self.stats.readings_written, self.buffered_readings);
            self.unsynced = true;
        }
        for written in self.pending.drain(..) {
            let _ = written.send(());
        }
        self.buffer.clear();
        self.buffered_readings = 0;
        Ok(())
    }

    /// Syncs written data to disk, if there is any new, and then lets go of
    /// its pages in memory.
    async fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            let file = self.file.try_clone()?;
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
