//! A `SensorValuesRequest`'s bytes straight into remote-write series bytes,
//! for `OUTPUT=remote-write`: the same bytes [`series::to_series`] makes
//! from the decoded request, without decoding it into messages first (a
//! string per reading, and the time to build and drop it all).
//!
//! It takes the common shape only: any request it does not recognise (an
//! invalid reading, a field the node does not send twice sent twice,
//! groups, anything malformed) it leaves to the decoder and
//! [`series::to_series`], which give the exact error or result. A
//! property test holds it to them.
//!
//! [`series::to_series`]: super::series::to_series

use std::collections::HashMap;

use super::{super::Rendered, series::Window};
use crate::{
    database::names,
    receiver::input::validate::{MAX_LABEL_BYTES, MAX_SECONDS, owner, sender},
};

/// The series of the request `bytes`, metric `metric`, or `None` when the
/// request is not in the common shape or is refused (a reading outside
/// `window`, two values of a sensor in one millisecond): then decode it and
/// use `series::to_series`, which says why. A request without a node
/// identity is labelled with `address` (`input::validate::owner`).
pub(crate) fn transcode(mut bytes: &[u8], metric: &str, window: Window, address: &str) -> Option<Rendered> {
    let mut grouped = Grouped::default();
    // A reading takes at least 20 bytes in the common shape.
    grouped.samples.reserve(bytes.len() / 20);
    let mut node_id: &[u8] = b"";
    while !bytes.is_empty() {
        match field(&mut bytes)? {
            (1, Value::Bytes(item)) => {
                let (name, value, millis) = in_order(item).or_else(|| reading(item))?;
                if !window.contains(millis) || name.len() > MAX_LABEL_BYTES {
                    return None;
                }
                grouped.add(name, value, millis)?;
            }
            (2, Value::Bytes(id)) => node_id = id,
            (3 | 4, Value::Varint(_)) => {}
            (1..=4, _) => return None,
            _ => {}
        }
    }
    if node_id.len() > MAX_LABEL_BYTES {
        return None;
    }
    let owner = owner(std::str::from_utf8(node_id).ok()?, address);
    let sender = sender(owner);
    Some(Rendered { bytes: grouped.encode(metric, owner)?, readings: grouped.readings, sender })
}

/// One sensor's series while a request is read.
struct Head<'a> {
    /// The sensor's name, checked to be UTF-8.
    name: &'a str,
    /// Its samples so far.
    count: usize,
}

/// Readings grouped into one series per sensor, in the order the sensors
/// first appear: every sample in one list, put in series order once all
/// are read (no list per sensor: a request of 1000 sensors with one reading
/// each is the common shape of a node with many sensors).
#[derive(Default)]
struct Grouped<'a> {
    /// Each sensor's series.
    series: Vec<Head<'a>>,
    /// Where each sensor's series is, once there are too many to guess.
    index_of: HashMap<&'a [u8], usize>,
    /// The series of the last reading.
    last: usize,
    /// Whether the last reading's series was the one before it too.
    repeating: bool,
    /// Every sample in the order read: its series, time in ms, value.
    samples: Vec<(usize, i64, f64)>,
    /// Readings added.
    readings: usize,
}

impl<'a> Grouped<'a> {
    /// Adds a reading; `None` if its name is not UTF-8. (Two readings of a
    /// sensor in one millisecond are judged in [`Grouped::encode`], with the
    /// series whole.)
    fn add(&mut self, name: &'a [u8], value: i64, millis: i64) -> Option<()> {
        self.readings += 1;
        let at = self.find(name)?;
        self.last = at;
        self.series[at].count += 1;
        self.samples.push((at, millis, value as f64));
        Some(())
    }

    /// The series of `name`, begun if new. A node's lane sends its sensors'
    /// readings in turn, and other senders a sensor's readings together, so
    /// the series after the last one and the last one are tried first (the
    /// one that matched last time first): one comparison instead of a hash,
    /// most of the time.
    fn find(&mut self, name: &'a [u8]) -> Option<usize> {
        let next = if self.last + 1 < self.series.len() { self.last + 1 } else { 0 };
        let guesses = if self.repeating { [self.last, next] } else { [next, self.last] };
        for guess in guesses {
            if self.series.get(guess).is_some_and(|head| head.name.as_bytes() == name) {
                self.repeating = guess == self.last;
                return Some(guess);
            }
        }
        self.repeating = false;
        if self.index_of.len() < self.series.len() {
            for (at, head) in self.series.iter().enumerate().skip(self.index_of.len()) {
                self.index_of.insert(head.name.as_bytes(), at);
            }
        }
        let new = self.series.len();
        let at = *self.index_of.entry(name).or_insert(new);
        if at == new {
            // A name that is not UTF-8 ends the reading (and this
            // grouping) here.
            let name = std::str::from_utf8(name).ok()?;
            self.series.push(Head { name, count: 0 });
        }
        Some(at)
    }

