//! Configuration: defaults that work together, and bad values refused with
//! exit status 2 and one line naming the variable, the value and what is
//! accepted.

mod common;

use std::time::Duration;

use common::{Pki, Process, scratch, vars};
use telemetry_node::{
    config::{ConfigError, Destination, NodeConfig, SinkConfig},
    node::RetryPolicy,
};

#[test]
fn defaults_are_valid_and_point_the_node_at_the_sink() {
    let node = NodeConfig::from_vars(&vars(&[])).unwrap();
    let sink = SinkConfig::from_vars(&vars(&[])).unwrap();
    let node_port = node.server_socket.rsplit_once(':').unwrap().1;
    let sink_port = sink.listen_address().unwrap().rsplit_once(':').unwrap().1.to_owned();
    assert_eq!(node_port, sink_port);
    assert_eq!((node.sensor_count, node.sensor_rate, node.request_rate), (1, 5.0, 1.0));
}

#[test]
fn every_bad_node_value_names_its_variable() {
    let cases = [
        ("SENSOR_NAME", ""),
        ("SENSOR_COUNT", "0"),
        ("SENSOR_COUNT", "many"),
        ("SENSOR_VALUE_RATE_PER_SECOND", "abc"),
        ("SENSOR_VALUE_RATE_PER_SECOND", "0"),
        ("SENSOR_VALUE_RATE_PER_SECOND", "-2"),
        ("SENSOR_VALUE_RATE_PER_SECOND", "NaN"),
        ("REQUEST_RATE_PER_SECOND", "0"),
        ("REQUEST_RATE_PER_SECOND", "-0.5"),
        ("REQUEST_RATE_PER_SECOND", "2000000"),
        ("REQUEST_BURST", "0"),
        ("GRPC_SERVER_SOCKET", "localhost"),
        ("GRPC_SERVER_SOCKET", "localhost:99999"),
        ("GRPC_SERVER_SOCKET", "http://x:1/"),
        ("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", "-1"),
        ("GRPC_CLIENT_RETRY_SEND_INTERVAL", "soon"),
        ("GRPC_CLIENT_RETRY_SEND_INTERVAL", "0s"),
        ("BATCH_SIZE", "0"),
        ("BATCH_SIZE", "-5"),
        ("MAX_MESSAGE_BYTES", "1000"),
        ("MAX_MESSAGE_BYTES", "2000000000"),
        ("BATCH_TIMEOUT", "1"),
        ("RPC_TIMEOUT", "0ms"),
        ("SHUTDOWN_TIMEOUT", "x"),
        ("LOGGER_MIN_LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
        ("METRICS_ADDR", "9100"),
        ("GRPC_COMPRESSION", "brotli"),
        ("TLS_CA_CERT", "/no/such/ca.pem"),
        ("TLS_CLIENT_CERT", "/no/such/cert.pem"),
    ];
    for (variable, value) in cases {
        let error = NodeConfig::from_vars(&vars(&[(variable, value.into())])).unwrap_err();
        let ConfigError::Invalid { variable: named, value: given, .. } = &error else { panic!("{error}") };
        assert_eq!((*named, given.as_str()), (variable, value), "{error}");
        assert!(error.to_string().contains("expected"), "{error}");
    }
}

#[test]
fn every_bad_sink_value_names_its_variable() {
    let cases = [
        ("GRPC_SERVER_SOCKET", "8000"),
        ("RATE_PER_SECOND", "0"),
        ("RATE_PER_SECOND", "-1"),
        ("RATE_PER_SECOND", "fast"),
        ("MAX_BYTES_IN_FLIGHT", "1000"),
        ("MAX_BYTES_IN_FLIGHT", "lots"),
        ("MAX_CONNECTIONS", "0"),
        ("MAX_CONNECTIONS", "many"),
        ("BUFFER_SIZE", "0"),
        ("BUFFER_FLUSH_INTERVAL", "later"),
        ("BUFFER_FLUSH_INTERVAL", "0s"),
        ("FILE_PATH", ""),
        ("MAX_MESSAGE_BYTES", "10"),
        ("MAX_ITEMS_PER_REQUEST", "0"),
        ("TLS_CERT", "/no/such/cert.pem"),
        ("TLS_CLIENT_CA", "/no/such/ca.pem"),
    ];
    for (variable, value) in cases {
        let error = SinkConfig::from_vars(&vars(&[(variable, value.into())])).unwrap_err();
        let ConfigError::Invalid { variable: named, value: given, .. } = &error else { panic!("{error}") };
        assert_eq!((*named, given.as_str()), (variable, value), "{error}");
    }
}

#[test]
fn a_bad_token_is_named_but_never_echoed() {
    let error = NodeConfig::from_vars(&vars(&[("SINK_AUTH_TOKEN", "has space".into())])).unwrap_err();
    assert!(error.to_string().contains("SINK_AUTH_TOKEN") && !error.to_string().contains("has space"), "{error}");
}

#[test]
fn fractional_rates_and_go_style_addresses_are_accepted() {
    let node = NodeConfig::from_vars(&vars(&[("REQUEST_RATE_PER_SECOND", "0.5".into())])).unwrap();
    assert_eq!(node.request_rate().unwrap().per_second, 0.5);
    assert!(
        NodeConfig::from_vars(&vars(&[("REQUEST_RATE_PER_SECOND", "inf".into())])).unwrap().request_rate().is_none()
    );
    let sink = SinkConfig::from_vars(&vars(&[("GRPC_SERVER_SOCKET", ":50051".into())])).unwrap();
    assert_eq!(sink.listen_address().unwrap(), ":50051");
}

#[test]
fn retries_can_be_unlimited() {
    let node = NodeConfig::from_vars(&vars(&[("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", "inf".into())])).unwrap();
    assert_eq!(RetryPolicy::from(&node).max_retries, None);
    let node = NodeConfig::from_vars(&vars(&[("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", "10".into())])).unwrap();
    assert_eq!(RetryPolicy::from(&node).max_retries, Some(10));
    // The default: a batch is retried for as long as it takes; the overflow
    // queue bounds what the node holds meanwhile.
    let node = NodeConfig::from_vars(&vars(&[])).unwrap();
    assert_eq!(RetryPolicy::from(&node).max_retries, None);
    let error = NodeConfig::from_vars(&vars(&[("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", "-1".into())])).unwrap_err();
    assert!(error.to_string().contains("or inf for no limit"), "{error}");
}

#[test]
fn tls_files_must_hold_what_they_name() {
    let dir = scratch("tls-files");
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not a certificate\n").unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let pem = |label: &str| format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
    let key_only = dir.join("key.pem");
    std::fs::write(&key_only, pem("PRIVATE KEY")).unwrap();
    let cert_only = dir.join("cert.pem");
    std::fs::write(&cert_only, pem("CERTIFICATE")).unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    for bad in [&text, &empty, &key_only] {
        let error = NodeConfig::from_vars(&vars(&[("TLS_CA_CERT", path(bad))])).unwrap_err();
        assert!(error.to_string().contains("TLS_CA_CERT"), "{error}");
        let error = SinkConfig::from_vars(&vars(&[("TLS_CERT", path(bad)), ("TLS_KEY", path(&key_only))])).unwrap_err();
        assert!(error.to_string().contains("TLS_CERT="), "{error}");
    }
    let error = SinkConfig::from_vars(&vars(&[("TLS_CERT", path(&cert_only)), ("TLS_KEY", path(&text))])).unwrap_err();
    assert!(error.to_string().contains("TLS_KEY"), "{error}");
    // Neither the file's contents nor anything else but its name is echoed.
    assert!(!error.to_string().contains("not a certificate"), "{error}");
    let bad_name = [("TLS_CA_CERT", path(&cert_only)), ("TLS_SERVER_NAME", "not a name!".into())];
    let error = NodeConfig::from_vars(&vars(&bad_name)).unwrap_err();
    assert!(error.to_string().contains("TLS_SERVER_NAME"), "{error}");
}

/// Runs `binary` with `env` in `dir` and returns its exit code and stderr.
fn run_binary(binary: &str, env: &[(&str, String)], dir: &std::path::Path) -> (i32, String) {
    let (code, _, stderr) = Process::start("bad-config", binary, &[], env, dir).wait(Duration::from_secs(20));
    (code, stderr)
}

#[test]
fn binaries_exit_2_with_one_line_naming_the_variable() {
    let dir = scratch("bad-config");
    let node = env!("CARGO_BIN_EXE_telemetry-node");
    let sink = env!("CARGO_BIN_EXE_telemetry-sink");
    let cases = [
        (node, "SENSOR_VALUE_RATE_PER_SECOND", "abc"),
        (node, "REQUEST_RATE_PER_SECOND", "0"),
        (node, "BATCH_SIZE", "-5"),
        (node, "BATCH_TIMEOUT", "soon"),
        (node, "GRPC_SERVER_SOCKET", "nowhere"),
        (node, "SENSOR_VALUE_RATE_PER_SECOND", "1e-20"),
        (node, "REQUEST_RATE_PER_SECOND", "1e-300"),
        (node, "SENSOR_VALUE_RATE_PER_SECOND", "NaN"),
        (node, "BATCH_TIMEOUT", "18446744073709551615s"),
        (node, "GRPC_CLIENT_RETRY_SEND_INTERVAL", "18446744073709551615s"),
        (node, "GRPC_SERVER_SOCKET", "127.0.0.1:0"),
        (node, "TLS_SERVER_NAME", "sink.example"),
        (node, "DESTINATION", "database"),
        // Below tokio's millisecond: a deadline that fails every attempt.
        (node, "RPC_TIMEOUT", "1ns"),
        (node, "BATCH_TIMEOUT", "500us"),
        (sink, "BUFFER_FLUSH_INTERVAL", "10us"),
        (sink, "FILE_PATH", "/dev/null"),
        (sink, "REMOTE_WRITE_TIMEOUT", "1000000000000s"),
        (sink, "RATE_PER_SECOND", "0"),
        (sink, "BUFFER_FLUSH_INTERVAL", "x"),
    ];
    for (binary, variable, value) in cases {
        let (code, stderr) = run_binary(binary, &[(variable, value.into())], &dir);
        assert_eq!(code, 2, "{variable}={value}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&format!("{variable}=\"{value}\"")) && stderr.contains("expected"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_sensor_faster_than_one_reading_a_millisecond_exits_2_and_says_to_use_more_sensors() {
    let dir = scratch("too-fast");
    let node = env!("CARGO_BIN_EXE_telemetry-node");
    assert!(NodeConfig::from_vars(&vars(&[("SENSOR_VALUE_RATE_PER_SECOND", "1000".into())])).is_ok());
    for rate in ["1000.5", "2000", "1000000000"] {
        let (code, stderr) = run_binary(node, &[("SENSOR_VALUE_RATE_PER_SECOND", rate.into())], &dir);
        assert_eq!(code, 2, "{rate}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("SENSOR_VALUE_RATE_PER_SECOND=")
                && stderr.contains("one sample per sensor and millisecond"),
            "{stderr}"
        );
        assert!(stderr.contains("more sensors (SENSOR_COUNT)"), "{stderr}");
    }
}

#[test]
fn a_dot_env_file_is_read_and_the_environment_wins_over_it() {
    let dir = scratch("dot-env");
    std::fs::write(dir.join(".env"), "BATCH_SIZE=zero\nREQUEST_BURST=0\n").unwrap();
    let node = env!("CARGO_BIN_EXE_telemetry-node");
    let (code, stderr) = run_binary(node, &[], &dir);
    assert_eq!(code, 2);
    assert!(stderr.contains("BATCH_SIZE=\"zero\""), "{stderr}");
    let (code, stderr) = run_binary(node, &[("BATCH_SIZE", "10".into())], &dir);
    assert_eq!(code, 2);
    assert!(stderr.contains("REQUEST_BURST=\"0\""), "{stderr}");
}

#[test]
fn a_dot_env_file_in_a_parent_folder_is_not_read() {
    let parent = scratch("dot-env-parent");
    std::fs::write(parent.join(".env"), "BATCH_SIZE=zero\n").unwrap();
    let dir = parent.join("a").join("b");
    std::fs::create_dir_all(&dir).unwrap();
    let node = env!("CARGO_BIN_EXE_telemetry-node");
    // Would exit 2 for BATCH_SIZE if the parent's file were read; it exits 2
    // for the variable set here instead.
    let (code, stderr) = run_binary(node, &[("REQUEST_BURST", "0".into())], &dir);
    assert_eq!(code, 2);
    assert!(stderr.contains("REQUEST_BURST") && !stderr.contains("BATCH_SIZE"), "{stderr}");
}

#[test]
fn an_unusable_spool_folder_is_a_configuration_error() {
    let dir = scratch("bad-spool");
    let node = env!("CARGO_BIN_EXE_telemetry-node");
    let env = [("OVERFLOW_POLICY", "spool".to_owned()), ("SPOOL_DIR", "/proc/1".to_owned())];
    let (code, stderr) = run_binary(node, &env, &dir);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("SPOOL_DIR=\"/proc/1\""), "{stderr}");
}

#[test]
fn a_variable_that_is_not_utf8_is_named_and_never_echoed() {
    use std::os::unix::ffi::OsStrExt;
    let dir = scratch("not-utf8");
    let secret = std::ffi::OsStr::from_bytes(b"TopSecret\xff123");
    let unrelated = std::ffi::OsStr::from_bytes(b"caf\xe9");
    for binary in [env!("CARGO_BIN_EXE_telemetry-node"), env!("CARGO_BIN_EXE_telemetry-sink")] {
        let output = std::process::Command::new(binary)
            .env_clear()
            .env("SINK_AUTH_TOKEN", secret)
            .env("SOMETHING_ELSE", unrelated)
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("SINK_AUTH_TOKEN") && !stderr.contains("TopSecret"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

#[test]
fn a_dot_env_line_that_cannot_be_parsed_is_not_echoed() {
    let dir = scratch("dot-env-broken");
    std::fs::write(dir.join(".env"), "SINK_AUTH_TOKEN=\"unterminated Sekrit\n").unwrap();
    let (code, stderr) = run_binary(env!("CARGO_BIN_EXE_telemetry-node"), &[], &dir);
    assert_eq!(code, 2);
    assert!(!stderr.contains("Sekrit") && stderr.lines().count() == 1, "{stderr}");
}

#[test]
fn remote_write_settings_are_checked_and_credentials_never_echoed() {
    let remote = |extra: &[(&str, &str)]| {
        let mut pairs =
            vec![("OUTPUT", "remote-write".to_owned()), ("REMOTE_WRITE_URL", "http://db:8428/api/v1/write".to_owned())];
        pairs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        SinkConfig::from_vars(&vars(&pairs))
    };
    assert!(remote(&[]).is_ok());
    // https:// trusts the system's CA bundle unless told otherwise.
    let https = remote(&[("REMOTE_WRITE_URL", "https://db/api/v1/write")]);
    if std::path::Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        assert!(https.is_ok(), "{https:?}");
    } else {
        assert!(https.unwrap_err().to_string().contains("REMOTE_WRITE_TLS_CA_CERT"));
    }
    // The scheme is read as the client reads it: HTTPS:// is https, with
    // CAs to check the database against (never plaintext).
    let bundle = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    let bundle_text = bundle.display().to_string();
    let shouted = [("REMOTE_WRITE_URL", "HTTPS://db/api/v1/write"), ("REMOTE_WRITE_TLS_CA_CERT", bundle_text.as_str())];
    if bundle.exists() {
        assert!(remote(&shouted).unwrap().remote_write.roots().unwrap().is_some());
    }
    assert_eq!(remote(&[]).unwrap().remote_write.roots().unwrap(), None);
    let not_pem = std::env::current_exe().unwrap().display().to_string();
    let cases: [(&[(&str, &str)], &str); 19] = [
        (&[("REMOTE_WRITE_URL", "ftp://db/api/v1/write")], "REMOTE_WRITE_URL"),
        (&[("REMOTE_WRITE_URL", "https://db..x/api/v1/write")], "REMOTE_WRITE_URL"),
        (
            &[("REMOTE_WRITE_URL", "https://db/api/v1/write"), ("REMOTE_WRITE_TLS_CA_CERT", "/no/such/ca.pem")],
            "REMOTE_WRITE_TLS_CA_CERT",
        ),
        (
            &[("REMOTE_WRITE_URL", "https://db/api/v1/write"), ("REMOTE_WRITE_TLS_CA_CERT", not_pem.as_str())],
            "REMOTE_WRITE_TLS_CA_CERT",
        ),
        (&[("REMOTE_WRITE_TLS_CA_CERT", "/etc/ssl/certs/ca-certificates.crt")], "REMOTE_WRITE_TLS_CA_CERT"),
        (
            &[("REMOTE_WRITE_URL", "https://db/api/v1/write"), ("REMOTE_WRITE_TLS_CA_CERT", "/dev/zero")],
            "REMOTE_WRITE_TLS_CA_CERT",
        ),
        (&[("REMOTE_WRITE_URL", "http://user:pw-S3cret@db:8428/api/v1/write")], "REMOTE_WRITE_URL"),
        // Read as no port at all, the client would use 80; the query (which
        // may hold a token) is not shown.
        (&[("REMOTE_WRITE_URL", "http://db:99999/api/v1/write?token=S3cret")], "REMOTE_WRITE_URL"),
        (&[("REMOTE_WRITE_URL", "http://db:8428/%77rite#S3cret")], "REMOTE_WRITE_URL"),
        // A user name that would break a log line.
        (&[("REMOTE_WRITE_USERNAME", "u\nINFO forged"), ("REMOTE_WRITE_PASSWORD", "p")], "REMOTE_WRITE_USERNAME"),
        // InfluxDB's and the import endpoints answer OK and store nothing.
        (&[("REMOTE_WRITE_URL", "http://db:8428/write")], "REMOTE_WRITE_URL"),
        (&[("REMOTE_WRITE_URL", "http://db:8428/api/v1/import")], "REMOTE_WRITE_URL"),
        (&[("REMOTE_WRITE_METRIC", "__name")], "REMOTE_WRITE_METRIC"),
        (&[("REMOTE_WRITE_MAX_AGE", "999ms")], "REMOTE_WRITE_MAX_AGE"),
        (&[("REMOTE_WRITE_MAX_AHEAD", "0s")], "REMOTE_WRITE_MAX_AHEAD"),
        (&[("REMOTE_WRITE_METRIC", "1bad")], "REMOTE_WRITE_METRIC"),
        (&[("REMOTE_WRITE_USERNAME", "u")], "REMOTE_WRITE_USERNAME"),
        (&[("REMOTE_WRITE_USERNAME", "u"), ("REMOTE_WRITE_PASSWORD", "")], "REMOTE_WRITE_PASSWORD"),
        (
            &[("REMOTE_WRITE_BEARER_TOKEN", "t0k"), ("REMOTE_WRITE_USERNAME", "u"), ("REMOTE_WRITE_PASSWORD", "p")],
            "REMOTE_WRITE_BEARER_TOKEN",
        ),
    ];
    for (extra, variable) in cases {
        let error = remote(extra).unwrap_err().to_string();
        assert!(error.contains(variable), "{extra:?}: {error}");
        assert!(!error.contains("S3cret") && !error.contains("t0k"), "{error}");
    }
}

/// A node writing to the database itself reads the sink's remote-write
/// variables and checks them the same way, only when it uses them.
#[test]
fn a_node_writing_to_the_database_checks_the_same_settings() {
    let node = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        NodeConfig::from_vars(&vars(&pairs))
    };
    let direct = ("DESTINATION", "remote-write");
    let config = node(&[direct, ("REMOTE_WRITE_URL", "http://db:8428/api/v1/write")]).unwrap();
    assert_eq!(config.destination, Destination::RemoteWrite);
    assert_eq!(node(&[]).unwrap().destination, Destination::Sink);
    // Unused, an unusable URL is no error (as for a sink writing its file).
    assert!(node(&[("REMOTE_WRITE_URL", "ftp://db")]).is_ok());
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[direct], "REMOTE_WRITE_URL"),
        (&[direct, ("REMOTE_WRITE_URL", "ftp://db/api/v1/write")], "REMOTE_WRITE_URL"),
        (&[direct, ("REMOTE_WRITE_URL", "http://user:pw-S3cret@db/api/v1/write")], "REMOTE_WRITE_URL"),
        (
            &[direct, ("REMOTE_WRITE_URL", "http://db/api/v1/write"), ("REMOTE_WRITE_MAX_AGE", "30s")],
            "REMOTE_WRITE_MAX_AGE",
        ),
        (&[("DESTINATION", "vm")], "DESTINATION"),
    ];
    for (pairs, variable) in cases {
        let error = node(pairs).unwrap_err().to_string();
        assert!(error.contains(variable) && !error.contains("S3cret"), "{pairs:?}: {error}");
    }
    let dir = scratch("node-destination-config");
    let (code, stderr) =
        run_binary(env!("CARGO_BIN_EXE_telemetry-node"), &[("DESTINATION", "remote-write".into())], &dir);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("REMOTE_WRITE_URL") && stderr.lines().count() == 1, "{stderr}");
}

