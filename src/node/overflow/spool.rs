//! The spool: batches the sink could not take, kept on disk in a redb
//! database until they are delivered, in order, ahead of newer data.
//!
//! redb is an embedded, crash-safe B-tree store with checksummed pages and
//! atomic, fsynced commits: a batch the spool has committed survives a
//! SIGKILL of the node, and a torn commit is rolled back on open. Each
//! stored batch also carries its own CRC32, so a damaged record is found,
//! skipped and counted rather than sent.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use prost::{Message, bytes::Bytes};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::proto::SensorValuesRequest;

/// Stored batches: (lane, batch number) → CRC32 (4 bytes, LE) + encoded
/// readings (field 1 of the request, repeated).
const BATCHES: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("batches");
/// Node facts that outlive a run: its identity.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// The identity each stored batch was made under: (lane, batch number) →
/// node identity, written and removed with the batch, so that it is
/// replayed as its maker, whatever NODE_ID is now. (A batch stored before
/// this table existed has none.)
const IDENTITIES: TableDefinition<(u32, u64), &str> = TableDefinition::new("identities");

/// Stored batches that have been sent (or tried) as they are: (lane, batch
/// number) → nothing. The sink may hold such a batch already, and knows it
/// again only by its number, so it is replayed alone, never merged into
/// another.
const SENT: TableDefinition<(u32, u64), ()> = TableDefinition::new("sent");

/// How much one replayed request may carry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Most {
    /// Readings: BATCH_SIZE.
    pub readings: usize,
    /// Encoded bytes of readings: MAX_MESSAGE_BYTES, less room for the
    /// request's identity.
    pub bytes: usize,
    /// The first batch number of this run: a merge never spans it, so
    /// each request is an earlier run's or this run's, as counted.
    pub run_starts: u64,
}

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
#[error("spool {}: {message}", .path.display())]
pub struct SpoolError {
    /// The database file.
    path: PathBuf,
    /// What went wrong.
    message: String,
}

/// One batch read back from the spool.
#[derive(Debug)]
pub(crate) struct Stored {
    /// Its number within the lane.
    pub(crate) batch_sequence: u64,
    /// Its encoded readings and how many there are, or `None` when the
    /// record is damaged.
    pub(crate) items: Option<(Bytes, usize)>,
    /// The identity it was made under, where the spool recorded it (a
    /// spool written before runs were recorded has none).
    pub(crate) node_id: Option<String>,
    /// Whether it had been sent (or tried) before it was read: its readings
    /// went on the wire already.
    pub(crate) sent_before: bool,
}

/// A durable FIFO of batches per lane, bounded in bytes.
#[derive(Debug, Clone)]
pub struct Spool {
    /// The database; `None` while it could not be opened again after a
    /// failure.
    db: Arc<Mutex<Option<Arc<Database>>>>,
    /// Set by any failure: redb refuses every later operation after an I/O
    /// error (a full disk), so the next operation opens the database again
    /// (at its last commit) first.
    failed: Arc<std::sync::atomic::AtomicBool>,
    /// Its file, for messages.
    path: PathBuf,
    /// SPOOL_MAX_BYTES.
    max_bytes: u64,
    /// Bytes of stored records.
    bytes: Arc<Mutex<u64>>,
    /// Batches being delivered by their replayer: never evicted, so that a
    /// batch is not counted as dropped and then delivered.
    held: Arc<Mutex<HashSet<(u32, u64)>>>,
}

