//! The domain type that flows through the node: one sensor reading.

use std::{sync::Arc, time::SystemTime};

use prost::{
    bytes::BufMut,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint},
};

use crate::proto::{SensorValue, SensorValuesRequest, sensor_value::Measurement};

/// One value measured by one sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The sensor's name, shared by all its readings so that producing a
    /// reading does not allocate a string.
    pub sensor: Arc<str>,
    /// Position in the sensor's output, from 0 up: the sink uses it to prove
    /// that nothing was lost, duplicated or reordered.
    pub sequence: u64,
    /// The measured value.
    pub value: i64,
    /// When the reading was taken.
    pub created_at: SystemTime,
}

/// Readings sent together in one request.
pub type Batch = Vec<Reading>;

impl From<&Reading> for SensorValue {
    fn from(reading: &Reading) -> Self {
        SensorValue {
            sensor_name: reading.sensor.to_string(),
            measurement: Some(Measurement {
                sensor_value: Some(reading.value),
                created_at: Some(reading.created_at.into()),
            }),
            sequence: reading.sequence,
        }
    }
}

/// The request that carries `batch`.
pub fn to_request(batch: &[Reading]) -> SensorValuesRequest {
    SensorValuesRequest { items: batch.iter().map(SensorValue::from).collect(), ..Default::default() }
}

/// Writes the `SensorValuesRequest` that carries `batch` straight into
/// `buf`: the same bytes as encoding [`to_request`], without building the
/// intermediate messages (a string copy per reading).
pub fn encode_batch(batch: &[Reading], buf: &mut impl BufMut) {
    // Readings of one sensor tick share their time: convert it once.
    let mut last: Option<(SystemTime, prost_types::Timestamp)> = None;
    for reading in batch {
        let created_at = match last {
            Some((at, timestamp)) if at == reading.created_at => timestamp,
            _ => {
                let timestamp = prost_types::Timestamp::from(reading.created_at);
                last = Some((reading.created_at, timestamp));
                timestamp
            }
        };
        let wire = WireReading::of(reading, created_at);
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(wire.len() as u64, buf);
        wire.encode(buf);
    }
}

/// One reading's fields as they go on the wire, with the nested lengths.
struct WireReading<'a> {
    name: &'a str,
    value: i64,
    seconds: i64,
    nanos: i32,
    sequence: u64,
}

impl<'a> WireReading<'a> {
    fn of(reading: &'a Reading, created_at: prost_types::Timestamp) -> Self {
        let (seconds, nanos) = (created_at.seconds, created_at.nanos);
        Self { name: &reading.sensor, value: reading.value, seconds, nanos, sequence: reading.sequence }
    }

    /// `Int64Value { value }`: empty for 0, as proto3 leaves defaults out.
    fn value_len(&self) -> usize {
        varint_field_len(self.value as u64)
    }

    /// `Timestamp { seconds, nanos }`.
    fn timestamp_len(&self) -> usize {
        varint_field_len(self.seconds as u64) + varint_field_len(self.nanos as u64)
    }

    /// `Measurement { sensor_value = 2, created_at = 3 }`.
    fn measurement_len(&self) -> usize {
        nested_len(self.value_len()) + nested_len(self.timestamp_len())
    }

    /// `SensorValue { sensor_name = 1, measurement = 2, sequence = 3 }`.
    fn len(&self) -> usize {
        let name = if self.name.is_empty() { 0 } else { nested_len(self.name.len()) };
        name + nested_len(self.measurement_len()) + varint_field_len(self.sequence)
    }

    fn encode(&self, buf: &mut impl BufMut) {
        if !self.name.is_empty() {
            encode_key(1, WireType::LengthDelimited, buf);
            encode_varint(self.name.len() as u64, buf);
            buf.put_slice(self.name.as_bytes());
        }
        encode_key(2, WireType::LengthDelimited, buf);
        encode_varint(self.measurement_len() as u64, buf);
        encode_key(2, WireType::LengthDelimited, buf);
        encode_varint(self.value_len() as u64, buf);
        encode_varint_field(1, self.value as u64, buf);
        encode_key(3, WireType::LengthDelimited, buf);
        encode_varint(self.timestamp_len() as u64, buf);
        encode_varint_field(1, self.seconds as u64, buf);
        encode_varint_field(2, self.nanos as u64, buf);
        encode_varint_field(3, self.sequence, buf);
    }
}

/// Length of a one-byte-key varint field, or 0 for the default value.
fn varint_field_len(value: u64) -> usize {
    if value == 0 { 0 } else { 1 + encoded_len_varint(value) }
}

/// Length of a one-byte-key length-delimited field holding `len` bytes.
fn nested_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// Writes a varint field unless it holds the default value.
fn encode_varint_field(tag: u32, value: u64, buf: &mut impl BufMut) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    proptest! {
        #[test]
        fn encode_batch_writes_the_same_bytes_as_prost(
            readings in proptest::collection::vec(
                (
                    "[a-z0-9-]{0,20}",
                    any::<u64>(),
                    any::<i64>(),
                    // Repeated times take the cached conversion.
                    prop_oneof![Just(0i64), Just(1_700_000_000_000), -1_000_000_000_000i64..4_000_000_000_000],
                    prop_oneof![Just(0u32), 0u32..1_000_000_000],
                ),
                0..20,
            ),
        ) {
            let batch: Vec<Reading> = readings
                .into_iter()
                .map(|(name, sequence, value, millis, nanos)| {
                    let base = if millis >= 0 {
                        UNIX_EPOCH + Duration::from_millis(millis as u64)
                    } else {
                        UNIX_EPOCH - Duration::from_millis(millis.unsigned_abs())
                    };
                    let created_at = base + Duration::from_nanos(u64::from(nanos % 1_000_000));
                    Reading { sensor: Arc::from(name), sequence, value, created_at }
                })
                .collect();
            let mut ours = Vec::new();
            encode_batch(&batch, &mut ours);
            prop_assert_eq!(ours, to_request(&batch).encode_to_vec());
        }
    }
}
