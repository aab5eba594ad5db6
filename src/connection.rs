//! A connection a server holds: its place under the server's limit on open
//! connections, let go when it is dropped, and a deadline that closes it
//! when its peer sends nothing for too long. A place held by a peer that
//! never speaks (a socket opened and left, a handshake begun and not
//! finished) would otherwise be held for good. Also what both servers'
//! accept loops share: the open-file limit and waiting out accept failures.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::OwnedSemaphorePermit,
    time::{Instant, Sleep},
};
use tracing::warn;

use crate::logging::Every;

/// Pause after the first accept failure in a row; it doubles with each
/// further one, up to [`LONGEST_PAUSE`].
pub(crate) const FIRST_PAUSE: Duration = Duration::from_millis(5);

/// See [`FIRST_PAUSE`].
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// The process's soft limit on open files, or `None` where it is unlimited
/// or cannot be read.
pub(crate) fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find_map(|line| line.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// A listener's accept failures in a row: out of descriptors or memory,
/// accepting again at once fails again (and an accept loop retrying at once
/// spins a core), so each is waited out, longer after each in a row.
#[derive(Debug)]
pub(crate) struct AcceptFailures {
    /// The listener, for the log.
    listener: &'static str,
    /// Log gate of the failures.
    logged: Every,
    /// The pause after the next failure.
    pause: Duration,
}

impl AcceptFailures {
    /// No failures yet, of the listener named `listener`.
    pub(crate) fn new(listener: &'static str) -> Self {
        Self { listener, logged: Every::second(), pause: FIRST_PAUSE }
    }

    /// A connection was accepted: the next failure pauses [`FIRST_PAUSE`].
    pub(crate) fn succeeded(&mut self) {
        self.pause = FIRST_PAUSE;
    }

    /// Waits out `error`: at once if it concerns only the connection it
    /// would have been, else logs it (at most once a second) and pauses.
    pub(crate) async fn wait_out(&mut self, error: &io::Error) {
        if one_connections(error) {
            return;
        }
        if let Some(suppressed) = self.logged.ready() {
            warn!(
                message = "Could not accept a connection; trying again.",
                listener = self.listener,
                %error,
                pause = ?self.pause,
                suppressed,
            );
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
    }
}

/// Whether an accept failure concerns only the connection it would have
/// been (the peer gave up first), so that the next accept may follow at
/// once.
fn one_connections(error: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(error.kind(), ConnectionAborted | ConnectionReset | BrokenPipe | Interrupted | WouldBlock | TimedOut)
}

/// `io`, holding `place` (what keeps its place under the server's limit,
/// and whatever else is let go with the connection) until dropped, closed
/// once nothing has been read
/// from it for `idle`, or once it is older than its lifetime, if it has
/// one: a read that finds nothing then fails with `TimedOut`, and the
/// server drops the connection.
#[derive(Debug)]
pub struct Held<IO, P = OwnedSemaphorePermit> {
    /// The connection.
    io: IO,
    /// Its place under the server's limit.
    _place: P,
    /// The longest the peer may send nothing.
    idle: Duration,
    /// When something was last read.
    last_read: Instant,
    /// When the connection is closed at the latest, talking or not.
    end: Option<Instant>,
    /// Fires `idle` after `last_read`, or earlier (then it is moved on):
    /// resetting a timer on every read would cost more than reading the
    /// clock.
    deadline: Pin<Box<Sleep>>,
}

impl<IO, P> Held<IO, P> {
    /// `io` in `place`, closed after `idle` without anything to read.
    pub fn new(io: IO, place: P, idle: Duration) -> Self {
        let now = Instant::now();
        let deadline = Box::pin(tokio::time::sleep_until(now + idle));
        Self { io, _place: place, idle, last_read: now, end: None, deadline }
    }

    /// Closes the connection once it is `lifetime` old, even while its peer
    /// talks (a byte at a time, never finishing a request), the next time
    /// the server waits to read from it or to write to it. A write that
    /// waits (a peer that sends requests and never reads the answers: the
    /// server then reads no more) also ends after `idle` without anything
    /// read.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        let end = self.last_read + lifetime;
        self.end = Some(end);
        if end < self.deadline.deadline() {
            self.deadline.as_mut().reset(end);
        }
        self
    }

    /// The connection itself.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// `Ready` once the peer has sent nothing for `idle`, or the lifetime
    /// is over.
    fn poll_silent(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            std::task::ready!(self.deadline.as_mut().poll(cx));
            let silent = self.last_read + self.idle;
            let due = self.end.map_or(silent, |end| end.min(silent));
            if due <= Instant::now() {
                return Poll::Ready(());
            }
            self.deadline.as_mut().reset(due);
        }
    }

    /// What a read or write that waits gives: `TimedOut` once the peer has
    /// sent nothing for `idle` or the lifetime is over, else `Pending`.
    fn poll_timed_out<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.poll_silent(cx) {
            Poll::Ready(()) => {
                let message = format!("the peer sent nothing for {:?}, or the connection is too old", self.idle);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, message)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// `polled`, a write's result: one that waits times out as a read does,
    /// on a connection with a lifetime (see [`Held::with_lifetime`]).
    fn writing<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending if self.end.is_some() => self.poll_timed_out(cx),
            other => other,
        }
    }
}

