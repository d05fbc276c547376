//! Calls in flight in this process, so a duplicate can follow a live stream.
//!
//! The owner of a key appends each chunk of a streamed response to its [`Flight`] as
//! it forwards it; a duplicate that arrives meanwhile reads the chunks recorded so far
//! and then the live rest, from the same log (single-flight fan-out). The log is the
//! recording: followers hold references to its chunks, not copies, so memory grows
//! with the stream, not with the number of followers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body::Frame;
use tokio::sync::watch;

use crate::error::BoxError;
use crate::scope::StorageKey;

/// The flights of one layer, by key.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<StorageKey, Arc<Flight>>>,
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<StorageKey, Arc<Flight>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the flight of a call that just claimed `key`.
    pub(crate) fn start(&self, key: StorageKey) -> Arc<Flight> {
        let flight = Arc::new(Flight::default());
        self.lock().insert(key, flight.clone());
        flight
    }

    /// The live flight of `key`, if this process runs it.
    pub(crate) fn get(&self, key: &StorageKey) -> Option<Arc<Flight>> {
        self.lock().get(key).cloned()
    }

    /// Forgets `flight` (and not a newer flight of the same key).
    pub(crate) fn remove(&self, key: &StorageKey, flight: &Arc<Flight>) {
        let mut map = self.lock();
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }
}

/// The response head as followers replay it.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    /// The replayable headers (the same allow-list as a stored record); only kept
    /// when the flight is joinable, as nobody reads them otherwise.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether followers may join the live body: a storable status and a stream.
    pub(crate) joinable: bool,
}

/// How a flight ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The body ended at its terminator.
    Complete,
    /// The call failed or the body broke off; nothing was stored.
    Broken,
}

#[derive(Debug, Default)]
struct Log {
    head: Option<Head>,
    chunks: Vec<Bytes>,
    end: Option<End>,
    followers: u64,
}

/// One call in flight: its head, its body so far, and how it ended.
#[derive(Debug)]
pub(crate) struct Flight {
    log: Mutex<Log>,
    /// Bumped on every change; followers wait on it (a `watch` never loses a wake-up).
    changed: watch::Sender<u64>,
}

impl Default for Flight {
    fn default() -> Self {
        Self { log: Mutex::default(), changed: watch::channel(0).0 }
    }
}

impl Flight {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub(crate) fn set_head(&self, head: Head) {
        self.lock().head = Some(head);
        self.bump();
    }

    pub(crate) fn push(&self, chunk: Bytes) {
        self.lock().chunks.push(chunk);
        self.bump();
    }

    /// Ends the flight; returns how many duplicates followed it. Joining and ending
    /// take the same lock, so every follower is counted exactly once: by the owner
    /// here, or not at all when [`join`](Self::join) found the flight over.
    pub(crate) fn end(&self, end: End) -> u64 {
        let followers = {
            let mut log = self.lock();
            log.end = Some(end);
            log.followers
        };
        self.bump();
        followers
    }

    /// The chunks recorded so far (references, not copies).
    pub(crate) fn chunks(&self) -> Vec<Bytes> {
        self.lock().chunks.clone()
    }

    /// Waits for the head; `None` when the flight ended without one.
    pub(crate) async fn head(&self) -> Option<Head> {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let log = self.lock();
                if let Some(head) = &log.head {
                    return Some(head.clone());
                }
                if log.end.is_some() {
                    return None;
                }
            }
            // The sender lives as long as `self`; an error cannot happen while we hold it.
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Joins the live body: every chunk from the first, then the live rest, ending as
    /// the original ends (an error if it broke off). `None` when the flight is already
    /// over: its result is in the store by then.
    pub(crate) fn join(self: Arc<Self>) -> Option<impl Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static> {
        {
            let mut log = self.lock();
            if log.end.is_some() {
                return None;
            }
            log.followers += 1;
        }
        let rx = self.changed.subscribe();
        Some(Self::follow(self, rx))
    }

    fn follow(
        self: Arc<Self>,
        rx: watch::Receiver<u64>,
    ) -> impl Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static {
        futures_util::stream::unfold((self, rx, 0usize, false), |(flight, mut rx, next, done)| async move {
            if done {
                return None;
            }
            loop {
                let (chunk, end) = {
                    let log = flight.lock();
                    (log.chunks.get(next).cloned(), log.end)
                };
                match (chunk, end) {
                    (Some(chunk), _) => return Some((Ok(Frame::data(chunk)), (flight, rx, next + 1, false))),
                    (None, Some(End::Complete)) => return None,
                    (None, Some(End::Broken)) => {
                        let err: BoxError = "the original response broke off before its end".into();
                        return Some((Err(err), (flight, rx, next, true)));
                    }
                    (None, None) => {
                        if rx.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn data(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> (Vec<Bytes>, bool) {
        let failed = frames.iter().any(Result::is_err);
        (frames.into_iter().filter_map(|f| f.ok()?.into_data().ok()).collect(), failed)
    }

    #[tokio::test]
    async fn a_follower_gets_the_past_then_the_live_rest() {
        let flight = Arc::new(Flight::default());
        flight.push(Bytes::from_static(b"a"));
        let follower = tokio::spawn(flight.clone().join().unwrap().collect::<Vec<_>>());
        tokio::task::yield_now().await;
        flight.push(Bytes::from_static(b"b"));
        flight.push(Bytes::from_static(b"c"));
        assert_eq!(flight.end(End::Complete), 1, "one follower");
        let (chunks, failed) = data(follower.await.unwrap());
        assert_eq!(chunks, [&b"a"[..], b"b", b"c"]);
        assert!(!failed);
        assert!(flight.join().is_none(), "an ended flight takes no followers");
    }

    #[tokio::test]
    async fn a_broken_flight_ends_its_followers_with_an_error() {
        let flight = Arc::new(Flight::default());
        flight.push(Bytes::from_static(b"a"));
        let follower = flight.clone().join().unwrap();
        flight.end(End::Broken);
        let (chunks, failed) = data(follower.collect().await);
        assert_eq!(chunks, [&b"a"[..]]);
        assert!(failed);
    }

    #[tokio::test]
    async fn head_waits_for_the_head_or_the_end() {
        let flight = Arc::new(Flight::default());
        let waiter = tokio::spawn({
            let f = flight.clone();
            async move { f.head().await.map(|h| h.status) }
        });
        flight.set_head(Head { status: StatusCode::OK, headers: vec![], joinable: true });
        assert_eq!(waiter.await.unwrap(), Some(StatusCode::OK));
        let ended = Flight::default();
        ended.end(End::Broken);
        assert!(ended.head().await.is_none());
    }

    #[test]
    fn remove_spares_a_newer_flight() {
        let flights = Flights::default();
        let key = StorageKey::from_bytes([1; 32]);
        let old = flights.start(key);
        let new = flights.start(key);
        flights.remove(&key, &old);
        assert!(flights.get(&key).is_some_and(|f| Arc::ptr_eq(&f, &new)));
        flights.remove(&key, &new);
        assert!(flights.get(&key).is_none());
    }
}
