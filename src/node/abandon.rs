//! Connections the node can abandon: when a connection gets no answer in
//! time, the transport gives it up, and then it must be gone, not closed
//! politely. A polite close leaves what the node wrote in the kernel's send
//! queue, retransmitted for minutes: once a partition heals, a request the
//! node has long since sent again over a new connection (and the sink
//! written) would reach the sink a second time, behind later batches of
//! its lane, where it cannot be told from new data. An abandoned
//! connection fails every read and write at once (its requests end as
//! UNAVAILABLE and are retried over the new connection) and is closed with
//! a reset, which drops whatever the kernel still held for it.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::{
    client::legacy::connect::{HttpConnector, dns::GaiResolver},
    rt::TokioIo,
};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::codegen::{Service, http::Uri};

/// Makes the TCP connections of one channel; all of them are abandoned
/// together when `abandoned` is cancelled.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    /// Makes the connections.
    http: HttpConnector<GaiResolver>,
    /// Cancelled when the transport gives the channel up.
    abandoned: CancellationToken,
}

impl Connector {
    /// A connector whose connections end when `abandoned` is cancelled,
    /// and that tries each address the sink's name resolves to for a share
    /// of `timeout`: one that never answers (a stale entry first in the
    /// list) must not use up the whole attempt every time.
    pub(crate) fn new(abandoned: CancellationToken, timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        // https URIs are the TLS layer's business, which tonic wraps around.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        Self { http, abandoned }
    }
}

impl Service<Uri> for Connector {
    type Response = Abandonable;
    type Error = <HttpConnector<GaiResolver> as Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Abandonable, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let abandoned = self.abandoned.clone();
        Box::pin(async move {
            let io = connecting.await?;
            let waiting = Box::pin(abandoned.clone().cancelled_owned());
            Ok(Abandonable { io, abandoned, waiting, reset: false })
        })
    }
}

/// A TCP connection that fails once its channel is abandoned.
#[derive(Debug)]
pub(crate) struct Abandonable {
    /// The connection.
    io: TokioIo<TcpStream>,
    /// Cancelled once the channel is abandoned.
    abandoned: CancellationToken,
    /// Resolves once the channel is abandoned; polled only when the
    /// connection would wait, so that the wait ends with it.
    waiting: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Whether the socket was set to close with a reset.
    reset: bool,
}

impl Abandonable {
    /// `Err` once the channel is abandoned.
    fn check(&mut self) -> io::Result<()> {
        if self.abandoned.is_cancelled() { Err(self.aborted()) } else { Ok(()) }
    }

    /// The error of an abandoned connection; the socket is set to close
    /// with a reset, dropping what its send queue still held.
    fn aborted(&mut self) -> io::Error {
        if !self.reset {
            self.reset = true;
            // Linger 0: close() resets the connection and drops its queues.
            let _ = socket2::SockRef::from(self.io.inner()).set_linger(Some(Duration::ZERO));
        }
        io::Error::new(io::ErrorKind::ConnectionAborted, "connection abandoned: no answer in time")
    }

    /// `polled`, unless it waits and the channel is abandoned meanwhile.
    fn unless_abandoned<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match polled {
            // Registers to be woken when the channel is abandoned.
            Poll::Pending if self.waiting.as_mut().poll(cx).is_pending() => Poll::Pending,
            Poll::Pending => Poll::Ready(Err(self.aborted())),
            ready => ready,
        }
    }
}

impl Read for Abandonable {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.unless_abandoned(cx, polled)
    }
}

impl Write for Abandonable {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // A write that would go through is stopped too: it would only queue
        // more for the kernel to resend.
        if let Err(error) = this.check() {
            return Poll::Ready(Err(error));
        }
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.unless_abandoned(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(error) = this.check() {
            return Poll::Ready(Err(error));
        }
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.unless_abandoned(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.unless_abandoned(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
