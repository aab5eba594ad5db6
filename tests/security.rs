//! TLS, mutual TLS, the shared token and compression between a node's
//! transport and a sink, with certificates made at run time.

mod common;

use std::{sync::Arc, time::Duration, time::SystemTime};

use common::{Pki, node_config, scratch, sink_config};
use telemetry_node::{
    node::{GrpcTransport, Transport, codec::Outgoing},
    reading::Reading,
    receiver,
    receiver::{SinkStats, SinkSummary},
};
use tokio_util::sync::CancellationToken;
use tonic::Code;

fn reading(name: &str) -> Reading {
    Reading {
        sensor: Box::leak(name.to_owned().into_boxed_str()),
        sequence: 0,
        value: 1,
        created_at: SystemTime::now(),
    }
}

fn outgoing(batch: Vec<Reading>) -> Outgoing {
    Outgoing::new(&batch, Arc::from(""), 0, 0)
}

fn request() -> Outgoing {
    outgoing(vec![reading("s")])
}

/// Serves a sink configured by `pairs` on a free port; returns its address,
/// a stop token and a handle that yields its summary.
async fn sink(
    name: &str,
    pairs: &[(&str, String)],
) -> (String, CancellationToken, tokio::task::JoinHandle<SinkSummary>) {
    let mut pairs = pairs.to_vec();
    pairs.push(("FILE_PATH", scratch(name).join("out").display().to_string()));
    let config = sink_config(&pairs);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let handle = tokio::spawn({
        let stop = stop.clone();
        async move {
            receiver::serve(&config, listener, Arc::new(SinkStats::default()), stop.cancelled_owned()).await.unwrap()
        }
    });
    (format!("localhost:{port}"), stop, handle)
}

/// Sends one request through a node transport configured by `pairs`.
async fn send(socket: &str, pairs: &[(&str, String)]) -> Result<(), tonic::Status> {
    let mut pairs = pairs.to_vec();
    pairs.push(("GRPC_SERVER_SOCKET", socket.to_owned()));
    pairs.push(("RPC_TIMEOUT", "5s".into()));
    let transport = GrpcTransport::from_config(&node_config(&pairs)).unwrap();
    tokio::time::timeout(Duration::from_secs(20), transport.send(request())).await.expect("an answer in time")
}

async fn stop(stop: CancellationToken, handle: tokio::task::JoinHandle<SinkSummary>) -> SinkSummary {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), handle).await.unwrap().unwrap()
}

#[tokio::test]
async fn tls_works_and_a_wrong_ca_fails_with_a_clear_error() {
    let dir = scratch("tls");
    let pki = Pki::new(&dir, "ca");
    let other = Pki::new(&dir, "other-ca");
    let (cert, key) = pki.issue("sink", "localhost");
    let (socket, token, handle) = sink("tls-sink", &[("TLS_CERT", cert), ("TLS_KEY", key)]).await;

    let ca = dir.join("ca.pem").display().to_string();
    assert!(send(&socket, &[("TLS_CA_CERT", ca.clone())]).await.is_ok());

    let wrong = send(&socket, &[("TLS_CA_CERT", dir.join("other-ca.pem").display().to_string())]).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unavailable);
    assert!(wrong.message().contains("invalid peer certificate"), "{}", wrong.message());

    // Plaintext to a TLS sink is refused too.
    assert!(send(&socket, &[]).await.is_err());
    drop(other);
    assert_eq!(stop(token, handle).await.readings_written, 1);
}

