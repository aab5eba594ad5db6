//! `telemetry-node demo`: a sink on a free loopback port and a node sending
//! to it, in one process, with live progress.

use std::{collections::HashMap, future::Future, io::Write, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{NodeConfig, SinkConfig},
    error::ServeError,
    node::{self, GrpcTransport},
    receiver,
    stats::{NodeStats, SinkStats, SinkSummary, Summary},
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
) -> Result<DemoReport, ServeError> {
    let folder = std::env::temp_dir().join(format!("telemetry-node-demo-{}", std::process::id()));
    let vars = HashMap::from([("FILE_PATH".to_owned(), folder.display().to_string())]);
    let sink_config = SinkConfig::from_vars(&vars).map_err(|error| ServeError::Writer(error.to_string()))?;
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(ServeError::Listen)?;
    config.server_socket = listener.local_addr().map_err(ServeError::Listen)?.to_string();

    let sink_stats = Arc::new(SinkStats::default());
    let stop_sink = CancellationToken::new();
    let sink = tokio::spawn({
        let (stats, stop) = (Arc::clone(&sink_stats), stop_sink.clone());
        async move { receiver::serve(&sink_config, listener, stats, stop.cancelled_owned()).await }
    });

    let stats = Arc::new(NodeStats::default());
    let progress = tokio::spawn(report_progress(Arc::clone(&stats), Arc::clone(&sink_stats)));
    let endpoint = config.endpoint().map_err(|error| ServeError::Writer(error.to_string()))?;
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
    let sink = sink.await.map_err(|error| ServeError::Writer(error.to_string()))??;
    Ok(DemoReport { node, sink, output: folder.join("readings.jsonl") })
}

/// Prints one progress line a second until aborted.
async fn report_progress(node: Arc<NodeStats>, sink: Arc<SinkStats>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = 0;
    for second in 0u64.. {
        tick.tick().await;
        let now = node.snapshot();
        let written = sink.snapshot().readings_written;
        let line = format!("[{second:>3}s] {now} written={written} rate={}/s", now.acked - last);
        last = now.acked;
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}
