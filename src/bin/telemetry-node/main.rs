//! `telemetry-node`: runs the node configured by the environment, or the demo.

use std::{process::ExitCode, sync::Arc, time::Duration};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

mod bench;
mod demo;

use bench::BenchOptions;
use telemetry_node::{
    config::{self, Destination, NodeConfig},
    logging,
    node::Ledger,
    node::{self, GrpcTransport, RemoteWriteTransport, retry::SinkHealth},
    observe,
};
use tracing::info;

const USAGE: &str = "\
usage: telemetry-node [run]                  run the node, configured by environment variables
       telemetry-node demo [--duration D] [--host] [--keep]
                                             run a node against an embedded sink for D (default 10s);
                                             --host adds the host source and shows its readings;
                                             --keep keeps the sink's folder (removed by default)
       telemetry-node bench [--duration D] [--batch-size N] [--sensors N] [--in-flight N] [--writer on|off]
                                             measure readings/s: bare client vs the node's pipeline
                                             (defaults: 10s, 1000, 16000, 4, off)
       telemetry-node help                   show this text";

/// What the command line asks for.
enum Command {
    Run,
    Demo { duration: Duration, host: bool, keep: bool },
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
        println!("{USAGE}\n\n{}", config::reference::help(config::reference::Binary::Node));
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
    let code = runtime.block_on(async {
        match command {
            Command::Demo { duration, host, keep } => run_demo(config, duration, host, keep).await,
            Command::Bench(options) => run_bench(options).await,
            _ => run_node(config, &vars).await,
        }
    });
    // A source's read stuck in the kernel (a file on a hung mount) must not
    // keep the node from exiting once everything else is done.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Where this node's batches go.
#[allow(clippy::large_enum_variant, reason = "one value, made once and moved into the node")]
enum Chosen {
    /// The sink, over gRPC.
    Sink(GrpcTransport),
    /// The database itself, over remote-write.
    Database(RemoteWriteTransport),
}

async fn run_node(config: NodeConfig, vars: &std::collections::HashMap<String, String>) -> ExitCode {
    // Before anything slow (opening the spool): a stop signal then stops
    // the node cleanly.
    let (first, second) = telemetry_node::signals::stop_signals(true);
    if config.exec_argv().is_some() {
        // The command's orphans come to the node (PID 1 in a container):
        // reaped, never left as zombies.
        telemetry_node::node::source::adopt_orphans();
    }
    log_config(&config);
    let settings = config::reference::in_force(config::reference::Binary::Node, vars);
    tracing::info!(message = "Configuration in force.", %settings);
    let needed = config.requests_needed();
    if needed > config.request_rate {
        tracing::warn!(
            message = "The sources make more readings than full batches at REQUEST_RATE_PER_SECOND can carry: the overflow policy will act (OVERFLOW_POLICY) and a stop may not deliver all that is held. Raise REQUEST_RATE_PER_SECOND or BATCH_SIZE.",
            over_capacity = format!("{:.2}x", needed / config.request_rate),
            requests_needed = format!("{needed:.2}"),
            request_rate_per_second = config.request_rate,
        );
    }
    // A stop sends each lane's growing batch: one request per lane.
    let stop_needs = config.max_in_flight.min(config.sensor_count.max(1)) as f64 / config.request_rate;
    let shutdown = Duration::from(config.shutdown_timeout).as_secs_f64();
    if stop_needs > shutdown {
        tracing::warn!(
            message = "A stop needs one request per lane, more than SHUTDOWN_TIMEOUT allows at REQUEST_RATE_PER_SECOND: what is held at a stop may be dropped. Raise SHUTDOWN_TIMEOUT or REQUEST_RATE_PER_SECOND, or lower MAX_IN_FLIGHT.",
            stop_needs = format!("{stop_needs:.1}s"),
            shutdown_timeout = %config.shutdown_timeout,
        );
    }
    // Only the destination's own settings are built (and can fail).
    let transport = match config.destination {
        Destination::Sink => GrpcTransport::from_config(&config).map(Chosen::Sink),
        Destination::RemoteWrite => RemoteWriteTransport::from_config(&config).map(Chosen::Database),
    };
    let transport = match transport {
        Ok(transport) => transport,
        Err(error) => {
            eprintln!("telemetry-node: {error}");
            return ExitCode::from(2);
        }
    };
    let stats = Arc::new(Ledger::default());
    let health = SinkHealth::new(config.retry_budget);
    let stop_metrics = CancellationToken::new();
    if let Some(address) = &config.metrics_addr {
        let mut registry = Registry::default();
        stats.register(&mut registry);
        let (refreshed, checked) = (Arc::clone(&stats), health.clone());
        // Ready while the sink answers (any answer: it is there), however
        // rarely the sensors have something to send.
        let ready = move || checked.reachable();
        if let Err(error) =
            observe::spawn(address, registry, move || refreshed.refresh(), ready, stop_metrics.clone()).await
        {
            eprintln!("telemetry-node: cannot serve metrics on METRICS_ADDR={address:?}: {error}");
            return ExitCode::FAILURE;
        }
    }
    let summary = match transport {
        Chosen::Sink(sink) => node::run_with(&config, sink, health, stats, first, second).await,
        Chosen::Database(database) => node::run_with(&config, database, health, stats, first, second).await,
    };
    stop_metrics.cancel();
    info!(
        message = "Node stopped.",
        produced = summary.produced,
        sent = summary.sent,
        acked = summary.acked,
        dropped = summary.dropped,
        retries = summary.retries
    );
    logging::print_line(format_args!("summary: {summary}"));
    ExitCode::SUCCESS
}

async fn run_demo(mut config: NodeConfig, duration: Duration, host: bool, keep: bool) -> ExitCode {
    if host && config.host_interval.is_none() {
        config.host_interval = Some(Duration::from_secs(1).into());
    }
    eprintln!(
        "demo: {} sensor(s) at {}/s each{} for {}, Ctrl-C to stop early",
        config.sensor_count,
        config.sensor_rate,
        config.host_interval.map_or(String::new(), |every| format!(" and the host every {every}")),
        humantime::format_duration(duration)
    );
    let (stop, _) = telemetry_node::signals::stop_signals(true);
    match demo::run(config, duration, stop).await {
        Ok(report) => {
            let written = report.sink.readings_written;
            let folder = report.output.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
            if keep {
                eprintln!("demo: sink wrote {written} readings to {} (kept)", report.output.display());
            } else {
                match std::fs::remove_dir_all(&folder) {
                    Ok(()) => eprintln!("demo: sink wrote {written} readings (its folder removed; --keep keeps it)"),
                    Err(error) => eprintln!(
                        "demo: sink wrote {written} readings to {}; could not remove {}: {error}",
                        report.output.display(),
                        folder.display()
                    ),
                }
            }
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
            let args: Vec<String> = args.collect();
            let host = args.iter().any(|arg| arg == "--host");
            let keep = args.iter().any(|arg| arg == "--keep");
            for (option, value) in options(args.into_iter().filter(|arg| arg != "--host" && arg != "--keep"))? {
                match option.as_str() {
                    "--duration" => duration = parse_duration(&value)?,
                    _ => return Err(format!("unknown demo option {option:?}")),
                }
            }
            Ok(Command::Demo { duration, host, keep })
        }
        Some("bench") => {
            let mut bench = BenchOptions {
                duration: Duration::from_secs(10),
                batch_size: 1000,
                sensors: 16_000,
                in_flight: 4,
                writer: false,
            };
            for (option, value) in options(args)? {
                match option.as_str() {
                    "--duration" => bench.duration = parse_duration(&value)?,
                    "--batch-size" => bench.batch_size = parse_count(&option, &value, 1_000_000)?,
                    "--sensors" => {
                        bench.sensors = parse_count(&option, &value, 1_000_000)?;
                        if bench.sensors < bench::FEWEST_SENSORS {
                            return Err(format!(
                                "--sensors {value}: at least {} (the bench's load comes from sensors at 1000 readings a second each)",
                                bench::FEWEST_SENSORS
                            ));
                        }
                    }
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

/// Logs the effective configuration as fields (each its own key in JSON
/// logs), secrets as `[redacted]`.
fn log_config(c: &NodeConfig) {
    let or_none = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".into());
    let path = |value: &Option<std::path::PathBuf>| value.as_ref().map_or("-".into(), |p| p.display().to_string());
    info!(
        message = "Starting node.",
        sensor_name = %c.sensor_name,
        sensor_count = c.sensor_count,
        sensor_value_rate_per_second = c.sensor_rate,
        request_rate_per_second = c.request_rate,
        request_burst = c.request_burst,
        batch_size = c.batch_size(),
        batch_timeout = %c.batch_timeout,
        max_message_bytes = c.max_message_bytes,
        max_in_flight = c.max_in_flight,
        overflow_policy = ?c.overflow,
        queue_capacity = c.queue_capacity,
        spool_dir = %path(&c.spool_dir),
        spool_max_bytes = c.spool_max_bytes,
        node_id = %or_none(&c.node_id),
        shutdown_timeout = %c.shutdown_timeout,
        metrics_addr = %or_none(&c.metrics_addr),
        log_level = %c.log_level,
        log_format = ?c.log_format,
    );
    if c.destination == Destination::RemoteWrite {
        c.remote_write.log("Writing to the database itself (DESTINATION=remote-write).");
    }
    info!(
        message = "Retries.",
        grpc_client_max_retry_attempts_number = %c.max_retries.0.map_or("inf".into(), |n| n.to_string()),
        grpc_client_retry_send_interval = %c.retry_interval,
        grpc_client_retry_multiplier = c.retry_multiplier,
        grpc_client_retry_max_interval = %c.retry_max_interval,
        grpc_client_retry_max_elapsed = %c.retry_max_elapsed,
        grpc_client_retry_jitter = ?c.retry_jitter,
        grpc_client_retry_budget = c.retry_budget,
    );
    if c.destination == Destination::Sink {
        info!(
            message = "Sink connection.",
            grpc_server_socket = %c.server_socket,
            rpc_timeout = %c.rpc_timeout,
            grpc_compression = ?c.compression,
            sink_auth_token = %c.auth_token.as_ref().map_or("-".into(), ToString::to_string),
            tls_ca_cert = %path(&c.tls_ca_cert),
            tls_server_name = %or_none(&c.tls_server_name),
            tls_client_cert = %path(&c.tls_client_cert),
            tls_client_key = %path(&c.tls_client_key),
        );
    }
}

/// Why `demo` or `bench` could not run.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    /// The embedded sink's or the node's settings cannot be used.
    #[error("settings: {0}")]
    Config(#[from] telemetry_node::config::ConfigError),
    /// The embedded sink failed.
    #[error("embedded sink: {0}")]
    Sink(#[from] telemetry_node::error::ServeError),
    /// The embedded sink's task ended abnormally.
    #[error("embedded sink stopped abnormally: {0}")]
    Stopped(#[from] tokio::task::JoinError),
}
