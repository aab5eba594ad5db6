//! De-duplication of retried batches. A node's lane sends one batch at a
//! time and retries only that one, so remembering, per node and lane, the
//! last batch written is enough to recognise a retry of it.

use std::{
    collections::HashMap,
    io::{self, Read, Seek, SeekFrom},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// A node's lane: (node_id, lane).
type LaneKey = (String, u32);

/// The last batch written, per node and lane.
#[derive(Debug)]
pub(crate) struct Deduplicator {
    /// One lock per lane: a retry waits for the attempt before it to finish,
    /// then sees whether it was written. `None`: nothing written yet (a
    /// client may number its first batch 0).
    lanes: Mutex<HashMap<LaneKey, Arc<AsyncMutex<Option<u64>>>>>,
    /// Most lanes remembered; beyond it, idle ones are forgotten.
    capacity: usize,
}

impl Deduplicator {
    /// An empty window of `capacity` lanes.
    pub(crate) fn new(capacity: usize) -> Self {
        Self { lanes: Mutex::default(), capacity }
    }

    /// Remembers `batch` as the last one written by `lane` of `node`.
    pub(crate) fn seed(&self, node: &str, lane: u32, batch: u64) {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        lanes.insert((node.to_owned(), lane), Arc::new(AsyncMutex::new(Some(batch))));
    }

    /// Locks `lane` of `node`; the guard holds the last batch it wrote, if
    /// any.
    pub(crate) async fn lock(&self, node: &str, lane: u32) -> OwnedMutexGuard<Option<u64>> {
        let entry = {
            let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            if lanes.len() >= self.capacity && !lanes.contains_key(&(node.to_owned(), lane)) {
                // Forget a lane nobody is using right now.
                let idle = lanes.iter().find(|(_, lock)| lock.try_lock().is_ok()).map(|(key, _)| key.clone());
                if let Some(idle) = idle {
                    lanes.remove(&idle);
                }
            }
            Arc::clone(lanes.entry((node.to_owned(), lane)).or_default())
        };
        entry.lock_owned().await
    }

    /// Every lane remembered and the last batch it wrote.
    pub(crate) fn snapshot(&self) -> Vec<(String, u32, u64)> {
        let lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        lanes.iter().filter_map(|((node, lane), last)| Some((node.clone(), *lane, (*last.try_lock().ok()?)?))).collect()
    }

    /// How many lanes are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Saves `lanes` (node, lane, last batch written) at `path`, whole or not
/// at all: written beside it, synced, and renamed over it. A clean stop
/// saves them, so that a retry of a batch written long before the stop
/// (further back than [`recover`] reads) is still known after a restart.
pub(crate) fn save(path: &Path, lanes: &[(String, u32, u64)]) -> io::Result<()> {
    let mut text = String::new();
    for (node, lane, batch) in lanes {
        let line = serde_json::json!({ "node_id": node, "lane": lane, "batch": batch });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    {
        let mut file = std::fs::File::create(&partial)?;
        io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&partial, path)
}

/// The lanes [`save`] saved at `path`; none if there is no such file.
/// Lines that do not parse are passed over.
pub(crate) fn load(path: &Path) -> io::Result<Vec<(String, u32, u64)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    Ok(text
        .lines()
        .filter_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            lane_batch(&value).map(|(node, lane, batch)| (node.to_owned(), lane, batch))
        })
        .collect())
}

/// The node, lane and batch a line of the output or of the saved lanes
/// names, if it names all three.
fn lane_batch(value: &serde_json::Value) -> Option<(&str, u32, u64)> {
    let lane = u32::try_from(value["lane"].as_u64()?).ok()?;
    Some((value["node_id"].as_str()?, lane, value["batch"].as_u64()?))
}

/// What [`recover`] found at the end of the output.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// The last batch written by each node's lane: (node, lane, batch).
    pub lanes: Vec<(String, u32, u64)>,
    /// Bytes of a torn last line that were cut off.
    pub torn: u64,
}

/// Prepares the output at `path` for appending after a crash: cuts off an
/// unfinished write (a torn last line, and the lines of a request after the
/// last one marked whole with `batch_end`), then reads the last `window`
/// bytes for the last batch each node's lane wrote whole.
///
/// A window without any `batch_end` line was written before the marker
/// existed: only a torn line is cut from it, and no batch is taken from it,
/// so a retry is written again rather than taken for a duplicate.
pub(crate) fn recover(path: &Path, window: u64) -> io::Result<Recovered> {
    let mut file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Recovered::default()),
        Err(error) => return Err(error),
    };
    let length = file.metadata()?.len();
    let start = length.saturating_sub(window);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let lines_end = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let whole = last_batch_end(&tail[..lines_end]);
    let complete = whole.unwrap_or(lines_end);
    let torn = (tail.len() - complete) as u64;
    if torn > 0 {
        file.set_len(length - torn)?;
        file.sync_data()?;
    }
    let mut last: HashMap<LaneKey, u64> = HashMap::new();
    let known_whole = if whole.is_some() { &tail[..complete] } else { &[][..] };
    // The first line of the window may be cut at its start: it fails to
    // parse and is passed over like any other line without an identity.
    for line in known_whole.split(|&b| b == b'\n') {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
        let Some((node, lane, batch)) = lane_batch(&value) else { continue };
        let entry = last.entry((node.to_owned(), lane)).or_default();
        *entry = (*entry).max(batch);
    }
    Ok(Recovered { lanes: last.into_iter().map(|((node, lane), batch)| (node, lane, batch)).collect(), torn })
}

