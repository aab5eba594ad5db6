//! `telemetry-node`: runs the node configured by the environment, or the demo.

use std::{process::ExitCode, sync::Arc, time::Duration};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use telemetry_node::{
    bench::{self, BenchOptions},
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
       telemetry-node bench [--duration D] [--batch-size N] [--sensors N] [--in-flight N] [--writer on|off]
                                             measure readings/s: bare client vs the node's pipeline
                                             (defaults: 10s, 1000, 16, 4, off)
       telemetry-node help                   show this text";

/// What the command line asks for.
enum Command {
    Run,
    Demo { duration: Duration },
    Bench(BenchOptions),
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
    if matches!(command, Command::Demo { .. } | Command::Bench(_)) && !vars.contains_key("LOGGER_MIN_LOG_LEVEL") {
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
            Command::Bench(options) => run_bench(options).await,
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
    match args.next().as_deref() {
        None | Some("run") => match args.next() {
            Some(extra) => Err(format!("unexpected argument {extra:?}")),
            None => Ok(Command::Run),
        },
        Some("help" | "--help" | "-h") => Ok(Command::Help),
        Some("demo") => {
            let mut duration = Duration::from_secs(10);
            for (option, value) in options(args)? {
                match option.as_str() {
                    "--duration" => duration = parse_duration(&value)?,
                    _ => return Err(format!("unknown demo option {option:?}")),
                }
            }
            Ok(Command::Demo { duration })
        }
        Some("bench") => {
            let mut bench = BenchOptions {
                duration: Duration::from_secs(10),
                batch_size: 1000,
                sensors: 16,
                in_flight: 4,
                writer: false,
            };
            for (option, value) in options(args)? {
                match option.as_str() {
                    "--duration" => bench.duration = parse_duration(&value)?,
                    "--batch-size" => bench.batch_size = parse_count(&option, &value, 1_000_000)?,
                    "--sensors" => bench.sensors = parse_count(&option, &value, 1_000_000)?,
                    "--in-flight" => bench.in_flight = parse_count(&option, &value, 256)?,
                    "--writer" => {
                        bench.writer = match value.as_str() {
                            "on" => true,
                            "off" => false,
                            _ => return Err(format!("--writer {value:?}: expected on or off")),
                        }
                    }
                    _ => return Err(format!("unknown bench option {option:?}")),
                }
            }
            Ok(Command::Bench(bench))
        }
        Some(other) => Err(format!("unknown command {other:?}")),
    }
}

/// The `--name value` or `--name=value` pairs in `args`.
fn options(args: impl Iterator<Item = String>) -> Result<Vec<(String, String)>, String> {
    let mut args = args.peekable();
    let mut pairs = Vec::new();
    while let Some(arg) = args.next() {
        if !arg.starts_with("--") {
            return Err(format!("unexpected argument {arg:?}"));
        }
        let pair = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => {
                let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
                (arg, value)
            }
        };
        pairs.push(pair);
    }
    Ok(pairs)
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(format!("--duration {value:?}: expected a duration greater than 0, e.g. 30s")),
    }
}

fn parse_count(option: &str, value: &str, max: usize) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{option} {value:?}: expected a whole number from 1 to {max}")),
    }
}

async fn run_bench(options: BenchOptions) -> ExitCode {
    let writer = if options.writer { "on" } else { "off" };
    eprintln!(
        "bench: batch={} in-flight={} sensors={} writer={writer}, {} per run",
        options.batch_size,
        options.in_flight,
        options.sensors,
        humantime::format_duration(options.duration)
    );
    match bench::run(&options).await {
        Ok(report) => {
            let ratio = report.pipeline / report.ceiling;
            eprintln!("ceiling  (bare tonic client, pre-built batches): {:>12.0} readings/s", report.ceiling);
            eprintln!(
                "         (the lanes' readings from sequence {}, as far as a round gets halfway)",
                report.sequence
            );
            eprintln!("pipeline (sensors, merge, batch, retrying sink):  {:>12.0} readings/s", report.pipeline);
            eprintln!("ratio {ratio:.3}, peak RSS {:.1} MiB (node and sink in one process)", report.rss_mb);
            println!(
                "bench: ceiling={:.0} pipeline={:.0} ratio={ratio:.3} rss_mb={:.1}",
                report.ceiling, report.pipeline, report.rss_mb
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("telemetry-node: bench failed: {error}");
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
