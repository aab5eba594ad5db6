//! The gRPC service that receives readings: checks and rate-limits each
//! request, hands it to the output, and answers OK only once the output
//! says it is stored (or stored before: a retry).

use std::{net::SocketAddr, num::NonZeroU32, sync::Arc};

use governor::clock::Clock;
use governor::{Quota, RateLimiter};
use prost::Message;
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::{budget::Hold, codec::Incoming, refusals::Refusals};
use crate::{
    clock::{TokenBucket, TokioClock},
    config::SinkConfig,
    error::{OutputError, ReceiveError},
    proto::{SensorValuesRequest, SensorValuesResponse, sensor_service_server::SensorService},
    receiver::{
        output::{AfterStored, BatchId, Claim, Rendered, Store},
        stats::{RejectReason, SinkStats},
    },
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
    /// The bucket's clock, to tell a throttled node how long to wait.
    clock: TokioClock,
    /// RATE_PER_SECOND, for messages.
    rate: u32,
    /// Where accepted requests go; its queue is bounded, so a slow output
    /// slows the callers down.
    output: Arc<dyn Store>,
    /// Counters for logs and summaries.
    stats: Arc<SinkStats>,
    /// Where refused requests are counted and logged.
    refusals: Arc<Refusals>,
}

impl ReceiverService {
    /// A service that accepts what `config` allows and hands it to `output`.
    pub(crate) fn new(
        config: &SinkConfig,
        output: Arc<dyn Store>,
        stats: Arc<SinkStats>,
        refusals: Arc<Refusals>,
    ) -> Self {
        let rate = config.rate_per_second;
        let burst = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let clock = TokioClock::new();
        let bucket = RateLimiter::direct_with_clock(Quota::per_second(burst), clock);
        let authorization = config.auth_token.as_ref().map(|token| format!("Bearer {}", token.expose()).into_bytes());
        Self { authorization, max_items: config.max_items, bucket, clock, rate, output, stats, refusals }
    }

    /// Whether a request with `headers` carries the token, compared in
    /// constant time.
    pub(crate) fn authorized(&self, headers: &tonic::codegen::http::HeaderMap) -> bool {
        self.token_matches(headers.get("authorization").map_or(&[][..], |value| value.as_bytes()))
    }

    /// Whether `given` is `Bearer <SINK_AUTH_TOKEN>` (or no token is set).
    fn token_matches(&self, given: &[u8]) -> bool {
        let Some(expected) = &self.authorization else { return true };
        bool::from(given.ct_eq(expected))
    }

    /// Accepts `request` or says why not; nothing of a refused request is
    /// stored. A request without a node identity is told apart by the
    /// address of `peer`, where it came from. `hold`, the request's share of
    /// the budget, is held until its readings are stored.
    async fn accept(
        &self,
        request: &SensorValuesRequest,
        peer: Option<SocketAddr>,
        hold: Option<Hold>,
    ) -> Result<(), ReceiveError> {
        let bytes = request.encoded_len();
        self.stats.received(bytes);
        let items = request.items.len();
        if items > self.max_items {
            return Err(ReceiveError::TooManyItems { items, limit: self.max_items });
        }
        let rendered = self.output.render(request, peer)?;
        let record = match request.node_id.as_str() {
            "" => None,
            node => {
                let batch = BatchId { node, lane: request.lane, number: request.batch_sequence };
                match self.output.claim(batch).await {
                    Claim::Stored => {
                        self.stats.duplicate();
                        debug!(message = "Batch already written.", node_id = %node, lane = batch.lane, batch = batch.number);
                        return Ok(());
                    }
                    Claim::New(record) => record,
                }
            }
        };
        self.store(rendered, bytes, hold, record).await
    }

    /// Charges `bytes` to the rate, then stores `rendered` and calls
    /// `record` once it is stored.
    async fn store(
        &self,
        rendered: Rendered,
        bytes: usize,
        hold: Option<Hold>,
        record: Option<crate::receiver::output::Record>,
    ) -> Result<(), ReceiveError> {
        self.charge(bytes)?;
        let readings = rendered.readings;
        // Once queued, the readings are stored, the record made and the
        // hold kept until then, even if the caller goes away (a timed-out
        // node resets the stream): no task of its own is needed for that.
        let held = hold.map(|hold| Box::new(hold) as Box<dyn std::any::Any + Send + Sync>);
        self.output.store(rendered, AfterStored { record, held }).await?;
        self.stats.accepted(readings);
        Ok(())
    }

    /// Whether the output can judge requests now.
    pub(crate) async fn ready(&self) -> Result<(), Status> {
        self.output.ready().await.map_err(Status::from)
    }

    /// The output, for the decoder.
    pub(crate) fn output(&self) -> Arc<dyn Store> {
        Arc::clone(&self.output)
    }

    /// Takes `bytes` from the byte-rate bucket, or says how long to wait.
    fn charge(&self, bytes: usize) -> Result<(), ReceiveError> {
        let Some(cost) = NonZeroU32::new(u32::try_from(bytes).unwrap_or(u32::MAX)) else { return Ok(()) };
        match self.bucket.check_n(cost) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                Err(ReceiveError::Throttled { retry_after: not_until.wait_time_from(self.clock.now()) })
            }
            Err(_) => Err(ReceiveError::TooLarge { bytes, limit: self.rate }),
        }
    }
}

impl ReceiverService {
    /// Answers one request, as decoded by the route's codec.
    pub(crate) async fn receive(&self, request: Request<Incoming>) -> Result<Response<SensorValuesResponse>, Status> {
        // The route checks the token before reading the body; checked again
        // for a service served without the route.
        let given = request.metadata().get("authorization").map_or(&[][..], |value| value.as_bytes());
        let answer = if !self.token_matches(given) {
            Err(ReceiveError::Unauthenticated)
        } else {
            let (peer, hold) = (request.remote_addr(), request.extensions().get::<Hold>().cloned());
            match request.into_inner() {
                Incoming::Message(request) => self.accept(&request, peer, hold).await,
                Incoming::Rendered { rendered, bytes } => {
                    self.stats.received(bytes);
                    self.store(rendered, bytes, hold, None).await
                }
            }
        };
        match answer {
            Ok(()) => Ok(Response::new(SensorValuesResponse {})),
            Err(error) => {
                let reason = match &error {
                    ReceiveError::Throttled { .. } => {
                        self.stats.throttled();
                        debug!(message = "Throttled request.", %error);
                        None
                    }
                    ReceiveError::WriterStopped => {
                        debug!(message = "Refused request while stopping.", %error);
                        None
                    }
                    ReceiveError::Output(OutputError::Failed(_)) => Some(RejectReason::WriteFailed),
                    ReceiveError::Output(OutputError::Busy { .. }) => {
                        self.stats.throttled();
                        None
                    }
                    ReceiveError::Output(OutputError::Refused(_)) => Some(RejectReason::DatabaseRefused),
                    ReceiveError::Unauthenticated => Some(RejectReason::Unauthenticated),
                    ReceiveError::TooLarge { .. } | ReceiveError::TooManyItems { .. } => Some(RejectReason::TooLarge),
                    _ => Some(RejectReason::Invalid),
                };
                let status = Status::from(error);
                if let Some(reason) = reason {
                    self.refusals.refuse(reason, &status);
                }
                Err(status)
            }
        }
    }
}

#[tonic::async_trait]
impl SensorService for ReceiverService {
    async fn send_sensor_values(
        &self,
        request: Request<SensorValuesRequest>,
    ) -> Result<Response<SensorValuesResponse>, Status> {
        self.receive(request.map(Incoming::Message)).await
    }
}