/// A batch kept from eviction while it is delivered; released on drop.
#[derive(Debug)]
pub(crate) struct Hold {
    /// The held batches of the spool.
    held: Arc<Mutex<HashSet<(u32, u64)>>>,
    /// This batch's lane and number.
    key: (u32, u64),
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// Memory redb may use to cache the spool's pages.
const CACHE_BYTES: usize = 4 << 20;

impl Spool {
    /// Opens (or creates) the spool in `dir`. A database redb cannot open is
    /// moved aside as `spool.redb.damaged` and a new one started; one that
    /// another process has open, or that cannot be read, is an error.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Self, Option<String>), SpoolError> {
        let path = dir.join("spool.redb");
        let fail = |message: String| SpoolError { path: path.clone(), message };
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        // redb caches up to 1 GiB of pages by default, which a spool filling
        // while the sink is down would take as memory; a spool is written
        // and read in order, and needs little.
        let create = |path: &Path| Database::builder().set_cache_size(CACHE_BYTES).create(path);
        let (db, damage) = match create(&path) {
            Ok(db) => (db, None),
            // Not damage: another node (or this one, twice) has it open, or
            // the file cannot be read. Moving a live spool aside would lose
            // its batches without a count.
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(fail("in use by another process: each node needs a SPOOL_DIR of its own".into()));
            }
            // (A file that is not a database at all is reported as invalid
            // data: that is damage.)
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(error)))
                if error.kind() != std::io::ErrorKind::InvalidData =>
            {
                return Err(fail(error.to_string()));
            }
            Err(error) => {
                // An earlier damaged file is kept too.
                let mut aside = dir.join("spool.redb.damaged");
                if aside.exists() {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    aside = dir.join(format!("spool.redb.damaged-{}", now.as_secs()));
                }
                std::fs::rename(&path, &aside).map_err(|e| fail(e.to_string()))?;
                let db = create(&path).map_err(|e| fail(e.to_string()))?;
                (db, Some(format!("{error}; moved to {}", aside.display())))
            }
        };
        let spool = Self {
            db: Arc::new(Mutex::new(Some(Arc::new(db)))),
            failed: Arc::default(),
            path,
            max_bytes,
            bytes: Arc::default(),
            held: Arc::default(),
        };
        spool.count_bytes()?;
        Ok((spool, damage))
    }

    /// Counts the bytes of the stored records.
    fn count_bytes(&self) -> Result<(), SpoolError> {
        let total = self.read(|table| {
            let mut total = 0;
            for entry in table.iter()? {
                total += entry?.1.value().len() as u64;
            }
            Ok(total)
        })?;
        *self.bytes.lock().unwrap_or_else(PoisonError::into_inner) = total;
        Ok(())
    }

    /// The database, opened again first if an operation failed since the
    /// last opening.
    fn database(&self) -> Result<Arc<Database>, SpoolError> {
        use std::sync::atomic::Ordering::SeqCst;
        let mut slot = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        if self.failed.load(SeqCst) {
            // redb allows one handle on a file: the old one goes first. One
            // still in use by another operation is waited out by trying again
            // at the next operation.
            if let Some(old) = slot.take()
                && let Err(shared) = Arc::try_unwrap(old)
            {
                *slot = Some(shared);
                return Err(self.error("the spool is being opened again after a failure"));
            }
            let opened = Database::builder().set_cache_size(CACHE_BYTES).create(&self.path);
            *slot = Some(Arc::new(opened.map_err(|e| self.error(e))?));
            self.failed.store(false, SeqCst);
            drop(slot);
            // What a failed commit counted is not on disk.
            self.count_bytes()?;
            return self.database();
        }
        slot.clone().ok_or_else(|| self.error("the spool could not be opened again"))
    }

    /// The node identity kept in the spool, or `fresh` stored as it.
    pub fn node_id(&self, fresh: &str) -> Result<String, SpoolError> {
        let db = self.database()?;
        let write = db.begin_write().map_err(|e| self.error(e))?;
        let id = {
            let mut meta = write.open_table(META).map_err(|e| self.error(e))?;
            let existing = meta.get("node_id").map_err(|e| self.error(e))?.map(|v| v.value().to_owned());
            match existing {
                Some(id) => id,
                None => {
                    meta.insert("node_id", fresh).map_err(|e| self.error(e))?;
                    fresh.to_owned()
                }
            }
        };
        write.commit().map_err(|e| self.error(e))?;
        Ok(id)
    }

    /// The oldest batch of `lane`, kept from eviction until the returned
    /// hold is dropped: its replayer is about to deliver it. Read while no
    /// push is evicting, so the batch returned is one that is stored.
    #[cfg(test)]
    pub(crate) fn oldest_held(&self, lane: u32) -> Result<Option<(Stored, Hold)>, SpoolError> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(stored) = self.oldest(lane)? else { return Ok(None) };
        let key = (lane, stored.batch_sequence);
        held.insert(key);
        Ok(Some((stored, Hold { held: Arc::clone(&self.held), key })))
    }

    /// What `lane` replays next, kept from eviction until the returned hold
    /// is dropped: its oldest batch, merged with the batches after it that
    /// were never sent (made under the same identity, undamaged) while the
    /// whole fits in `most`. The merged batches are stored as one, under
    /// the number of the last, and that batch is marked as sent before it
    /// is returned: if the node stops before it is acknowledged, the next
    /// run sends exactly it again, and the sink knows it by its number.
    pub(crate) fn next_request(&self, lane: u32, most: Most) -> Result<Option<(Stored, Hold)>, SpoolError> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(first) = self.oldest(lane)? else { return Ok(None) };
        let sent_before = self.is_sent(lane, first.batch_sequence)?;
        let mut merged = vec![first];
        if !sent_before {
            self.gather(lane, most, &mut merged)?;
            self.store_merged(lane, &merged)?;
        }
        let mut stored = merged.pop().unwrap_or_else(|| unreachable!("one batch at least"));
        stored.sent_before = sent_before;
        if !merged.is_empty() {
            stored.items = Some(concatenated(&merged, &stored));
        }
        let key = (lane, stored.batch_sequence);
        held.insert(key);
        Ok(Some((stored, Hold { held: Arc::clone(&self.held), key })))
    }

    /// Adds to `merged` (which holds the lane's oldest batch) the batches
    /// after it that may travel with it in one request.
    fn gather(&self, lane: u32, most: Most, merged: &mut Vec<Stored>) -> Result<(), SpoolError> {
        let Some((first_items, first_n)) = &merged[0].items else { return Ok(()) };
        let (mut readings, mut bytes) = (*first_n, first_items.len());
        let after = merged[0].batch_sequence.saturating_add(1);
        let candidates = self.read(|table| {
            let mut found = Vec::new();
            for entry in table.range((lane, after)..=(lane, u64::MAX))? {
                let (key, value) = entry?;
                let Some((items, n)) = decode(value.value()) else { break };
                let sequence = key.value().1;
                if (after <= most.run_starts) != (sequence < most.run_starts) {
                    break;
                }
                if readings + n > most.readings || bytes + items.len() > most.bytes {
                    break;
                }
                (readings, bytes) = (readings + n, bytes + items.len());
                found.push(Stored {
                    batch_sequence: sequence,
                    items: Some((items, n)),
                    node_id: None,
                    sent_before: false,
                });
            }
            Ok(found)
        })?;
        for mut candidate in candidates {
            if self.is_sent(lane, candidate.batch_sequence)? {
                break;
            }
            candidate.node_id = self.identity_of(lane, candidate.batch_sequence)?;
            if candidate.node_id != merged[0].node_id {
                break;
            }
            merged.push(candidate);
        }
        Ok(())
    }

    /// Stores `merged` as one batch under the last one's number, marked as
    /// sent, in one commit.
    fn store_merged(&self, lane: u32, merged: &[Stored]) -> Result<(), SpoolError> {
        let last = merged.last().unwrap_or_else(|| unreachable!("one batch at least"));
        let db = self.database()?;
        let write = db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut marks = write.open_table(SENT).map_err(|e| self.error(e))?;
            marks.insert((lane, last.batch_sequence), ()).map_err(|e| self.error(e))?;
            if merged.len() > 1 {
                let (head, tail) = merged.split_at(merged.len() - 1);
                let items = concatenated(head, &tail[0]).0;
                let encoded = record(&items);
                let mut table = write.open_table(BATCHES).map_err(|e| self.error(e))?;
                let mut identities = write.open_table(IDENTITIES).map_err(|e| self.error(e))?;
                let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
                for batch in head {
                    identities.remove((lane, batch.batch_sequence)).map_err(|e| self.error(e))?;
                    if let Some(old) = table.remove((lane, batch.batch_sequence)).map_err(|e| self.error(e))? {
                        *bytes = bytes.saturating_sub(old.value().len() as u64);
                    }
                }
                if let Some(old) =
                    table.insert((lane, last.batch_sequence), encoded.as_slice()).map_err(|e| self.error(e))?
                {
                    *bytes = bytes.saturating_sub(old.value().len() as u64);
                }
                *bytes += encoded.len() as u64;
            }
        }
        write.commit().map_err(|e| self.error(e))
    }

    /// Whether batch `batch` of `lane` is marked as sent.
    fn is_sent(&self, lane: u32, batch: u64) -> Result<bool, SpoolError> {
        let db = self.database()?;
        let read = db.begin_read().map_err(|e| self.error(e))?;
        match read.open_table(SENT) {
            Ok(marks) => Ok(marks.get((lane, batch)).map_err(|e| self.error(e))?.is_some()),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
            Err(error) => Err(self.error(error)),
        }
    }

    /// Stores a batch's encoded readings durably. When the spool would
    /// exceed its size, the oldest stored batches are evicted first (but
    /// none that is being delivered: the spool then holds up to one batch
    /// per lane more than its size); returns their numbers and how many
    /// readings each held (0 for damaged ones).
    pub fn push(
        &self,
        lane: u32,
        batch_sequence: u64,
        items: &[u8],
        node_id: &str,
    ) -> Result<Vec<(u64, u64)>, SpoolError> {
        self.push_marked(lane, batch_sequence, items, node_id, false)
    }

    /// [`Spool::push`], marking the batch as already sent once if `sent`
    /// (an attempt whose outcome is unknown): it is then replayed alone.
    pub(crate) fn push_marked(
        &self,
        lane: u32,
        batch_sequence: u64,
        items: &[u8],
        node_id: &str,
        sent: bool,
    ) -> Result<Vec<(u64, u64)>, SpoolError> {
        let encoded = record(items);
        let mut evicted = Vec::new();
        // Held through the commit: a replayer cannot pick a batch up while it
        // may be evicted.
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let db = self.database()?;
        let write = db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = write.open_table(BATCHES).map_err(|e| self.error(e))?;
            let mut identities = write.open_table(IDENTITIES).map_err(|e| self.error(e))?;
            let mut marks = write.open_table(SENT).map_err(|e| self.error(e))?;
            let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
            while *bytes + encoded.len() as u64 > self.max_bytes && !table.is_empty().map_err(|e| self.error(e))? {
                let oldest = oldest_key(&table, &held).map_err(|e| self.error(e))?;
                let Some(key) = oldest else { break };
                identities.remove(key).map_err(|e| self.error(e))?;
                marks.remove(key).map_err(|e| self.error(e))?;
                if let Some(old) = table.remove(key).map_err(|e| self.error(e))? {
                    *bytes -= old.value().len() as u64;
                    evicted.push((key.1, decode(old.value()).map_or(0, |(_, n)| n as u64)));
                }
            }
            table.insert((lane, batch_sequence), encoded.as_slice()).map_err(|e| self.error(e))?;
            identities.insert((lane, batch_sequence), node_id).map_err(|e| self.error(e))?;
            if sent {
                marks.insert((lane, batch_sequence), ()).map_err(|e| self.error(e))?;
            }
            *bytes += encoded.len() as u64;
        }
        write.commit().map_err(|e| self.error(e))?;
        Ok(evicted)
    }

    /// The oldest batch of `lane`, if any.
    pub(crate) fn oldest(&self, lane: u32) -> Result<Option<Stored>, SpoolError> {
        let stored = self.read(|table| {
            let mut range = table.range((lane, 0)..=(lane, u64::MAX))?;
            Ok(range.next().transpose()?.map(|(key, value)| {
                let (_, batch_sequence) = key.value();
                Stored { batch_sequence, items: decode(value.value()), node_id: None, sent_before: false }
            }))
        })?;
        let Some(mut stored) = stored else { return Ok(None) };
        stored.node_id = self.identity_of(lane, stored.batch_sequence)?;
        Ok(Some(stored))
    }

    /// The identity batch `batch` of `lane` was made under, if recorded.
    fn identity_of(&self, lane: u32, batch: u64) -> Result<Option<String>, SpoolError> {
        let db = self.database()?;
        let read = db.begin_read().map_err(|e| self.error(e))?;
        let identities = match read.open_table(IDENTITIES) {
            Ok(identities) => identities,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(self.error(error)),
        };
        let id = identities.get((lane, batch)).map_err(|e| self.error(e))?;
        Ok(id.map(|id| id.value().to_owned()))
    }

    /// Removes a delivered (or damaged) batch.
    pub fn remove(&self, lane: u32, batch_sequence: u64) -> Result<(), SpoolError> {
        let db = self.database()?;
        let write = db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = write.open_table(BATCHES).map_err(|e| self.error(e))?;
            write
                .open_table(IDENTITIES)
                .map_err(|e| self.error(e))?
                .remove((lane, batch_sequence))
                .map_err(|e| self.error(e))?;
            write
                .open_table(SENT)
                .map_err(|e| self.error(e))?
                .remove((lane, batch_sequence))
                .map_err(|e| self.error(e))?;
            if let Some(old) = table.remove((lane, batch_sequence)).map_err(|e| self.error(e))? {
                let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
                *bytes = bytes.saturating_sub(old.value().len() as u64);
            }
        }
        write.commit().map_err(|e| self.error(e))
    }

    /// How many readings the stored batches hold (damaged ones count none).
    pub fn readings(&self) -> Result<u64, SpoolError> {
        self.read(|table| {
            let mut total = 0;
            for entry in table.iter()? {
                total += decode(entry?.1.value()).map_or(0, |(_, n)| n as u64);
            }
            Ok(total)
        })
    }

    /// Lanes with stored batches.
    pub fn lanes(&self) -> Result<Vec<u32>, SpoolError> {
        self.read(|table| {
            let mut lanes: Vec<u32> = Vec::new();
            for entry in table.iter()? {
                let lane = entry?.0.value().0;
                if lanes.last() != Some(&lane) {
                    lanes.push(lane);
                }
            }
            Ok(lanes)
        })
    }

    /// [`Spool::push`] off the async threads (it waits for the disk).
    pub(crate) async fn push_async(
        &self,
        lane: u32,
        batch_sequence: u64,
        items: Bytes,
        node_id: std::sync::Arc<str>,
        sent: bool,
    ) -> Result<Vec<(u64, u64)>, SpoolError> {
        let spool = self.clone();
        blocking(move || spool.push_marked(lane, batch_sequence, &items, &node_id, sent)).await
    }

    /// [`Spool::next_request`] off the async threads.
    pub(crate) async fn next_request_async(&self, lane: u32, most: Most) -> Result<Option<(Stored, Hold)>, SpoolError> {
        let spool = self.clone();
        blocking(move || spool.next_request(lane, most)).await
    }

    /// [`Spool::remove`] off the async threads.
    pub(crate) async fn remove_async(&self, lane: u32, batch_sequence: u64) -> Result<(), SpoolError> {
        let spool = self.clone();
        blocking(move || spool.remove(lane, batch_sequence)).await
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<(u32, u64), &[u8]>) -> Result<T, redb::StorageError>,
    ) -> Result<T, SpoolError> {
        // Held through the operation: the database is not opened again
        // under it.
        let db = self.database()?;
        let read = db.begin_read().map_err(|e| self.error(e))?;
        match read.open_table(BATCHES) {
            Ok(table) => f(&table).map_err(|e| self.error(e)),
            Err(redb::TableError::TableDoesNotExist(_)) => {
                drop(read);
                let write = db.begin_write().map_err(|e| self.error(e))?;
                write.open_table(BATCHES).map_err(|e| self.error(e))?;
                write.commit().map_err(|e| self.error(e))?;
                let read = db.begin_read().map_err(|e| self.error(e))?;
                let table = read.open_table(BATCHES).map_err(|e| self.error(e))?;
                f(&table).map_err(|e| self.error(e))
            }
            Err(error) => Err(self.error(error)),
        }
    }

    /// A failure: the next operation opens the database again first.
    fn error(&self, error: impl std::fmt::Display) -> SpoolError {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        SpoolError { path: self.path.clone(), message: error.to_string() }
    }
}

