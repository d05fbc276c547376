//! The response body of the mock: a list of chunks sent one frame at a time, with
//! optional pauses, and optionally an abort instead of a clean end.
//!
//! The body is a state machine polled by hyper rather than a channel fed by a task, so
//! a connection that closes takes its pending chunks and timers with it: nothing the
//! mock spawned outlives the connection.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// How long the body waits before an abort, so that hyper flushes the chunks written
/// before it instead of dropping them with the connection.
const ABORT_GRACE: Duration = Duration::from_millis(5);

/// The error a cut body ends with; hyper answers it by closing the connection.
#[derive(Debug)]
pub(crate) struct Abort;

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mock upstream cut the response short")
    }
}

impl std::error::Error for Abort {}

/// A response body: `chunks`, each its own frame, `gap` apart, after `first_delay`.
pub(crate) struct MockBody {
    chunks: VecDeque<Bytes>,
    /// The pause before the next frame; taken when the frame is polled.
    next_delay: Option<Duration>,
    gap: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// End with an error instead of a clean end of stream.
    abort: bool,
    /// Whether the pause before the abort has been taken.
    graced: bool,
    /// The declared length, which makes hyper send `content-length`; `None` means chunked.
    length: Option<u64>,
}

impl MockBody {
    /// A body of one chunk with a known length, sent at once.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        let length = Some(bytes.len() as u64);
        Self::new(vec![bytes], length)
    }

    /// A body of `chunks`, one frame each; `length` is the declared content length.
    pub(crate) fn new(chunks: Vec<Bytes>, length: Option<u64>) -> Self {
        Self {
            chunks: chunks.into_iter().filter(|c| !c.is_empty()).collect(),
            next_delay: None,
            gap: Duration::ZERO,
            sleep: None,
            abort: false,
            graced: false,
            length,
        }
    }

    /// Waits `delay` before the first chunk.
    pub(crate) fn with_first_delay(mut self, delay: Duration) -> Self {
        if !delay.is_zero() {
            self.next_delay = Some(delay);
        }
        self
    }

    /// Waits `gap` between two chunks.
    pub(crate) fn with_gap(mut self, gap: Duration) -> Self {
        self.gap = gap;
        self
    }

    /// Ends the body with an error after the chunks, which aborts the connection.
    pub(crate) fn with_abort(mut self) -> Self {
        self.abort = true;
        self
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Abort;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Abort>>> {
        let this = &mut *self;
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
            }
            if let Some(delay) = this.next_delay.take() {
                this.sleep = Some(Box::pin(tokio::time::sleep(delay)));
                continue;
            }
            if let Some(chunk) = this.chunks.pop_front() {
                if !this.gap.is_zero() && !this.chunks.is_empty() {
                    this.next_delay = Some(this.gap);
                }
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if !this.abort {
                return Poll::Ready(None);
            }
            if !this.graced {
                this.graced = true;
                this.next_delay = Some(this.gap.max(ABORT_GRACE));
                continue;
            }
            this.abort = false;
            return Poll::Ready(Some(Err(Abort)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && !self.abort && self.next_delay.is_none() && self.sleep.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(length) => SizeHint::with_exact(length),
            None => SizeHint::default(),
        }
    }
}
