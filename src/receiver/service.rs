//! The gRPC service that receives readings: checks, rate-limits and queues
//! each request for the writer, and answers only once it is queued.

use std::{num::NonZeroU32, sync::Arc};

use governor::{Quota, RateLimiter};
use prost::Message;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::{validate, writer::Chunk};
use crate::{
    clock::{TokenBucket, TokioClock},
    config::SinkConfig,
    error::ReceiveError,
    proto::{SensorValuesRequest, SensorValuesResponse, sensor_service_server::SensorService},
    stats::{RejectReason, SinkStats, count},
};

/// Answers `SensorService` calls.
#[derive(Debug)]
pub struct ReceiverService {
    /// `Bearer <SINK_AUTH_TOKEN>`, which every request must carry when set.
    authorization: Option<Vec<u8>>,
    /// MAX_ITEMS_PER_REQUEST.
    max_items: usize,
    /// Request bytes per second, with one second's worth as the burst.
    bucket: TokenBucket,
    /// RATE_PER_SECOND, for messages.
    rate: u32,
    /// Queue to the writer; bounded, so a slow disk slows the callers down.
    /// `None` when accepted readings are discarded.
    output: Option<mpsc::Sender<Chunk>>,
    /// Counters for logs and summaries.
    stats: Arc<SinkStats>,
}

impl ReceiverService {
    /// A service that accepts what `config` allows and queues it on `output`.
    pub fn new(config: &SinkConfig, output: Option<mpsc::Sender<Chunk>>, stats: Arc<SinkStats>) -> Self {
        let rate = config.rate_per_second;
        let burst = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let bucket = RateLimiter::direct_with_clock(Quota::per_second(burst), TokioClock::new());
        let authorization = config.auth_token.as_ref().map(|token| format!("Bearer {token}").into_bytes());
        Self { authorization, max_items: config.max_items, bucket, rate, output, stats }
    }

    /// Whether `request` carries the token, compared in constant time.
    fn authorized<T>(&self, request: &Request<T>) -> bool {
        let Some(expected) = &self.authorization else { return true };
        let given = request.metadata().get("authorization").map_or(&[][..], |value| value.as_bytes());
        bool::from(given.ct_eq(expected))
    }

    /// Accepts `request` or says why not; nothing of a refused request is queued.
    async fn accept(&self, request: &SensorValuesRequest) -> Result<(), ReceiveError> {
        let bytes = request.encoded_len();
        count(&self.stats.bytes_received, bytes);
        let items = request.items.len();
        if items > self.max_items {
            return Err(ReceiveError::TooManyItems { items, limit: self.max_items });
        }
        let lines = validate::to_json_lines(request)?;
        if let Some(cost) = NonZeroU32::new(u32::try_from(bytes).unwrap_or(u32::MAX)) {
            match self.bucket.check_n(cost) {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ReceiveError::Throttled),
                Err(_) => return Err(ReceiveError::TooLarge { bytes, limit: self.rate }),
            }
        }
        let readings = request.items.len();
        if let Some(output) = &self.output {
            output.send(Chunk { lines, readings }).await.map_err(|_| ReceiveError::WriterStopped)?;
        }
        count(&self.stats.requests_accepted, 1);
        count(&self.stats.readings_accepted, readings);
        Ok(())
    }
}

#[tonic::async_trait]
impl SensorService for ReceiverService {
    async fn send_sensor_values(
        &self,
        request: Request<SensorValuesRequest>,
    ) -> Result<Response<SensorValuesResponse>, Status> {
        let answer = if self.authorized(&request) {
            self.accept(request.get_ref()).await
        } else {
            Err(ReceiveError::Unauthenticated)
        };
        match answer {
            Ok(()) => Ok(Response::new(SensorValuesResponse {})),
            Err(error) => {
                match error {
                    ReceiveError::Throttled => {
                        self.stats.throttled.inc();
                        debug!(message = "Throttled request.", %error);
                    }
                    ReceiveError::WriterStopped => warn!(message = "Refused request.", %error),
                    ReceiveError::Unauthenticated => {
                        self.stats.reject(RejectReason::Unauthenticated);
                        warn!(message = "Refused request.", %error);
                    }
                    ReceiveError::TooLarge { .. } | ReceiveError::TooManyItems { .. } => {
                        self.stats.reject(RejectReason::TooLarge);
                        warn!(message = "Rejected oversized request.", %error);
                    }
                    _ => {
                        self.stats.reject(RejectReason::Invalid);
                        warn!(message = "Rejected invalid request.", %error, items = request.get_ref().items.len());
                    }
                }
                Err(error.into())
            }
        }
    }
}
