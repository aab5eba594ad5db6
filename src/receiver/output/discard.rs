//! The output that keeps nothing: requests are checked and rendered as for
//! the file, then let go (`telemetry-node bench --writer off`, to measure
//! the sink without its disk).

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{AfterStored, Rendered, Store, file::lines::to_json_lines};
use crate::{
    error::{ReceiveError, ServeError},
    proto::SensorValuesRequest,
};

/// Renders and lets go.
#[derive(Debug)]
pub(crate) struct Discard;

impl Store for Discard {
    fn describe(&self) -> String {
        "nowhere (discarded)".into()
    }

    fn render(
        &self,
        request: &SensorValuesRequest,
        _peer: Option<std::net::SocketAddr>,
    ) -> Result<Rendered, ReceiveError> {
        let bytes = to_json_lines(request)?;
        Ok(Rendered { bytes, readings: request.items.len(), sender: 0 })
    }

    fn store(&self, _rendered: Rendered, _after: AfterStored) -> BoxFuture<'static, Result<(), ReceiveError>> {
        Box::pin(async { Ok(()) })
    }

    fn close(&self, _hurry: CancellationToken) -> BoxFuture<'_, Result<(), ServeError>> {
        Box::pin(async { Ok(()) })
    }
}