    /// The series, encoded as the `timeseries` entries of a `WriteRequest`,
    /// each series' samples in time order; `None` if a sensor has two
    /// values in one millisecond.
    fn encode(&self, metric: &str, owner: Option<(&str, &str)>) -> Option<Vec<u8>> {
        let owner_len = owner.map_or(0, |(name, value)| name.len() + value.len());
        let mut out = Vec::with_capacity(self.samples.len() * 20 + self.series.len() * (metric.len() + owner_len + 64));
        let common = common_labels(metric, owner);
        // Each series' samples, one series after another.
        let mut starts = Vec::with_capacity(self.series.len());
        let mut start = 0;
        for head in &self.series {
            starts.push(start);
            start += head.count;
        }
        let mut ordered = vec![(0i64, 0f64); self.samples.len()];
        let mut cursor = starts.clone();
        for &(at, millis, value) in &self.samples {
            ordered[cursor[at]] = (millis, value);
            cursor[at] += 1;
        }
        for (head, start) in self.series.iter().zip(starts) {
            let samples = &mut ordered[start..start + head.count];
            // In the order sent, unless a sender sent them otherwise.
            if !samples.windows(2).all(|pair| pair[0].0 < pair[1].0) {
                samples.sort_by_key(|(millis, _)| *millis);
                let clash = |pair: &[(i64, f64)]| pair[0].0 == pair[1].0 && pair[0].1.to_bits() != pair[1].1.to_bits();
                if samples.windows(2).any(clash) {
                    return None;
                }
            }
            let samples = &*samples;
            // The same sample twice is stored once.
            let once = samples.iter().enumerate().filter(|(i, (millis, _))| *i == 0 || samples[i - 1].0 != *millis);
            let once = once.map(|(_, sample)| *sample);
            if names::plain(head.name) {
                encode_series(&mut out, &common, Some(head.name), once);
            } else {
                // A metric of its own (rarer: the host's readings, the
                // default single sensor): its labels, sorted; refused ones
                // are left to the decoder, which says why.
                let labels = names::series_labels(head.name, metric, owner).ok()?;
                let mut own = Vec::with_capacity(64);
                for (name, value) in &labels {
                    put_label(&mut own, name, value);
                }
                encode_series(&mut out, &own, None, once);
            }
        }
        Some(out)
    }
}

/// What [`reading`] gives for a `SensorValue` whose fields are in the order
/// a node and prost write them, each once, read without the general
/// field loop; `None` for anything else, which [`reading`] then reads.
#[inline(always)]
fn in_order(mut bytes: &[u8]) -> Option<(&[u8], i64, i64)> {
    key(&mut bytes, 0x0a)?;
    let name = delimited(&mut bytes)?;
    key(&mut bytes, 0x12)?;
    let mut measurement = delimited(&mut bytes)?;
    if !bytes.is_empty() {
        key(&mut bytes, 0x18)?;
        varint(&mut bytes)?;
    }
    key(&mut measurement, 0x12)?;
    let mut wrapped = delimited(&mut measurement)?;
    key(&mut measurement, 0x1a)?;
    let mut timestamp = delimited(&mut measurement)?;
    let mut value = 0;
    if key(&mut wrapped, 0x08).is_some() {
        value = varint(&mut wrapped)? as i64;
    }
    let (mut seconds, mut nanos) = (0i64, 0i32);
    if key(&mut timestamp, 0x08).is_some() {
        seconds = varint(&mut timestamp)? as i64;
    }
    if key(&mut timestamp, 0x10).is_some() {
        nanos = varint(&mut timestamp)? as i32;
    }
    let whole = bytes.is_empty() && measurement.is_empty() && wrapped.is_empty() && timestamp.is_empty();
    if !whole || name.is_empty() || !(0..=MAX_SECONDS).contains(&seconds) || !(0..1_000_000_000).contains(&nanos) {
        return None;
    }
    Some((name, value, seconds * 1000 + i64::from(nanos) / 1_000_000))
}

