//! The memory requests may take while they are received: a budget of bytes
//! shared by every connection. A request's body is let through once its
//! whole message fits in what is left (its length is in the gRPC prefix of
//! its first frame), and its share is held until it is answered. A request
//! that must wait holds its first frame only; its connection's HTTP/2 flow
//! control holds the rest of its bytes back at the client.
//!
//! Taking a whole message's share at once, rather than frame by frame,
//! means requests that together need more than the budget wait in turn
//! instead of each holding part of it and none finishing.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, ready},
};

use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prost::bytes::Buf;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// The bytes all requests being received may hold.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    /// One permit a byte.
    bytes: Arc<Semaphore>,
    /// The most one request is given: MAX_MESSAGE_BYTES and its prefix.
    most: u32,
}

/// A request's share of the budget, once it has one: held until the request
/// is answered, whether or not its body is still read, and until its
/// readings are written (see [`Hold`]).
pub(crate) type Share = Arc<Mutex<Option<OwnedSemaphorePermit>>>;

/// A request's share, in its extensions for the service: its readings
/// carry it to the output, which holds it until they are stored, also when
/// the request is gone (its stream reset, its deadline passed), so that
/// readings waiting for the output count against the budget as long as
/// they are held.
#[derive(Debug, Clone)]
pub(crate) struct Hold {
    /// Kept, not read: the share is given back when the last holder drops.
    _share: Share,
}

impl Hold {
    /// A hold on `share`.
    pub(crate) fn new(share: Share) -> Self {
        Self { _share: share }
    }
}

/// Bytes of the gRPC prefix of a message: a compression flag and a length.
const PREFIX: usize = 5;

impl Budget {
    /// A budget of `total` bytes, for requests of at most `max_message`
    /// bytes; `total` is raised to one largest request if it is less.
    pub(crate) fn new(total: usize, max_message: usize) -> Self {
        let most = u32::try_from(max_message.saturating_add(PREFIX)).unwrap_or(u32::MAX);
        let total = total.max(most as usize).min(Semaphore::MAX_PERMITS);
        Self { bytes: Arc::new(Semaphore::new(total)), most }
    }

    /// Bytes not taken now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// `body`, let through only once its share is taken; the share goes in
    /// `share`.
    pub(crate) fn meter<B: HttpBody>(&self, body: B, share: Share) -> Metered<B> {
        Metered { body, budget: self.clone(), share, state: State::<B::Data>::First }
    }

    /// What a message whose first frame starts with `first` may take: its
    /// length from the prefix, or, compressed (it may grow to
    /// MAX_MESSAGE_BYTES) or with the prefix cut short, the most.
    fn need(&self, first: &[u8]) -> u32 {
        match first {
            [0, a, b, c, d, ..] => {
                let length = u32::from_be_bytes([*a, *b, *c, *d]);
                length.saturating_add(PREFIX as u32).min(self.most)
            }
            _ => self.most,
        }
    }
}

/// Where a metered body is.
enum State<D> {
    /// Its first frame is still to come.
    First,
    /// Its first frame waits for the share of its message.
    Waiting(Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>, Option<Frame<D>>),
    /// Its share is held: frames go through.
    Through,
}

/// A request body under the budget.
pub(crate) struct Metered<B: HttpBody> {
    /// The body.
    body: B,
    /// The budget.
    budget: Budget,
    /// Where the share goes once taken.
    share: Share,
    /// Where it is.
    state: State<B::Data>,
}

// Nothing of the body is pinned but `body`, which is only polled through
// `Pin::new` when it is `Unpin`.
impl<B: HttpBody + Unpin> Unpin for Metered<B> {}

impl<B> HttpBody for Metered<B>
where
    B: HttpBody + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Through => return Pin::new(&mut this.body).poll_frame(cx),
                State::First => {
                    let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                        Some(Ok(frame)) => frame,
                        other => return Poll::Ready(other),
                    };
                    let Some(data) = frame.data_ref() else { return Poll::Ready(Some(Ok(frame))) };
                    let need = this.budget.need(data.chunk());
                    let taking = Arc::clone(&this.budget.bytes).acquire_many_owned(need);
                    this.state = State::Waiting(Box::pin(taking), Some(frame));
                }
                State::Waiting(taking, frame) => {
                    // The budget is never closed.
                    if let Ok(permit) = ready!(taking.as_mut().poll(cx)) {
                        *this.share.lock().unwrap_or_else(PoisonError::into_inner) = Some(permit);
                    }
                    let frame = frame.take();
                    this.state = State::Through;
                    if let Some(frame) = frame {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::<B::Data>::Through | State::<B::Data>::First) && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use futures::StreamExt;
    use http_body_util::{BodyExt, StreamBody};
    use prost::bytes::Bytes;

    use super::*;

    /// A body of one message of `length` bytes, in frames of `frame` bytes;
    /// `pulled` counts the frames read from it.
    fn message(
        length: usize,
        frame: usize,
        pulled: &Arc<AtomicUsize>,
    ) -> impl HttpBody<Data = Bytes, Error = Infallible> + Unpin + Send + 'static {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&(length as u32).to_be_bytes());
        bytes.resize(PREFIX + length, 7);
        let frames: Vec<Result<_, Infallible>> =
            bytes.chunks(frame).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
        let pulled = Arc::clone(pulled);
        StreamBody::new(futures::stream::iter(frames).inspect(move |_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        }))
    }

    #[tokio::test]
    async fn a_request_takes_its_message_and_gives_it_back_when_answered() {
        let budget = Budget::new(1000, 600);
        let share = Share::default();
        let pulled = Arc::default();
        let body = budget.meter(message(300, 64, &pulled), Arc::clone(&share)).collect().await.unwrap();
        assert_eq!(body.to_bytes().len(), 305);
        assert_eq!(budget.available(), 1000 - 305, "held until answered, after the body is read");
        drop(share);
        assert_eq!(budget.available(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_that_do_not_fit_together_wait_in_turn_reading_one_frame() {
        let budget = Budget::new(1000, 600);
        let (first, second) = (Share::default(), Share::default());
        let (pulled_first, pulled_second) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
        budget.meter(message(600, 64, &pulled_first), Arc::clone(&first)).collect().await.unwrap();
        // The second needs 605 of the 395 left: it waits, having read only
        // its first frame, until the first is answered.
        let waiting = tokio::spawn(budget.meter(message(600, 64, &pulled_second), Arc::clone(&second)).collect());
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        assert!(!waiting.is_finished());
        assert_eq!(pulled_second.load(Ordering::SeqCst), 1);
        drop(first);
        assert_eq!(waiting.await.unwrap().unwrap().to_bytes().len(), 605);
        assert_eq!(pulled_second.load(Ordering::SeqCst), 10);
        assert_eq!(budget.available(), 395);
        drop(second);
        assert_eq!(budget.available(), 1000);
    }

    #[test]
    fn a_message_takes_its_length_or_the_most_when_it_cannot_be_told() {
        let budget = Budget::new(1 << 20, 4096);
        assert_eq!(budget.need(&[0, 0, 0, 1, 0, 9]), 261);
        assert_eq!(budget.need(&[0, 0xff, 0xff, 0xff, 0xff]), 4101, "longer than the most: tonic refuses it");
        assert_eq!(budget.need(&[1, 0, 0, 0, 10]), 4101, "compressed: may grow to the most");
        assert_eq!(budget.need(&[0, 0, 0]), 4101, "prefix cut short");
        assert_eq!(Budget::new(10, 4096).bytes.available_permits(), 4101, "room for one largest request");
    }
}
