//! The wire contract, byte for byte: what the Go node and sink send and
//! expect under `sensor.v1`.

use prost::Message;
use telemetry_node::proto::{SensorValue, SensorValuesRequest, sensor_value::Measurement};

fn request(value: Option<i64>, sequence: u64) -> SensorValuesRequest {
    SensorValuesRequest {
        items: vec![SensorValue {
            sensor_name: "t".into(),
            measurement: Some(Measurement {
                sensor_value: value,
                created_at: Some(prost_types::Timestamp { seconds: 1, nanos: 2 }),
            }),
            sequence,
        }],
        ..Default::default()
    }
}

#[test]
fn encodes_exactly_as_the_go_peers_do_plus_the_sequence_field() {
    let bytes = request(Some(5), 3).encode_to_vec();
    #[rustfmt::skip]
    let expected = [
        0x0a, 0x11,                   // items (1), 17 bytes
        0x0a, 0x01, b't',             //   sensor_name (1) "t"
        0x12, 0x0a,                   //   measurement (2), 10 bytes
        0x12, 0x02, 0x08, 0x05,       //     sensor_value (2): Int64Value { value: 5 }
        0x1a, 0x04, 0x08, 0x01, 0x10, 0x02, // created_at (3): Timestamp { 1 s, 2 ns }
        0x18, 0x03,                   //   sequence (3) = 3, new; skipped by Go peers
    ];
    assert_eq!(bytes, expected);
}

#[test]
fn a_zero_value_is_present_and_distinct_from_an_absent_one() {
    let zero = request(Some(0), 0).encode_to_vec();
    let absent = request(None, 0).encode_to_vec();
    assert_ne!(zero, absent);
    assert_eq!(
        SensorValuesRequest::decode(zero.as_slice()).unwrap().items[0].measurement.unwrap().sensor_value,
        Some(0)
    );
    assert_eq!(
        SensorValuesRequest::decode(absent.as_slice()).unwrap().items[0].measurement.unwrap().sensor_value,
        None
    );
}

#[test]
fn a_go_node_request_without_sequence_decodes_with_sequence_zero() {
    // What the Go node sends: the same reading with no field 3.
    let go = [0x0a, 0x0f, 0x0a, 0x01, b't', 0x12, 0x0a, 0x12, 0x02, 0x08, 0x05, 0x1a, 0x04, 0x08, 0x01, 0x10, 0x02];
    assert_eq!(SensorValuesRequest::decode(go.as_slice()).unwrap(), request(Some(5), 0));
}

#[test]
fn the_batch_identity_takes_new_field_numbers() {
    let mut with_identity = request(Some(5), 3);
    with_identity.node_id = "n".into();
    with_identity.lane = 1;
    with_identity.batch_sequence = 2;
    let bytes = with_identity.encode_to_vec();
    let mut expected = request(Some(5), 3).encode_to_vec();
    // node_id (2) "n", lane (3) = 1, batch_sequence (4) = 2: a Go sink skips them.
    expected.extend_from_slice(&[0x12, 0x01, b'n', 0x18, 0x01, 0x20, 0x02]);
    assert_eq!(bytes, expected);
}

#[test]
fn fields_from_a_newer_peer_are_skipped() {
    let mut bytes = request(Some(5), 3).encode_to_vec();
    // An unknown field 9 (varint 1) appended to the request.
    bytes.extend_from_slice(&[0x48, 0x01]);
    assert_eq!(SensorValuesRequest::decode(bytes.as_slice()).unwrap(), request(Some(5), 3));
}
