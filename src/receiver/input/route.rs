//! The `SensorService` route, served by hand rather than by the generated
//! server, for two things the generated one cannot do: decode requests
//! with [`RequestCodec`], and account for the requests that tonic refuses
//! before they reach the service (too large, compressed with an encoding
//! the sink does not accept, malformed framing).

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    task::{Context, Poll},
};

use tonic::{
    Code, Status,
    body::Body,
    codec::CompressionEncoding,
    codegen::{Body as HttpBody, BoxFuture, Service, StdError, http},
    server::{Grpc, NamedService, UnaryService},
};

use super::{
    budget::{Budget, Hold, Share},
    codec::{Incoming, RequestCodec},
    refusals::Refusals,
    service::ReceiverService,
    validate,
};
use crate::{error::ReceiveError, proto::SensorValuesResponse, receiver::stats::RejectReason};

/// Longest a request may take to arrive whole (waiting for its share of
/// the budget included) before it is answered DEADLINE_EXCEEDED, which a
/// node retries: a sender that stalls mid-request gives its share back.
const RECEIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The method's path.
const SEND_PATH: &str = "/sensor.v1.SensorService/SendSensorValues";

/// `sensor.v1.SensorService`, for tonic's router.
#[derive(Debug, Clone)]
pub(crate) struct SensorRoute {
    /// The service that answers requests once decoded.
    service: Arc<ReceiverService>,
    /// Whether gzip-compressed requests are accepted.
    accept_gzip: bool,
    /// MAX_MESSAGE_BYTES: the largest request, after decompression.
    max_bytes: usize,
    /// MAX_ITEMS_PER_REQUEST.
    max_items: usize,
    /// Where refusals are counted and logged.
    refusals: Arc<Refusals>,
    /// The bytes requests being received may hold, over all connections.
    budget: Budget,
}

impl SensorRoute {
    /// A route to `service` with the sink's limits.
    pub(crate) fn new(
        service: ReceiverService,
        accept_gzip: bool,
        limits: (usize, usize),
        budget: Budget,
        refusals: Arc<Refusals>,
    ) -> Self {
        let (max_bytes, max_items) = limits;
        Self { service: Arc::new(service), accept_gzip, max_bytes, max_items, refusals, budget }
    }

    /// Answers one call of the method.
    async fn send<B>(self, request: http::Request<B>) -> http::Response<Body>
    where
        B: HttpBody + Send + 'static,
        B::Data: Send,
        B::Error: Into<StdError> + Send,
    {
        // Before any of the body is read: a sender without the token costs
        // no memory.
        if !self.service.authorized(request.headers()) {
            let status = Status::from(ReceiveError::Unauthenticated);
            self.refusals.refuse(RejectReason::Unauthenticated, &status);
            return status.into_http();
        }
        if let Err(status) = self.service.ready().await {
            return status.into_http();
        }
        // Held until the request is answered.
        let share = Share::default();
        let mut request = request.map(|body| self.budget.meter(Box::pin(body), Arc::clone(&share)));
        request.extensions_mut().insert(Hold::new(Arc::clone(&share)));
        let reached = Arc::new(AtomicBool::new(false));
        let method = Method { service: Arc::clone(&self.service), reached: Arc::clone(&reached) };
        let peer = validate::peer_of(request.extensions());
        let codec = RequestCodec::new(self.max_items, self.service.output(), peer, Arc::clone(&self.refusals));
        let mut grpc = Grpc::new(codec).max_decoding_message_size(self.max_bytes);
        if self.accept_gzip {
            grpc = grpc.accept_compressed(CompressionEncoding::Gzip);
        }
        let answering = grpc.unary(method, request);
        tokio::pin!(answering);
        let response = tokio::select! {
            response = &mut answering => response,
            () = tokio::time::sleep(RECEIVE_TIMEOUT) => {
                if reached.load(Relaxed) {
                    // Received whole: its answer is the output's to give.
                    answering.await
                } else {
                    let status = Status::deadline_exceeded(format!(
                        "the request did not arrive whole within {} s",
                        RECEIVE_TIMEOUT.as_secs()
                    ));
                    self.refusals.refuse(RejectReason::Invalid, &status);
                    return status.into_http();
                }
            }
        };
        drop(share);
        if reached.load(Relaxed) {
            return response;
        }
        self.before_service(response)
    }

    /// A request tonic refused before decoding it: counted, logged, and an
    /// oversized compressed request answered OUT_OF_RANGE like an oversized
    /// plain one (tonic says RESOURCE_EXHAUSTED, which a node would retry).
    fn before_service(&self, response: http::Response<Body>) -> http::Response<Body> {
        let Some(status) = response.extensions().get::<Status>() else { return response };
        let reason = match status.code() {
            // The decoder counted its own refusals.
            Code::InvalidArgument | Code::Ok => return response,
            Code::ResourceExhausted if status.message().starts_with("Error decompressing: size limit") => {
                let status = Status::out_of_range(format!(
                    "request is larger than MAX_MESSAGE_BYTES ({}) once decompressed",
                    self.max_bytes
                ));
                self.refusals.refuse(RejectReason::TooLarge, &status);
                return status.into_http();
            }
            Code::OutOfRange => RejectReason::TooLarge,
            Code::Unimplemented => RejectReason::Compression,
            _ => RejectReason::Invalid,
        };
        self.refusals.refuse(reason, status);
        response
    }
}

impl NamedService for SensorRoute {
    const NAME: &'static str = "sensor.v1.SensorService";
}

impl<B> Service<http::Request<B>> for SensorRoute
where
    B: HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == SEND_PATH {
            let route = self.clone();
            Box::pin(async move { Ok(route.send(request).await) })
        } else {
            Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) })
        }
    }
}

/// The method, as tonic's unary handler calls it; notes that the request
/// got this far.
struct Method {
    /// Who answers.
    service: Arc<ReceiverService>,
    /// Set once a request is decoded and handed over.
    reached: Arc<AtomicBool>,
}

impl UnaryService<Incoming> for Method {
    type Response = SensorValuesResponse;
    type Future = BoxFuture<tonic::Response<SensorValuesResponse>, Status>;

    fn call(&mut self, request: tonic::Request<Incoming>) -> Self::Future {
        self.reached.store(true, Relaxed);
        let service = Arc::clone(&self.service);
        Box::pin(async move { service.receive(request).await })
    }
}
