//! `telemetry-node demo`: a sink on a free loopback port and a node sending
//! to it, in one process, with live progress.

use std::{collections::HashMap, future::Future, io::Write, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::CommandError;
use telemetry_node::{
    config::{NodeConfig, SinkConfig},
    error::ServeError,
    node::{self, GrpcTransport, Ledger, Summary},
    receiver::{self, SinkStats, SinkSummary},
};

/// What a demo run did.
#[derive(Debug)]
pub struct DemoReport {
    /// The node's totals.
    pub node: Summary,
    /// The sink's totals.
    pub sink: SinkSummary,
    /// The file the sink wrote.
    pub output: PathBuf,
}

/// Runs the node configured by `config` against an embedded sink, until
/// `duration` has passed or `interrupt` resolves, printing progress to
/// stderr once a second.
pub async fn run(
    mut config: NodeConfig,
    duration: Duration,
    interrupt: impl Future<Output = ()>,
) -> Result<DemoReport, CommandError> {
    let folder = std::env::temp_dir().join(format!("telemetry-node-demo-{}", std::process::id()));
    let vars = HashMap::from([("FILE_PATH".to_owned(), folder.display().to_string())]);
    let sink_config = SinkConfig::from_vars(&vars)?;
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(ServeError::Listen)?;
    config.server_socket = listener.local_addr().map_err(ServeError::Listen)?.to_string();

    let sink_stats = Arc::new(SinkStats::default());
    let stop_sink = CancellationToken::new();
    let sink = tokio::spawn({
        let (stats, stop) = (Arc::clone(&sink_stats), stop_sink.clone());
        async move { receiver::serve(&sink_config, listener, stats, stop.cancelled_owned()).await }
    });

    let stats = Arc::new(Ledger::default());
    let output = folder.join("readings.jsonl");
    let host = config.host_interval.is_some().then(|| output.clone());
    let progress = tokio::spawn(report_progress(Arc::clone(&stats), Arc::clone(&sink_stats), host));
    let endpoint = node::transport::endpoint(&config)?;
    let transport = GrpcTransport::new(endpoint, config.rpc_timeout.into());
    let stop = async {
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            () = interrupt => {}
        }
    };
    let node = node::run(&config, transport, stats, stop).await;
    progress.abort();

    stop_sink.cancel();
    let sink = sink.await??;
    Ok(DemoReport { node, sink, output })
}

/// Prints one progress line a second until aborted; with `host` (the
/// sink's output file), the latest host readings the sink wrote, too.
async fn report_progress(node: Arc<Ledger>, sink: Arc<SinkStats>, host: Option<PathBuf>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = 0;
    let mut seen = HostReadings::default();
    for second in 0u64.. {
        tick.tick().await;
        let now = node.snapshot();
        let written = sink.snapshot().readings_written;
        let mut line = format!("[{second:>3}s] {now} written={written} rate={}/s", now.acked - last);
        last = now.acked;
        if let Some(path) = &host {
            seen.read_new(path);
            line.push_str(&seen.show());
        }
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

/// The latest machine-wide host readings the demo's sink wrote.
#[derive(Debug, Default)]
struct HostReadings {
    /// How far the output file has been read.
    offset: u64,
    /// Latest value per host sensor.
    latest: HashMap<String, i64>,
}

/// One output line, as far as the demo reads it.
#[derive(serde::Deserialize)]
struct OutputLine {
    sensor_name: String,
    value: i64,
}

impl HostReadings {
    /// Reads the whole lines `path` gained since the last call.
    fn read_new(&mut self, path: &std::path::Path) {
        use std::io::{BufRead, Seek};
        let Ok(mut file) = std::fs::File::open(path) else { return };
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut lines = std::io::BufReader::new(file);
        let mut line = String::new();
        while lines.read_line(&mut line).is_ok_and(|n| n > 0) && line.ends_with('\n') {
            self.offset += line.len() as u64;
            if let Ok(reading) = serde_json::from_str::<OutputLine>(&line)
                && reading.sensor_name.starts_with("host_")
            {
                self.latest.insert(reading.sensor_name, reading.value);
            }
            line.clear();
        }
    }

    /// A few of them, for a progress line.
    fn show(&self) -> String {
        let get = |name: &str| self.latest.get(name).copied();
        let mut shown = String::from(" | host:");
        if let Some(permille) = get("host_cpu_busy_permille") {
            shown.push_str(&format!(" cpu={:.1}%", permille as f64 / 10.0));
        }
        if let Some(load) = get("host_load1_milli") {
            shown.push_str(&format!(" load1={:.2}", load as f64 / 1000.0));
        }
        if let (Some(available), Some(total)) = (get("host_memory_available_bytes"), get("host_memory_total_bytes")) {
            shown.push_str(&format!(" mem_available={}/{} MiB", available >> 20, total >> 20));
        }
        // What `df` shows as available: what an unprivileged writer has.
        if let Some(available) = get("host_filesystem_avail_bytes{mountpoint=\"/\"}") {
            shown.push_str(&format!(" root_available={} MiB", available >> 20));
        }
        shown
    }
}
