//! Log output of both binaries: to stderr, as text or JSON lines.

use crate::config::LogFormat;

/// Installs the global subscriber. Standard output stays free for the
/// machine-readable summary lines.
pub fn init(level: tracing::Level, format: LogFormat) {
    let builder = tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::stderr);
    // A second call (tests that run both binaries' code) keeps the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
