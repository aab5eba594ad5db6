//! The gRPC service that receives readings: checks, de-duplicates and
//! rate-limits each request, and answers OK only once its readings are
//! written.

use std::{net::SocketAddr, num::NonZeroU32, sync::Arc};

use governor::clock::Clock;
use governor::{Quota, RateLimiter};
use prost::Message;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::{
    budget::Hold,
    codec::Incoming,
    dedup::Deduplicator,
    refusals::Refusals,
    stats::{RejectReason, SinkStats},
    transcode::Series,
    validate::{self, SeriesRules},
    writer::Chunk,
};
use crate::{
    clock::{TokenBucket, TokioClock},
    config::SinkConfig,
    error::{OutputError, ReceiveError},
    proto::{SensorValuesRequest, SensorValuesResponse, sensor_service_server::SensorService},
};

/// How long a node waits when the database could not be reached to read
/// its clock.
const CLOCK_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// What the output takes of an accepted request.
#[derive(Debug, Clone)]
pub(crate) enum Render {
    /// JSON lines, for the file.
    Lines,
    /// Remote-write series, as these rules say.
    Series(SeriesRules),
}

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
    /// Queue to the writer; bounded, so a slow disk slows the callers down.
    /// `None` when accepted readings are discarded.
    output: Option<mpsc::Sender<Chunk>>,
    /// The last batch written per node and lane; `None` where retried
    /// batches are harmless (remote-write).
    dedup: Option<Arc<Deduplicator>>,
    /// What the output takes.
    render: Render,
    /// Counters for logs and summaries.
    stats: Arc<SinkStats>,
    /// Where refused requests are counted and logged.
    refusals: Arc<Refusals>,
    /// Failures to read the database's clock are logged at most once a
    /// second.
    clock_failures: std::sync::Mutex<crate::logging::Every>,
}

impl ReceiverService {
    /// A service that accepts what `config` allows and queues it on `output`.
    pub(crate) fn new(
        config: &SinkConfig,
        output: Option<mpsc::Sender<Chunk>>,
        dedup: Option<Arc<Deduplicator>>,
        render: Render,
        stats: Arc<SinkStats>,
        refusals: Arc<Refusals>,
    ) -> Self {
        let rate = config.rate_per_second;
        let burst = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let clock = TokioClock::new();
        let bucket = RateLimiter::direct_with_clock(Quota::per_second(burst), clock);
        let authorization = config.auth_token.as_ref().map(|token| format!("Bearer {}", token.expose()).into_bytes());
        let clock_failures = std::sync::Mutex::new(crate::logging::Every::second());
        Self {
            authorization,
            max_items: config.max_items,
            bucket,
            clock,
            rate,
            output,
            dedup,
            render,
            stats,
            refusals,
            clock_failures,
        }
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
    /// queued. A request without a node identity is labelled in a database
    /// with the address of `peer`, where it came from. `hold`, the
    /// request's share of the budget, is held until its readings are
    /// written.
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
        // The file takes every request in turn; a database, one node's at a time.
        let (lines, sender) = match &self.render {
            Render::Lines => (validate::to_json_lines(request)?, 0),
            Render::Series(rules) => {
                let address = validate::address_of(peer);
                let owner = validate::owner(&request.node_id, &address);
                (validate::to_series(request, &rules.metric, rules.window(), &address)?, validate::sender(owner))
            }
        };
        // Held until the batch is written, so a retry of it waits here and
        // then finds it written.
        let mut last_written = match (request.node_id.as_str(), &self.dedup) {
            ("", _) | (_, None) => None,
            (node, Some(dedup)) => Some(dedup.lock(node, request.lane).await),
        };
        // A lane sends one batch at a time and retries only that one, so a
        // duplicate is exactly the last batch written. A lower number (a
        // node restarted with its clock set back) is new data, not a retry.
        if last_written.as_ref().is_some_and(|last| **last == Some(request.batch_sequence)) {
            self.stats.duplicate();
            debug!(message = "Batch already written.", node_id = %request.node_id, lane = request.lane, batch = request.batch_sequence);
            return Ok(());
        }
        self.charge(bytes)?;
        // Once queued, the lines will be written even if the caller goes
        // away (a timed-out node resets the stream): the write and the
        // record of it run in a task of their own, so the record is never
        // missing for lines that were written.
        let output = self.output.clone();
        let batch = request.batch_sequence;
        let write = tokio::spawn(async move {
            let _hold = hold;
            if let Some(output) = output {
                write_out(output, lines, items, sender).await?;
            }
            if let Some(last) = last_written.as_mut() {
                **last = Some(batch);
            }
            Ok::<(), ReceiveError>(())
        });
        write.await.map_err(|_| ReceiveError::WriterStopped)??;
        self.stats.accepted(items);
        Ok(())
    }

    /// Accepts a request the codec already made into remote-write series:
    /// every reading valid, nothing to de-duplicate (remote-write keeps no
    /// memory between requests).
    async fn accept_series(&self, series: Series, bytes: usize, hold: Option<Hold>) -> Result<(), ReceiveError> {
        self.stats.received(bytes);
        self.charge(bytes)?;
        let output = self.output.clone().ok_or(ReceiveError::WriterStopped)?;
        let Series { bytes: lines, readings, sender } = series;
        // In a task of its own, as in `accept`: once queued, it is written.
        let write = tokio::spawn(async move {
            let _hold = hold;
            write_out(output, lines, readings, sender).await
        });
        write.await.map_err(|_| ReceiveError::WriterStopped)??;
        self.stats.accepted(readings);
        Ok(())
    }

    /// How requests become remote-write series, when they do.
    /// With a database as the output, reads its clock before the first
    /// request is judged by it. While the database cannot be reached the
    /// node is pushed back, as while the database fails: nothing is judged
    /// by the sink's clock where the database's may differ.
    pub(crate) async fn read_database_clock(&self) -> Result<(), Status> {
        let Render::Series(rules) = &self.render else { return Ok(()) };
        rules.read_clock().await.map_err(|message| {
            self.stats.database_pushed_back("error", 1);
            let gate = self.clock_failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).ready();
            if let Some(suppressed) = gate {
                warn!(message = "Cannot read the database's clock; pushing back on the nodes.", error = %message, suppressed);
            }
            Status::from(ReceiveError::Output(OutputError::Busy { retry_after: CLOCK_PAUSE, message: message.into() }))
        })
    }

    pub(crate) fn series_rules(&self) -> Option<SeriesRules> {
        match &self.render {
            Render::Series(rules) => Some(rules.clone()),
            Render::Lines => None,
        }
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

/// Hands `lines` (holding `readings` readings) to the output and waits
/// until they are stored: in the file, or in the database.
async fn write_out(
    output: mpsc::Sender<Chunk>,
    lines: Vec<u8>,
    readings: usize,
    sender: u64,
) -> Result<(), ReceiveError> {
    let (written, confirmed) = oneshot::channel();
    output.send(Chunk { lines, readings, sender, written }).await.map_err(|_| ReceiveError::WriterStopped)?;
    confirmed.await.map_err(|_| ReceiveError::WriterStopped)?.map_err(ReceiveError::from)
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
                Incoming::Series { series, bytes } => self.accept_series(series, bytes, hold).await,
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
