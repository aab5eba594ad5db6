//! Configuration of both binaries, read from environment variables.
//!
//! Every variable is parsed by `envconfig` from one map of strings (the
//! process environment, after a `.env` file is loaded, or a map a test
//! built), then checked by `validate()`. Both steps report failures as a
//! [`ConfigError`] that names the variable, the value and what is accepted.

mod node;
pub mod reference;
mod remote_write;
mod sink;
mod sources;

use std::collections::HashMap;

pub(crate) use node::tokenable;
pub use node::{
    ClientTls, Destination, Jitter, LogFormat, MAX_REQUEST_RATE, MAX_SENSOR_RATE, NodeConfig, Overflow, RequestRate,
    Retries,
};
pub use remote_write::RemoteWriteConfig;
pub(crate) use remote_write::shown as shown_url;
pub use sink::{OutputKind, ServerTls, SinkConfig};
pub use sources::{FileSensor, HOST_PREFIX, Owned};

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
    /// The variable's value parsed but cannot be used, for a reason that
    /// depends on the value (a glob that matches nothing, a name clash).
    #[error("invalid configuration: {variable}={value:?}: {reason}")]
    Unusable {
        /// Name of the environment variable.
        variable: &'static str,
        /// The value it was given.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The `.env` file exists but cannot be read.
    #[error("invalid configuration: .env file: {0}")]
    EnvFile(String),
}

/// Shown instead of a value that holds credentials.
pub(crate) const HIDDEN_CREDENTIALS: &str = "(holds credentials, not shown)";