/// Runs `f` on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|error| Err(SpoolError { path: PathBuf::new(), message: error.to_string() }))
}

/// The key of the oldest batch over all lanes that is not `held`: the
/// lowest batch number among each lane's first batch not being delivered.
fn oldest_key(
    table: &redb::Table<(u32, u64), &[u8]>,
    held: &HashSet<(u32, u64)>,
) -> Result<Option<(u32, u64)>, redb::StorageError> {
    let mut oldest: Option<(u32, u64)> = None;
    let mut lane = 0u32;
    // Each lane with stored batches in turn: its oldest batch that is not
    // being delivered is a candidate.
    while let Some(first) = table.range((lane, 0)..=(u32::MAX, u64::MAX))?.next().transpose()? {
        lane = first.0.value().0;
        for entry in table.range((lane, 0)..=(lane, u64::MAX))? {
            let key = entry?.0.value();
            if !held.contains(&key) {
                if oldest.is_none_or(|(_, sequence)| key.1 < sequence) {
                    oldest = Some(key);
                }
                break;
            }
        }
        let Some(next) = lane.checked_add(1) else { break };
        lane = next;
    }
    Ok(oldest)
}

/// The readings of `head` and then of `last`, as one batch's: encoded
/// repeated fields concatenate.
fn concatenated(head: &[Stored], last: &Stored) -> (Bytes, usize) {
    let mut items = Vec::new();
    let mut readings = 0;
    for batch in head.iter().chain(std::iter::once(last)) {
        if let Some((part, n)) = &batch.items {
            items.extend_from_slice(part);
            readings += n;
        }
    }
    (items.into(), readings)
}

