//! The overflow side path: where a lane's readings or batches go when the
//! sink cannot take them as fast as they come.
//!
//! - [`queue`]: a bounded queue of readings per lane that drops the oldest
//!   or the newest when full (`OVERFLOW_POLICY=drop-oldest|drop-newest`).
//! - [`spool`]: the durable on-disk store of batches (`OVERFLOW_POLICY=spool`).
//! - [`replay`]: how a lane spills batches into the spool, and the replayer
//!   that delivers them, oldest first.

pub(crate) mod queue;
pub(crate) mod replay;
pub mod spool;
