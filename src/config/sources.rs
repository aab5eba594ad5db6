//! What the source settings name: the file sensors `FILE_SENSORS` lists,
//! the command `EXEC_COMMAND` runs, and the sensor names each source owns.
//! Read and checked here, at start, so that a bad setting exits 2 naming
//! its variable; the sources in `node::source` run on what this yields.

use std::{collections::HashSet, path::PathBuf};

use crate::reading::{check_sensor_name, sensor_name};

/// The most file sensors a node has.
pub(crate) const MOST_FILES: usize = 10_000;

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
    /// A glob matches only paths that are not UTF-8, which cannot name a
    /// sensor.
    #[error("glob {0:?} matches only paths that are not UTF-8, which cannot name a sensor: {1}")]
    NotUtf8(String, String),
    /// An entry names a directory, not a file.
    #[error("{0:?} is a directory: name the files to read, e.g. {0}/*")]
    Directory(String),
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

/// The sensors `spec` (the value of `FILE_SENSORS`) names, globs expanded,
/// and the paths a glob matched that are not UTF-8 (left out: no sensor
/// name can hold them).
pub(crate) fn parse_file_sensors(spec: &str) -> Result<(Vec<FileSensor>, Vec<PathBuf>), SpecError> {
    let mut sensors: Vec<FileSensor> = Vec::new();
    let mut skipped = Vec::new();
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
            let (found, not_utf8) = expand(prefix, pattern, MOST_FILES - sensors.len())?;
            skipped.extend(not_utf8);
            found
        } else {
            let name = prefix.ok_or_else(|| match std::path::Path::new(pattern).is_dir() {
                true => SpecError::Directory(pattern.trim_end_matches('/').to_owned()),
                false => SpecError::Unnamed(entry.to_owned()),
            })?;
            vec![(name.to_owned(), PathBuf::from(pattern))]
        };
        for (name, path) in found {
            if path.is_dir() {
                return Err(SpecError::Directory(path.display().to_string().trim_end_matches('/').to_owned()));
            }
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
    Ok((sensors, skipped))
}

/// Whether `pattern` holds a wildcard.
fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// A file sensor's name and path.
type Named = (String, PathBuf);

/// Most paths a glob's levels before the last may match between them.
const MOST_CANDIDATES: usize = 100 * MOST_FILES;

/// The paths `pattern` matches, each with its sensor name (in the order
/// of their names), and those left out for a name that is not UTF-8.
fn expand(prefix: Option<&str>, pattern: &str, most: usize) -> Result<(Vec<Named>, Vec<PathBuf>), SpecError> {
    let glob_error = |error: glob::PatternError| SpecError::Glob(pattern.to_owned(), error.msg.to_owned());
    // Each level in turn: a path found so far and the names its wildcards
    // matched.
    let mut found: Vec<(PathBuf, Vec<String>)> = vec![(PathBuf::from("/"), Vec::new())];
    let mut not_utf8 = Vec::new();
    for level in pattern.split('/').filter(|level| !level.is_empty()) {
        if !is_glob(level) {
            found.iter_mut().for_each(|(path, _)| path.push(level));
            continue;
        }
        let wild = glob::Pattern::new(level).map_err(glob_error)?;
        let mut next = Vec::new();
        for (dir, matched) in found {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            let mut names: Vec<std::ffi::OsString> = entries.filter_map(Result::ok).map(|e| e.file_name()).collect();
            names.sort();
            for name in names {
                match name.to_str() {
                    Some(text) if wild.matches(text) => {
                        let matched = matched.iter().cloned().chain([text.to_owned()]).collect();
                        next.push((dir.join(text), matched));
                    }
                    None if wild.matches(&name.to_string_lossy()) => not_utf8.push(dir.join(&name)),
                    _ => {}
                }
            }
            if next.len() > MOST_CANDIDATES {
                return Err(SpecError::TooMany);
            }
        }
        found = next;
    }
    found.retain(|(path, _)| path.exists());
    if found.len() > most {
        return Err(SpecError::TooMany);
    }
    if found.is_empty() {
        return Err(match not_utf8.first() {
            Some(path) => SpecError::NotUtf8(pattern.to_owned(), path.to_string_lossy().into_owned()),
            None => SpecError::NoMatch(pattern.to_owned()),
        });
    }
    let named = found.into_iter().map(|(path, matched)| {
        let name: Vec<String> = prefix.map(str::to_owned).into_iter().chain(matched).collect();
        (name.join("."), path)
    });
    Ok((named.collect(), not_utf8))
}

/// `EXEC_COMMAND` as a program and its arguments: split on whitespace, or
/// handed to `/bin/sh -c` whole when `shell` is set.
pub(crate) fn argv(command: &str, shell: bool) -> Vec<String> {
    if shell {
        return vec!["/bin/sh".to_owned(), "-c".to_owned(), command.to_owned()];
    }
    command.split_ascii_whitespace().map(str::to_owned).collect()
}

