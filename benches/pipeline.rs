//! The whole node over loopback gRPC to an embedded sink (output discarded),
//! rate limit off: sensors, merge, batch, retrying sender, tonic, sink.

use std::{collections::HashMap, sync::Arc, time::Duration};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use telemetry_node::{
    config::{NodeConfig, SinkConfig},
    node::Ledger,
    node::{self, GrpcTransport},
    receiver::SinkStats,
    receiver::{self, Output},
};
use tokio_util::sync::CancellationToken;

const READINGS_PER_ITERATION: u64 = 100_000;

fn pipeline(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stop_sink = CancellationToken::new();
    let address = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut config = SinkConfig::from_vars(&HashMap::new()).unwrap();
        config.rate_per_second = u32::MAX;
        let stop = stop_sink.clone();
        tokio::spawn(async move {
            let stats = Arc::new(SinkStats::default());
            receiver::serve_with(
                &config,
                listener,
                stats,
                stop.cancelled_owned(),
                std::future::pending(),
                Output::Discard,
                Arc::default(),
            )
            .await
        });
        address
    });
    let vars: HashMap<String, String> = [
        ("GRPC_SERVER_SOCKET", address.to_string()),
        ("SENSOR_COUNT", "16000".into()),
        ("SENSOR_VALUE_RATE_PER_SECOND", "1000".into()),
        ("REQUEST_RATE_PER_SECOND", "inf".into()),
        ("BATCH_TIMEOUT", "100ms".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(READINGS_PER_ITERATION)).sample_size(10);
    for batch in [100, 1000] {
        let mut vars = vars.clone();
        vars.insert("BATCH_SIZE".into(), batch.to_string());
        let config = NodeConfig::from_vars(&vars).unwrap();
        group.bench_function(format!("loopback_grpc_batch_{batch}"), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let config = config.clone();
                async move {
                    let stats = Arc::new(Ledger::default());
                    let target = iters * READINGS_PER_ITERATION;
                    let watched = Arc::clone(&stats);
                    let enough = async move {
                        while watched.snapshot().acked < target {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    };
                    let started = std::time::Instant::now();
                    let transport = GrpcTransport::from_config(&config).unwrap();
                    node::run(&config, transport, stats, enough).await;
                    started.elapsed()
                }
            })
        });
    }
    group.finish();
    stop_sink.cancel();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