/// Takes the one-byte field key `expected` off `bytes`, if it is next.
#[inline(always)]
fn key(bytes: &mut &[u8], expected: u8) -> Option<()> {
    let rest = bytes.strip_prefix(&[expected])?;
    *bytes = rest;
    Some(())
}

/// Takes a length and that many bytes off `bytes`.
#[inline(always)]
fn delimited<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
    let length = usize::try_from(varint(bytes)?).ok().filter(|l| *l <= bytes.len())?;
    let (value, rest) = bytes.split_at(length);
    *bytes = rest;
    Some(value)
}

/// The name, value and time in milliseconds of one `SensorValue`, if it
/// is valid and in the common shape.
fn reading(mut bytes: &[u8]) -> Option<(&[u8], i64, i64)> {
    let (mut name, mut measurement): (&[u8], _) = (b"", None);
    while !bytes.is_empty() {
        match field(&mut bytes)? {
            (1, Value::Bytes(text)) => name = text,
            (2, Value::Bytes(inner)) if measurement.is_none() => measurement = Some(inner),
            (3, Value::Varint(_)) => {}
            (1..=3, _) => return None,
            _ => {}
        }
    }
    let (mut value, mut created_at) = (None, None);
    let mut bytes = measurement?;
    while !bytes.is_empty() {
        match field(&mut bytes)? {
            (2, Value::Bytes(inner)) if value.is_none() => value = Some(wrapped_int64(inner)?),
            (3, Value::Bytes(inner)) if created_at.is_none() => created_at = Some(millis(inner)?),
            (2 | 3, _) => return None,
            _ => {}
        }
    }
    if name.is_empty() {
        return None;
    }
    Some((name, value?, created_at?))
}

/// The value of an `Int64Value`.
fn wrapped_int64(mut bytes: &[u8]) -> Option<i64> {
    let mut value = 0;
    while !bytes.is_empty() {
        match field(&mut bytes)? {
            (1, Value::Varint(v)) => value = v as i64,
            (1, _) => return None,
            _ => {}
        }
    }
    Some(value)
}

/// A `Timestamp` in milliseconds since 1970, if RFC 3339 can write it.
fn millis(mut bytes: &[u8]) -> Option<i64> {
    let (mut seconds, mut nanos) = (0i64, 0i32);
    while !bytes.is_empty() {
        match field(&mut bytes)? {
            (1, Value::Varint(v)) => seconds = v as i64,
            (2, Value::Varint(v)) => nanos = v as i32,
            (1 | 2, _) => return None,
            _ => {}
        }
    }
    if !(0..=MAX_SECONDS).contains(&seconds) || !(0..1_000_000_000).contains(&nanos) {
        return None;
    }
    Some(seconds * 1000 + i64::from(nanos) / 1_000_000)
}

/// One field's value.
enum Value<'a> {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 2.
    Bytes(&'a [u8]),
    /// Wire types 1 and 5, skipped.
    Fixed,
}

/// The next field of `bytes`: its number and value. `None` for anything
/// the decoder should judge: a bad key or varint, a length past the end,
/// a group.
#[inline(always)]
fn field<'a>(bytes: &mut &'a [u8]) -> Option<(u32, Value<'a>)> {
    let key = varint(bytes)?;
    let number = u32::try_from(key >> 3).ok().filter(|n| *n > 0)?;
    if key > u64::from(u32::MAX) {
        return None;
    }
    let value = match key & 7 {
        0 => Value::Varint(varint(bytes)?),
        2 => Value::Bytes(delimited(bytes)?),
        1 | 5 => {
            let width = if key & 7 == 1 { 8 } else { 4 };
            *bytes = bytes.get(width..)?;
            Value::Fixed
        }
        _ => return None,
    };
    Some((number, value))
}

/// A varint as prost reads it: at most ten bytes, the tenth at most 1.
#[inline(always)]
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    if let Some((&byte, rest)) = bytes.split_first()
        && byte < 0x80
    {
        *bytes = rest;
        return Some(u64::from(byte));
    }
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        if i == 9 && byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Some(value);
        }
    }
    None
}

/// The labels every series of a request begins with, encoded:
/// `__name__`, then the `owner` label (`node` or `address`) if any, as
/// prost encodes them.
fn common_labels(metric: &str, owner: Option<(&str, &str)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(metric.len() + 64);
    put_label(&mut out, "__name__", metric);
    if let Some((name, value)) = owner {
        put_label(&mut out, name, value);
    }
    out
}

