//! The wire codec of the node's requests: a batch is encoded once, and the
//! encoded form is shared by its retries and written into tonic's outgoing
//! buffer with the sender's identity.

use std::{marker::PhantomData, sync::Arc};

use prost::{
    Message,
    bytes::{BufMut, Bytes},
    encoding::{WireType, encode_key, encode_varint},
};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use crate::{
    proto::SensorValuesResponse,
    reading::{Reading, encode_batch},
};

/// The path of `sensor.v1.SensorService/SendSensorValues`.
pub(crate) const SEND_PATH: &str = "/sensor.v1.SensorService/SendSensorValues";

/// Something that can be written as a `SensorValuesRequest`.
pub trait Payload: Send + Sync + 'static {
    /// Writes the encoded request into `buf`.
    fn write_to(&self, buf: &mut impl BufMut);

    /// How many bytes [`Payload::write_to`] writes, at most.
    fn encoded_len(&self) -> usize;
}

/// One batch as the sender sends it: its readings, encoded once when the
/// batch is made (on the lane's task, not on the connection's, which all
/// lanes share), and who sent them. Cheap to clone, so every retry sends the
/// same bytes.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The encoded readings: field 1 of the request, repeated.
    pub items: Bytes,
    /// How many readings `items` holds.
    pub readings: usize,
    /// The sending node's identity.
    pub node_id: Arc<str>,
    /// The sending lane.
    pub lane: u32,
    /// The batch's number within its lane.
    pub batch_sequence: u64,
}

impl Outgoing {
    /// Encodes `batch`, to be sent by `node_id` as `batch_sequence` of `lane`.
    pub fn new(batch: &[Reading], node_id: Arc<str>, lane: u32, batch_sequence: u64) -> Self {
        let mut items = Vec::new();
        encode_batch(batch, &mut items);
        Self { items: items.into(), readings: batch.len(), node_id, lane, batch_sequence }
    }
}

impl Outgoing {
    /// The request's readings as two requests of about half each, numbered
    /// `first` and `second`: for a sink that can never take the whole (its
    /// byte rate is smaller). `None` for a single reading, or items that do
    /// not parse as the node encoded them.
    pub(crate) fn halves(&self, first: u64, second: u64) -> Option<(Self, Self)> {
        let ends = item_ends(&self.items)?;
        if ends.len() < 2 {
            return None;
        }
        let middle = ends.len() / 2;
        let cut = ends[middle - 1];
        let half = |items: Bytes, readings: usize, batch_sequence: u64| Self {
            items,
            readings,
            node_id: Arc::clone(&self.node_id),
            lane: self.lane,
            batch_sequence,
        };
        Some((half(self.items.slice(..cut), middle, first), half(self.items.slice(cut..), ends.len() - middle, second)))
    }
}

/// Where each item of `items` (field 1, length-delimited, repeated) ends.
fn item_ends(items: &[u8]) -> Option<Vec<usize>> {
    let mut ends = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let (&key, after_key) = rest.split_first()?;
        if key != 0x0a {
            return None;
        }
        let mut after_length = after_key;
        let length = usize::try_from(prost::encoding::decode_varint(&mut after_length).ok()?).ok()?;
        rest = after_length.get(length..)?;
        ends.push(items.len() - rest.len());
    }
    Some(ends)
}

impl Payload for Outgoing {
    fn write_to(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.items);
        encode_identity(&self.node_id, self.lane, self.batch_sequence, buf);
    }

    fn encoded_len(&self) -> usize {
        // Three identity fields, each a key byte and a varint of at most 10
        // bytes, and node_id's text.
        self.items.len() + 3 * 11 + self.node_id.len()
    }
}

/// Writes fields 2 to 4 of a request: who sent the batch.
fn encode_identity(node_id: &str, lane: u32, batch_sequence: u64, buf: &mut impl BufMut) {
    if !node_id.is_empty() {
        encode_key(2, WireType::LengthDelimited, buf);
        encode_varint(node_id.len() as u64, buf);
        buf.put_slice(node_id.as_bytes());
    }
    if lane != 0 {
        encode_key(3, WireType::Varint, buf);
        encode_varint(u64::from(lane), buf);
    }
    if batch_sequence != 0 {
        encode_key(4, WireType::Varint, buf);
        encode_varint(batch_sequence, buf);
    }
}

/// An already encoded request, sent as it is.
impl Payload for Bytes {
    fn write_to(&self, buf: &mut impl BufMut) {
        buf.put_slice(self);
    }

    fn encoded_len(&self) -> usize {
        self.len()
    }
}

/// Encodes `P` requests; decodes the (empty) response.
#[derive(Debug)]
pub(crate) struct SendCodec<P>(PhantomData<fn(P)>);

impl<P> Default for SendCodec<P> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<P: Payload> Codec for SendCodec<P> {
    type Encode = P;
    type Decode = SensorValuesResponse;
    type Encoder = PayloadEncoder<P>;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        PayloadEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder
    }
}

/// Writes a [`Payload`].
#[derive(Debug)]
pub(crate) struct PayloadEncoder<P>(PhantomData<fn(P)>);

impl<P: Payload> Encoder for PayloadEncoder<P> {
    type Item = P;
    type Error = Status;

    fn encode(&mut self, item: P, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // At once: growing the buffer as the request is written would copy
        // what is already in it.
        dst.reserve(item.encoded_len());
        item.write_to(dst);
        Ok(())
    }
}

/// Reads a `SensorValuesResponse`.
#[derive(Debug)]
pub(crate) struct ResponseDecoder;

impl Decoder for ResponseDecoder {
    type Item = SensorValuesResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<SensorValuesResponse>, Status> {
        SensorValuesResponse::decode(src).map(Some).map_err(|error| Status::internal(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::proto::SensorValuesRequest;

    #[test]
    fn outgoing_encodes_as_the_request_with_its_identity() {
        let reading = Reading { sensor: "s", sequence: 3, value: 7, created_at: SystemTime::now() };
        let outgoing = Outgoing::new(std::slice::from_ref(&reading), Arc::from("n1"), 2, 99);
        let mut bytes = Vec::new();
        outgoing.write_to(&mut bytes);
        assert_eq!(outgoing.readings, 1);
        assert!(bytes.len() <= outgoing.encoded_len());
        let decoded = SensorValuesRequest::decode(bytes.as_slice()).unwrap();
        let mut expected = crate::reading::to_request(&[reading]);
        expected.node_id = "n1".into();
        expected.lane = 2;
        expected.batch_sequence = 99;
        assert_eq!(decoded, expected);
    }

    #[test]
    fn halves_hold_the_readings_in_order_under_their_own_numbers() {
        let readings: Vec<Reading> = (0..5)
            .map(|i| Reading { sensor: "s", sequence: i, value: i as i64, created_at: SystemTime::now() })
            .collect();
        let whole = Outgoing::new(&readings, Arc::from("n1"), 2, 99);
        let (first, second) = whole.halves(100, 101).expect("five readings split");
        let decode = |part: &Outgoing| {
            let request = SensorValuesRequest::decode(part.items.clone()).unwrap();
            assert_eq!(request.items.len(), part.readings);
            request.items.iter().map(|item| item.sequence).collect::<Vec<_>>()
        };
        assert_eq!((decode(&first), first.batch_sequence), (vec![0, 1], 100));
        assert_eq!((decode(&second), second.batch_sequence), (vec![2, 3, 4], 101));
        assert!(Outgoing::new(&readings[..1], Arc::from("n1"), 2, 1).halves(2, 3).is_none());
    }
}