/// What each variable accepts, for messages. One table for both binaries: a
/// variable means the same to each of them or has a separate name.
const ACCEPTED: &[(&str, &str)] = &[
    ("SENSOR_NAME", "a non-empty name of at most 256 bytes with its `-N` suffix (SENSOR_COUNT > 1)"),
    (
        "SENSOR_COUNT",
        "a whole number from 0 to 1000000; 0 (no simulated sensors) only with HOST_INTERVAL, FILE_SENSORS or EXEC_COMMAND",
    ),
    ("HOST_INTERVAL", "a duration from 1ms to 3650 days, e.g. 1s (Linux only), or unset for no host source"),
    ("FILE_INTERVAL", "a duration from 1ms to 3650 days, e.g. 10s"),
    ("EXEC_INTERVAL", "a duration from 1ms to 3650 days, e.g. 10s"),
    ("EXEC_TIMEOUT", "a duration from 1ms to 3650 days, e.g. 5s"),
    ("EXEC_COMMAND", "a command whose program is a file or is found on PATH"),
    ("EXEC_SHELL", "true or false"),
    (
        "SENSOR_VALUE_RATE_PER_SECOND",
        "a number of readings per second from 0.000001 to 1000 (fractions allowed, e.g. 0.5)",
    ),
    (
        "REQUEST_RATE_PER_SECOND",
        "a number of requests per second from 0.000001 to 1000000 (fractions allowed, e.g. 0.5), or inf for no limit",
    ),
    ("REQUEST_BURST", "a whole number from 1 to 4294967295"),
    ("GRPC_SERVER_SOCKET", "host:port with a port from 1 (the sink: 0 for any free one), e.g. localhost:8000"),
    ("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", "a whole number of retries, 0 or more, or inf for no limit"),
    ("GRPC_CLIENT_RETRY_SEND_INTERVAL", "a duration from 1ms to 3650 days, e.g. 500ms or 1s"),
    ("GRPC_CLIENT_RETRY_MULTIPLIER", "a number from 1 to 100, e.g. 2"),
    (
        "GRPC_CLIENT_RETRY_MAX_INTERVAL",
        "a duration at least GRPC_CLIENT_RETRY_SEND_INTERVAL and at most 3650 days, e.g. 30s",
    ),
    ("GRPC_CLIENT_RETRY_MAX_ELAPSED", "a duration of at most 3650 days, e.g. 5m, or 0s for no limit"),
    ("GRPC_CLIENT_RETRY_JITTER", "full or none"),
    ("GRPC_CLIENT_RETRY_BUDGET", "a number of tokens from 1 to 1000000, e.g. 10"),
    ("NODE_ID", "a non-empty identity of at most 128 characters"),
    ("BATCH_SIZE", "a whole number from 1 to 1000000"),
    ("MAX_IN_FLIGHT", "a whole number from 1 to 256"),
    ("OVERFLOW_POLICY", "block, drop-oldest, drop-newest or spool"),
    ("SPOOL_DIR", "a folder the node can create and write files in, required by OVERFLOW_POLICY=spool"),
    ("SPOOL_MAX_BYTES", "a whole number of bytes, at least 65536"),
    ("QUEUE_CAPACITY", "a whole number of readings from 1 to 100000000"),
    ("BATCH_TIMEOUT", "a duration from 1ms to 3650 days, e.g. 500ms or 1s"),
    ("RPC_TIMEOUT", "a duration from 1ms to 3650 days, e.g. 5s"),
    ("SHUTDOWN_TIMEOUT", "a duration from 1ms to 3650 days, e.g. 10s"),
    ("LOGGER_MIN_LOG_LEVEL", "one of trace, debug, info, warn, error"),
    ("LOG_FORMAT", "text or json"),
    ("RATE_PER_SECOND", "a whole number of bytes per second from 1 to 4294967295"),
    ("FILE_PATH", "a non-empty path of a folder (or of none yet) that the sink can create and write"),
    ("BUFFER_SIZE", "a whole number of bytes from 1 to 1073741824"),
    ("BUFFER_FLUSH_INTERVAL", "a duration from 1ms to 3650 days, e.g. 1s"),
    ("METRICS_ADDR", "host:port to serve /metrics, /healthz and /readyz on, e.g. 0.0.0.0:9100"),
    ("GRPC_COMPRESSION", "none or gzip"),
    ("SINK_AUTH_TOKEN", "a non-empty token of visible ASCII characters"),
    ("TLS_CA_CERT", "a readable PEM file holding the certificate of the CA that signed the sink's certificate"),
    ("TLS_SERVER_NAME", "the DNS name or IP address the sink's certificate is issued for; needs TLS_CA_CERT"),
    ("TLS_CLIENT_CERT", "a readable PEM file holding a certificate, set together with TLS_CLIENT_KEY and TLS_CA_CERT"),
    ("TLS_CLIENT_KEY", "a readable PEM file holding the private key of TLS_CLIENT_CERT, set together with it"),
    ("TLS_CERT", "a readable PEM file holding a certificate, set together with TLS_KEY"),
    ("TLS_KEY", "a readable PEM file holding a private key, set together with TLS_CERT"),
    (
        "TLS_CLIENT_CA",
        "a readable PEM file holding the certificate of the CA that signs node certificates; needs TLS_CERT",
    ),
    ("MAX_MESSAGE_BYTES", "a whole number of bytes from 1024 to 1073741824"),
    ("MAX_ITEMS_PER_REQUEST", "a whole number from 1 to 10000000"),
    ("MAX_BYTES_IN_FLIGHT", "a whole number of bytes from 1048576 to 1099511627776"),
    ("MAX_CONNECTIONS", "a whole number from 1 to 1000000"),
    ("OUTPUT", "file or remote-write"),
    ("DESTINATION", "sink or remote-write"),
    ("REMOTE_WRITE_URL", "a URL without credentials in it (use REMOTE_WRITE_USERNAME and REMOTE_WRITE_PASSWORD)"),
    (
        "REMOTE_WRITE_TLS_CA_CERT",
        "a readable PEM file of the CAs to trust for an https:// REMOTE_WRITE_URL (default: /etc/ssl/certs/ca-certificates.crt, which must then exist); only with https://",
    ),
    (
        "REMOTE_WRITE_TLS_CLIENT_CERT",
        "a readable PEM file holding the certificate shown to the database, set together with REMOTE_WRITE_TLS_CLIENT_KEY; only with https://",
    ),
    ("REMOTE_WRITE_TLS_CLIENT_KEY", "a readable PEM file holding the private key of REMOTE_WRITE_TLS_CLIENT_CERT"),
    ("REMOTE_WRITE_PASSWORD", "a non-empty password, set together with REMOTE_WRITE_USERNAME"),
    ("REMOTE_WRITE_METRIC", "a Prometheus metric name not starting with __, e.g. sensor_value"),
    ("REMOTE_WRITE_TIMEOUT", "a duration from 1ms to 3650 days, e.g. 4s"),
    ("REMOTE_WRITE_MAX_AGE", "a duration from 1m to 3650 days, e.g. 30d"),
    ("REMOTE_WRITE_MAX_AHEAD", "a duration from 1s to 3650 days, e.g. 10m"),
    ("REMOTE_WRITE_CONCURRENCY", "a whole number of requests from 1 to 64"),
    ("REMOTE_WRITE_MAX_SAMPLES", "a whole number of samples from 1 to 1000000"),
    ("REMOTE_WRITE_BEARER_TOKEN", "a non-empty token of visible ASCII characters, not with REMOTE_WRITE_USERNAME"),
    ("REMOTE_WRITE_USERNAME", "a user name, set together with REMOTE_WRITE_PASSWORD"),
];

