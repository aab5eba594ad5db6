//! The wire codec of the node's requests: encodes a batch straight into
//! tonic's outgoing buffer, and shares the encoded form across retries.

use std::{marker::PhantomData, sync::Arc};

use prost::{Message, bytes::BufMut};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use crate::{
    proto::SensorValuesResponse,
    reading::{Batch, encode_batch},
};

/// The path of `sensor.v1.SensorService/SendSensorValues`.
pub const SEND_PATH: &str = "/sensor.v1.SensorService/SendSensorValues";

/// Something that can be written as a `SensorValuesRequest`.
pub trait Payload: Send + Sync + 'static {
    /// Writes the encoded request into `buf`.
    fn write_to(&self, buf: &mut impl BufMut);
}

impl Payload for Arc<Batch> {
    fn write_to(&self, buf: &mut impl BufMut) {
        encode_batch(self, buf);
    }
}

/// An already encoded request, sent as it is.
impl Payload for prost::bytes::Bytes {
    fn write_to(&self, buf: &mut impl BufMut) {
        buf.put_slice(self);
    }
}

/// Encodes `P` requests; decodes the (empty) response.
#[derive(Debug)]
pub struct SendCodec<P>(PhantomData<fn(P)>);

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
pub struct PayloadEncoder<P>(PhantomData<fn(P)>);

impl<P: Payload> Encoder for PayloadEncoder<P> {
    type Item = P;
    type Error = Status;

    fn encode(&mut self, item: P, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write_to(dst);
        Ok(())
    }
}

/// Reads a `SensorValuesResponse`.
#[derive(Debug)]
pub struct ResponseDecoder;

impl Decoder for ResponseDecoder {
    type Item = SensorValuesResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<SensorValuesResponse>, Status> {
        SensorValuesResponse::decode(src).map(Some).map_err(|error| Status::internal(error.to_string()))
    }
}
