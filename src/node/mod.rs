//! The telemetry node: sources → merge → batch → throttle → sender.
//!
//! Each stage is a module that knows the type it receives and the type it
//! yields; [`pipeline`] composes them.

pub(crate) mod abandon;
pub mod batch;
pub mod codec;
pub(crate) mod delivery;
pub mod ledger;
pub mod overflow;
pub(crate) mod pipeline;
pub mod remote_write;
pub mod retry;
pub(crate) mod sender;
pub mod source;
pub(crate) mod throttle;
pub mod transport;

pub use ledger::{Ledger, Summary};
pub use pipeline::{run, run_with};
pub use remote_write::RemoteWriteTransport;
pub use retry::RetryPolicy;
pub use transport::{GrpcTransport, Transport};
