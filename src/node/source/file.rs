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
    path::{Path, PathBuf},
};

use super::{Failure, Probe, Round};
use crate::reading::{check_sensor_name, sensor_name};

/// The most file sensors a node has.
pub(crate) const MOST_FILES: usize = 10_000;

/// The most bytes read from one file: far more than any integer takes, so a
/// file named by mistake (a log) costs little to refuse.
const MOST_BYTES: u64 = 256;

/// One sensor of the file source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSensor {
    /// The sensor's name.
    pub name: &'static str,
    /// The file it reads.
    pub path: PathBuf,
}

/// Why `FILE_SENSORS` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SpecError {
    /// An entry is empty, has an empty name or path, or a relative path.
    #[error("entry {0:?} is not name=/absolute/path or an absolute glob")]
    Entry(String),
    /// An entry that is not a glob has no name.
    #[error("entry {0:?} names no sensor: write name=path")]
    Unnamed(String),
    /// A glob is malformed.
    #[error("glob {0:?}: {1}")]
    Glob(String, String),
    /// A glob matches no file.
    #[error("glob {0:?} matches no file")]
    NoMatch(String),
    /// A glob descends any depth (`**`): it would follow /sys's and /proc's
    /// endless links.
    #[error("glob {0:?}: ** is not supported; write each level, e.g. /sys/class/hwmon/*/temp*_input")]
    Recursive(String),
    /// The globs match more files than a node reads.
    #[error("the globs match more than {MOST_FILES} files")]
    TooMany,
    /// A sensor name is not one the sink takes.
    #[error("sensor name {0:?}: {1}")]
    Name(String, &'static str),
    /// Two entries give the same name.
    #[error("sensor name {0:?} is given twice")]
    Duplicate(String),
}

/// The sensors `spec` (the value of `FILE_SENSORS`) names, globs expanded.
pub(crate) fn parse(spec: &str) -> Result<Vec<FileSensor>, SpecError> {
    let mut sensors: Vec<FileSensor> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for entry in spec.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
        let (prefix, pattern) = match entry.split_once('=') {
            Some((name, path)) => (Some(name.trim()), path.trim()),
            None => (None, entry),
        };
        if !pattern.starts_with('/') || prefix == Some("") {
            return Err(SpecError::Entry(entry.to_owned()));
        }
        let found = if is_glob(pattern) {
            if pattern.contains("**") {
                return Err(SpecError::Recursive(pattern.to_owned()));
            }
            expand(prefix, pattern, MOST_FILES - sensors.len())?
        } else {
            let name = prefix.ok_or_else(|| SpecError::Unnamed(entry.to_owned()))?;
            vec![(name.to_owned(), PathBuf::from(pattern))]
        };
        for (name, path) in found {
            check_sensor_name(&name).map_err(|why| SpecError::Name(name.clone(), why))?;
            if !names.insert(name.clone()) {
                return Err(SpecError::Duplicate(name));
            }
            if sensors.len() == MOST_FILES {
                return Err(SpecError::TooMany);
            }
            sensors.push(FileSensor { name: sensor_name(&name), path });
        }
    }
    Ok(sensors)
}

/// Whether `pattern` holds a wildcard.
fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// The files `pattern` matches, each with its sensor name.
fn expand(prefix: Option<&str>, pattern: &str, most: usize) -> Result<Vec<(String, PathBuf)>, SpecError> {
    let paths = glob::glob(pattern).map_err(|error| SpecError::Glob(pattern.to_owned(), error.msg.to_owned()))?;
    let wild: Vec<bool> = Path::new(pattern).components().map(|c| is_glob(&c.as_os_str().to_string_lossy())).collect();
    let mut found = Vec::new();
    for path in paths.filter_map(Result::ok) {
        let matched = path
            .components()
            .zip(&wild)
            .filter(|(_, wild)| **wild)
            .map(|(component, _)| component.as_os_str().to_string_lossy().into_owned());
        let name: Vec<String> = prefix.map(str::to_owned).into_iter().chain(matched).collect();
        found.push((name.join("."), path));
        if found.len() > most {
            return Err(SpecError::TooMany);
        }
    }
    if found.is_empty() {
        return Err(SpecError::NoMatch(pattern.to_owned()));
    }
    Ok(found)
}

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
    fn named_entries_and_globs_name_their_sensors() {
        let dir = tempdir("names");
        for zone in ["zone0", "zone1"] {
            std::fs::create_dir_all(dir.join(zone)).unwrap();
            std::fs::write(dir.join(zone).join("temp"), "42000\n").unwrap();
        }
        let spec = format!("cpu={0}/zone0/temp, {0}/zone*/temp, hot={0}/zone?/te*", dir.display());
        let names: Vec<&str> = parse(&spec).unwrap().iter().map(|sensor| sensor.name).collect();
        assert_eq!(names, ["cpu", "zone0", "zone1", "hot.zone0.temp", "hot.zone1.temp"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_specs_are_refused_with_the_entry() {
        let dir = tempdir("bad");
        let cases = [
            ("x=relative/path".to_owned(), SpecError::Entry("x=relative/path".into())),
            ("/no/name".to_owned(), SpecError::Unnamed("/no/name".into())),
            ("=/a".to_owned(), SpecError::Entry("=/a".into())),
            (format!("{}/nothing*", dir.display()), SpecError::NoMatch(format!("{}/nothing*", dir.display()))),
            ("a=/x, a=/y".to_owned(), SpecError::Duplicate("a".into())),
            ("a b=/x".to_owned(), SpecError::Name("a b".into(), "holds whitespace or a control character")),
            ("/sys/**/temp".to_owned(), SpecError::Recursive("/sys/**/temp".into())),
        ];
        for (spec, expected) in cases {
            assert_eq!(parse(&spec), Err(expected), "{spec}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

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
    pub(super) fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tn-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
