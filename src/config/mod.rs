//! Configuration of both binaries, read from environment variables.
//!
//! Every variable is parsed by `envconfig` from one map of strings (the
//! process environment, after a `.env` file is loaded, or a map a test
//! built), then checked by `validate()`. Both steps report failures as a
//! [`ConfigError`] that names the variable, the value and what is accepted.

mod node;
mod sink;

use std::collections::HashMap;

pub use node::{LogFormat, NodeConfig};
pub use sink::SinkConfig;

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// The variable is set to something outside what it accepts.
    #[error("invalid configuration: {variable}={value:?}: expected {expected}")]
    Invalid {
        /// Name of the environment variable.
        variable: &'static str,
        /// The value it was given.
        value: String,
        /// What the variable accepts.
        expected: &'static str,
    },
    /// The `.env` file exists but cannot be read.
    #[error("invalid configuration: .env file: {0}")]
    EnvFile(String),
}

/// What each variable accepts, for messages. One table for both binaries: a
/// variable means the same to each of them or has a separate name.
const ACCEPTED: &[(&str, &str)] = &[
    ("SENSOR_NAME", "a non-empty name"),
    ("SENSOR_COUNT", "a whole number from 1 to 1000000"),
    (
        "SENSOR_VALUE_RATE_PER_SECOND",
        "a number of readings per second greater than 0 and at most 1000000000 (fractions allowed, e.g. 0.5)",
    ),
    (
        "REQUEST_RATE_PER_SECOND",
        "a number of requests per second greater than 0 and at most 1000000 (fractions allowed, e.g. 0.5), or inf for no limit",
    ),
    ("REQUEST_BURST", "a whole number from 1 to 4294967295"),
    ("GRPC_SERVER_SOCKET", "host:port, e.g. localhost:8000"),
    ("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", "a whole number of retries, 0 or more"),
    ("GRPC_CLIENT_RETRY_SEND_INTERVAL", "a duration greater than 0, e.g. 500ms or 1s"),
    ("BATCH_SIZE", "a whole number from 1 to 1000000"),
    ("BATCH_TIMEOUT", "a duration greater than 0, e.g. 500ms or 1s"),
    ("RPC_TIMEOUT", "a duration greater than 0, e.g. 5s"),
    ("SHUTDOWN_TIMEOUT", "a duration greater than 0, e.g. 10s"),
    ("LOGGER_MIN_LOG_LEVEL", "one of trace, debug, info, warn, error"),
    ("LOG_FORMAT", "text or json"),
    ("RATE_PER_SECOND", "a whole number of bytes per second from 1 to 4294967295"),
    ("FILE_PATH", "a non-empty folder path"),
    ("BUFFER_SIZE", "a whole number of bytes from 1 to 1073741824"),
    ("BUFFER_FLUSH_INTERVAL", "a duration greater than 0, e.g. 1s"),
];

/// Reads the process environment, after loading `.env` from the working
/// folder when there is one. Variables already set win over the file, as
/// with `docker run --env-file`.
pub fn process_env() -> Result<HashMap<String, String>, ConfigError> {
    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(error) if error.not_found() => {}
        Err(error) => return Err(ConfigError::EnvFile(error.to_string())),
    }
    Ok(std::env::vars().collect())
}

/// Parses a configuration struct from `vars`, naming the variable on error.
fn parse<C: envconfig::Envconfig>(vars: &HashMap<String, String>) -> Result<C, ConfigError> {
    C::init_from_hashmap(vars).map_err(|error| {
        let variable = match error {
            envconfig::Error::EnvVarMissing { name } | envconfig::Error::ParseError { name } => name,
        };
        invalid(variable, vars.get(variable).map_or("", String::as_str))
    })
}

/// Parses a configuration struct from `vars` and checks it with `validate`.
/// Errors quote the value as it was written, not as it was parsed.
pub(crate) fn load<C: envconfig::Envconfig>(
    vars: &HashMap<String, String>,
    validate: impl FnOnce(&C) -> Result<(), ConfigError>,
) -> Result<C, ConfigError> {
    let config: C = parse(vars)?;
    validate(&config).map_err(|error| match error {
        ConfigError::Invalid { variable, value, expected } => {
            let value = vars.get(variable).cloned().unwrap_or(value);
            ConfigError::Invalid { variable, value, expected }
        }
        other => other,
    })?;
    Ok(config)
}

/// The error for `variable` set to `value`.
pub(crate) fn invalid(variable: &'static str, value: impl Into<String>) -> ConfigError {
    let expected =
        ACCEPTED.iter().find(|(name, _)| *name == variable).map_or("a valid value", |(_, expected)| expected);
    ConfigError::Invalid { variable, value: value.into(), expected }
}

/// Fails with [`invalid`] unless `ok`.
pub(crate) fn ensure(ok: bool, variable: &'static str, value: impl ToString) -> Result<(), ConfigError> {
    if ok { Ok(()) } else { Err(invalid(variable, value.to_string())) }
}

/// Fails unless `duration` is longer than zero.
pub(crate) fn ensure_positive(variable: &'static str, duration: humantime::Duration) -> Result<(), ConfigError> {
    ensure(!duration.is_zero(), variable, duration)
}
