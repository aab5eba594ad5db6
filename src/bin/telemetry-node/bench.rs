//! `telemetry-node bench`: how fast the node ships readings, against the
//! fastest a bare tonic client can push the same batches to the same sink.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::CommandError;
use telemetry_node::{
    config::{NodeConfig, SinkConfig},
    error::ServeError,
    node::{self, GrpcTransport, Ledger, codec::Outgoing, source::simulated, transport::Transport},
    reading::Reading,
    receiver::{self, Output, SinkStats},
};

/// Alternating rounds of each measurement in one run.
const ROUNDS: u32 = 5;

/// Readings per second of all the bench's sensors together: several times
/// what the wire takes, so the sensors never hold the pipeline back, and no
/// more. A tick takes its share of this (a millisecond's worth) at once, and
/// a lane delivers every reading it took before it stops: a rate far above
/// the wire would leave the last ticks too much to deliver in time.
const SENSORS_TOTAL_RATE: f64 = 16_000_000.0;

/// Fewest sensors that make [`SENSORS_TOTAL_RATE`] at no more than a
/// reading a millisecond each.
pub const FEWEST_SENSORS: usize = (SENSORS_TOTAL_RATE / telemetry_node::config::MAX_SENSOR_RATE) as usize;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// How long each of the two measurements lasts in all, split into
    /// alternating rounds; each reports its median round.
    pub duration: Duration,
    /// Readings per request.
    pub batch_size: usize,
    /// Sensors of the node (spread over `in_flight` lanes).
    pub sensors: usize,
    /// Requests in flight at once, in both runs.
    pub in_flight: usize,
    /// Whether the sink writes JSON lines to a file, or checks and discards.
    pub writer: bool,
}

/// What was measured.
#[derive(Debug, Clone, Copy)]
pub struct BenchReport {
    /// Readings per second acknowledged to the bare client.
    pub ceiling: f64,
    /// Readings per second acknowledged to the node's pipeline.
    pub pipeline: f64,
    /// Peak resident memory of the whole process (node and sink), MiB.
    pub rss_mb: f64,
    /// The sequence number the ceiling's readings start from.
    pub sequence: u64,
}

/// Runs both measurements against one embedded sink.
pub async fn run(options: &BenchOptions) -> Result<BenchReport, CommandError> {
    let folder = std::env::temp_dir().join(format!("telemetry-node-bench-{}", std::process::id()));
    let vars = HashMap::from([("FILE_PATH".to_owned(), folder.display().to_string())]);
    let mut sink_config = SinkConfig::from_vars(&vars)?;
    sink_config.rate_per_second = u32::MAX;
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(ServeError::Listen)?;
    let address = listener.local_addr().map_err(ServeError::Listen)?;
    let stop_sink = CancellationToken::new();
    let output = if options.writer { Output::File } else { Output::Discard };
    let sink = tokio::spawn({
        let stop = stop_sink.clone();
        let stats = Arc::new(SinkStats::default());
        async move {
            receiver::serve_with(
                &sink_config,
                listener,
                stats,
                stop.cancelled_owned(),
                std::future::pending(),
                output,
                Arc::default(),
            )
            .await
        }
    });

    let address = address.to_string();
    // The ceiling sends what the pipeline's lanes send halfway through a
    // round (sequence numbers as long, on the wire and in the sink's
    // output): a short pipeline run first says how far in that is.
    let round = BenchOptions { duration: options.duration / ROUNDS, ..options.clone() };
    let warm_up = pipeline(&address, &BenchOptions { duration: round.duration / 4, ..options.clone() }).await;
    let sequence = (warm_up * round.duration.as_secs_f64() / 2.0 / options.sensors as f64) as u64;
    // The machine's other load comes and goes: alternating short runs
    // exposes both measurements to the same conditions, and the median
    // round of each leaves out the rounds a burst of load hit.
    let (mut ceilings, mut pipelines) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ceilings.push(ceiling(&address, &round, sequence).await);
        pipelines.push(pipeline(&address, &round).await);
    }
    let (ceiling, pipeline) = (median(ceilings), median(pipelines));

    stop_sink.cancel();
    sink.await??;
    let _ = std::fs::remove_dir_all(&folder);
    Ok(BenchReport { ceiling, pipeline, rss_mb: peak_rss_mb(), sequence })
}

