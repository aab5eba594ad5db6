//! The sink's request decoder: sizes a request up before decoding it, so
//! that no request costs more memory than its readings could need, and
//! refuses undecodable bytes as the client's fault (INVALID_ARGUMENT).

use std::{marker::PhantomData, net::SocketAddr, sync::Arc};

use prost::{Message, bytes::Buf};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstCodec;

use super::refusals::Refusals;
use crate::{
    proto::{SensorValuesRequest, SensorValuesResponse},
    receiver::{
        output::{Rendered, Store},
        stats::RejectReason,
    },
};

/// Fewest bytes a valid reading takes inside its request: a name of one
/// character (3 bytes) and a measurement holding a value and a time, each
/// possibly empty (2 + 2 + 2). A shorter item is refused without being
/// decoded, so a request of empty items cannot cost 40 times its size.
pub(crate) const MIN_ITEM_BYTES: usize = 9;

/// A request as the decoder hands it to the service.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// Decoded into its messages.
    Message(SensorValuesRequest),
    /// Already in the output's form (`Store::render_bytes`): every
    /// reading valid.
    Rendered {
        /// The request, rendered.
        rendered: Rendered,
        /// The request's size on the wire.
        bytes: usize,
    },
}

/// Encodes answers with prost, decodes requests with [`RequestDecoder`].
#[derive(Debug, Clone)]
pub(crate) struct RequestCodec {
    /// MAX_ITEMS_PER_REQUEST.
    max_items: usize,
    /// The output, which may render requests from their bytes.
    output: Arc<dyn Store>,
    /// Where requests come from: their label when they have no node
    /// identity (`validate::address_of`).
    peer: Option<SocketAddr>,
    /// Where a refused request is counted and logged.
    refusals: Arc<Refusals>,
}

impl RequestCodec {
    /// A codec that refuses more than `max_items` readings in one request,
    /// for requests from `peer`.
    pub(crate) fn new(
        max_items: usize,
        output: Arc<dyn Store>,
        peer: Option<SocketAddr>,
        refusals: Arc<Refusals>,
    ) -> Self {
        Self { max_items, output, peer, refusals }
    }
}

impl Codec for RequestCodec {
    type Encode = SensorValuesResponse;
    type Decode = Incoming;
    type Encoder = <ProstCodec<SensorValuesResponse, SensorValuesRequest> as Codec>::Encoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<SensorValuesResponse, SensorValuesRequest>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder {
            max_items: self.max_items,
            output: Arc::clone(&self.output),
            peer: self.peer,
            refusals: Arc::clone(&self.refusals),
            decoded: PhantomData,
        }
    }
}

/// Decodes one request, after checking its shape.
#[derive(Debug)]
pub(crate) struct RequestDecoder {
    /// MAX_ITEMS_PER_REQUEST.
    max_items: usize,
    /// The output, which may render requests from their bytes.
    output: Arc<dyn Store>,
    /// Where the request comes from.
    peer: Option<SocketAddr>,
    /// Where a refused request is counted and logged.
    refusals: Arc<Refusals>,
    /// What it decodes.
    decoded: PhantomData<SensorValuesRequest>,
}

impl Decoder for RequestDecoder {
    type Item = Incoming;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        // The whole message is in one contiguous buffer (tonic gathers it
        // into one BytesMut); where not, it is gathered here.
        let length = buf.remaining();
        let gathered;
        let bytes = if buf.chunk().len() >= length {
            &buf.chunk()[..length]
        } else {
            gathered = buf.copy_to_bytes(length);
            &gathered[..]
        };
        // Decoded from the slice: through the buffer's `Buf`, prost's
        // varint reads cost more than all the rest of the decode.
        let fast = || {
            let rendered = self.output.render_bytes(bytes, self.peer)?;
            Some(Incoming::Rendered { rendered, bytes: length })
        };
        let checked = match size_up(bytes, self.max_items) {
            Ok(()) => match fast() {
                Some(rendered) => Ok(rendered),
                None => SensorValuesRequest::decode(bytes)
                    .map(Incoming::Message)
                    .map_err(|error| Shape::Undecodable(error.to_string())),
            },
            Err(shape) => Err(shape),
        };
        let consumed = buf.remaining();
        buf.advance(consumed);
        checked.map(Some).map_err(|shape| {
            let (reason, status) = shape.refusal();
            self.refusals.refuse(reason, &status);
            status
        })
    }
}