/// Reads the process environment, after loading `.env` from the working
/// folder when there is one (only there: not from a parent folder).
/// Variables already set win over the file, as with `docker run --env-file`.
pub fn process_env() -> Result<HashMap<String, String>, ConfigError> {
    match dotenvy::from_path(".env") {
        Ok(_) => {}
        Err(error) if error.not_found() => {}
        // The line itself is not echoed: it may hold a secret.
        Err(dotenvy::Error::LineParse(_, at)) => {
            return Err(ConfigError::EnvFile(format!("a line cannot be parsed (at character {at} of the line)")));
        }
        Err(error) => return Err(ConfigError::EnvFile(error.to_string())),
    }
    from_os(std::env::vars_os())
}

/// The variables of `vars` as strings. One this configuration reads that is
/// not UTF-8 is an error naming it (never its value); others are passed over.
fn from_os(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<HashMap<String, String>, ConfigError> {
    let mut map = HashMap::new();
    for (name, value) in vars {
        let Ok(name) = name.into_string() else { continue };
        match value.into_string() {
            Ok(value) => {
                map.insert(name, value);
            }
            Err(_) => {
                if let Some((variable, expected)) = ACCEPTED.iter().find(|(known, _)| *known == name) {
                    let value = "(not UTF-8)".to_owned();
                    return Err(ConfigError::Invalid { variable, value, expected });
                }
            }
        }
    }
    Ok(map)
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
        // Secrets are never echoed.
        ConfigError::Invalid {
            variable: "SINK_AUTH_TOKEN" | "REMOTE_WRITE_BEARER_TOKEN" | "REMOTE_WRITE_PASSWORD",
            ..
        } => error,
        ConfigError::Invalid { ref value, .. } if value == HIDDEN_CREDENTIALS => error,
        // A URL shown without its query, which may hold a token.
        ConfigError::Invalid { variable: "REMOTE_WRITE_URL", ref value, .. }
            if value.ends_with(remote_write::QUERY_NOT_SHOWN) =>
        {
            error
        }
        // Nor are the contents of files: only their names.
        ConfigError::Invalid { variable, .. } if variable.starts_with("TLS_") => error,
        ConfigError::Invalid { variable, value, expected } => {
            let value = vars.get(variable).cloned().unwrap_or(value);
            ConfigError::Invalid { variable, value: shortened(value), expected }
        }
        other => other,
    })?;
    Ok(config)
}

/// `value` as an error line shows it: a value of more than 200 bytes by its
/// first 64 characters and its length, not whole.
fn shortened(value: String) -> String {
    if value.len() <= 200 {
        return value;
    }
    let start: String = value.chars().take(64).collect();
    format!("{start}… ({} bytes)", value.len())
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

/// What a PEM file named by a TLS variable must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pem {
    /// One or more certificates.
    Certificates,
    /// A private key.
    PrivateKey,
}

