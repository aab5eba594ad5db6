//! The sink's input: the `sensor.v1` gRPC service. It admits connections
//! ([`connections`]) and the bytes their requests may hold ([`budget`]),
//! decodes and sizes up each request ([`route`], [`codec`]), checks it
//! ([`validate`]), rate-limits it and hands it to the output, answering OK
//! once the output says it is stored ([`service`]); what it refuses is
//! counted and logged ([`refusals`]).

pub(crate) mod budget;
pub(crate) mod codec;
pub(crate) mod connections;
pub(crate) mod refusals;
pub(crate) mod route;
pub(crate) mod service;
pub mod validate;