/// Why a request was refused before it was decoded.
#[derive(Debug, PartialEq, Eq)]
enum Shape {
    /// More items than MAX_ITEMS_PER_REQUEST.
    TooManyItems { limit: usize },
    /// An item too short to be a valid reading.
    ItemTooShort { index: usize, bytes: usize },
    /// Not a protobuf message of the expected type.
    Undecodable(String),
}

impl Shape {
    fn refusal(&self) -> (RejectReason, Status) {
        match self {
            Self::TooManyItems { limit } => (
                RejectReason::TooLarge,
                Status::invalid_argument(format!("request holds more than MAX_ITEMS_PER_REQUEST ({limit}) readings")),
            ),
            Self::ItemTooShort { index, bytes } => (
                RejectReason::Invalid,
                Status::invalid_argument(format!("item {index}: {bytes} bytes cannot hold a valid reading")),
            ),
            Self::Undecodable(error) => {
                (RejectReason::Invalid, Status::invalid_argument(format!("request cannot be decoded: {error}")))
            }
        }
    }
}

/// Walks the request's top-level fields without decoding them: counts the
/// items (field 1), refusing more than `max_items` or one too short to be
/// valid. Other fields are skipped; malformed framing is left for the
/// decoder to name.
fn size_up(mut bytes: &[u8], max_items: usize) -> Result<(), Shape> {
    let mut items = 0;
    while !bytes.is_empty() {
        let Some(key) = varint(&mut bytes) else { return Ok(()) };
        let skip = match key & 7 {
            0 => {
                let Some(_) = varint(&mut bytes) else { return Ok(()) };
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let Some(length) = varint(&mut bytes).and_then(|l| usize::try_from(l).ok()) else { return Ok(()) };
                if key >> 3 == 1 {
                    if length < MIN_ITEM_BYTES {
                        return Err(Shape::ItemTooShort { index: items, bytes: length });
                    }
                    items += 1;
                    if items > max_items {
                        return Err(Shape::TooManyItems { limit: max_items });
                    }
                }
                length
            }
            _ => return Ok(()),
        };
        if skip > bytes.len() {
            return Ok(());
        }
        bytes = &bytes[skip..];
    }
    Ok(())
}

/// Reads one varint off the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proto::{SensorValue, sensor_value::Measurement};

    fn smallest_valid_item() -> SensorValue {
        SensorValue {
            sensor_name: "a".into(),
            measurement: Some(Measurement {
                sensor_value: Some(0),
                created_at: Some(prost_types::Timestamp::default()),
            }),
            sequence: 0,
        }
    }

    #[test]
    fn the_smallest_valid_item_is_min_item_bytes_long() {
        assert_eq!(smallest_valid_item().encoded_len(), MIN_ITEM_BYTES);
        let request = SensorValuesRequest { items: vec![smallest_valid_item()], ..Default::default() };
        assert!(crate::receiver::output::file::lines::to_json_lines(&request).is_ok());
    }

    #[test]
    fn empty_items_are_refused_before_decoding() {
        let request = SensorValuesRequest { items: vec![SensorValue::default(); 3], ..Default::default() };
        assert_eq!(size_up(&request.encode_to_vec(), 10), Err(Shape::ItemTooShort { index: 0, bytes: 0 }));
    }

    #[test]
    fn items_are_counted_before_decoding() {
        let request = SensorValuesRequest {
            items: vec![smallest_valid_item(); 11],
            node_id: "n".into(),
            lane: 3,
            batch_sequence: u64::MAX,
        };
        let bytes = request.encode_to_vec();
        assert_eq!(size_up(&bytes, 11), Ok(()));
        assert_eq!(size_up(&bytes, 10), Err(Shape::TooManyItems { limit: 10 }));
    }

    proptest! {
        /// Whatever is refused before decoding is a request the sink would
        /// refuse anyway: too many items, or an item that fails validation.
        #[test]
        fn sizing_up_refuses_only_what_validation_refuses(
            names in proptest::collection::vec(".{0,3}", 0..8),
            with_values in proptest::collection::vec(any::<bool>(), 8),
        ) {
            let items: Vec<SensorValue> = names
                .iter()
                .zip(&with_values)
                .map(|(name, with_value)| SensorValue {
                    sensor_name: name.clone(),
                    measurement: Some(Measurement {
                        sensor_value: with_value.then_some(0),
                        created_at: Some(prost_types::Timestamp::default()),
                    }),
                    sequence: 0,
                })
                .collect();
            let request = SensorValuesRequest { items, ..Default::default() };
            if size_up(&request.encode_to_vec(), 100).is_err() {
                prop_assert!(crate::receiver::output::file::lines::to_json_lines(&request).is_err());
            }
        }
    }
}
