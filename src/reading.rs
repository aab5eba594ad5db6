//! The domain type that flows through the node: one sensor reading.

use std::{
    collections::HashSet,
    sync::{LazyLock, Mutex, PoisonError},
    time::SystemTime,
};

use prost::encoding::{WireType, encoded_len_varint};

use crate::proto::{SensorValue, SensorValuesRequest, sensor_value::Measurement};

/// One value measured by one sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// The sensor's name: the process's one copy of it (see
    /// [`sensor_name`]), so that a reading neither allocates a string nor
    /// counts references to one.
    pub sensor: &'static str,
    /// Position in the sensor's output, from 0 up: the sink uses it to prove
    /// that nothing was lost, duplicated or reordered.
    pub sequence: u64,
    /// The measured value.
    pub value: i64,
    /// When the reading was taken.
    pub created_at: SystemTime,
}

/// The one copy of sensor name `name` this process keeps, made on first
/// use and kept for good.
///
/// A node's sensors are fixed by its configuration and live as long as it
/// does, so their names are never freed; keeping one copy of each name
/// bounds that by the names ever configured. In return a reading is plain
/// data: taking, batching and dropping one costs no atomic reference count
/// (one up and one down per reading, as with an `Arc<str>`).
pub(crate) fn sensor_name(name: &str) -> &'static str {
    static NAMES: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Mutex::default);
    let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(&kept) = names.get(name) {
        return kept;
    }
    let kept: &'static str = Box::leak(Box::from(name));
    names.insert(kept);
    kept
}

/// The longest sensor name, in bytes, that the node's sources give.
pub const MAX_SENSOR_NAME_BYTES: usize = 256;

/// Whether `name` may name a sensor of this node, and if not, why. The sink
/// takes any non-empty UTF-8 name (as the Go sink does); names the node
/// makes from files, commands and the host are held to more: 1 to
/// [`MAX_SENSOR_NAME_BYTES`] bytes without whitespace or control
/// characters, so that each reads the same in a log line, a JSON line and a
/// database label.
pub fn check_sensor_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > MAX_SENSOR_NAME_BYTES {
        return Err("is longer than 256 bytes");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("holds whitespace or a control character");
    }
    Ok(())
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
/// messages (a string copy per reading). Lengths are worked out first, so
/// each byte is written once, straight into `out`.
pub fn encode_batch(batch: &[Reading], out: &mut Vec<u8>) {
    // Room for every reading, so that `out` seldom grows mid-batch: a name as
    // long as the first one plus 40 bytes of framing and numbers (a few more
    // for the largest values; `out` then grows).
    out.reserve(batch.first().map_or(0, |reading| batch.len() * (reading.sensor.len() + 40)));
    // Readings of one sensor tick share their time: encode it once.
    let mut time = Time::of(SystemTime::UNIX_EPOCH);
    for reading in batch {
        if reading.created_at != time.at {
            time = Time::of(reading.created_at);
        }
        let name = reading.sensor.as_bytes();
        let (value, value_len) = (reading.value as u64, varint_field_len(reading.value as u64));
        // A value and a time: under 128 bytes, so its length is one byte.
        let measurement_len = 2 + value_len + time.field.len();
        let name_len = if name.is_empty() { 0 } else { 1 + encoded_len_varint(name.len() as u64) + name.len() };
        let len = name_len + 2 + measurement_len + varint_field_len(reading.sequence);

        // SensorValue { sensor_name = 1, measurement = 2, sequence = 3 }
        out.push(key(1, WireType::LengthDelimited));
        push_varint(out, len as u64);
        if !name.is_empty() {
            out.push(key(1, WireType::LengthDelimited));
            push_varint(out, name.len() as u64);
            out.extend_from_slice(name);
        }
        // Measurement { sensor_value = 2: Int64Value { value = 1 }, created_at = 3 }
        out.push(key(2, WireType::LengthDelimited));
        out.push(measurement_len as u8);
        out.push(key(2, WireType::LengthDelimited));
        out.push(value_len as u8);
        push_varint_field(out, 1, value);
        out.extend_from_slice(&time.field);
        push_varint_field(out, 3, reading.sequence);
    }
}

/// A reading's time, encoded as field 3 of a `Measurement`.
struct Time {
    /// The time encoded.
    at: SystemTime,
    /// The field: key, length, `Timestamp { seconds = 1, nanos = 2 }`, at
    /// most 2 + 11 + 11 bytes.
    field: Vec<u8>,
}

impl Time {
    fn of(at: SystemTime) -> Self {
        let timestamp = prost_types::Timestamp::from(at);
        let (seconds, nanos) = (timestamp.seconds as u64, timestamp.nanos as u64);
        let mut field = Vec::with_capacity(24);
        field.push(key(3, WireType::LengthDelimited));
        field.push((varint_field_len(seconds) + varint_field_len(nanos)) as u8);
        push_varint_field(&mut field, 1, seconds);
        push_varint_field(&mut field, 2, nanos);
        Self { at, field }
    }
}

/// The one-byte key of field `tag` (1 to 15).
const fn key(tag: u8, wire_type: WireType) -> u8 {
    tag << 3 | wire_type as u8
}

/// Length of a one-byte-key varint field, or 0 for the default value.
fn varint_field_len(value: u64) -> usize {
    if value == 0 { 0 } else { 1 + encoded_len_varint(value) }
}

/// prost's `encode_varint`, for a `Vec` only: written for any `BufMut`, it
/// is not inlined, and its calls cost more than the encoding.
fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Varint field `tag`, left out when it holds the default value, as proto3 does.
fn push_varint_field(out: &mut Vec<u8>, tag: u8, value: u64) {
    if value != 0 {
        out.push(key(tag, WireType::Varint));
        push_varint(out, value);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    #[test]
    fn a_sensor_name_is_kept_once() {
        let first = sensor_name(&format!("kept-{}", 1));
        let again = sensor_name("kept-1");
        assert_eq!(first, "kept-1");
        assert!(std::ptr::eq(first, again), "the same copy both times");
        assert!(!std::ptr::eq(first, sensor_name("kept-2")));
    }

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
                    Reading { sensor: sensor_name(&name), sequence, value, created_at }
                })
                .collect();
            let mut ours = Vec::new();
            encode_batch(&batch, &mut ours);
            prop_assert_eq!(ours, to_request(&batch).encode_to_vec());
        }
    }
}