/// Reads the PEM file named by `variable`, if it is set, and checks that it
/// holds what it must: an empty file, a text file or a key where a
/// certificate belongs is refused here, naming the variable, rather than
/// failing every connection later.
pub(crate) fn read_pem(
    variable: &'static str,
    path: Option<&std::path::Path>,
    holds: Pem,
) -> Result<Option<String>, ConfigError> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let Some(path) = path else { return Ok(None) };
    let bad = || invalid(variable, path.display().to_string());
    let text = read_small(path).ok_or_else(bad)?;
    let valid = match holds {
        Pem::Certificates => {
            let mut certificates = CertificateDer::pem_slice_iter(text.as_bytes()).peekable();
            certificates.peek().is_some() && certificates.all(|certificate| certificate.is_ok())
        }
        Pem::PrivateKey => PrivateKeyDer::from_pem_slice(text.as_bytes()).is_ok(),
    };
    ensure(valid, variable, path.display())?;
    Ok(Some(text))
}

/// Checks a client certificate chain `chain` (PEM, from the file `cert`
/// names) and its private key `key` (PEM, from the file `key_file` names):
/// the first certificate must be readable whole as X.509, of version 3 when
/// `v3_only` (rustls, on the sink's side too, takes no other from a
/// client), and the key one rustls can sign with and that certificate's.
/// Each fault names the variable holding it.
pub(crate) fn check_identity(
    cert: (&'static str, &std::path::Path),
    key_file: (&'static str, &std::path::Path),
    chain: &str,
    key: &str,
    v3_only: bool,
) -> Result<(), ConfigError> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use tokio_rustls::rustls::crypto::ring::sign::any_supported_type;
    let unusable = |(variable, path): (&'static str, &std::path::Path), reason: String| ConfigError::Unusable {
        variable,
        value: path.display().to_string(),
        reason,
    };
    let certificates: Vec<CertificateDer> = CertificateDer::pem_slice_iter(chain.as_bytes()).flatten().collect();
    let Some(first) = certificates.first() else { return Err(invalid(cert.0, cert.1.display().to_string())) };
    match certificate_version(first) {
        None => {
            return Err(unusable(
                cert,
                "its first certificate is not readable as X.509 (cut short, or bytes after it)".into(),
            ));
        }
        Some(version) if v3_only && version != 3 => {
            // What `openssl x509 -req` makes without an extension file.
            let made_by = if version == 1 { " (what `openssl x509 -req` makes without an extension file)" } else { "" };
            let reason = format!("an X.509 version {version} certificate{made_by}: {ONLY_VERSION_3}");
            return Err(unusable(cert, reason));
        }
        Some(_) => {}
    }
    if let Some((not_before, not_after)) = certificate_validity(first) {
        let now = std::time::SystemTime::now();
        let at = |seconds: i64| {
            let since = std::time::Duration::from_secs(seconds.max(0).unsigned_abs());
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + since)
        };
        let now_seconds = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if now_seconds > not_after {
            let reason = format!(
                "it expired at {} (this machine's clock reads {}): the other side refuses it at the handshake; issue a new one",
                at(not_after),
                humantime::format_rfc3339_seconds(now)
            );
            return Err(unusable(cert, reason));
        }
        if now_seconds < not_before {
            let reason = format!(
                "it is valid only from {} (this machine's clock reads {}): the other side refuses it at the handshake",
                at(not_before),
                humantime::format_rfc3339_seconds(now)
            );
            return Err(unusable(cert, reason));
        }
    }
    let Ok(key_der) = PrivateKeyDer::from_pem_slice(key.as_bytes()) else {
        return Err(invalid(key_file.0, key_file.1.display().to_string()));
    };
    let signer = any_supported_type(&key_der).ok();
    let Some(key_spki) = signer.as_ref().and_then(|signer| signer.public_key()) else {
        return Err(unusable(
            key_file,
            "a key TLS cannot sign with here: RSA of 2048 bits or more, ECDSA P-256 or P-384, or Ed25519 can".into(),
        ));
    };
    let fits = |certificate: &CertificateDer| subject_public_key_info(certificate) == Some(key_spki.as_ref());
    if fits(first) {
        return Ok(());
    }
    match certificates.iter().position(fits) {
        Some(at) => Err(unusable(
            cert,
            format!(
                "the key of {} is that of certificate {} in this file: the client's own certificate must come first, then the CAs that issued it",
                key_file.0,
                at + 1
            ),
        )),
        None => Err(invalid(key_file.0, key_file.1.display().to_string())),
    }
}

