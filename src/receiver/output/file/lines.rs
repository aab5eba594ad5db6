//! The file output's form of a request: one JSON line per reading, or the
//! reason the request is refused. Nothing of a refused request is written.

use serde::Serialize;

use crate::{error::ReceiveError, proto::SensorValuesRequest, receiver::input::validate::check};

/// One output line.
#[derive(Debug, Serialize)]
struct Line<'a> {
    /// Which sensor measured it.
    sensor_name: &'a str,
    /// The measured value.
    value: i64,
    /// When it was measured, RFC 3339 with nanoseconds, UTC.
    created_at: String,
    /// The reading's position in its sensor's output.
    sequence: u64,
    /// The sending node, when it said.
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<&'a str>,
    /// The sending lane, with `node_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    lane: Option<u32>,
    /// The batch's number within its lane, with `node_id`: what a restarted
    /// sink reads back to keep recognising retries.
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<u64>,
    /// On the last line of each request: the request is in the file whole
    /// up to here. What a crash leaves after the last such line is an
    /// unfinished write, which a restarted sink cuts off.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    batch_end: bool,
}

/// Checks every reading of `request` and renders them all as JSON lines, or
/// refuses the whole request at its first bad reading.
pub fn to_json_lines(request: &SensorValuesRequest) -> Result<Vec<u8>, ReceiveError> {
    let mut out = Vec::with_capacity(request.items.len() * 100);
    let identified = !request.node_id.is_empty();
    let node_id = identified.then_some(request.node_id.as_str());
    let (lane, batch) = (identified.then_some(request.lane), identified.then_some(request.batch_sequence));
    let last = request.items.len().saturating_sub(1);
    for (index, item) in request.items.iter().enumerate() {
        let (value, created_at) = check(index, item)?;
        let line = Line {
            sensor_name: &item.sensor_name,
            value,
            created_at: humantime::format_rfc3339_nanos(created_at).to_string(),
            sequence: item.sequence,
            node_id,
            lane,
            batch,
            batch_end: index == last,
        };
        serde_json::to_writer(&mut out, &line).expect("a Vec accepts every write and the line has only string keys");
        out.push(b'\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        proto::{SensorValue, sensor_value::Measurement},
        receiver::input::validate::{MAX_SECONDS, item},
    };

    #[test]
    fn renders_one_line_per_reading() {
        let request =
            SensorValuesRequest { items: vec![item("a\"b", Some(-3), 0), item("c", Some(0), 1)], ..Default::default() };
        let text = String::from_utf8(to_json_lines(&request).unwrap()).unwrap();
        assert_eq!(
            text,
            "{\"sensor_name\":\"a\\\"b\",\"value\":-3,\"created_at\":\"1970-01-01T00:00:00.000000005Z\",\"sequence\":7}\n\
             {\"sensor_name\":\"c\",\"value\":0,\"created_at\":\"1970-01-01T00:00:01.000000005Z\",\"sequence\":7,\"batch_end\":true}\n"
        );
    }

    #[test]
    fn lines_carry_the_batch_identity_when_the_node_gives_one() {
        let request = SensorValuesRequest {
            items: vec![item("c", Some(0), 1)],
            node_id: "n1".into(),
            lane: 2,
            batch_sequence: 9,
        };
        let text = String::from_utf8(to_json_lines(&request).unwrap()).unwrap();
        assert!(
            text.ends_with(",\"sequence\":7,\"node_id\":\"n1\",\"lane\":2,\"batch\":9,\"batch_end\":true}\n"),
            "{text}"
        );
    }

    #[test]
    fn refuses_each_kind_of_bad_reading() {
        let cases = [
            (item("", Some(1), 0), ReceiveError::EmptySensorName { index: 1 }),
            (
                SensorValue { measurement: None, ..item("s-a", Some(1), 0) },
                ReceiveError::MissingMeasurement { index: 1 },
            ),
            (item("s-a", None, 0), ReceiveError::MissingValue { index: 1 }),
            (item("s-a", Some(1), -1), ReceiveError::BadTimestamp { index: 1 }),
            (item("s-a", Some(1), MAX_SECONDS + 1), ReceiveError::BadTimestamp { index: 1 }),
        ];
        for (bad, expected) in cases {
            let request = SensorValuesRequest { items: vec![item("ok", Some(1), 0), bad], ..Default::default() };
            assert_eq!(to_json_lines(&request), Err(expected));
        }
        let no_time = SensorValue {
            measurement: Some(Measurement { sensor_value: Some(1), created_at: None }),
            ..item("s-a", Some(1), 0)
        };
        assert_eq!(
            to_json_lines(&SensorValuesRequest { items: vec![no_time], ..Default::default() }),
            Err(ReceiveError::BadTimestamp { index: 0 })
        );
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::proto::{SensorValue, sensor_value::Measurement};

    /// Mostly valid items (a name a sensor could have, a time between 1970
    /// and 2100), each field drawn over its whole range, or left out, one
    /// time in twenty: valid requests must render, not only empty ones.
    fn any_item() -> impl Strategy<Value = SensorValue> {
        let name = prop_oneof![19 => "[a-z][a-z0-9_.:-]{0,11}", 1 => ".{0,12}"];
        let seconds = prop_oneof![19 => 0i64..4_102_444_800, 1 => any::<i64>()];
        let nanos = prop_oneof![19 => 0i32..1_000_000_000, 1 => any::<i32>()];
        let time = prop_oneof![19 => (seconds, nanos).prop_map(Some), 1 => Just(None)];
        let value = prop_oneof![19 => any::<i64>().prop_map(Some), 1 => Just(None)];
        let measurement = prop_oneof![19 => (value, time).prop_map(Some), 1 => Just(None)];
        (name, measurement, any::<u64>()).prop_map(|(sensor_name, measurement, sequence)| SensorValue {
            sensor_name,
            measurement: measurement.map(|(sensor_value, time)| Measurement {
                sensor_value,
                created_at: time.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
            }),
            sequence,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// The request path from the wire on: any bytes either fail to
        /// decode or are checked without a panic.
        #[test]
        fn any_bytes_are_refused_or_checked_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(request) = SensorValuesRequest::decode(bytes.as_slice()) {
                let _ = to_json_lines(&request);
            }
        }
    }

    /// Every request is refused whole or rendered as one JSON line per
    /// reading; and a real share of them (non-empty ones too) renders, so
    /// that the rendering is what is checked.
    #[test]
    fn a_request_is_refused_whole_or_written_line_per_reading() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let (rendered, cases) = (AtomicUsize::new(0), 2000);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases, ..ProptestConfig::default() });
        let outcome = runner.run(&proptest::collection::vec(any_item(), 1..10), |items| {
            let request = SensorValuesRequest { items, ..Default::default() };
            if let Ok(lines) = to_json_lines(&request) {
                rendered.fetch_add(1, Relaxed);
                let text = String::from_utf8(lines).expect("JSON is UTF-8");
                prop_assert_eq!(text.lines().count(), request.items.len());
                for line in text.lines() {
                    prop_assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "{}", line);
                }
            }
            Ok(())
        });
        if let Err(failure) = outcome {
            panic!("{failure}");
        }
        let rendered = rendered.load(Relaxed);
        assert!(rendered >= cases as usize / 20, "only {rendered} of {cases} requests rendered");
    }
}
