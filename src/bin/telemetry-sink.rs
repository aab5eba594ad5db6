//! `telemetry-sink`: receives readings over gRPC and writes them as JSON lines.

use std::{
    process::ExitCode,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use telemetry_node::{
    config::{self, SinkConfig},
    logging, observe, receiver,
    stats::SinkStats,
};
use tokio::net::TcpListener;
use tracing::{error, info};

fn main() -> ExitCode {
    if std::env::args().nth(1).is_some_and(|arg| arg == "help" || arg == "--help" || arg == "-h") {
        println!("usage: telemetry-sink   (configured by environment variables, see the README)");
        return ExitCode::SUCCESS;
    }
    let config = match config::process_env().and_then(|vars| SinkConfig::from_vars(&vars)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("telemetry-sink: {error}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.log_level, config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("telemetry-sink: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: SinkConfig) -> ExitCode {
    info!(message = "Starting sink.", ?config);
    let address = config.listen_address().expect("validated with the rest of the configuration");
    let listener = match TcpListener::bind(&address).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("telemetry-sink: cannot listen on GRPC_SERVER_SOCKET={address:?}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let stats = Arc::new(SinkStats::default());
    let stop_metrics = CancellationToken::new();
    if let Some(address) = &config.metrics_addr {
        let mut registry = Registry::default();
        stats.register(&mut registry);
        let checked = Arc::clone(&stats);
        let ready = move || checked.serving.load(Relaxed);
        if let Err(error) = observe::spawn(address, registry, || {}, ready, stop_metrics.clone()).await {
            eprintln!("telemetry-sink: cannot serve metrics on METRICS_ADDR={address:?}: {error}");
            return ExitCode::FAILURE;
        }
    }
    let served = receiver::serve(&config, listener, stats, terminated()).await;
    stop_metrics.cancel();
    match served {
        Ok(summary) => {
            info!(message = "Sink stopped.", %summary);
            println!("summary: {summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            error!(message = "Sink failed.", %error);
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(term) => { term.recv().await; } None => std::future::pending().await } } => {}
    }
}