#[tokio::test]
async fn mutual_tls_refuses_a_node_without_a_client_certificate() {
    let dir = scratch("mtls");
    let pki = Pki::new(&dir, "ca");
    let (cert, key) = pki.issue("sink", "localhost");
    let (client_cert, client_key) = pki.issue("node", "node-1");
    let ca = dir.join("ca.pem").display().to_string();
    let (socket, token, handle) =
        sink("mtls-sink", &[("TLS_CERT", cert), ("TLS_KEY", key), ("TLS_CLIENT_CA", ca.clone())]).await;

    let refused = send(&socket, &[("TLS_CA_CERT", ca.clone())]).await.unwrap_err();
    assert!(refused.message().contains("CertificateRequired"), "{}", refused.message());

    let with_cert = [("TLS_CA_CERT", ca), ("TLS_CLIENT_CERT", client_cert), ("TLS_CLIENT_KEY", client_key)];
    assert!(send(&socket, &with_cert).await.is_ok());
    assert_eq!(stop(token, handle).await.readings_written, 1);
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused_and_counted() {
    let (socket, token, handle) = sink("token", &[("SINK_AUTH_TOKEN", "s3cret".into())]).await;
    assert_eq!(send(&socket, &[]).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(send(&socket, &[("SINK_AUTH_TOKEN", "guess".into())]).await.unwrap_err().code(), Code::Unauthenticated);
    assert!(send(&socket, &[("SINK_AUTH_TOKEN", "s3cret".into())]).await.is_ok());
    let summary = stop(token, handle).await;
    assert_eq!((summary.rejected, summary.readings_written), (2, 1));
}

#[tokio::test]
async fn gzip_requests_are_accepted_only_when_the_sink_allows_them() {
    let (socket, token, handle) = sink("gzip", &[]).await;
    assert!(send(&socket, &[("GRPC_COMPRESSION", "gzip".into())]).await.is_ok());
    assert_eq!(stop(token, handle).await.readings_written, 1);

    let (socket, token, handle) = sink("no-gzip", &[("GRPC_COMPRESSION", "none".into())]).await;
    assert_eq!(send(&socket, &[("GRPC_COMPRESSION", "gzip".into())]).await.unwrap_err().code(), Code::Unimplemented);
    assert_eq!(stop(token, handle).await.readings_written, 0);
}

#[tokio::test]
async fn oversized_requests_are_refused_and_nothing_is_written() {
    let (socket, token, handle) =
        sink("caps", &[("MAX_ITEMS_PER_REQUEST", "1".into()), ("MAX_MESSAGE_BYTES", "1024".into())]).await;
    let transport = GrpcTransport::from_config(&node_config(&[("GRPC_SERVER_SOCKET", socket.clone())])).unwrap();
    let two = outgoing(vec![reading("a"), reading("b")]);
    assert_eq!(transport.send(two).await.unwrap_err().code(), Code::InvalidArgument);
    let big = outgoing(vec![reading(&"x".repeat(2000))]);
    assert_eq!(transport.send(big).await.unwrap_err().code(), Code::OutOfRange);
    assert!(transport.send(request()).await.is_ok());
    assert_eq!(stop(token, handle).await.readings_written, 1);
}

/// Every variable the configuration reads into its secret type: the
/// configuration table's secrets, which `tests/reference.rs` holds to the
/// `Secret` fields of the source, so a secret added later is covered too.
fn secret_variables() -> Vec<String> {
    let table = telemetry_node::config::reference::VARIABLES.iter();
    table.filter(|variable| variable.secret).map(|variable| variable.name.to_owned()).collect()
}

#[test]
fn the_exec_command_gets_no_secret_of_the_node_only_what_exec_env_names() {
    let secrets = secret_variables();
    assert!(secrets.len() >= 3 && secrets.contains(&"REMOTE_WRITE_PASSWORD".to_owned()), "{secrets:?}");
    // One node per secret: some exclude each other (a bearer token and a
    // password).
    for secret in &secrets {
        let environment = exec_environment(secret);
        assert!(
            !environment.contains("marker-"),
            "{secret} or an unnamed variable reached the command:\n{environment}"
        );
        assert!(
            environment.contains("ASKED_FOR=passed") && environment.contains("HOME=/nonexistent-home"),
            "{environment}"
        );
        // Besides what the shell sets itself (PWD, SHLVL, _), nothing else.
        let names = environment.lines().filter_map(|line| line.split_once('=')).map(|(name, _)| name);
        for name in names {
            assert!(
                ["PATH", "HOME", "ASKED_FOR", "PWD", "SHLVL", "_", "OLDPWD"].contains(&name),
                "{name} reached the command"
            );
        }
    }
}

/// What an exec command of a node with `secret` (and an unnamed variable)
/// set saw of its environment.
fn exec_environment(secret: &str) -> String {
    let dir = scratch(&format!("exec-secrets-{secret}"));
    let seen = dir.join("environment");
    let mut env: Vec<(&str, String)> = vec![(secret, format!("marker-{secret}"))];
    if secret == "REMOTE_WRITE_PASSWORD" {
        // Its partner, which is not a secret.
        env.push(("REMOTE_WRITE_USERNAME", "marker-user".to_owned()));
    }
    env.extend([
        ("SENSOR_COUNT", "0".to_owned()),
        ("EXEC_SHELL", "true".to_owned()),
        ("EXEC_COMMAND", format!("env > {}.part && mv {0}.part {0}; echo done 1", seen.display())),
        ("EXEC_INTERVAL", "100ms".to_owned()),
        ("SHUTDOWN_TIMEOUT", "1s".to_owned()),
        ("EXEC_ENV", "ASKED_FOR".to_owned()),
        ("ASKED_FOR", "passed".to_owned()),
        ("NOT_ASKED_FOR", "marker-unasked".to_owned()),
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("HOME", "/nonexistent-home".to_owned()),
        ("GRPC_SERVER_SOCKET", format!("127.0.0.1:{}", common::free_port())),
    ]);
    let node = common::Process::start("node", env!("CARGO_BIN_EXE_telemetry-node"), &[], &env, &dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !seen.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the command never ran: {:?}",
            std::fs::read_to_string(dir.join("node.err"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, stderr) = node.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    std::fs::read_to_string(&seen).unwrap()
}

#[test]
fn the_exec_command_cannot_read_the_nodes_environment_through_proc() {
    // As the container runs it: node and command one unprivileged user.
    let dir = scratch("exec-proc-environ");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let seen = dir.join("environ");
    let env = [
        ("SINK_AUTH_TOKEN", "marker-token".to_owned()),
        ("SENSOR_COUNT", "0".to_owned()),
        ("EXEC_SHELL", "true".to_owned()),
        (
            "EXEC_COMMAND",
            format!("cat /proc/$PPID/environ > {0}.part 2>&1; mv {0}.part {0}; echo done 1", seen.display()),
        ),
        ("EXEC_INTERVAL", "100ms".to_owned()),
        ("SHUTDOWN_TIMEOUT", "1s".to_owned()),
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("GRPC_SERVER_SOCKET", format!("127.0.0.1:{}", common::free_port())),
    ];
    let args = ["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_telemetry-node")];
    let node = common::Process::start("node", "setpriv", &args, &env, &dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !seen.exists() {
        if std::time::Instant::now() > deadline {
            let (_, _, stderr) = node.terminate(Duration::from_secs(30));
            assert!(std::env::var_os("CI").is_none(), "the command never ran: {stderr}");
            eprintln!("skipped: cannot run the node as another user here: {stderr}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, stderr) = node.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let environ = std::fs::read_to_string(&seen).unwrap();
    assert!(!environ.contains("marker-token"), "the command read the node's secrets: {environ}");
    assert!(environ.contains("Permission denied"), "{environ}");
}