/// Appends one `labels` entry of a `TimeSeries`.
fn put_label(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x0a);
    put_varint(out, (string_len(name) + string_len(value)) as u64);
    put_string(out, 1, name);
    put_string(out, 2, value);
}

/// Appends one `timeseries` entry: the `common` labels (see
/// [`common_labels`]), the `sensor` label if any, then the samples, as
/// prost encodes a `TimeSeries`.
fn encode_series(
    out: &mut Vec<u8>,
    common: &[u8],
    sensor: Option<&str>,
    samples: impl Iterator<Item = (i64, f64)> + Clone,
) {
    let sample_len = |(millis, value): (i64, f64)| {
        (if value != 0.0 { 9 } else { 0 }) + if millis != 0 { 1 + varint_len(millis as u64) } else { 0 }
    };
    let body: usize = common.len()
        + sensor.map_or(0, |sensor| nested_len(string_len("sensor") + string_len(sensor)))
        + samples.clone().map(|sample| nested_len(sample_len(sample))).sum::<usize>();
    out.push(0x0a);
    put_varint(out, body as u64);
    out.extend_from_slice(common);
    if let Some(sensor) = sensor {
        put_label(out, "sensor", sensor);
    }
    for sample in samples {
        out.push(0x12);
        put_varint(out, sample_len(sample) as u64);
        if sample.1 != 0.0 {
            out.push(0x09);
            out.extend_from_slice(&sample.1.to_le_bytes());
        }
        if sample.0 != 0 {
            out.push(0x10);
            put_varint(out, sample.0 as u64);
        }
    }
}