/// The X.509 version (1, 2 or 3) of the DER certificate `der`, or `None`
/// when it is not one whole certificate.
fn certificate_version(der: &[u8]) -> Option<u8> {
    let mut tbs = to_be_signed(der)?;
    // [0] EXPLICIT version, absent in v1: an INTEGER, 0 for v1 to 2 for v3.
    if tbs.first() != Some(&0xa0) {
        return Some(1);
    }
    let (_, _, mut version) = der_element(&mut tbs)?;
    match der_element(&mut version)? {
        (0x02, _, &[number]) if number <= 2 && version.is_empty() => Some(number + 1),
        _ => None,
    }
}

/// When the DER certificate `der` is valid, from and until, in seconds
/// since 1970; `None` when its validity cannot be read.
fn certificate_validity(der: &[u8]) -> Option<(i64, i64)> {
    let mut tbs = to_be_signed(der)?;
    // [0] version, absent in v1; then serial, signature algorithm, issuer,
    // and the validity: two times.
    if tbs.first() == Some(&0xa0) {
        der_element(&mut tbs)?;
    }
    for _ in 0..3 {
        der_element(&mut tbs)?;
    }
    let (0x30, _, mut validity) = der_element(&mut tbs)? else { return None };
    let (from_tag, _, from) = der_element(&mut validity)?;
    let (until_tag, _, until) = der_element(&mut validity)?;
    Some((asn1_time(from_tag, from)?, asn1_time(until_tag, until)?))
}

/// An ASN.1 UTCTime (tag 0x17, `YYMMDDHHMMSSZ`, 1950 to 2049) or
/// GeneralizedTime (0x18, `YYYYMMDDHHMMSSZ`) in seconds since 1970.
fn asn1_time(tag: u8, text: &[u8]) -> Option<i64> {
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = std::str::from_utf8(text.get(range)?).ok()?;
        part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse().ok())?
    };
    let (year, rest) = match (tag, text.len()) {
        (0x17, 13) => {
            let year = digits(0..2)?;
            (if year < 50 { 2000 + year } else { 1900 + year }, 2)
        }
        (0x18, 15) => (digits(0..4)?, 4),
        _ => return None,
    };
    if text.last() != Some(&b'Z') {
        return None;
    }
    let field = |i: usize| digits(rest + 2 * i..rest + 2 * i + 2);
    let (month, day, hour, minute, second) = (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Days from 1970-01-01 to the date (the proleptic Gregorian calendar).
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

/// The sink's TLS, and the node's, take version 3 client certificates only.
const ONLY_VERSION_3: &str = "this node and the sink take version 3 client certificates only; issue it again with \
     `-extfile` naming a file that holds e.g. `extendedKeyUsage=clientAuth`";

/// The next DER element of `bytes`: its tag, its whole encoding and its
/// contents; `bytes` moves past it.
fn der_element<'a>(bytes: &mut &'a [u8]) -> Option<(u8, &'a [u8], &'a [u8])> {
    let whole = *bytes;
    let (&tag, rest) = bytes.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (digits, after) = rest.split_at(count);
        rest = after;
        digits.iter().fold(0usize, |length, digit| length << 8 | usize::from(*digit))
    };
    let header = whole.len() - rest.len();
    let contents = rest.get(..length)?;
    *bytes = &rest[length..];
    Some((tag, &whole[..header + length], contents))
}

/// The contents of the TBSCertificate of the DER certificate `der`.
fn to_be_signed(der: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    let mut outer = der;
    let (SEQUENCE, _, mut certificate) = der_element(&mut outer)? else { return None };
    let (SEQUENCE, _, tbs) = der_element(&mut certificate)? else { return None };
    outer.is_empty().then_some(tbs)
}