/// The end (just past its newline) of the last line in `lines` that closes a
/// request, if any.
fn last_batch_end(lines: &[u8]) -> Option<usize> {
    const MARK: &[u8] = b",\"batch_end\":true}";
    let mut end = lines.len();
    while end > 0 {
        let start = lines[..end - 1].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if lines[start..end - 1].ends_with(MARK) {
            return Some(end);
        }
        end = start;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn remembers_the_last_batch_per_lane() {
        let dedup = Deduplicator::new(10);
        *dedup.lock("a", 0).await = Some(5);
        assert_eq!(*dedup.lock("a", 0).await, Some(5));
        assert_eq!(*dedup.lock("a", 1).await, None);
        assert_eq!(*dedup.lock("b", 0).await, None);
    }

    #[tokio::test]
    async fn the_lanes_saved_at_a_stop_are_loaded_whole() {
        let dir = std::env::temp_dir().join(format!("dedup-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("readings.lanes");
        assert_eq!(load(&path).unwrap(), Vec::new(), "nothing saved yet");
        let memory = Deduplicator::new(8);
        memory.seed("a", 0, 7);
        memory.seed("b \"quoted\"", 3, u64::MAX);
        *memory.lock("c", 1).await = Some(0);
        drop(memory.lock("never-written", 2).await);
        let mut saved = memory.snapshot();
        saved.sort();
        save(&path, &saved).unwrap();
        let mut loaded = load(&path).unwrap();
        loaded.sort();
        assert_eq!(loaded, saved);
        assert_eq!(loaded.len(), 3, "a lane that wrote nothing is not saved: {loaded:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn forgets_idle_lanes_beyond_its_capacity() {
        let dedup = Deduplicator::new(2);
        for lane in 0..5 {
            *dedup.lock("a", lane).await = Some(1);
        }
        assert_eq!(dedup.len(), 2);
    }

    #[test]
    fn recovery_cuts_a_torn_line_and_finds_the_last_batches() {
        let dir = std::env::temp_dir().join(format!("dedup-recover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("readings.jsonl");
        let text = concat!(
            "{\"sensor_name\":\"s\",\"value\":1,\"created_at\":\"x\",\"sequence\":0,\"batch_end\":true}\n",
            "{\"sensor_name\":\"s\",\"value\":1,\"created_at\":\"x\",\"sequence\":0,\"node_id\":\"n\",\"lane\":1,\"batch\":7,\"batch_end\":true}\n",
            "{\"sensor_name\":\"s\",\"value\":1,\"created_at\":\"x\",\"sequence\":1,\"node_id\":\"n\",\"lane\":1,\"batch\":8,\"batch_end\":true}\n",
            "{\"sensor_name\":\"s\",\"value\":1,\"created_at\":\"x\",\"sequence\":0,\"node_id\":\"m\",\"lane\":0,\"batch\":3,\"batch_end\":true}\n",
            "{\"sensor_name\":\"s\",\"val",
        );
        std::fs::write(&path, text).unwrap();
        let Recovered { mut lanes, torn } = recover(&path, 1 << 20).unwrap();
        lanes.sort();
        assert_eq!(lanes, vec![("m".to_owned(), 0, 3), ("n".to_owned(), 1, 8)]);
        assert_eq!(torn, "{\"sensor_name\":\"s\",\"val".len() as u64);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("\"batch\":3,\"batch_end\":true}\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn recovery_cuts_a_partly_written_batch_and_does_not_take_it_for_written() {
        let dir = std::env::temp_dir().join(format!("dedup-partial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("readings.jsonl");
        let whole = "{\"sensor_name\":\"s\",\"value\":1,\"created_at\":\"x\",\"sequence\":0,\"node_id\":\"n\",\"lane\":0,\"batch\":4,\"batch_end\":true}\n";
        let partial = concat!(
            "{\"sensor_name\":\"s\",\"value\":1,\"created_at\":\"x\",\"sequence\":1,\"node_id\":\"n\",\"lane\":0,\"batch\":5}\n",
            "{\"sensor_name\":\"t\",\"value\":1,\"created_at\":\"x\",\"sequence\":1,\"node_id\":\"n\",\"lane\":0,\"batch\":5}\n",
            "{\"sensor_name\":\"u\",\"value\":1,\"cre",
        );
        std::fs::write(&path, format!("{whole}{partial}")).unwrap();
        let Recovered { lanes, torn } = recover(&path, 1 << 20).unwrap();
        assert_eq!(lanes, vec![("n".to_owned(), 0, 4)]);
        assert_eq!(torn, partial.len() as u64);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_from_before_the_marker_keeps_its_lines_and_seeds_nothing() {
        let dir = std::env::temp_dir().join(format!("dedup-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("readings.jsonl");
        let text = "{\"sensor_name\":\"s\",\"value\":1,\"created_at\":\"x\",\"sequence\":0,\"node_id\":\"n\",\"lane\":0,\"batch\":4}\n";
        std::fs::write(&path, text).unwrap();
        assert_eq!(recover(&path, 1 << 20).unwrap(), Recovered::default());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