#[test]
fn a_client_certificate_for_the_database_is_checked_against_its_key() {
    let dir = scratch("rw-client-cert-config");
    let pki = Pki::new(&dir, "ca");
    let ca = dir.join("ca.pem").display().to_string();
    let (cert, key) = pki.issue("sink", "sink.example");
    let (_, other_key) = pki.issue("other", "other.example");
    let remote = |url: &str, extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("OUTPUT", "remote-write".to_owned()),
            ("REMOTE_WRITE_URL", url.to_owned()),
            ("REMOTE_WRITE_TLS_CA_CERT", ca.clone()),
        ];
        if url.starts_with("http:") {
            pairs.pop();
        }
        pairs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        SinkConfig::from_vars(&vars(&pairs))
    };
    let https = "https://db/api/v1/write";
    let both = [("REMOTE_WRITE_TLS_CLIENT_CERT", cert.as_str()), ("REMOTE_WRITE_TLS_CLIENT_KEY", key.as_str())];
    let config = remote(https, &both).unwrap();
    let (chain, pem_key) = config.remote_write.identity().unwrap().unwrap();
    assert!(chain.contains("BEGIN CERTIFICATE") && pem_key.contains("PRIVATE KEY"));
    assert_eq!(remote(https, &[]).unwrap().remote_write.identity().unwrap(), None);
    /// The URL, the variables added, and the variable the error names.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        (https, &both[..1], "REMOTE_WRITE_TLS_CLIENT_CERT"),
        (https, &both[1..], "REMOTE_WRITE_TLS_CLIENT_KEY"),
        // Only toward an https:// database.
        ("http://db/api/v1/write", &both, "REMOTE_WRITE_TLS_CLIENT_CERT"),
        // Another certificate's key.
        (
            https,
            &[("REMOTE_WRITE_TLS_CLIENT_CERT", cert.as_str()), ("REMOTE_WRITE_TLS_CLIENT_KEY", other_key.as_str())],
            "REMOTE_WRITE_TLS_CLIENT_KEY",
        ),
        // A certificate where the key belongs.
        (
            https,
            &[("REMOTE_WRITE_TLS_CLIENT_CERT", cert.as_str()), ("REMOTE_WRITE_TLS_CLIENT_KEY", cert.as_str())],
            "REMOTE_WRITE_TLS_CLIENT_KEY",
        ),
    ];
    for (url, extra, variable) in cases {
        let error = remote(url, extra).unwrap_err().to_string();
        assert!(error.contains(variable), "{extra:?}: {error}");
    }
}

