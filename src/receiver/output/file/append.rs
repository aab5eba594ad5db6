//! The output file itself: appends that are whole or not there at all, and
//! a path that is followed when the file is deleted, renamed or rotated.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use tracing::warn;

/// The open output and the path it belongs at.
#[derive(Debug)]
pub(crate) struct OutputFile {
    /// FILE_PATH/readings.jsonl.
    path: PathBuf,
    /// The file, opened for appending.
    file: File,
    /// Where a failed append began, while cutting it off has not worked
    /// yet: nothing may be appended behind a partial write.
    torn_from: Option<u64>,
}

impl OutputFile {
    /// Opens `path` for appending, creating it if needed.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        Ok(Self { path: path.to_owned(), file: open_append(path)?, torn_from: None })
    }

    /// Where the file belongs.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, for syncing.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Appends `bytes` whole, or leaves the file as it was and fails.
    ///
    /// A write that fails half-way (a full disk, a file-size limit) is cut
    /// off again, so a retry of the same lines is never taken for data
    /// already written. If the file turns out to have been deleted while
    /// it was written to, the lines went nowhere: the file is made anew at
    /// its path and they are written there.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.append_here(bytes)?;
        if self.file.metadata()?.nlink() == 0 {
            warn!(message = "The output file was deleted; writing to a new one at its path.", path = %self.path.display());
            self.reopen()?;
            self.append_here(bytes)?;
        }
        Ok(())
    }

    fn append_here(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.cut_torn()?;
        let start = self.file.metadata()?.len();
        let written = self.file.write_all(bytes);
        if written.is_err() {
            self.torn_from = Some(start);
            // Best effort now; the next append insists.
            let _ = self.cut_torn();
        }
        written
    }

    /// Cuts off what a failed append left behind, if anything.
    fn cut_torn(&mut self) -> io::Result<()> {
        let Some(start) = self.torn_from else { return Ok(()) };
        // The file may have been truncated meanwhile (copytruncate):
        // never lengthen it.
        if self.file.metadata()?.len() > start {
            self.file.set_len(start)?;
        }
        self.torn_from = None;
        Ok(())
    }

    /// Whether the path no longer names the open file (deleted, or renamed
    /// away by a log rotation).
    pub(crate) fn moved(&self) -> bool {
        let Ok(open) = self.file.metadata() else { return true };
        match std::fs::metadata(&self.path) {
            Ok(at_path) => (at_path.dev(), at_path.ino()) != (open.dev(), open.ino()),
            Err(_) => true,
        }
    }

    /// Opens the file at the path again (after a rotation, or on SIGHUP).
    /// Syncing what went into the old file is the caller's business (the
    /// writer does it on the blocking pool; a deleted file needs none).
    pub(crate) fn reopen(&mut self) -> io::Result<()> {
        self.cut_torn()?;
        self.file = open_append(&self.path)?;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("output-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("readings.jsonl")
    }

    #[test]
    fn lines_written_to_a_deleted_file_are_written_again_at_its_path() {
        let path = scratch("deleted");
        let mut output = OutputFile::open(&path).unwrap();
        output.append(b"one\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        output.append(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
    }

    #[test]
    fn a_renamed_file_is_noticed_and_reopened_at_its_path() {
        let path = scratch("renamed");
        let mut output = OutputFile::open(&path).unwrap();
        output.append(b"one\n").unwrap();
        assert!(!output.moved());
        let rotated = path.with_extension("1");
        std::fs::rename(&path, &rotated).unwrap();
        assert!(output.moved());
        output.reopen().unwrap();
        output.append(b"two\n").unwrap();
        assert!(!output.moved());
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "one\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
    }

    #[test]
    fn a_truncated_file_is_appended_to_from_its_new_end() {
        let path = scratch("truncated");
        let mut output = OutputFile::open(&path).unwrap();
        output.append(b"one\n").unwrap();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
        output.append(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
    }
}
