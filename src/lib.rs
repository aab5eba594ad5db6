//! A telemetry node that ships sensor readings over gRPC, and the telemetry
//! sink that receives them.
//!
//! # Layout
//!
//! Data flows through the node in this order:
//!
//! - [`node::source`]: sources of [`reading::Reading`]s (simulated sensors,
//!   the host, files, a command), each a `Stream` on its own interval timer,
//!   merged per lane.
//! - [`node::batch`]: readings grouped into batches by size and by time; a
//!   due batch leaves when its gate opens, and grows while it is shut.
//! - [`node::throttle`]: the gate's token: requests no faster than the rate
//!   (a `governor` token bucket on tokio's clock, see [`clock`]).
//! - [`node::sender`]: a `futures::Sink` that delivers each batch through a
//!   [`node::transport`], retrying what is worth retrying.
//! - [`node::pipeline`]: composes the stages and drives shutdown.
//! - [`node::overflow`]: beside the chain, where what the sink cannot take
//!   yet waits (the drop-policy queue, the default, or the durable spool and
//!   its replayer).
//!
//! And through the sink:
//!
//! - [`receiver::input`]: the gRPC service; admits, decodes, checks and
//!   rate-limits requests, and answers once the output stored them.
//! - [`receiver::output`]: one interface and an output per folder: the
//!   JSON-lines file (with the memory that tells a retried batch from new
//!   data), or, with `OUTPUT=remote-write`, a time-series database sent
//!   blocks gathered from many requests.
//!
//! Around them: [`config`] (environment variables), [`node::ledger`] and
//! [`receiver::stats`] (what happened to every reading, on each side),
//! [`error`], [`logging`], and [`listen`] and [`connection`] (the
//! sockets both binaries serve on). The `telemetry-node` binary's `demo` and
//! `bench` commands are built on the public API alone.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub(crate) mod clock;
pub mod config;
pub mod connection;
pub(crate) mod database;
pub mod error;
pub mod listen;
pub mod logging;
pub mod node;
pub mod observe;
pub mod reading;
pub mod receiver;
pub mod signals;
pub(crate) mod wire;

/// Code generated from `proto/sensor/v1/sensor.proto`.
#[allow(missing_docs, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("sensor.v1");
}

/// Code generated from `proto/prometheus/remote.proto`: the remote-write
/// request.
#[allow(missing_docs, unreachable_pub)]
pub mod prompb {
    tonic::include_proto!("prometheus");
}