impl<IO: AsyncRead + Unpin, P: Unpin> AsyncRead for Held<IO, P> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.last_read = Instant::now();
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.poll_timed_out(cx),
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin, P: Unpin> AsyncWrite for Held<IO, P> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.writing(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.writing(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.writing(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected, P> tonic::transport::server::Connected for Held<IO, P> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        sync::Semaphore,
    };

    use super::*;

    fn place() -> OwnedSemaphorePermit {
        Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_sends_nothing_is_cut_off_after_the_idle_time() {
        let (ours, _peer) = tokio::io::duplex(64);
        let mut held = Held::new(ours, place(), Duration::from_secs(60));
        let started = Instant::now();
        let error = held.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn each_read_gives_the_peer_the_whole_idle_time_again() {
        let (ours, mut peer) = tokio::io::duplex(64);
        let mut held = Held::new(ours, place(), Duration::from_secs(60));
        let started = Instant::now();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            peer.write_all(b"x").await.unwrap();
            assert_eq!(held.read(&mut [0; 8]).await.unwrap(), 1);
        }
        let error = held.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(250 + 60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_talks_a_byte_at_a_time_is_cut_off_at_the_lifetime() {
        let (ours, mut peer) = tokio::io::duplex(64);
        let mut held = Held::new(ours, place(), Duration::from_secs(10)).with_lifetime(Duration::from_secs(30));
        let started = Instant::now();
        let talker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if peer.write_all(b"x").await.is_err() {
                    break;
                }
            }
        });
        let error = loop {
            match held.read(&mut [0; 8]).await {
                Ok(_) => {}
                Err(error) => break error,
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        talker.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_reads_is_cut_off_while_the_server_writes() {
        // A peer that sent its requests and reads no answer: the server
        // only writes, and the write waits for good.
        let (ours, mut peer) = tokio::io::duplex(64);
        let mut held = Held::new(ours, place(), Duration::from_secs(10)).with_lifetime(Duration::from_secs(30));
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(held.read(&mut [0; 64]).await.unwrap() > 0);
        let started = Instant::now();
        let error = held.write_all(&[b'x'; 1024]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // Without a lifetime (the gRPC side), writes are left alone.
        let (ours, _peer) = tokio::io::duplex(64);
        let mut held = Held::new(ours, place(), Duration::from_secs(10));
        let waited = tokio::time::timeout(Duration::from_secs(60), held.write_all(&[b'x'; 1024])).await;
        assert!(waited.is_err(), "a write without a lifetime is not timed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_peer_reads_as_the_end_not_as_silence() {
        let (ours, peer) = tokio::io::duplex(64);
        let mut held = Held::new(ours, place(), Duration::from_secs(60));
        drop(peer);
        assert_eq!(held.read(&mut [0; 8]).await.unwrap(), 0);
    }

    #[test]
    fn the_open_file_limit_is_read() {
        assert!(open_files_limit().is_some_and(|files| files > 0));
    }

    #[tokio::test]
    async fn the_place_is_let_go_with_the_connection() {
        let places = Arc::new(Semaphore::new(1));
        let held = Held::new((), Arc::clone(&places).try_acquire_owned().unwrap(), Duration::from_secs(1));
        assert_eq!(places.available_permits(), 0);
        drop(held);
        assert_eq!(places.available_permits(), 1);
    }
}