/// The stored record of `items`: their CRC32 (4 bytes, LE), then them.
fn record(items: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(items.len() + 4);
    record.extend_from_slice(&crc32fast::hash(items).to_le_bytes());
    record.extend_from_slice(items);
    record
}

/// The encoded readings of a stored record and how many there are, or
/// `None` if it is damaged: its CRC does not match or it does not decode.
fn decode(record: &[u8]) -> Option<(Bytes, usize)> {
    let (crc, body) = record.split_at_checked(4)?;
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let readings = SensorValuesRequest::decode(body).ok()?.items.len();
    Some((Bytes::copy_from_slice(body), readings))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};

    use proptest::prelude::*;

    use super::*;
    use crate::reading::{Reading, encode_batch, sensor_name};

    /// `n` readings of `lane`'s sensor, encoded.
    fn batch(lane: u32, sequence: u64, n: usize) -> Bytes {
        let readings: Vec<Reading> = (0..n)
            .map(|i| Reading {
                sensor: sensor_name(&format!("lane-{lane}")),
                sequence: sequence * 100 + i as u64,
                value: i as i64,
                created_at: std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(sequence),
            })
            .collect();
        let mut items = Vec::new();
        encode_batch(&readings, &mut items);
        items.into()
    }

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("spool-{name}-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u32, usize),
        Pop(u32),
        Reopen,
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            prop_oneof![
                4 => (0u32..3, 1usize..5).prop_map(|(lane, n)| Op::Push(lane, n)),
                3 => (0u32..3).prop_map(Op::Pop),
                1 => Just(Op::Reopen),
            ],
            1..40,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Against an in-memory model: every lane is a FIFO, and what was
        /// committed survives the spool being closed and opened again (as
        /// after a SIGKILL: redb's commits are already on disk).
        #[test]
        fn the_spool_behaves_as_a_fifo_per_lane_across_reopens(ops in ops()) {
            let dir = dir("model");
            let (mut spool, _) = Spool::open(&dir, u64::MAX).unwrap();
            let mut model: BTreeMap<u32, VecDeque<(u64, Bytes, usize)>> = BTreeMap::new();
            let mut next = 1u64;
            for op in ops {
                match op {
                    Op::Push(lane, n) => {
                        let items = batch(lane, next, n);
                        prop_assert_eq!(spool.push(lane, next, &items, "n").unwrap(), vec![]);
                        model.entry(lane).or_default().push_back((next, items, n));
                        next += 1;
                    }
                    Op::Pop(lane) => {
                        let expected = model.entry(lane).or_default().pop_front();
                        let got = spool.oldest(lane).unwrap();
                        match (expected, got) {
                            (None, None) => {}
                            (Some((sequence, items, n)), Some(stored)) => {
                                prop_assert_eq!(stored.batch_sequence, sequence);
                                prop_assert_eq!(stored.items, Some((items, n)));
                                spool.remove(lane, sequence).unwrap();
                            }
                            (expected, got) => prop_assert!(false, "model {:?}, spool {:?}", expected, got),
                        }
                    }
                    Op::Reopen => {
                        drop(spool);
                        spool = Spool::open(&dir, u64::MAX).unwrap().0;
                    }
                }
                let lanes: Vec<u32> = model.iter().filter(|(_, q)| !q.is_empty()).map(|(l, _)| *l).collect();
                prop_assert_eq!(spool.lanes().unwrap(), lanes);
            }
            drop(spool);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_batch_being_delivered_is_never_evicted() {
        let dir = dir("held");
        let (spool, _) = Spool::open(&dir, 1200).unwrap();
        for sequence in 1..=10 {
            spool.push(0, sequence, &batch(0, sequence, 5), "n").unwrap();
        }
        let (stored, hold) = spool.oldest_held(0).unwrap().unwrap();
        let first = stored.batch_sequence;
        let evicted: Vec<u64> =
            (11..=40).flat_map(|s| spool.push(0, s, &batch(0, s, 5), "n").unwrap()).map(|(b, _)| b).collect();
        assert!(evicted.len() >= 20, "{evicted:?}");
        assert!(!evicted.contains(&first), "the batch being delivered was evicted: {evicted:?}");
        assert_eq!(spool.oldest(0).unwrap().map(|s| s.batch_sequence), Some(first));
        // Once delivered (or given up), it may be evicted like any other.
        drop(hold);
        let evicted: Vec<u64> = spool.push(0, 41, &batch(0, 41, 5), "n").unwrap().into_iter().map(|(b, _)| b).collect();
        assert_eq!(evicted.first(), Some(&first), "{evicted:?}");
        drop(spool);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_batch_keeps_the_identity_it_was_made_under() {
        let (dir, evict_dir) = (dir("identities"), dir("identities-evict"));
        let (spool, _) = Spool::open(&dir, u64::MAX).unwrap();
        spool.push(0, 100, &batch(0, 100, 2), "first").unwrap();
        spool.push(1, 101, &batch(1, 101, 2), "first").unwrap();
        drop(spool);
        // Restarted under another NODE_ID, with a clock set back: numbers
        // below the first run's are told apart all the same.
        let (spool, _) = Spool::open(&dir, u64::MAX).unwrap();
        spool.push(0, 50, &batch(0, 50, 2), "second").unwrap();
        spool.push(0, 102, &batch(0, 102, 2), "second").unwrap();
        // Written before identities were kept: none.
        let write = spool.database().unwrap().begin_write().unwrap();
        write.open_table(BATCHES).unwrap().insert((2, 7), record(&batch(2, 7, 1)).as_slice()).unwrap();
        write.commit().unwrap();
        let drain = |lane| {
            let mut seen = Vec::new();
            while let Some(stored) = spool.oldest(lane).unwrap() {
                seen.push((stored.batch_sequence, stored.node_id));
                spool.remove(lane, stored.batch_sequence).unwrap();
            }
            seen
        };
        let id = |s: &str| Some(s.to_owned());
        assert_eq!(drain(0), vec![(50, id("second")), (100, id("first")), (102, id("second"))]);
        assert_eq!(drain(1), vec![(101, id("first"))]);
        assert_eq!(drain(2), vec![(7, None)]);
        // Removed with their batches, evicted ones too.
        let small = Spool::open(&evict_dir, 300).unwrap().0;
        for sequence in 1..=10 {
            small.push(0, sequence, &batch(0, sequence, 2), "n").unwrap();
        }
        let read = small.database().unwrap().begin_read().unwrap();
        let kept = read.open_table(IDENTITIES).unwrap().len().unwrap();
        assert_eq!(kept, read.open_table(BATCHES).unwrap().len().unwrap());
        assert!(kept < 10);
        drop((read, small, spool));
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&evict_dir).unwrap();
    }

    #[test]
    fn a_full_spool_evicts_its_oldest_batch_and_says_how_many_readings() {
        let dir = dir("evict");
        let (spool, _) = Spool::open(&dir, 1200).unwrap();
        for sequence in 1..=20 {
            spool.push(sequence as u32 % 2, sequence, &batch(0, sequence, 5), "n").unwrap();
        }
        let evicted: u64 =
            (21..=25).flat_map(|s| spool.push(0, s, &batch(0, s, 5), "n").unwrap()).map(|(_, n)| n).sum();
        assert!(evicted >= 25, "evicted {evicted}");
        assert!(*spool.bytes.lock().unwrap() <= 1200);
        // What is left is the newest, in order.
        let oldest = spool.oldest(1).unwrap().map(|s| s.batch_sequence);
        assert!(oldest.is_none_or(|s| s > 5), "{oldest:?}");
        drop(spool);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_record_is_found_and_a_damaged_file_moved_aside() {
        let dir = dir("damage");
        let (spool, _) = Spool::open(&dir, u64::MAX).unwrap();
        spool.push(0, 1, &batch(0, 1, 3), "n").unwrap();
        let write = spool.database().unwrap().begin_write().unwrap();
        write.open_table(BATCHES).unwrap().insert((0, 2), &b"\x01\x02\x03\x04garbage"[..]).unwrap();
        write.commit().unwrap();
        spool.push(0, 3, &batch(0, 3, 3), "n").unwrap();
        assert_eq!(spool.oldest(0).unwrap().unwrap().items.map(|(_, n)| n), Some(3));
        spool.remove(0, 1).unwrap();
        let damaged = spool.oldest(0).unwrap().unwrap();
        assert_eq!((damaged.batch_sequence, damaged.items), (2, None));
        drop(spool);

        std::fs::write(dir.join("spool.redb"), b"not a database at all").unwrap();
        let (spool, damage) = Spool::open(&dir, u64::MAX).unwrap();
        assert!(damage.is_some());
        assert!(dir.join("spool.redb.damaged").exists());
        assert_eq!(spool.lanes().unwrap(), Vec::<u32>::new());
        drop(spool);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The sequences of the readings a replayed request carries.
    fn sequences(stored: &Stored) -> Vec<u64> {
        let (items, n) = stored.items.clone().expect("undamaged");
        let request = SensorValuesRequest::decode(items).unwrap();
        assert_eq!(request.items.len(), n);
        request.items.iter().map(|item| item.sequence).collect()
    }

    const MOST: Most = Most { readings: 30, bytes: 1 << 20, run_starts: 0 };

    #[test]
    fn a_spool_in_use_is_refused_not_moved_aside() {
        let dir = dir("in-use");
        let (spool, _) = Spool::open(&dir, u64::MAX).unwrap();
        spool.push(0, 1, &batch(0, 1, 3), "n").unwrap();
        let error = Spool::open(&dir, u64::MAX).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("in use by another process"), "{error}");
        assert!(!dir.join("spool.redb.damaged").exists());
        assert_eq!(spool.readings().unwrap(), 3, "the first opener's batches are where they were");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_backlog_leaves_in_requests_of_up_to_the_batch_size_in_order() {
        let dir = dir("coalesce");
        let (spool, _) = Spool::open(&dir, u64::MAX).unwrap();
        for sequence in 1..=25 {
            spool.push(0, sequence, &batch(0, sequence, 4), "n").unwrap();
        }
        let mut replayed = Vec::new();
        let mut requests = Vec::new();
        while let Some((stored, _hold)) = spool.next_request(0, MOST).unwrap() {
            requests.push((stored.batch_sequence, sequences(&stored).len()));
            replayed.extend(sequences(&stored));
            spool.remove(0, stored.batch_sequence).unwrap();
        }
        // 7 batches of 4 fit in 30 readings: numbered by the last of them.
        assert_eq!(requests, vec![(7, 28), (14, 28), (21, 28), (25, 16)]);
        let all: Vec<u64> = (1..=25).flat_map(|b| (0..4).map(move |i| b * 100 + i)).collect();
        assert_eq!(replayed, all);
        assert_eq!(*spool.bytes.lock().unwrap(), 0, "the merged records are counted out");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_batch_sent_once_is_replayed_alone_under_its_number_even_after_a_crash() {
        let dir = dir("sent-alone");
        let (spool, _) = Spool::open(&dir, u64::MAX).unwrap();
        // Tried once by the lane, then spooled: the sink may hold it.
        spool.push_marked(0, 1, &batch(0, 1, 4), "n", true).unwrap();
        for sequence in 2..=4 {
            spool.push(0, sequence, &batch(0, sequence, 4), "n").unwrap();
        }
        let (first, hold) = spool.next_request(0, MOST).unwrap().unwrap();
        assert_eq!((first.batch_sequence, sequences(&first).len()), (1, 4));
        drop(hold);
        spool.remove(0, 1).unwrap();
        let (merged, hold) = spool.next_request(0, MOST).unwrap().unwrap();
        assert_eq!((merged.batch_sequence, sequences(&merged).len()), (4, 12));
        drop(hold);
        // The node dies before the sink's answer; more is spooled, and the
        // next run opens the spool: the merged batch goes again as it was.
        drop(spool);
        let (spool, _) = Spool::open(&dir, u64::MAX).unwrap();
        spool.push(0, 5, &batch(0, 5, 4), "n").unwrap();
        let (again, _hold) = spool.next_request(0, MOST).unwrap().unwrap();
        assert_eq!((again.batch_sequence, sequences(&again)), (merged.batch_sequence, sequences(&merged)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_merge_keeps_to_one_identity_and_one_run() {
        let dir = dir("merge-bounds");
        let (spool, _) = Spool::open(&dir, u64::MAX).unwrap();
        spool.push(0, 1, &batch(0, 1, 2), "a").unwrap();
        spool.push(0, 2, &batch(0, 2, 2), "a").unwrap();
        spool.push(0, 3, &batch(0, 3, 2), "b").unwrap();
        spool.push(0, 10, &batch(0, 10, 2), "b").unwrap();
        let most = Most { run_starts: 10, ..MOST };
        let mut requests = Vec::new();
        while let Some((stored, _hold)) = spool.next_request(0, most).unwrap() {
            requests.push((stored.batch_sequence, stored.node_id.clone(), sequences(&stored).len()));
            spool.remove(0, stored.batch_sequence).unwrap();
        }
        let named = |id: &str| Some(id.to_owned());
        assert_eq!(requests, vec![(2, named("a"), 4), (3, named("b"), 2), (10, named("b"), 2)]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
