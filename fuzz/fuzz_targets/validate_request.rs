//! The sink's request path from the wire on: decode, then validate and
//! render. Any input must be refused or rendered, never panic, and a
//! rendered request has one JSON line per reading.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use telemetry_node::{proto::SensorValuesRequest, receiver::output::file::lines::to_json_lines};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = SensorValuesRequest::decode(data) {
        if let Ok(lines) = to_json_lines(&request) {
            assert_eq!(lines.iter().filter(|&&b| b == b'\n').count(), request.items.len());
        }
    }
});