/// Bytes of a length-delimited field holding `len` bytes, key included.
fn nested_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Bytes of a string field holding `text` (none when empty, as proto3
/// omits it).
fn string_len(text: &str) -> usize {
    if text.is_empty() { 0 } else { nested_len(text.len()) }
}

/// Appends string field `number` unless `text` is empty.
fn put_string(out: &mut Vec<u8>, number: u8, text: &str) {
    if !text.is_empty() {
        out.push(number << 3 | 2);
        put_varint(out, text.len() as u64);
        out.extend_from_slice(text.as_bytes());
    }
}

/// Bytes `value` takes as a varint.
fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// Appends `value` as a varint.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::{
        proto::{SensorValue, SensorValuesRequest, sensor_value::Measurement},
        receiver::output::remote_write::series::to_series,
    };

    /// What the decoder and `to_series` make of `bytes`, if they accept it.
    fn slow(bytes: &[u8], metric: &str) -> Option<Rendered> {
        slow_within(bytes, metric, Window::any(), "")
    }

    fn slow_within(bytes: &[u8], metric: &str, window: Window, address: &str) -> Option<Rendered> {
        let request = SensorValuesRequest::decode(bytes).ok()?;
        let series = to_series(&request, metric, window, address).ok()?;
        let sender = sender(owner(&request.node_id, address));
        Some(Rendered { bytes: series, readings: request.items.len(), sender })
    }

    fn any_item() -> impl Strategy<Value = SensorValue> {
        let name = prop_oneof![
            8 => Just(String::new()),
            40 => "[a-c]{1,3}",
            40 => "\\PC{0,4}",
            1 => Just("a".repeat(MAX_LABEL_BYTES)),
            1 => Just("a".repeat(MAX_LABEL_BYTES + 1)),
        ];
        let value = prop_oneof![Just(None), Just(Some(0i64)), any::<i64>().prop_map(Some), (0i64..5).prop_map(Some)];
        let seconds = prop_oneof![Just(0i64), 1_700_000_000i64..1_700_000_003, any::<i64>(), Just(MAX_SECONDS + 1)];
        let nanos = prop_oneof![Just(0i32), 0i32..3_000_000, any::<i32>(), Just(999_999_999)];
        let at = prop_oneof![
            Just(None),
            (seconds, nanos).prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos }))
        ];
        let measurement = prop_oneof![
            1 => Just(None),
            9 => (value, at).prop_map(|(sensor_value, created_at)| Some(Measurement { sensor_value, created_at })),
        ];
        (name, measurement, any::<u64>()).prop_map(|(sensor_name, measurement, sequence)| SensorValue {
            sensor_name,
            measurement,
            sequence,
        })
    }

    fn any_request() -> impl Strategy<Value = SensorValuesRequest> {
        let node = prop_oneof![
            10 => Just(String::new()),
            10 => "[a-z]{1,8}",
            1 => Just("n".repeat(MAX_LABEL_BYTES)),
            1 => Just("n".repeat(MAX_LABEL_BYTES + 1)),
        ];
        (proptest::collection::vec(any_item(), 0..20), node, any::<u32>(), any::<u64>()).prop_map(
            |(items, node_id, lane, batch_sequence)| SensorValuesRequest { items, node_id, lane, batch_sequence },
        )
    }

    /// Requests every reading of which is valid, several per sensor and
    /// millisecond now and then, with the same value (another value in the
    /// same millisecond refuses the request).
    fn any_valid_request() -> impl Strategy<Value = SensorValuesRequest> {
        let item = ("[a-c]{1,2}", any::<i64>(), 0i64..3, 0i32..3_000_000, any::<u64>()).prop_map(
            |(sensor_name, value, second, nanos, sequence)| SensorValue {
                sensor_name,
                measurement: Some(Measurement {
                    sensor_value: Some(value % 3),
                    created_at: Some(prost_types::Timestamp { seconds: 1_700_000_000 + second, nanos }),
                }),
                sequence,
            },
        );
        let node = prop_oneof![Just(String::new()), "[a-z]{1,8}"];
        (proptest::collection::vec(item, 0..50), node).prop_map(|(mut items, node_id)| {
            let mut first = std::collections::HashMap::new();
            for item in &mut items {
                let measurement = item.measurement.as_mut().expect("made with one");
                let at = measurement.created_at.expect("made with one");
                let millis = (at.seconds, at.nanos / 1_000_000);
                measurement.sensor_value = Some(
                    *first.entry((item.sensor_name.clone(), millis)).or_insert(measurement.sensor_value.unwrap_or(0)),
                );
            }
            SensorValuesRequest { items, node_id, lane: 1, batch_sequence: 7 }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn valid_requests_are_always_taken_fast_and_alike(request in any_valid_request()) {
            let bytes = request.encode_to_vec();
            let fast = transcode(&bytes, "sensor_value", Window::any(), "");
            prop_assert!(fast.is_some());
            prop_assert_eq!(fast, slow(&bytes, "sensor_value"));
        }

        #[test]
        fn a_window_refuses_alike(
            request in any_valid_request(),
            now in 1_699_999_999_000i64..1_700_000_004_000,
            age in 0u64..3000,
            ahead in 0u64..3000,
        ) {
            let window = Window::around(now, Duration::from_millis(age), Duration::from_millis(ahead));
            let bytes = request.encode_to_vec();
            let fast = transcode(&bytes, "m", window, "");
            let slow = slow_within(&bytes, "m", window, "");
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn gives_what_decoding_and_to_series_give(
            request in any_request(),
            address in prop_oneof![Just(""), Just("10.0.0.7"), Just("::1")],
        ) {
            let bytes = request.encode_to_vec();
            let fast = transcode(&bytes, "sensor_value", Window::any(), address);
            let slow = slow_within(&bytes, "sensor_value", Window::any(), address);
            prop_assert!(fast.is_none() || fast == slow, "fast {fast:?} slow {slow:?}");
            // The common shape, every reading valid: always taken fast.
            if slow.is_some() {
                prop_assert_eq!(fast, slow);
            }
        }

        #[test]
        fn gives_the_same_or_leaves_it_on_any_bytes(
            request in any_request(),
            cuts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            extra in proptest::collection::vec(any::<u8>(), 0..24),
        ) {
            let mut bytes = request.encode_to_vec();
            for (at, byte) in cuts {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
            }
            bytes.extend(extra);
            let fast = transcode(&bytes, "m", Window::any(), "");
            prop_assert!(fast.is_none() || fast == slow(&bytes, "m"));
        }
    }

    #[test]
    fn repeated_fields_are_left_to_the_decoder_or_read_as_it_reads_them() {
        let one = SensorValue {
            sensor_name: "a".into(),
            measurement: Some(Measurement {
                sensor_value: Some(5),
                created_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
            }),
            sequence: 1,
        };
        let mut bytes =
            SensorValuesRequest { items: vec![one], node_id: "n".into(), ..Default::default() }.encode_to_vec();
        // A second node_id, and a second measurement inside the item: the
        // last string wins; the decoder merges measurements, so it judges.
        bytes.extend([0x12, 1, b'm']);
        let fast = transcode(&bytes, "x", Window::any(), "").unwrap();
        assert_eq!(Some(fast), slow(&bytes, "x"));
    }
}
