//! The response body the layer hands back: a live stream from the owner's task, a
//! replay of recorded chunks, a gateway error, or an untouched pass-through.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::mpsc;

use crate::error::BoxError;

/// The body of every response the layer returns.
pub struct ResponseBody {
    kind: Kind,
}

enum Kind {
    Chunks { chunks: VecDeque<Bytes>, remaining: u64, trailers: Option<HeaderMap> },
    Live(mpsc::Receiver<Result<Frame<Bytes>, BoxError>>),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl ResponseBody {
    /// A body of `chunks`, each sent as its own frame (empty ones are skipped: they
    /// carry nothing on the wire).
    pub fn from_chunks(chunks: impl IntoIterator<Item = Bytes>) -> Self {
        let chunks: VecDeque<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        Self { kind: Kind::Chunks { chunks, remaining, trailers: None } }
    }

    /// A body read to its end: its data chunks, then its trailers, if any.
    pub(crate) fn whole(chunks: Vec<Bytes>, trailers: Option<HeaderMap>) -> Self {
        let mut body = Self::from_chunks(chunks);
        if let Kind::Chunks { trailers: slot, .. } = &mut body.kind {
            *slot = trailers;
        }
        body
    }

    /// A body of one buffer.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::from_chunks([bytes.into()])
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::from_chunks([])
    }

    /// Wraps any other body unchanged.
    pub fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self { kind: Kind::Boxed(body.map_err(Into::into).boxed_unsync()) }
    }

    pub(crate) fn live(rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>) -> Self {
        Self { kind: Kind::Live(rx) }
    }

    /// Chunks sent at their recorded pace: chunk `i` no earlier than `offsets_ms[i]`
    /// after the body is made.
    pub fn paced(chunks: Vec<Bytes>, offsets_ms: Vec<u32>) -> Self {
        let start = tokio::time::Instant::now();
        let timed = chunks.into_iter().zip(offsets_ms).filter(|(c, _)| !c.is_empty());
        let stream = futures_util::stream::iter(timed).then(move |(chunk, offset)| async move {
            tokio::time::sleep_until(start + Duration::from_millis(u64::from(offset))).await;
            Ok::<_, BoxError>(Frame::data(chunk))
        });
        Self::new(http_body_util::StreamBody::new(stream))
    }
}

impl Default for ResponseBody {
    fn default() -> Self {
        Self::empty()
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Chunks { .. } => "chunks",
            Kind::Live(_) => "live",
            Kind::Boxed(_) => "boxed",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Chunks { chunks, remaining, trailers } => match chunks.pop_front() {
                Some(c) => {
                    *remaining -= c.len() as u64;
                    Poll::Ready(Some(Ok(Frame::data(c))))
                }
                None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
            },
            Kind::Live(rx) => rx.poll_recv(cx),
            Kind::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Chunks { chunks, trailers, .. } => chunks.is_empty() && trailers.is_none(),
            Kind::Live(_) => false,
            Kind::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            // Trailers need chunked framing, which a known length would rule out.
            Kind::Chunks { remaining, trailers: None, .. } => SizeHint::with_exact(*remaining),
            Kind::Chunks { .. } => SizeHint::default(),
            Kind::Live(_) => SizeHint::default(),
            Kind::Boxed(b) => b.size_hint(),
        }
    }
}
