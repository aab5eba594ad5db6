//! The file source: sensors that each read a file holding one integer, such
//! as `/sys/class/thermal/thermal_zone0/temp` (millidegrees Celsius) or a
//! hwmon `temp1_input`.
//!
//! `FILE_SENSORS` lists `name=path` entries and globs, comma-separated. A
//! glob is expanded once, at start; each file it matches is a sensor named
//! after the parts of its path the wildcards matched, joined by `.`, after
//! an optional `name=` prefix: `/sys/class/hwmon/hwmon*/temp*_input` gives
//! `hwmon0.temp1_input`, and `cpu=/sys/class/hwmon/hwmon*/temp*_input`
//! gives `cpu.hwmon0.temp1_input`.

use std::{
    io::{ErrorKind, Read},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use super::{Failure, Probe, Round};
use crate::config::FileSensor;

/// The most bytes read from one file: far more than any integer takes, so a
/// file named by mistake (a log) costs little to refuse.
const MOST_BYTES: u64 = 256;

/// Reads every sensor's file at each tick.
#[derive(Debug)]
pub(crate) struct Files {
    /// The sensors, on loan to the blocking thread while it reads them.
    sensors: Option<Vec<FileSensor>>,
}

impl Files {
    /// A probe of `sensors`.
    pub(crate) fn new(sensors: Vec<FileSensor>) -> Self {
        Self { sensors: Some(sensors) }
    }
}

impl Probe for Files {
    const KIND: &'static str = "file";

    fn read(&mut self) -> impl Future<Output = Round> + Send {
        super::off_the_runtime(&mut self.sensors, read_all, Self::KIND)
    }
}

/// One round: each file read, its integer a reading, a failure otherwise.
#[allow(clippy::ptr_arg, reason = "the state off_the_runtime lends is the Vec itself")]
fn read_all(sensors: &mut Vec<FileSensor>) -> Round {
    let mut round = Round::default();
    for sensor in sensors.iter() {
        match read_integer(&sensor.path) {
            Ok(value) => round.values.push((sensor.name, value)),
            Err(reason) => round.failures.push(Failure::new(reason, format!("{:?}", sensor.path))),
        }
    }
    round
}

/// The integer `path` holds (surrounding whitespace allowed), or why not:
/// `missing`, `unreadable` or `not_an_integer`.
pub(crate) fn read_integer(path: &Path) -> Result<i64, &'static str> {
    // Non-blocking, so that a FIFO without a writer reads as empty instead
    // of holding the source up forever (regular files ignore the flag).
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path);
    let file = file.map_err(|error| match error.kind() {
        ErrorKind::NotFound => "missing",
        _ => "unreadable",
    })?;
    let mut text = String::new();
    match file.take(MOST_BYTES + 1).read_to_string(&mut text) {
        Ok(n) if n as u64 <= MOST_BYTES => text.trim().parse().map_err(|_| "not_an_integer"),
        Ok(_) => Err("not_an_integer"),
        Err(error) if error.kind() == ErrorKind::InvalidData => Err("not_an_integer"),
        Err(_) => Err("unreadable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_holds_an_integer_or_says_why_not() {
        let dir = tempdir("read");
        let path = dir.join("value");
        for (content, expected) in [
            ("  -17 \n", Ok(-17)),
            ("42000", Ok(42000)),
            ("4.2", Err("not_an_integer")),
            ("", Err("not_an_integer")),
            ("99999999999999999999", Err("not_an_integer")),
        ] {
            std::fs::write(&path, content).unwrap();
            assert_eq!(read_integer(&path), expected, "{content:?}");
        }
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert_eq!(read_integer(&path), Err("not_an_integer"));
        std::fs::write(&path, "1".repeat(10_000)).unwrap();
        assert_eq!(read_integer(&path), Err("not_an_integer"));
        assert_eq!(read_integer(&dir.join("gone")), Err("missing"));
        assert_eq!(read_integer(&dir), Err("unreadable"));
        let fifo = dir.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert_eq!(read_integer(&fifo), Err("not_an_integer"), "a FIFO without a writer does not block");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A new, empty folder for one test.
    fn tempdir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tn-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
