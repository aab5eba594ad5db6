//! Transport: one attempt at delivering one request to the sink, over a
//! connection that is replaced when a request on it gets no answer in time.

use std::{
    error::Error as _,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tonic::{
    Code, Status,
    codec::CompressionEncoding,
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use tonic::{client::Grpc, codegen::http::uri::PathAndQuery};

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::abandon::Connector;
use super::codec::{Outgoing, Payload, SEND_PATH, SendCodec};
use crate::config::{Compression, ConfigError, NodeConfig};

/// The gRPC endpoint of the sink `config` names (`GRPC_SERVER_SOCKET`).
pub fn endpoint(config: &NodeConfig) -> Result<Endpoint, ConfigError> {
    let uri = config.sink_uri()?;
    Endpoint::from_shared(uri).map_err(|_| crate::config::invalid("GRPC_SERVER_SOCKET", config.server_socket.trim()))
}

/// Delivers one batch, once. Retrying is the sender's business.
pub trait Transport: Clone + Send + Sync + 'static {
    /// Sends `request` and waits for the sink's answer.
    fn send(&self, request: Outgoing) -> impl Future<Output = Result<(), Status>> + Send;

    /// Where requests go, for logs: an address or a URL (never its query).
    fn destination(&self) -> String {
        String::from("the sink")
    }
}

/// HTTP/2 flow-control window per stream and per connection. tonic's
/// default (64 KiB) stalls a batch of a few thousand readings on round
/// trips; 4 MiB lets a whole batch go out in one flight.
const WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// The real transport: a tonic client over one lazily connected channel,
/// which reconnects by itself when the sink closes or refuses, and which is
/// replaced by a new one when a request on it gets no answer within
/// RPC_TIMEOUT. A connection that packets silently stopped crossing (a
/// partition, a NAT or load balancer that forgot the flow, a sink replica
/// that hangs) is otherwise used until HTTP/2 keep-alive gives it up, 40 s
/// later; a new connection also resolves the sink's name again and is
/// spread anew by whatever balances connections in front of the sinks.
#[derive(Debug, Clone)]
pub struct GrpcTransport {
    /// The connection in use, shared by every lane's copy.
    connection: Arc<Mutex<Connection>>,
    /// What a new connection is made from.
    endpoint: Endpoint,
    /// Whether requests are gzipped.
    compression: Compression,
    /// Deadline of one attempt.
    rpc_timeout: Duration,
    /// `Bearer <SINK_AUTH_TOKEN>`, sent with every request when set.
    authorization: Option<MetadataValue<Ascii>>,
    /// The sink's URI, for logs.
    address: Arc<str>,
}

impl GrpcTransport {
    /// A plaintext transport to `endpoint`; it connects on first use.
    pub fn new(endpoint: Endpoint, rpc_timeout: Duration) -> Self {
        Self::build(endpoint, rpc_timeout, Compression::None, None)
    }

    /// The transport that `config` describes: TLS, token and compression
    /// included.
    pub fn from_config(config: &NodeConfig) -> Result<Self, ConfigError> {
        let authorization = match &config.auth_token {
            Some(token) => {
                let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.expose())
                    .parse()
                    .map_err(|_| crate::config::invalid("SINK_AUTH_TOKEN", "(hidden)"))?;
                // Kept out of HPACK's tables and out of Debug output.
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let mut endpoint = endpoint(config)?;
        if let Some(tls) = config.tls()? {
            let mut settings =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(tls.ca)).domain_name(tls.server_name);
            if let Some((cert, key)) = tls.identity {
                settings = settings.identity(Identity::from_pem(cert, key));
            }
            // `sink_uri` makes the URI https whenever there is TLS material.
            endpoint = endpoint.tls_config(settings).map_err(|error| crate::config::ConfigError::Unusable {
                variable: "TLS_CA_CERT",
                value: config.tls_ca_cert.as_deref().map(|path| path.display().to_string()).unwrap_or_default(),
                reason: error.to_string(),
            })?;
        }
        Ok(Self::build(endpoint, config.rpc_timeout.into(), config.compression, authorization))
    }

    fn build(
        endpoint: Endpoint,
        rpc_timeout: Duration,
        compression: Compression,
        authorization: Option<MetadataValue<Ascii>>,
    ) -> Self {
        let address = endpoint.uri().to_string().into();
        let endpoint = tuned(endpoint).connect_timeout(rpc_timeout);
        let connection = Arc::new(Mutex::new(Connection::new(&endpoint, compression, rpc_timeout, 0)));
        Self { connection, endpoint, compression, rpc_timeout, authorization, address }
    }

    /// The connection in use and its number.
    fn current(&self) -> (Grpc<Channel>, u64) {
        let connection = self.connection.lock().unwrap_or_else(PoisonError::into_inner);
        (connection.client.clone(), connection.number)
    }

    /// Replaces connection `number` by a new one, unless another lane did
    /// already. The old one is abandoned: requests still waiting on it fail
    /// at once (and are retried), and nothing it held is sent later.
    fn replace(&self, number: u64) {
        let mut connection = self.connection.lock().unwrap_or_else(PoisonError::into_inner);
        if connection.number == number {
            connection.abandoned.cancel();
            *connection = Connection::new(&self.endpoint, self.compression, self.rpc_timeout, number + 1);
            info!(
                message = "No answer in time; the next request goes over a new connection.",
                to = %self.address,
                rpc_timeout = ?self.rpc_timeout,
            );
        }
    }

    /// How many times the connection was replaced.
    pub fn replaced(&self) -> u64 {
        self.connection.lock().unwrap_or_else(PoisonError::into_inner).number
    }
}

/// The connection requests go over, and its number in the transport's life.
#[derive(Debug)]
struct Connection {
    /// Client over the channel; cloning it is cheap.
    client: Grpc<Channel>,
    /// 0 for the first connection, then one more for each replacement.
    number: u64,
    /// Cancelled when the connection is given up.
    abandoned: CancellationToken,
}

impl Connection {
    /// A client over a new channel to `endpoint`, connected on first use
    /// (and again, by the channel, after the sink closed it).
    fn new(endpoint: &Endpoint, compression: Compression, timeout: Duration, number: u64) -> Self {
        let abandoned = CancellationToken::new();
        let channel = endpoint.connect_with_connector_lazy(Connector::new(abandoned.clone(), timeout));
        let client = Grpc::new(channel).max_decoding_message_size(1 << 20);
        let client =
            if compression == Compression::Gzip { client.send_compressed(CompressionEncoding::Gzip) } else { client };
        Self { client, number, abandoned }
    }
}

/// `endpoint` with the transport settings that let a batch use the wire:
/// windows that hold whole batches, and keep-alives that notice a dead
/// sink. (No Nagle delay either: the connector sets TCP_NODELAY itself,
/// since the endpoint's setting reaches only tonic's own connector.)
pub fn tuned(endpoint: Endpoint) -> Endpoint {
    endpoint
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
}

impl GrpcTransport {
    /// Sends one request made of `payload`.
    pub async fn send_payload<P: Payload>(&self, payload: P) -> Result<(), Status> {
        let mut request = tonic::Request::new(payload);
        // Tells the sink the deadline; the local timeout enforces it even
        // when the sink never answers.
        request.set_timeout(self.rpc_timeout);
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
        let (mut client, number) = self.current();
        let call = async {
            client.ready().await.map_err(|error| Status::unavailable(error.to_string()))?;
            let path = PathAndQuery::from_static(SEND_PATH);
            client.unary(request, path, SendCodec::<P>::default()).await
        };
        // tonic's client enforces the deadline it sends (CANCELLED, "Timeout
        // expired"); the local timeout is there should it not.
        match tokio::time::timeout(self.rpc_timeout, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) if !timed_out(&status) => Err(explained(status)),
            Ok(Err(_)) | Err(_) => {
                self.replace(number);
                Err(Status::deadline_exceeded(format!("no answer within {:?}", self.rpc_timeout)))
            }
        }
    }
}

