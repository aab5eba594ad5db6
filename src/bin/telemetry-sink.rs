//! `telemetry-sink`: receives readings over gRPC and writes them as JSON lines.

use std::{process::ExitCode, sync::Arc};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use telemetry_node::{
    config::{self, SinkConfig},
    logging, observe, receiver,
    receiver::SinkStats,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};
use tracing::{error, info, warn};

fn main() -> ExitCode {
    if std::env::args().nth(1).is_some_and(|arg| arg == "help" || arg == "--help" || arg == "-h") {
        println!(
            "usage: telemetry-sink        receive readings over gRPC and write them to a file or a database\n\n{}",
            config::reference::help(config::reference::Binary::Sink)
        );
        return ExitCode::SUCCESS;
    }
    let (config, vars) = match config::process_env().and_then(|vars| Ok((SinkConfig::from_vars(&vars)?, vars))) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("telemetry-sink: {error}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.log_level, config.log_format);
    raise_open_files_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("telemetry-sink: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, vars))
}

async fn run(config: SinkConfig, vars: std::collections::HashMap<String, String>) -> ExitCode {
    // Before anything slow (reading back the output file): a stop signal
    // then stops the sink cleanly once it serves.
    let (stop, hurry) = telemetry_node::signals::stop_signals(false);
    log_config(&config);
    let settings = config::reference::in_force(config::reference::Binary::Sink, &vars);
    info!(message = "Configuration in force.", %settings);
    if config.output == config::OutputKind::File && config.remote_write.url.is_some() {
        warn!(
            message = "REMOTE_WRITE_URL is set but OUTPUT is file: readings go to the file, not to the database. \
                       Set OUTPUT=remote-write to write them to the database.",
            file_path = %config.file_path.display(),
        );
    }
    let address = config.server_socket.trim();
    let listener = match telemetry_node::listen::bind(address).await {
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
        let ready = move || checked.is_ready();
        if let Err(error) = observe::spawn(address, registry, || {}, ready, stop_metrics.clone()).await {
            eprintln!("telemetry-sink: cannot serve metrics on METRICS_ADDR={address:?}: {error}");
            return ExitCode::FAILURE;
        }
    }
    let reopen = Arc::new(Notify::new());
    if let Err(error) = handle_file_signals(Arc::clone(&reopen)) {
        eprintln!("telemetry-sink: cannot install signal handlers: {error}");
        return ExitCode::FAILURE;
    }
    let served = receiver::serve_with(&config, listener, stats, stop, hurry, receiver::Output::File, reopen).await;
    stop_metrics.cancel();
    match served {
        Ok(summary) => {
            info!(message = "Sink stopped.", %summary);
            logging::print_line(format_args!("summary: {summary}"));
            ExitCode::SUCCESS
        }
        Err(error) => {
            error!(message = "Sink failed.", %error);
            ExitCode::FAILURE
        }
    }
}

/// Logs the effective configuration as fields (each its own key in JSON
/// logs), secrets as `[redacted]`.
fn log_config(c: &SinkConfig) {
    let path = |value: &Option<std::path::PathBuf>| value.as_ref().map_or("-".into(), |p| p.display().to_string());
    info!(
        message = "Starting sink.",
        grpc_server_socket = %c.server_socket,
        rate_per_second = c.rate_per_second,
        file_path = %c.file_path.display(),
        buffer_size = c.buffer_size,
        buffer_flush_interval = %c.flush_interval,
        max_message_bytes = c.max_message_bytes,
        max_connections = c.max_connections,
        max_items_per_request = c.max_items,
        grpc_compression = ?c.compression,
        sink_auth_token = %c.auth_token.as_ref().map_or("-".into(), ToString::to_string),
        tls_cert = %path(&c.tls_cert),
        tls_key = %path(&c.tls_key),
        tls_client_ca = %path(&c.tls_client_ca),
        metrics_addr = %c.metrics_addr.clone().unwrap_or_else(|| "-".into()),
        log_level = %c.log_level,
        log_format = ?c.log_format,
        output = ?c.output,
        remote_write_concurrency = c.remote_write_concurrency,
        remote_write_max_samples = c.remote_write_max_samples,
    );
    c.remote_write.log("Database settings (used with OUTPUT=remote-write).");
}

/// Raises the soft limit on open files to the hard one, as Go programs (the
/// Go sink among them) do at start: the soft limit is often 1024, and
/// MAX_CONNECTIONS would be lowered to fit under it.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct given,
    // which lives on this stack frame. A failure leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// SIGHUP reopens the output file (after a log rotation renamed it).
/// SIGXFSZ, which a file-size limit (`ulimit -f`) sends, would kill the
/// process mid-write; with a handler installed the write fails with EFBIG
/// instead, and the sink refuses the request and keeps serving, as on a
/// full disk.
fn handle_file_signals(reopen: Arc<Notify>) -> std::io::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    let mut file_size = signal(SignalKind::from_raw(libc::SIGXFSZ))?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = hangup.recv() => reopen.notify_one(),
                Some(()) = file_size.recv() => {}
                else => break,
            }
        }
    });
    Ok(())
}