/// The ceiling: a loop per lane of the node, each sending its lane's
/// batch, encoded once before the clock starts (each request under its own
/// batch number, as a lane would), as fast as the sink answers, over a
/// transport built from the node's own settings. The batches hold the
/// readings the lane's sensors take from their `sequence`-th on. Nothing is
/// left but tonic, the wire and the sink.
async fn ceiling(address: &str, options: &BenchOptions, sequence: u64) -> f64 {
    let config = node_config(address, options);
    let client = GrpcTransport::from_config(&config).expect("the bench's own settings are valid");
    let node_id = config.node_identity();
    let batches: Vec<Outgoing> = config
        .lanes()
        .into_iter()
        .enumerate()
        .map(|(lane, names)| {
            let batch: Vec<Reading> = simulated::readings_from(names, sequence, options.batch_size as u64).collect();
            Outgoing::new(&batch, Arc::clone(&node_id), lane as u32, 1)
        })
        .collect();
    let deadline = tokio::time::Instant::now() + options.duration;
    let started = Instant::now();
    let loops: Vec<_> = batches
        .into_iter()
        .map(|mut request| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut acked = 0u64;
                while tokio::time::Instant::now() < deadline {
                    if client.send(request.clone()).await.is_ok() {
                        acked += request.readings as u64;
                    }
                    request.batch_sequence += 1;
                }
                acked
            })
        })
        .collect();
    let mut acked = 0;
    for one in loops {
        acked += one.await.unwrap_or(0);
    }
    acked as f64 / started.elapsed().as_secs_f64()
}

/// The node's own pipeline with the rate limit off and sensors faster than
/// the wire, counted up to the end of the duration.
async fn pipeline(address: &str, options: &BenchOptions) -> f64 {
    let config = node_config(address, options);
    let transport = GrpcTransport::from_config(&config).expect("the bench's own settings are valid");
    let stats = Arc::new(Ledger::default());
    let measured = Arc::new(std::sync::Mutex::new(0.0));
    let stop = {
        let (stats, measured, duration) = (Arc::clone(&stats), Arc::clone(&measured), options.duration);
        async move {
            let started = Instant::now();
            tokio::time::sleep(duration).await;
            let rate = stats.snapshot().acked as f64 / started.elapsed().as_secs_f64();
            *measured.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = rate;
        }
    };
    node::run(&config, transport, stats, stop).await;
    *measured.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The node's default settings, sending to `address`, with the rate limit
/// off and sensors faster than the wire, [`SENSORS_TOTAL_RATE`] readings
/// per second between them, held back by it (`block`).
fn node_config(address: &str, options: &BenchOptions) -> NodeConfig {
    let sensor_rate = SENSORS_TOTAL_RATE / options.sensors.max(1) as f64;
    let vars = HashMap::from([
        ("GRPC_SERVER_SOCKET".to_owned(), address.to_owned()),
        ("SENSOR_COUNT".to_owned(), options.sensors.to_string()),
        ("SENSOR_VALUE_RATE_PER_SECOND".to_owned(), sensor_rate.to_string()),
        ("REQUEST_RATE_PER_SECOND".to_owned(), "inf".to_owned()),
        ("BATCH_SIZE".to_owned(), options.batch_size.to_string()),
        ("BATCH_TIMEOUT".to_owned(), "100ms".to_owned()),
        ("MAX_IN_FLIGHT".to_owned(), options.in_flight.to_string()),
        // The sensors outrun the wire on purpose: held back by it, as
        // before the default became a queue that would drop the excess.
        ("OVERFLOW_POLICY".to_owned(), "block".to_owned()),
    ]);
    NodeConfig::from_vars(&vars).expect("the bench's own settings are valid")
}

/// The middle value of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Peak resident set size of this process, in MiB (0 where unknown).
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
