//! Live streams shared through the store, for duplicates that land on another
//! gateway process than the one running the original.
//!
//! The owner publishes the head and then the chunks of a joinable stream to the
//! store's live log ([`LogWriter`], on a task of its own, batching chunks that arrive
//! while an append is in flight); a follower in another process reads the log from the start and then polls
//! (woken by the store's `watch`) for the rest ([`follow`]). Stores that do not share
//! live logs (memory, SQLite) answer `live_begin` with `false`, and the in-process
//! [`Flight`](crate::flight::Flight) alone serves their followers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use http_body::Frame;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::clock::Timestamp;
use crate::error::BoxError;
use crate::metrics::Meters;
use crate::record::RecordState;
use crate::scope::StorageKey;
use crate::store::{Lease, LiveEnd, LiveHead, LiveRead, Store};

/// How long a follower waits for a wake-up before it reads the log again.
const FOLLOW_POLL: Duration = Duration::from_millis(50);
/// Reads without progress after which a follower checks the record itself (the owner
/// may have died, or completed without ending its log).
const STALLED_READS: u32 = 20;

enum Msg {
    Chunk(Bytes),
    /// Answer once every chunk sent before is in the log.
    Flush(oneshot::Sender<()>),
    End(LiveEnd),
}

/// The owner's side: appends chunks to the store's live log in order, off the path
/// that forwards them to the client.
pub(crate) struct LogWriter {
    tx: mpsc::UnboundedSender<Msg>,
}

impl LogWriter {
    /// Starts publishing the live log of `lease` with `head`, on a task of its own so
    /// the client's first byte never waits for the store. If the store does not share
    /// live logs, or the log cannot be opened, the task drains and drops the chunks
    /// (followers elsewhere then wait for the stored record instead).
    pub(crate) fn start(store: Arc<dyn Store>, lease: Lease, head: LiveHead, tracker: &TaskTracker) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tracker.spawn(write(store, lease, head, rx));
        Self { tx }
    }

    /// Queues `chunk` for the log. It waits there for as long as the store takes to
    /// append the ones before it, so it must be a copy, not a slice of the upstream
    /// connection's read buffer: each queued slice pinned a whole 8 KiB buffer, which
    /// with PostgreSQL and 1,000 streams came to 20 MB at the peak.
    pub(crate) fn push(&self, chunk: Bytes) {
        let _ = self.tx.send(Msg::Chunk(chunk));
    }

    /// Waits until every chunk pushed so far is in the log. The owner calls it before
    /// `complete`: appends are fenced by the record, which `complete` changes.
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub(crate) fn end(self, end: LiveEnd) {
        let _ = self.tx.send(Msg::End(end));
    }
}

async fn write(store: Arc<dyn Store>, lease: Lease, head: LiveHead, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut healthy = match store.live_begin(&lease, &head).await {
        Ok(shared) => shared,
        Err(e) => {
            tracing::warn!(target: "idemgate::store", error = %e, "cannot open the live log; duplicates elsewhere will wait for the record");
            false
        }
    };
    let opened = healthy;
    let mut next = 0u64;
    let mut end = LiveEnd::Broken;
    let mut batch = Vec::new();
    while let Some(msg) = rx.recv().await {
        let mut done = false;
        let mut flushed = Vec::new();
        let mut push = |msg| match msg {
            Msg::Chunk(c) => batch.push(c),
            Msg::Flush(reply) => flushed.push(reply),
            Msg::End(e) => {
                end = e;
                done = true;
            }
        };
        push(msg);
        while let Ok(more) = rx.try_recv() {
            push(more);
        }
        if healthy && !batch.is_empty() {
            match store.live_append(&lease, next, &batch).await {
                Ok(()) => next += batch.len() as u64,
                Err(e) => {
                    // Followers elsewhere notice the stall and finish from the record.
                    tracing::warn!(target: "idemgate::store", error = %e, "live log append failed; no longer publishing");
                    healthy = false;
                }
            }
        }
        batch.clear();
        for reply in flushed {
            let _ = reply.send(());
        }
        if done {
            break;
        }
    }
    if opened && let Err(e) = store.live_end(&lease, if healthy { end } else { LiveEnd::Broken }).await {
        tracing::warn!(target: "idemgate::store", error = %e, "cannot end the live log");
    }
}

