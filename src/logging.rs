//! Log output of both binaries: to stderr, as text or JSON lines.

use crate::config::LogFormat;

/// Installs the global subscriber. Standard output stays free for the
/// machine-readable summary lines.
pub fn init(level: tracing::Level, format: LogFormat) {
    // A log line that cannot be written (stderr closed: a collector that
    // died) is passed over; by default the subscriber would report it with
    // eprintln!, which panics on that same closed stderr.
    // Colours only for a person at a terminal: a file or a collector would
    // keep the escape codes.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(colours)
        .log_internal_errors(false);
    // A second call (tests that run both binaries' code) keeps the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Writes `line` to standard output, passing over a closed one (println!
/// would panic there, losing whatever the process still holds).
pub fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A gate that lets a repeated log line through at most once per period,
/// and says how many were held back since the last one.
#[derive(Debug)]
pub struct Every {
    /// The shortest time between two lines.
    period: std::time::Duration,
    /// When the last line went through.
    last: Option<std::time::Instant>,
    /// Lines held back since then.
    suppressed: u64,
}

impl Every {
    /// At most one line a second.
    pub fn second() -> Self {
        Self::new(std::time::Duration::from_secs(1))
    }

    /// At most one line per `period`.
    pub fn new(period: std::time::Duration) -> Self {
        Self { period, last: None, suppressed: 0 }
    }

    /// `Some(lines held back since the last one)` if this line may go out.
    pub fn ready(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < self.period) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}