#[test]
fn the_requests_the_sources_need_are_estimated_for_the_rate_warning() {
    let needed = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
        NodeConfig::from_vars(&vars(&pairs)).unwrap().requests_needed()
    };
    // The defaults: 5 readings a second in batches of up to 1000.
    assert_eq!(needed(&[]), 0.005);
    // Four sensors make four lanes that take tokens in turn.
    assert_eq!(needed(&[("SENSOR_COUNT", "4")]), 0.02);
    // 100,000 readings/s fill 100 batches of 1000 a second.
    assert_eq!(needed(&[("SENSOR_COUNT", "100"), ("SENSOR_VALUE_RATE_PER_SECOND", "1000")]), 100.0);
    // The busiest lane sets the pace: 5 sensors in 4 lanes, one lane has two.
    assert_eq!(needed(&[("SENSOR_COUNT", "5"), ("SENSOR_VALUE_RATE_PER_SECOND", "1000")]), 8.0);
    // A source read every 10 s counts as a reading every 10 s.
    assert_eq!(needed(&[("SENSOR_COUNT", "0"), ("EXEC_COMMAND", "true"), ("BATCH_SIZE", "1")]), 0.1);
}

#[test]
fn the_nodes_client_certificate_is_checked_against_its_key_and_its_version() {
    let dir = scratch("node-client-cert-config");
    let pki = Pki::new(&dir, "ca");
    let ca = dir.join("ca.pem").display().to_string();
    let (cert, key) = pki.issue("node", "node.example");
    let (_, other_key) = pki.issue("other", "other.example");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let node = |cert: &str, key: &str| {
        let pairs =
            [("TLS_CA_CERT", ca.clone()), ("TLS_CLIENT_CERT", cert.to_owned()), ("TLS_CLIENT_KEY", key.to_owned())];
        NodeConfig::from_vars(&vars(&pairs))
    };
    let config = node(&cert, &key).unwrap();
    assert!(config.tls().unwrap().unwrap().identity.is_some());
    // Another certificate's key: named, not left to fail at the first
    // connection as a "transport error".
    let error = node(&cert, &other_key).unwrap_err().to_string();
    assert!(error.contains("TLS_CLIENT_KEY"), "{error}");
    // A version 1 certificate, with its own key: rustls refuses it on both
    // ends, so the node says so at start, naming the certificate.
    let error = node(&format!("{data}/v1-client.crt"), &format!("{data}/v1-client.key")).unwrap_err();
    let ConfigError::Unusable { variable, reason, .. } = &error else { panic!("{error}") };
    assert_eq!(*variable, "TLS_CLIENT_CERT");
    assert!(reason.contains("version 1") && reason.contains("-extfile"), "{reason}");
    // The CA's certificate first, then the node's: the order is at fault,
    // not the key.
    let reversed = dir.join("reversed.crt");
    let text = std::fs::read_to_string(dir.join("ca.pem")).unwrap() + &std::fs::read_to_string(&cert).unwrap();
    std::fs::write(&reversed, text).unwrap();
    let error = node(&reversed.display().to_string(), &key).unwrap_err();
    let ConfigError::Unusable { variable, reason, .. } = &error else { panic!("{error}") };
    assert_eq!(*variable, "TLS_CLIENT_CERT");
    assert!(reason.contains("certificate 2") && reason.contains("must come first"), "{reason}");
    // A certificate cut short (a whole base64 line of it taken out: still
    // valid base64, no longer a whole certificate) is the certificate's
    // fault, not the key's.
    let pem = std::fs::read_to_string(&cert).unwrap();
    let mut lines: Vec<&str> = pem.lines().collect();
    let full = lines.iter().rposition(|line| line.len() == 64).unwrap();
    lines.remove(full);
    let cut = dir.join("cut.crt");
    std::fs::write(&cut, lines.join("\n") + "\n").unwrap();
    let error = node(&cut.display().to_string(), &key).unwrap_err();
    let ConfigError::Unusable { variable, reason, .. } = &error else { panic!("{error}") };
    assert_eq!(*variable, "TLS_CLIENT_CERT");
    assert!(reason.contains("not readable as X.509"), "{reason}");
    // Expired, or not valid yet: the sink would refuse it at the handshake.
    for (name, from, until, said) in [
        ("expired", (2019, 1, 1), (2020, 1, 1), "expired at 2020-01-01T00:00:00Z"),
        ("early", (2090, 1, 1), (2091, 1, 1), "valid only from 2090-01-01T00:00:00Z"),
    ] {
        let (cert, key) = pki.issue_valid(name, "node", from, until);
        let error = node(&cert, &key).unwrap_err();
        let ConfigError::Unusable { variable, reason, .. } = &error else { panic!("{error}") };
        assert_eq!(*variable, "TLS_CLIENT_CERT");
        assert!(reason.contains(said), "{reason}");
    }
}