/// The SubjectPublicKeyInfo of the DER certificate `der`, tag and length
/// included; read here rather than by webpki, which refuses X.509 v1
/// certificates (what `openssl x509 -req` makes without an extension file),
/// which TLS servers accept from clients.
fn subject_public_key_info(der: &[u8]) -> Option<&[u8]> {
    let mut tbs = to_be_signed(der)?;
    // [0] version, absent in v1; then serial, signature algorithm, issuer,
    // validity, subject, and the key.
    if tbs.first() == Some(&0xa0) {
        der_element(&mut tbs)?;
    }
    for _ in 0..5 {
        der_element(&mut tbs)?;
    }
    match der_element(&mut tbs)? {
        (0x30, whole, _) => Some(whole),
        _ => None,
    }
}

/// The text of the regular file at `path`, if it holds at most 16 MiB of
/// UTF-8: a configuration file named by mistake (`/dev/zero`, a FIFO, a
/// log) is refused at once rather than read for ever.
fn read_small(path: &std::path::Path) -> Option<String> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    const MOST: u64 = 16 << 20;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(MOST + 1).read_to_string(&mut text).ok()?;
    (text.len() as u64 <= MOST).then_some(text)
}

/// A secret from the configuration (a token, a password): never shown by
/// `Debug` or `Display`, so that no log line, error or metric can carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Fails unless `address` is `host:port` (an empty host means every interface).
pub(crate) fn ensure_socket(variable: &'static str, address: &str) -> Result<(), ConfigError> {
    let valid = address.rsplit_once(':').is_some_and(|(host, port)| port.parse::<u16>().is_ok() && !host.contains('/'));
    ensure(valid, variable, address)
}

/// Request compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Requests go uncompressed; the sink refuses compressed ones.
    None,
    /// gzip: the node compresses requests; the sink accepts them.
    Gzip,
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Self::None),
            "gzip" => Ok(Self::Gzip),
            _ => Err(format!("unknown compression {s:?}")),
        }
    }
}

/// Longest duration any setting takes: 3650 days (ten years, as humantime
/// counts a year as 365.25 days, is a little more). Longer ones would
/// overflow the clock's arithmetic.
const LONGEST: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);

/// Fails unless `duration` is from a millisecond to ten years: tokio's
/// timers count whole milliseconds, so a shorter timeout or interval would
/// act as a millisecond (or, as a deadline, fail every attempt at once).
pub(crate) fn ensure_positive(variable: &'static str, duration: humantime::Duration) -> Result<(), ConfigError> {
    ensure(*duration >= std::time::Duration::from_millis(1) && *duration <= LONGEST, variable, duration)
}

/// Fails unless `duration` is at most ten years (zero allowed).
pub(crate) fn ensure_bounded(variable: &'static str, duration: humantime::Duration) -> Result<(), ConfigError> {
    ensure(*duration <= LONGEST, variable, duration)
}

#[cfg(test)]
mod tests {
    use super::asn1_time;

    #[test]
    fn certificate_times_are_read_as_seconds_since_1970() {
        assert_eq!(asn1_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(asn1_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(asn1_time(0x17, b"500101000000Z"), Some(-631_152_000));
        assert_eq!(asn1_time(0x18, b"20260101000000Z"), Some(1_767_225_600));
        assert_eq!(asn1_time(0x18, b"20240229120000Z"), Some(1_709_208_000));
        assert_eq!(asn1_time(0x18, b"99991231235959Z"), Some(253_402_300_799));
        for (tag, text) in [
            (0x17, &b"700101000000"[..]),
            (0x17, b"701301000000Z"),
            (0x18, b"2026010100000Z"),
            (0x18, b"2026-1-01000000Z"),
            (0x04, b"700101000000Z"),
        ] {
            assert_eq!(asn1_time(tag, text), None, "{}", String::from_utf8_lossy(text));
        }
    }
}
