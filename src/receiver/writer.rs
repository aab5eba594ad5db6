//! The output writer: appends JSON lines to one file, buffered by size and
//! time, and writes out everything queued before it stops.

use std::{io, path::Path, sync::Arc, time::Duration};

use tokio::{fs::File, io::AsyncWriteExt, sync::mpsc};
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
}

/// Owns the output file and its buffer.
#[derive(Debug)]
pub struct JsonLinesWriter {
    /// The output, opened for appending.
    file: File,
    /// Lines not yet written.
    buffer: Vec<u8>,
    /// Readings in `buffer`.
    buffered_readings: usize,
    /// BUFFER_SIZE: the buffer is written once it holds this many bytes.
    buffer_size: usize,
    /// Counters for logs and summaries.
    stats: Arc<SinkStats>,
}

impl JsonLinesWriter {
    /// Opens `path` for appending, creating it if needed.
    pub async fn open(path: &Path, buffer_size: usize, stats: Arc<SinkStats>) -> Result<Self, ServeError> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|source| ServeError::Output { path: path.to_owned(), source })?;
        Ok(Self { file, buffer: Vec::with_capacity(buffer_size), buffered_readings: 0, buffer_size, stats })
    }

    /// Writes what arrives on `queue` until `stop` is cancelled, then
    /// everything still queued, and syncs the file.
    pub async fn run(
        mut self,
        mut queue: mpsc::Receiver<Chunk>,
        flush_interval: Duration,
        stop: CancellationToken,
    ) -> io::Result<()> {
        let mut tick = tokio::time::interval(flush_interval);
        loop {
            tokio::select! {
                chunk = queue.recv() => match chunk {
                    Some(chunk) => self.push(chunk).await?,
                    None => break,
                },
                _ = tick.tick() => self.flush().await?,
                () = stop.cancelled() => break,
            }
        }
        queue.close();
        while let Some(chunk) = queue.recv().await {
            self.push(chunk).await?;
        }
        self.flush().await?;
        self.file.sync_all().await
    }

    /// Buffers `chunk`, writing the buffer out once it is full.
    async fn push(&mut self, chunk: Chunk) -> io::Result<()> {
        self.buffer.extend_from_slice(&chunk.lines);
        self.buffered_readings += chunk.readings;
        if self.buffer.len() >= self.buffer_size {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes the buffer to the file.
    async fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.file.write_all(&self.buffer).await?;
        self.file.flush().await?;
        self.stats.write_latency.observe(started.elapsed().as_secs_f64());
        debug!(message = "Wrote readings.", readings = self.buffered_readings, bytes = self.buffer.len());
        count(&self.stats.readings_written, self.buffered_readings);
        self.buffer.clear();
        self.buffered_readings = 0;
        Ok(())
    }
}