/// Whether `program` can be run: a path to a file, or a name found on PATH.
pub(crate) fn findable(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).is_file();
    }
    // Without PATH, the C library's own default, as execvp(3) searches.
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// Names the configured sources own, so that a command cannot report a
/// reading under another source's sensor name.
#[derive(Debug, Clone, Default)]
pub struct Owned {
    /// SENSOR_NAME and SENSOR_COUNT, when simulated sensors run.
    simulated: Option<(String, usize)>,
    /// The file source's names.
    named: HashSet<&'static str>,
    /// Whether the host source runs (it owns every name with its prefix).
    host: bool,
}

impl Owned {
    /// The names of `simulated` sensors (base name and count), `named`
    /// others, and the host source's if `host`.
    pub fn new(simulated: Option<(String, usize)>, named: HashSet<&'static str>, host: bool) -> Self {
        Self { simulated, named, host }
    }

    /// Whether a configured source owns `name`.
    pub fn owns(&self, name: &str) -> bool {
        self.named.contains(name) || (self.host && name.starts_with(HOST_PREFIX)) || self.simulates(name)
    }

    /// Whether `name` is one of the simulated sensors': the base name alone
    /// for one sensor, else `<base>-<i>` for i from 1.
    fn simulates(&self, name: &str) -> bool {
        let Some((base, count)) = &self.simulated else { return false };
        if *count == 1 {
            return name == base;
        }
        let number = name.strip_prefix(base.as_str()).and_then(|rest| rest.strip_prefix('-'));
        number.is_some_and(|n| !n.starts_with('0') && n.parse::<usize>().is_ok_and(|i| (1..=*count).contains(&i)))
    }
}

/// The prefix of every host sensor's name.
pub const HOST_PREFIX: &str = "host_";

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
        let names: Vec<&str> = parse_file_sensors(&spec).unwrap().0.iter().map(|sensor| sensor.name).collect();
        assert_eq!(names, ["cpu", "zone0", "zone1", "hot.zone0.temp", "hot.zone1.temp"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_specs_are_refused_with_the_entry() {
        let dir = tempdir("bad");
        std::fs::create_dir_all(dir.join("subdir")).unwrap();
        let cases = [
            ("x=relative/path".to_owned(), SpecError::Entry("x=relative/path".into())),
            ("/no/name".to_owned(), SpecError::Unnamed("/no/name".into())),
            ("=/a".to_owned(), SpecError::Entry("=/a".into())),
            (format!("{}/nothing*", dir.display()), SpecError::NoMatch(format!("{}/nothing*", dir.display()))),
            ("a=/x, a=/y".to_owned(), SpecError::Duplicate("a".into())),
            ("a b=/x".to_owned(), SpecError::Name("a b".into(), "holds whitespace or a control character")),
            ("/sys/**/temp".to_owned(), SpecError::Recursive("/sys/**/temp".into())),
            (format!("{}/sub*", dir.display()), SpecError::Directory(format!("{}/subdir", dir.display()))),
            (format!("d={}/subdir", dir.display()), SpecError::Directory(format!("{}/subdir", dir.display()))),
        ];
        for (spec, expected) in cases {
            assert_eq!(parse_file_sensors(&spec).map(drop), Err(expected), "{spec}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_path_that_is_not_utf8_is_left_out_and_said_and_alone_refused() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempdir("not-utf8");
        std::fs::write(dir.join("temp1"), "1\n").unwrap();
        let odd = dir.join(std::ffi::OsStr::from_bytes(b"temp\xff"));
        std::fs::write(&odd, "2\n").unwrap();
        let (sensors, skipped) = parse_file_sensors(&format!("t={}/temp*", dir.display())).unwrap();
        assert_eq!(sensors.iter().map(|sensor| sensor.name).collect::<Vec<_>>(), ["t.temp1"]);
        assert_eq!(skipped, std::slice::from_ref(&odd));
        let only = format!("{}/temp[!1]", dir.display());
        let error = parse_file_sensors(&only).map(drop).unwrap_err();
        assert_eq!(error, SpecError::NotUtf8(only, odd.to_string_lossy().into_owned()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn commands_split_on_whitespace_unless_a_shell_is_asked_for() {
        assert_eq!(argv(" /bin/echo  a b ", false), ["/bin/echo", "a", "b"]);
        assert_eq!(argv("echo a | tr a b", true), ["/bin/sh", "-c", "echo a | tr a b"]);
        assert!(findable("sh") && findable("/bin/sh"));
        assert!(!findable("no-such-program-here") && !findable("/no/such"));
    }

    #[test]
    fn a_command_cannot_take_the_names_other_sources_own() {
        let files = std::collections::HashSet::from(["cpu_temp"]);
        let owned = Owned::new(Some(("sensor".into(), 12)), files, true);
        for taken in ["sensor-1", "sensor-12", "cpu_temp", "host_anything"] {
            assert!(owned.owns(taken), "{taken}");
        }
        for free in ["sensor", "sensor-0", "sensor-13", "sensor-01", "sensor-x", "cpu", "hostname"] {
            assert!(!owned.owns(free), "{free}");
        }
        assert!(Owned::new(Some(("s".into(), 1)), Default::default(), false).owns("s"));
    }

    /// A new, empty folder for one test.
    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tn-sources-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