/// A follower's body: the chunks of `first` (read from chunk 0), then the rest of the
/// log as it grows, ending as the original ends. If the log stalls, the record decides:
/// completed → the rest comes from the stored chunks (the same sequence); anything else
/// → the stream ends with an error, as the original's did.
pub(crate) fn follow(
    store: Arc<dyn Store>,
    key: StorageKey,
    first: LiveRead,
    meters: Arc<Meters>,
) -> impl Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static {
    let token = first.token;
    let state = Follow { store, key, token, meters, next: 0, pending: first.chunks.into(), end: first.end, stalled: 0 };
    futures_util::stream::unfold(Some(state), |state| async move {
        let mut s = state?;
        loop {
            if let Some(chunk) = s.pending.pop_front() {
                s.next += 1;
                return Some((Ok(Frame::data(chunk)), Some(s)));
            }
            match s.end {
                Some(LiveEnd::Complete) => {
                    s.count_saved().await;
                    return None;
                }
                Some(LiveEnd::Broken) => return Some((Err(broken()), None)),
                None => {}
            }
            let wake = s.store.watch(&s.key);
            match s.store.live_read(&s.key, s.next).await {
                Ok(Some(read)) if read.token == s.token => {
                    if read.chunks.is_empty() && read.end.is_none() {
                        s.stalled += 1;
                    } else {
                        s.stalled = 0;
                    }
                    s.pending.extend(read.chunks);
                    s.end = read.end;
                }
                // The log is gone or belongs to a new owner: ask the record.
                Ok(_) => s.stalled = STALLED_READS,
                Err(e) => {
                    tracing::debug!(target: "idemgate::store", error = %e, "live log read failed");
                    s.stalled += 1;
                }
            }
            if s.stalled >= STALLED_READS {
                s.stalled = 0;
                match s.record().await {
                    Record::Completed(rest) => {
                        s.pending.extend(rest);
                        s.end = Some(LiveEnd::Complete);
                        continue;
                    }
                    Record::Running => {}
                    Record::Gone => return Some((Err(broken()), None)),
                }
            }
            if s.pending.is_empty() && s.end.is_none() {
                let _ = tokio::time::timeout(FOLLOW_POLL, wake).await;
            }
        }
    })
}

fn broken() -> BoxError {
    "the original response broke off before its end".into()
}

/// What the record says of a stalled live log.
enum Record {
    /// The original completed: the rest of the stored chunks.
    Completed(Vec<Bytes>),
    /// The original still runs (or the store cannot tell yet).
    Running,
    /// The original died or was released: the stream broke off.
    Gone,
}

struct Follow {
    store: Arc<dyn Store>,
    key: StorageKey,
    token: crate::record::Token,
    meters: Arc<Meters>,
    next: u64,
    pending: std::collections::VecDeque<Bytes>,
    end: Option<LiveEnd>,
    stalled: u32,
}

impl Follow {
    /// What the record says when the log stalls.
    async fn record(&self) -> Record {
        let record = match self.store.get(&self.key).await {
            Ok(Some(record)) => record,
            Ok(None) => return Record::Gone,
            // The store is unreachable: no verdict yet, keep trying.
            Err(_) => return Record::Running,
        };
        match record.state {
            RecordState::Completed { response, .. } => {
                let skip = usize::try_from(self.next).unwrap_or(usize::MAX);
                Record::Completed(response.chunks.into_iter().skip(skip).collect())
            }
            // The owner renews its lease while it runs; a lapsed lease means it died.
            RecordState::InFlight { token, lease_until } if token == self.token => {
                if lease_until > Timestamp::from_system_time(SystemTime::now()) {
                    Record::Running
                } else {
                    Record::Gone
                }
            }
            RecordState::InFlight { .. } => Record::Gone,
        }
    }

    /// A join saves what the original cost: read it from the stored record.
    async fn count_saved(&self) {
        if let Ok(Some(record)) = self.store.get(&self.key).await
            && let RecordState::Completed { response, .. } = record.state
        {
            self.meters.saved(response.usage.as_ref(), response.model.as_deref());
        }
    }
}
