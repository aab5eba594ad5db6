//! The checks every request passes whatever the output: each reading has a
//! name, a value and a time RFC 3339 can write; and who sent it, for the
//! outputs that tell senders apart. Nothing of a refused request is ever
//! stored.

use std::time::{Duration, SystemTime};

use crate::{error::ReceiveError, proto::SensorValue};

/// Latest timestamp that RFC 3339 can write: 9999-12-31T23:59:59Z.
pub(crate) const MAX_SECONDS: i64 = 253_402_300_799;

/// Longest sensor name or node identity sent to a database as a label
/// value: VictoriaMetrics cuts longer values (two sensors then share one
/// series, and one's samples are lost though the answer is OK); Mimir and
/// Cortex refuse values over 2048 bytes.
pub(crate) const MAX_LABEL_BYTES: usize = 2048;

/// The value and time of the reading at `index`, or why it is refused.
pub(crate) fn check(index: usize, item: &SensorValue) -> Result<(i64, SystemTime), ReceiveError> {
    if item.sensor_name.is_empty() {
        return Err(ReceiveError::EmptySensorName { index });
    }
    let measurement = item.measurement.as_ref().ok_or(ReceiveError::MissingMeasurement { index })?;
    let value = measurement.sensor_value.ok_or(ReceiveError::MissingValue { index })?;
    let created_at =
        measurement.created_at.as_ref().and_then(to_system_time).ok_or(ReceiveError::BadTimestamp { index })?;
    Ok((value, created_at))
}

/// Whose series a request holds, as a number: its [`owner`] label. Two
/// nodes' series never meet, so their requests can be written to a
/// database together; one node's requests are written one after another: a
/// database that takes two writes of one series at once, or one write
/// holding it twice, may keep only some of their samples and answer OK
/// (Prometheus drops what is out of order when it commits). The lane does
/// not count: this node keeps a sensor to one lane, but a client need not.
pub(crate) fn sender(owner: Option<(&str, &str)>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    owner.hash(&mut hasher);
    hasher.finish()
}

/// How a request without a node identity (the Go node) is told apart: the
/// IP address it came from (an IPv4 address as such, also when it reached
/// an IPv6 socket), or empty if unknown.
pub(crate) fn address_of(peer: Option<std::net::SocketAddr>) -> String {
    peer.map(|address| address.ip().to_canonical().to_string()).unwrap_or_default()
}

/// The label that tells a request's series from other senders': `node`,
/// its `node_id`; for a request without one, `address`, the IP address it
/// came from (a label no node can take, so that a `NODE_ID` that happens to
/// be an address never shares its series); none if neither is known.
pub(crate) fn owner<'a>(node_id: &'a str, address: &'a str) -> Option<(&'static str, &'a str)> {
    match (node_id, address) {
        ("", "") => None,
        ("", address) => Some(("address", address)),
        (node_id, _) => Some(("node", node_id)),
    }
}

/// The address a request came from, over plain TCP or TLS (tonic gives
/// the TCP connection's information over TLS too).
pub(crate) fn peer_of(extensions: &tonic::codegen::http::Extensions) -> Option<std::net::SocketAddr> {
    extensions.get::<tonic::transport::server::TcpConnectInfo>().and_then(|info| info.remote_addr())
}
/// The time of `timestamp` if RFC 3339 can write it (years 1970 to 9999).
pub(crate) fn to_system_time(timestamp: &prost_types::Timestamp) -> Option<SystemTime> {
    let seconds = u64::try_from(timestamp.seconds).ok().filter(|s| *s <= MAX_SECONDS as u64)?;
    let nanos = u32::try_from(timestamp.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// A reading named `name` of `value` (none: left out) at `seconds` (and 5
/// ns), sequence 7: what the checks' and the renderings' tests send.
#[cfg(test)]
pub(crate) fn item(name: &str, value: Option<i64>, seconds: i64) -> SensorValue {
    use crate::proto::sensor_value::Measurement;
    SensorValue {
        sensor_name: name.into(),
        measurement: Some(Measurement {
            sensor_value: value,
            created_at: Some(prost_types::Timestamp { seconds, nanos: 5 }),
        }),
        sequence: 7,
    }
}
