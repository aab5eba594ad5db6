//! `telemetry-node`: runs the node configured by the environment, or the demo.

use std::{process::ExitCode, sync::Arc, time::Duration};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use telemetry_node::{
    config::{self, NodeConfig},
    demo, logging,
    node::{self, GrpcTransport},
    observe,
    stats::NodeStats,
};
use tracing::info;

const USAGE: &str = "\
usage: telemetry-node [run]                  run the node, configured by environment variables
       telemetry-node demo [--duration D]    run a node against an embedded sink for D (default 10s)
       telemetry-node help                   show this text";

/// What the command line asks for.
enum Command {
    Run,
    Demo { duration: Duration },
    Help,
}

fn main() -> ExitCode {
    let command = match parse_args(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(message) => {
            eprintln!("telemetry-node: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Command::Help = command {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let (vars, mut config) = match config::process_env().and_then(|vars| Ok((NodeConfig::from_vars(&vars)?, vars))) {
        Ok((config, vars)) => (vars, config),
        Err(error) => {
            eprintln!("telemetry-node: {error}");
            return ExitCode::from(2);
        }
    };
    // The demo's progress lines are the show; logs only interrupt them
    // unless asked for.
    if matches!(command, Command::Demo { .. }) && !vars.contains_key("LOGGER_MIN_LOG_LEVEL") {
        config.log_level = tracing::Level::WARN;
    }
    logging::init(config.log_level, config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("telemetry-node: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match command {
            Command::Demo { duration } => run_demo(config, duration).await,
            _ => run_node(config).await,
        }
    })
}

async fn run_node(config: NodeConfig) -> ExitCode {
    info!(message = "Starting node.", ?config);
    let transport = match GrpcTransport::from_config(&config) {
        Ok(transport) => transport,
        Err(error) => {
            eprintln!("telemetry-node: {error}");
            return ExitCode::from(2);
        }
    };
    let stats = Arc::new(NodeStats::default());
    let stop_metrics = CancellationToken::new();
    if let Some(address) = &config.metrics_addr {
        let mut registry = Registry::default();
        stats.register(&mut registry);
        let (refreshed, checked, window) = (Arc::clone(&stats), Arc::clone(&stats), config.ready_window());
        let ready = move || checked.acked_within(window);
        if let Err(error) =
            observe::spawn(address, registry, move || refreshed.refresh(), ready, stop_metrics.clone()).await
        {
            eprintln!("telemetry-node: cannot serve metrics on METRICS_ADDR={address:?}: {error}");
            return ExitCode::FAILURE;
        }
    }
    let summary = node::run(&config, transport, stats, terminated()).await;
    stop_metrics.cancel();
    info!(
        message = "Node stopped.",
        produced = summary.produced,
        sent = summary.sent,
        acked = summary.acked,
        dropped = summary.dropped,
        retries = summary.retries
    );
    println!("summary: {summary}");
    ExitCode::SUCCESS
}

async fn run_demo(config: NodeConfig, duration: Duration) -> ExitCode {
    eprintln!(
        "demo: {} sensor(s) at {}/s each for {}, Ctrl-C to stop early",
        config.sensor_count,
        config.sensor_rate,
        humantime::format_duration(duration)
    );
    match demo::run(config, duration, terminated()).await {
        Ok(report) => {
            eprintln!("demo: sink wrote {} readings to {}", report.sink.readings_written, report.output.display());
            println!("summary: {}", report.node);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("telemetry-node: demo failed: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let command = match args.next().as_deref() {
        None | Some("run") => Command::Run,
        Some("help" | "--help" | "-h") => Command::Help,
        Some("demo") => {
            let mut duration = Duration::from_secs(10);
            while let Some(arg) = args.next() {
                let value = match arg.split_once('=') {
                    Some(("--duration", value)) => value.to_owned(),
                    None if arg == "--duration" => args.next().ok_or("--duration needs a value, e.g. 30s")?,
                    _ => return Err(format!("unknown demo option {arg:?}")),
                };
                duration = humantime::parse_duration(&value)
                    .map_err(|_| format!("--duration {value:?}: expected a duration, e.g. 30s"))?;
            }
            Command::Demo { duration }
        }
        Some(other) => return Err(format!("unknown command {other:?}")),
    };
    match args.next() {
        Some(extra) => Err(format!("unexpected argument {extra:?}")),
        None => Ok(command),
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
