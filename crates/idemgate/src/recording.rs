//! What the owner of a key keeps of a response while it forwards it: the chunks as
//! they arrived, their timing, whether a stream reached its terminator, and the usage
//! the provider reported.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use crate::clock::Timestamp;
use crate::flight::Flight;
use crate::record::StoredResponse;
use crate::sse::{Event, Protocol, Splitter, StreamTracker, Verdict};
use crate::usage;

/// JSON bodies larger than this are stored without reading their usage: parsing
/// them would delay the end of the response for a figure that is only a metric.
const USAGE_PARSE_LIMIT: usize = 4 * 1024 * 1024;

/// A response body being recorded.
pub(crate) struct Recording {
    /// Where the chunks go when followers may read them live; else `chunks`.
    flight: Option<Arc<Flight>>,
    chunks: Vec<Bytes>,
    offsets_ms: Vec<u32>,
    first: Option<Instant>,
    stream: Option<Stream>,
    json: bool,
}

struct Stream {
    splitter: Splitter,
    tracker: StreamTracker,
    events: Vec<Event>,
}

impl Recording {
    /// A plain (non-stream) body; `json` says whether to read usage from it.
    pub(crate) fn body(json: bool) -> Self {
        Self { flight: None, chunks: Vec::new(), offsets_ms: Vec::new(), first: None, stream: None, json }
    }

    /// An event stream of `protocol`, whose chunks go to `flight` for followers.
    pub(crate) fn stream(protocol: Protocol, flight: Arc<Flight>) -> Self {
        let stream = Stream { splitter: Splitter::new(), tracker: StreamTracker::new(protocol), events: Vec::new() };
        Self { flight: Some(flight), stream: Some(stream), ..Self::body(false) }
    }

    /// Records one chunk, as it is forwarded.
    pub(crate) fn push(&mut self, chunk: &Bytes) {
        self.push_and_share(chunk, |_| {});
    }

    /// [`push`](Self::push), also showing the recorded copy to `share`: whatever else
    /// holds on to the chunk (the live log) should keep that copy, not `chunk`.
    pub(crate) fn push_and_share(&mut self, chunk: &Bytes, share: impl FnOnce(&Bytes)) {
        if let Some(s) = &mut self.stream {
            let first = *self.first.get_or_insert_with(Instant::now);
            self.offsets_ms.push(u32::try_from(first.elapsed().as_millis()).unwrap_or(u32::MAX));
            s.splitter.push(chunk, &mut s.events);
            for event in s.events.drain(..) {
                s.tracker.observe(&event);
            }
        }
        // A copy, not a clone: a chunk is a slice of the connection's read buffer, and
        // holding it would pin that whole buffer (8 KiB and up, for a chunk of a few
        // hundred bytes) for as long as the record lives.
        let kept = Bytes::copy_from_slice(chunk);
        share(&kept);
        match &self.flight {
            Some(flight) => flight.push(kept),
            None => self.chunks.push(kept),
        }
    }

    /// The response to store, or `None` when the body is not whole: it ended with an
    /// error (`clean` false), or a stream stopped before its terminator or carried an
    /// in-band error.
    pub(crate) fn finish(
        mut self,
        status: u16,
        headers: Vec<(HeaderName, HeaderValue)>,
        clean: bool,
    ) -> Option<StoredResponse> {
        let (usage, model) = match &mut self.stream {
            Some(s) => {
                s.splitter.finish(&mut s.events);
                for event in s.events.drain(..) {
                    s.tracker.observe(&event);
                }
                if s.tracker.verdict(clean) != Verdict::Complete {
                    return None;
                }
                (s.tracker.usage(), s.tracker.model().map(str::to_owned))
            }
            None if !clean => return None,
            None => self.json_usage().map_or((None, None), |(u, m)| (Some(u), m)),
        };
        let chunks = match &self.flight {
            Some(flight) => flight.chunks(),
            None => std::mem::take(&mut self.chunks),
        };
        let chunks = contiguous(chunks);
        let completed_at = Timestamp::from_system_time(SystemTime::now());
        let mut response = StoredResponse::new(status, headers, chunks, completed_at);
        response.offsets_ms = self.offsets_ms;
        response.usage = usage;
        response.model = model;
        Some(response)
    }

    fn json_usage(&self) -> Option<(usage::Usage, Option<String>)> {
        let len: usize = self.chunks.iter().map(Bytes::len).sum();
        if !self.json || len > USAGE_PARSE_LIMIT {
            return None;
        }
        match self.chunks.as_slice() {
            [one] => usage::from_json_body(one),
            many => usage::from_json_body(&many.concat()),
        }
    }
}

/// The chunks as slices of one buffer, boundaries kept: a record that lives for hours
/// is one allocation rather than one per chunk scattered over the heap, where each
/// would keep a page from being given back after a burst of traffic.
fn contiguous(chunks: Vec<Bytes>) -> Vec<Bytes> {
    if chunks.len() < 2 {
        return chunks;
    }
    let mut all = bytes::BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in &chunks {
        all.extend_from_slice(chunk);
    }
    let all = all.freeze();
    let mut at = 0;
    chunks
        .iter()
        .map(|c| {
            at += c.len();
            all.slice(at - c.len()..at)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded chunk must not keep the buffer it was sliced from alive.
    #[test]
    fn recorded_chunks_do_not_pin_the_read_buffer() {
        let buffer = Bytes::from(vec![b'x'; 64 * 1024]);
        let chunk = buffer.slice(100..400);
        let mut rec = Recording::body(false);
        rec.push(&chunk);
        let stored = rec.finish(200, Vec::new(), true).expect("a clean body is stored");
        assert_eq!(stored.chunks, vec![chunk.clone()]);
        let range = buffer.as_ptr_range();
        assert!(!range.contains(&stored.chunks[0].as_ptr()), "the stored chunk is a slice of the read buffer");
    }

    /// What the live log is given to hold is the recorded copy, not the slice.
    #[test]
    fn a_shared_chunk_does_not_pin_the_read_buffer() {
        let buffer = Bytes::from(vec![b'x'; 64 * 1024]);
        let chunk = buffer.slice(100..400);
        let mut rec = Recording::body(false);
        let mut shared = None;
        rec.push_and_share(&chunk, |kept| shared = Some(kept.clone()));
        let shared = shared.expect("the copy is shown");
        assert_eq!(shared, chunk);
        assert!(!buffer.as_ptr_range().contains(&shared.as_ptr()), "the shared chunk is a slice of the read buffer");
        let stored = rec.finish(200, Vec::new(), true).expect("a clean body is stored");
        assert_eq!(stored.chunks, vec![chunk]);
    }

    #[test]
    fn a_recorded_body_is_one_buffer_with_its_chunk_boundaries() {
        let chunks = [Bytes::from_static(b"ab"), Bytes::from_static(b""), Bytes::from_static(b"cde")];
        let mut rec = Recording::body(false);
        chunks.iter().for_each(|c| rec.push(c));
        let stored = rec.finish(200, Vec::new(), true).expect("a clean body is stored");
        assert_eq!(stored.chunks, chunks);
        assert_eq!(stored.chunks[0].as_ptr().wrapping_add(2), stored.chunks[2].as_ptr(), "one buffer, in order");
    }
}
