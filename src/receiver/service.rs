//! The gRPC service that receives readings: checks, rate-limits and queues
//! each request for the writer, and answers only once it is queued.

use std::{num::NonZeroU32, sync::Arc};

use governor::{Quota, RateLimiter};
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::{validate, writer::Chunk};
use crate::{
    clock::{TokenBucket, TokioClock},
    error::ReceiveError,
    proto::{SensorValuesRequest, SensorValuesResponse, sensor_service_server::SensorService},
    stats::{SinkStats, count},
};

/// Answers `SensorService` calls.
#[derive(Debug)]
pub struct ReceiverService {
    /// Request bytes per second, with one second's worth as the burst.
    bucket: TokenBucket,
    /// RATE_PER_SECOND, for messages.
    rate: u32,
    /// Queue to the writer; bounded, so a slow disk slows the callers down.
    output: mpsc::Sender<Chunk>,
    /// Counters for logs and summaries.
    stats: Arc<SinkStats>,
}

impl ReceiverService {
    /// A service that accepts `rate` request bytes per second and queues
    /// what it accepts on `output`.
    pub fn new(rate: u32, output: mpsc::Sender<Chunk>, stats: Arc<SinkStats>) -> Self {
        let burst = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let bucket = RateLimiter::direct_with_clock(Quota::per_second(burst), TokioClock::new());
        Self { bucket, rate, output, stats }
    }

    /// Accepts `request` or says why not; nothing of a refused request is queued.
    async fn accept(&self, request: &SensorValuesRequest) -> Result<(), ReceiveError> {
        let bytes = request.encoded_len();
        count(&self.stats.bytes_received, bytes);
        let lines = validate::to_json_lines(request)?;
        if let Some(cost) = NonZeroU32::new(u32::try_from(bytes).unwrap_or(u32::MAX)) {
            match self.bucket.check_n(cost) {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ReceiveError::Throttled),
                Err(_) => return Err(ReceiveError::TooLarge { bytes, limit: self.rate }),
            }
        }
        let readings = request.items.len();
        let chunk = Chunk { lines, readings };
        self.output.send(chunk).await.map_err(|_| ReceiveError::WriterStopped)?;
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
        let request = request.into_inner();
        match self.accept(&request).await {
            Ok(()) => Ok(Response::new(SensorValuesResponse {})),
            Err(error) => {
                match error {
                    ReceiveError::Throttled => {
                        count(&self.stats.throttled, 1);
                        debug!(message = "Throttled request.", %error);
                    }
                    ReceiveError::WriterStopped => warn!(message = "Refused request.", %error),
                    _ => {
                        count(&self.stats.rejected, 1);
                        warn!(message = "Rejected invalid request.", %error, items = request.items.len());
                    }
                }
                Err(error.into())
            }
        }
    }
}
