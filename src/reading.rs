//! The domain type that flows through the node: one sensor reading.

use std::{sync::Arc, time::SystemTime};

use prost::encoding::{WireType, encoded_len_varint};

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

/// Appends the `SensorValuesRequest` that carries `batch` to `out`: the
/// same bytes as encoding [`to_request`], without building the intermediate
/// messages (a string copy per reading). Each reading's fields are put
/// together on the stack and copied out in three slices.
pub fn encode_batch(batch: &[Reading], out: &mut Vec<u8>) {
    // Readings of one sensor tick share their time: encode it once.
    let mut time: Option<(SystemTime, Scratch)> = None;
    for reading in batch {
        let created_at = match &time {
            Some((at, encoded)) if *at == reading.created_at => encoded,
            _ => &time.insert((reading.created_at, timestamp_field(reading.created_at))).1,
        };
        // SensorValue fields 2 (measurement) and 3 (sequence).
        let mut rest = Scratch::default();
        rest.byte(key(2, WireType::LengthDelimited));
        // Under 128 bytes (a value and a time), so its length is one byte.
        let measurement_len = 2 + varint_field_len(reading.value as u64) + created_at.len;
        rest.byte(measurement_len as u8);
        rest.byte(key(2, WireType::LengthDelimited));
        rest.byte(varint_field_len(reading.value as u64) as u8);
        rest.varint_field(key(1, WireType::Varint), reading.value as u64);
        rest.extend(created_at.as_slice());
        rest.varint_field(key(3, WireType::Varint), reading.sequence);

        let name = reading.sensor.as_bytes();
        let name_field_len = if name.is_empty() { 0 } else { 1 + encoded_len_varint(name.len() as u64) + name.len() };
        let mut head = Scratch::default();
        head.byte(key(1, WireType::LengthDelimited));
        head.varint((name_field_len + rest.len) as u64);
        if !name.is_empty() {
            head.byte(key(1, WireType::LengthDelimited));
            head.varint(name.len() as u64);
        }
        out.extend_from_slice(head.as_slice());
        out.extend_from_slice(name);
        out.extend_from_slice(rest.as_slice());
    }
}

/// `Measurement.created_at = 3`, a `Timestamp { seconds, nanos }`.
fn timestamp_field(at: SystemTime) -> Scratch {
    let timestamp = prost_types::Timestamp::from(at);
    let (seconds, nanos) = (timestamp.seconds as u64, timestamp.nanos as u64);
    let mut field = Scratch::default();
    field.byte(key(3, WireType::LengthDelimited));
    field.byte((varint_field_len(seconds) + varint_field_len(nanos)) as u8);
    field.varint_field(key(1, WireType::Varint), seconds);
    field.varint_field(key(2, WireType::Varint), nanos);
    field
}

/// The one-byte key of field `tag` (1 to 15).
const fn key(tag: u8, wire_type: WireType) -> u8 {
    tag << 3 | wire_type as u8
}

/// Length of a one-byte-key varint field, or 0 for the default value.
fn varint_field_len(value: u64) -> usize {
    if value == 0 { 0 } else { 1 + encoded_len_varint(value) }
}

/// Bytes put together on the stack: the fixed-size fields of one reading,
/// at most 50 bytes (a measurement of two varints and a time of two, each
/// varint at most 10 bytes, and a sequence).
struct Scratch {
    bytes: [u8; 64],
    len: usize,
}

impl Default for Scratch {
    fn default() -> Self {
        Self { bytes: [0; 64], len: 0 }
    }
}

impl Scratch {
    fn byte(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.byte(value as u8 | 0x80);
            value >>= 7;
        }
        self.byte(value as u8);
    }

    /// A varint field, left out when it holds the default value, as proto3 does.
    fn varint_field(&mut self, key: u8, value: u64) {
        if value != 0 {
            self.byte(key);
            self.varint(value);
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
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
                    // Names of 128 bytes and more take a longer length.
                    prop_oneof!["[a-z0-9-]{0,20}", "[a-z]{120,300}"],
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
