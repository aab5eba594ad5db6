//! Each stage alone: batching, encoding a batch, the sink's decode,
//! validate and render, the same through the sink's writer into a file, and
//! the spool. Throughput in readings.

use std::{hint::black_box, sync::Arc, time::Duration, time::SystemTime};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, stream};
use prost::Message;
use telemetry_node::{
    node::{batch::batches, overflow::spool::Spool},
    proto::SensorValuesRequest,
    reading::{Reading, encode_batch, to_request},
    receiver::SinkStats,
    receiver::output::{
        Chunk, Rendered,
        file::{lines::to_json_lines, writer::JsonLinesWriter},
    },
};
use tokio_util::sync::CancellationToken;

const READINGS: usize = 100_000;
const BATCH: usize = 1000;

fn readings(n: usize) -> Vec<Reading> {
    let names: Vec<&'static str> = (1..=16).map(|i| &*Box::leak(format!("sensor-{i}").into_boxed_str())).collect();
    let now = SystemTime::now();
    (0..n)
        .map(|i| Reading { sensor: names[i % 16], sequence: i as u64, value: (i % 1000) as i64, created_at: now })
        .collect()
}

fn batching(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    // A tick of 250 readings: e.g. a lane of 4 sensors at 62,500/s each.
    let ticks: Vec<Vec<Reading>> = readings(READINGS).chunks(250).map(<[Reading]>::to_vec).collect();
    let timeout = Duration::from_secs(1);
    let mut group = c.benchmark_group("batch");
    group.throughput(Throughput::Elements(READINGS as u64));
    group.bench_function("ticks_of_250_into_1000", |b| {
        b.to_async(&runtime).iter_batched(
            || ticks.clone(),
            |ticks| async move { batches(stream::iter(ticks), BATCH, timeout).count().await },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("one_by_one_into_1000", |b| {
        b.to_async(&runtime).iter_batched(
            || readings(READINGS),
            |input| async move {
                batches(stream::iter(input.into_iter().map(std::iter::once)), BATCH, timeout).count().await
            },
            BatchSize::LargeInput,
        )
    });
    // The same ticks through tokio-stream's chunks_timeout, a reading at a time.
    group.bench_function("chunks_timeout_ticks_of_250_into_1000", |b| {
        b.to_async(&runtime).iter_batched(
            || ticks.clone(),
            |ticks| async move {
                let readings = stream::iter(ticks).flat_map(stream::iter);
                tokio_stream::StreamExt::chunks_timeout(readings, BATCH, timeout).count().await
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn encoding(c: &mut Criterion) {
    let batch = readings(BATCH);
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut buf = Vec::with_capacity(64 * 1024);
    group.bench_function("encode_batch_1000", |b| {
        b.iter(|| {
            buf.clear();
            encode_batch(black_box(&batch), &mut buf);
            buf.len()
        })
    });
    group.bench_function("prost_request_1000", |b| b.iter(|| to_request(black_box(&batch)).encode_to_vec().len()));
    group.finish();
}

fn sink(c: &mut Criterion) {
    let mut encoded = Vec::new();
    encode_batch(&readings(BATCH), &mut encoded);
    let mut group = c.benchmark_group("sink");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut out = Vec::with_capacity(256 * 1024);
    group.bench_function("decode_validate_render_1000", |b| {
        b.iter(|| {
            let request = SensorValuesRequest::decode(black_box(encoded.as_slice())).unwrap();
            let lines = to_json_lines(&request).unwrap();
            out.clear();
            out.extend_from_slice(&lines);
            out.len()
        })
    });
    group.finish();
}

/// A request at a time, decoded, checked, rendered and handed to the sink's
/// writer, until the writer says the lines are in the file (which it syncs
/// every second, as the sink does by default). Each iteration appends about
/// 100 KB: the run writes a gigabyte or so to CARGO_TARGET_TMPDIR and
/// removes it at the end.
fn sink_writing(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-sink-writer");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut encoded = Vec::new();
    encode_batch(&readings(BATCH), &mut encoded);
    let (queue, waiting) = tokio::sync::mpsc::channel(64);
    let stop = CancellationToken::new();
    let writer = runtime
        .block_on(JsonLinesWriter::open(&dir.join("readings.jsonl"), 65536, Arc::new(SinkStats::default())))
        .unwrap();
    let writing = runtime.spawn(writer.run(waiting, Duration::from_secs(1), Arc::default(), stop.clone()));
    let mut group = c.benchmark_group("sink");
    group.throughput(Throughput::Elements(BATCH as u64)).sample_size(10);
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    group.bench_function("decode_validate_write_1000", |b| {
        b.to_async(&runtime).iter(|| async {
            let request = SensorValuesRequest::decode(black_box(encoded.as_slice())).unwrap();
            let lines = to_json_lines(&request).unwrap();
            let (written, confirmed) = tokio::sync::oneshot::channel();
            queue.send(Chunk::new(Rendered { bytes: lines, readings: BATCH, sender: 0 }, written)).await.unwrap();
            confirmed.await.unwrap().unwrap();
        })
    });
    group.finish();
    stop.cancel();
    runtime.block_on(writing).unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn spool(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-spool");
    let _ = std::fs::remove_dir_all(&dir);
    let (spool, _) = Spool::open(&dir, u64::MAX).unwrap();
    let mut batch = Vec::new();
    encode_batch(&readings(100), &mut batch);
    let mut group = c.benchmark_group("spool");
    group.throughput(Throughput::Elements(1)).sample_size(20);
    let mut sequence = 0u64;
    group.bench_function("commit_and_remove_batch_100", |b| {
        b.iter(|| {
            sequence += 1;
            spool.push(0, sequence, &batch, "node").unwrap();
            spool.remove(0, sequence).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, batching, encoding, sink, sink_writing, spool);
criterion_main!(benches);
