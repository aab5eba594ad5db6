//! Transport: one attempt at delivering one request to the sink.

use std::{future::Future, time::Duration};

use tonic::{Status, transport::Channel, transport::Endpoint};

use crate::proto::{SensorValuesRequest, sensor_service_client::SensorServiceClient};

/// Delivers one request, once. Retrying is the sender's business.
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` and waits for the sink's answer.
    fn send(&self, request: SensorValuesRequest) -> impl Future<Output = Result<(), Status>> + Send;
}

/// HTTP/2 flow-control window per stream and per connection. tonic's
/// default (64 KiB) stalls a batch of a few thousand readings on round
/// trips; 4 MiB lets a whole batch go out in one flight.
const WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// The real transport: a tonic client over one lazily connected channel,
/// which reconnects by itself when the sink comes back.
#[derive(Debug, Clone)]
pub struct GrpcTransport {
    /// Client over the shared channel; cloning it is cheap.
    client: SensorServiceClient<Channel>,
    /// Deadline of one attempt.
    rpc_timeout: Duration,
}

impl GrpcTransport {
    /// A transport to `endpoint`; it connects on first use.
    pub fn new(endpoint: Endpoint, rpc_timeout: Duration) -> Self {
        let channel = endpoint
            .tcp_nodelay(true)
            .initial_stream_window_size(WINDOW_BYTES)
            .initial_connection_window_size(WINDOW_BYTES)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_timeout(rpc_timeout)
            .connect_lazy();
        Self { client: SensorServiceClient::new(channel), rpc_timeout }
    }
}

impl Transport for GrpcTransport {
    async fn send(&self, request: SensorValuesRequest) -> Result<(), Status> {
        let mut request = tonic::Request::new(request);
        // Tells the sink the deadline; the local timeout enforces it even
        // when the sink never answers.
        request.set_timeout(self.rpc_timeout);
        let mut client = self.client.clone();
        match tokio::time::timeout(self.rpc_timeout, client.send_sensor_values(request)).await {
            Ok(answer) => answer.map(drop),
            Err(_) => Err(Status::deadline_exceeded(format!("no answer within {:?}", self.rpc_timeout))),
        }
    }
}