impl Transport for GrpcTransport {
    async fn send(&self, request: Outgoing) -> Result<(), Status> {
        self.send_payload(request).await
    }

    fn destination(&self) -> String {
        self.address.to_string()
    }
}

/// Whether `status` says the request's deadline passed without an answer.
fn timed_out(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = error.source();
    }
    // The error is not always kept as the status's source.
    let expired = status.code() == Code::Cancelled && status.message().starts_with("Timeout expired");
    expired || status.code() == Code::DeadlineExceeded
}

/// `status` with the chain of errors behind it in its message (a TLS or
/// connection failure otherwise reads only "transport error"), and, when it
/// was made here from a failed connection rather than sent by the sink, as
/// UNAVAILABLE: tonic reports a connection closed mid-call as CANCELLED or
/// UNKNOWN, codes that would otherwise read as the sink refusing the batch.
fn explained(status: Status) -> Status {
    let code = match status.code() {
        Code::Cancelled | Code::Unknown | Code::Internal if status.source().is_some() => Code::Unavailable,
        code => code,
    };
    let mut message = status.message().to_owned();
    let mut source = status.source();
    while let Some(error) = source {
        let text = error.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = error.source();
    }
    Status::with_details_and_metadata(code, message, status.details().to_vec().into(), status.metadata().clone())
}