#[test]
fn a_sensor_name_is_held_to_what_a_database_label_keeps_whole() {
    let node = |name: String, count: &str| {
        NodeConfig::from_vars(&vars(&[("SENSOR_NAME", name), ("SENSOR_COUNT", count.into())]))
    };
    assert!(node("x".repeat(256), "1").is_ok());
    assert!(node("x".repeat(253), "99").is_ok());
    // With its `-100` suffix the last name would be 257 bytes.
    let error = node("x".repeat(253), "100").unwrap_err().to_string();
    assert!(error.contains("SENSOR_NAME"), "{error}");
    // A name far too long (VictoriaMetrics cuts labels at 16 KiB, merging
    // sensors) is refused and not echoed whole.
    let error = node("x".repeat(17_000), "2").unwrap_err().to_string();
    assert!(error.contains("SENSOR_NAME") && error.len() < 1000, "{} bytes: {}", error.len(), &error[..200]);
    assert!(node(String::new(), "1").is_err());
}

#[test]
fn a_node_id_or_sensor_name_with_a_newline_or_space_is_refused_naming_the_variable() {
    let forged = "x\n2026-12-07T00:00:00Z ERROR telemetry_node: FORGED";
    for (variable, value) in
        [("NODE_ID", forged), ("SENSOR_NAME", forged), ("NODE_ID", "a b"), ("SENSOR_NAME", "tab\there")]
    {
        let error = NodeConfig::from_vars(&vars(&[(variable, value.into())])).unwrap_err().to_string();
        assert!(error.contains(variable), "{variable}: {error}");
        assert!(!error.contains('\n'), "the message is one line: {error}");
    }
    assert!(NodeConfig::from_vars(&vars(&[("NODE_ID", "pod-7.example".into())])).is_ok());
}

#[test]
fn batches_hold_1000_readings_to_a_sink_and_10000_to_a_database_unless_batch_size_says() {
    let size = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
        NodeConfig::from_vars(&vars(&pairs)).unwrap().batch_size()
    };
    let database = [("DESTINATION", "remote-write"), ("REMOTE_WRITE_URL", "http://127.0.0.1:8428/api/v1/write")];
    assert_eq!(size(&[]), 1000);
    assert_eq!(size(&database), 10_000);
    assert_eq!(size(&[("BATCH_SIZE", "250")]), 250);
    assert_eq!(size(&[database[0], database[1], ("BATCH_SIZE", "250")]), 250);
}
