//! The `Store` trait: one atomic claim, and fenced transitions after it.
//!
//! ```text
//! absent --claim--> in_flight{token, lease_until} --complete(token)--> completed --ttl--> absent
//!                          |                      \--release(token)--> absent
//!                          \--lease expired: the next claim takes over, CAS on the stale token
//! ```
//!
//! Backends implement the storage; the decision of what a claim means given the record
//! found is [`decide`], shared by every backend that can run Rust inside its atomic
//! section, so they cannot drift apart.

mod memory;
mod notify;

use std::time::Duration;

use bytes::Bytes;
pub use futures_util::future::BoxFuture;

pub use self::memory::MemoryStore;
pub use self::notify::Notifier;
use crate::clock::Timestamp;
use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::record::{Record, StoredResponse, Token};
use crate::scope::StorageKey;

/// Ownership of an in-flight key, returned by a successful claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The key owned.
    pub key: StorageKey,
    /// The fencing token every later transition must present.
    pub token: Token,
    /// When the lease runs out unless renewed.
    pub lease_until: Timestamp,
    /// Whether this claim took over an expired lease (its owner died or stalled).
    pub took_over: bool,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller now owns the key and must execute, then complete or release.
    Acquired(Lease),
    /// Another request owns the key and its lease is alive.
    InFlight {
        /// When the owner's lease runs out unless renewed.
        lease_until: Timestamp,
    },
    /// The key completed with this response, for the same request.
    Completed(Box<StoredResponse>),
    /// The key is in use (in flight or completed) by a request with another fingerprint.
    Mismatch,
}

/// An idempotency store. Object-safe: the gateway holds an `Arc<dyn Store>`.
///
/// Every backend passes `idemgate_testkit::store_suite!`, which is the precise
/// statement of these rules:
///
/// - `claim` is atomic: of any number of concurrent claims on an absent key, exactly
///   one acquires. A claim on an in-flight record whose lease has run out takes it over
///   with a compare-and-swap on the stale token, so exactly one claimer wins.
/// - `complete`, `release` and `renew` change the record only if it is in flight under
///   the lease's token; otherwise they fail with [`ErrorKind::Conflict`] and change
///   nothing. An owner whose lease ran out but that nobody took over may still
///   complete.
/// - A completed record is served until `completed_at + ttl`, judged from the stored
///   timestamp, then treated as absent; `sweep` deletes such records in batches.
///
/// [`ErrorKind::Conflict`]: crate::ErrorKind::Conflict
pub trait Store: Send + Sync + 'static {
    /// A short name for metrics and logs (`memory`, `sqlite`, ...).
    fn backend(&self) -> &'static str;

    /// Claims `key` for a request with fingerprint `fp`, holding it for `lease`.
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        fp: &'a Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;

    /// Extends the lease to `lease` from now; returns the new expiry.
    fn renew<'a>(&'a self, lease: &'a Lease, duration: Duration) -> BoxFuture<'a, Result<Timestamp, StoreError>>;

    /// Records the response and keeps it for `ttl`; wakes waiters.
    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Gives the key up (a transient failure) so the next claim executes; wakes waiters.
    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Reads a record as stored, expired or not (for `idemgate inspect`).
    fn get<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>>;

    /// Deletes a record in any state; returns whether there was one. An owner still
    /// running loses its lease.
    fn purge<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Deletes up to `limit` expired records; returns how many were deleted.
    fn sweep(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// Resolves when `key` may have changed state (completed, released or purged).
    ///
    /// The subscription is taken when this is called, not when the future is first
    /// polled, so a caller can subscribe, then check the state, then wait without
    /// missing a change in between. It is a hint: it may resolve spuriously, and a
    /// backend shared across processes may miss a change, so callers poll as well.
    fn watch(&self, key: &StorageKey) -> BoxFuture<'static, ()>;

    /// Checks that the store answers (for readiness probes).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Opens the live log of an in-flight streamed response, so that duplicates that
    /// land on other processes can follow it while it runs. Fenced by the lease; any
    /// earlier log of the key is discarded.
    ///
    /// Returns `Ok(false)` when the store does not share live logs: stores that serve
    /// one process (memory, SQLite) rely on the layer's in-process fan-out instead, and
    /// that is the default.
    fn live_begin<'a>(&'a self, lease: &'a Lease, head: &'a LiveHead) -> BoxFuture<'a, Result<bool, StoreError>> {
        let _ = (lease, head);
        Box::pin(std::future::ready(Ok(false)))
    }

    /// Appends `chunks` to the live log, the first of them being chunk number `first`
    /// (counted from 0); a chunk already in the log is not appended twice. Fenced by
    /// the lease; wakes watchers of the key.
    fn live_append<'a>(
        &'a self,
        lease: &'a Lease,
        first: u64,
        chunks: &'a [Bytes],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = (lease, first, chunks);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Ends the live log. Unlike the other live operations it is not fenced by the
    /// record (which `complete` or `release` already changed), only by the log's own
    /// token; the log is kept for [`LIVE_LOG_LINGER`] so slow followers can finish.
    fn live_end<'a>(&'a self, lease: &'a Lease, end: LiveEnd) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = (lease, end);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Reads the live log of `key` from chunk number `from` on; `None` when there is no
    /// live log (the store does not share them, or the key has none).
    fn live_read<'a>(&'a self, key: &'a StorageKey, from: u64) -> BoxFuture<'a, Result<Option<LiveRead>, StoreError>> {
        let _ = (key, from);
        Box::pin(std::future::ready(Ok(None)))
    }
}

/// How long an ended live log stays readable, for followers still reading it.
pub const LIVE_LOG_LINGER: Duration = Duration::from_secs(60);

/// The head of a live response, as its log carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveHead {
    /// The HTTP status.
    pub status: u16,
    /// The replayable headers (the same allow-list as a stored record).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// How a live log ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveEnd {
    /// The stream reached its terminator.
    Complete,
    /// The stream broke off or failed; nothing was stored.
    Broken,
}

/// What a follower read of a live log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRead {
    /// The fencing token of the owner that wrote the log (a takeover starts a new log).
    pub token: Token,
    /// The response head.
    pub head: LiveHead,
    /// The chunks from the requested number on.
    pub chunks: Vec<Bytes>,
    /// How the log ended, if it has.
    pub end: Option<LiveEnd>,
}

/// The state of an existing record, as [`decide`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// In flight under `token` until `lease_until`.
    InFlight {
        /// The stored fingerprint.
        fingerprint: Fingerprint,
        /// The owner's token.
        token: Token,
        /// The owner's lease expiry.
        lease_until: Timestamp,
    },
    /// Completed, kept until `expires_at`.
    Completed {
        /// The stored fingerprint.
        fingerprint: Fingerprint,
        /// The record's expiry.
        expires_at: Timestamp,
    },
}

/// What a claim must do, given what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write a new in-flight record. `replaces` is the stale token of an expired
    /// lease being taken over (the write must be a CAS on it), or `None` when the key
    /// was absent or its completed record had expired.
    Acquire {
        /// The stale token to replace.
        replaces: Option<Token>,
    },
    /// Answer in flight.
    InFlight {
        /// The owner's lease expiry.
        lease_until: Timestamp,
    },
    /// Answer with the stored response.
    Completed,
    /// Answer mismatch.
    Mismatch,
}

/// The claim rule every backend applies, given the record found at `now`.
///
/// A request with another fingerprint is a mismatch while a record exists, even one
/// whose lease ran out: the first request may have run upstream, and the key is bound
/// to it until the record is swept or expires.
pub fn decide(existing: Option<Existing>, fp: &Fingerprint, now: Timestamp) -> Decision {
    match existing {
        None => Decision::Acquire { replaces: None },
        Some(Existing::Completed { expires_at, .. }) if expires_at <= now => Decision::Acquire { replaces: None },
        Some(Existing::Completed { fingerprint, .. }) if fingerprint == *fp => Decision::Completed,
        Some(Existing::InFlight { fingerprint, token, lease_until }) if fingerprint == *fp => {
            if lease_until <= now {
                Decision::Acquire { replaces: Some(token) }
            } else {
                Decision::InFlight { lease_until }
            }
        }
        Some(_) => Decision::Mismatch,
    }
}

/// How long an in-flight record whose lease ran out is kept before `sweep` deletes it:
/// long enough that its key stays bound to its fingerprint while a retry is likely.
pub const STALE_IN_FLIGHT_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decide_covers_every_state() {
        let fp = Fingerprint::from_bytes([1; 32]);
        let other = Fingerprint::from_bytes([2; 32]);
        let now = Timestamp::from_millis(1000);
        let later = Timestamp::from_millis(2000);
        let token = Token::from_u128(7);
        let inflight = |f, until| Some(Existing::InFlight { fingerprint: f, token, lease_until: until });
        let done = |f, until| Some(Existing::Completed { fingerprint: f, expires_at: until });

        assert_eq!(decide(None, &fp, now), Decision::Acquire { replaces: None });
        assert_eq!(decide(inflight(fp, later), &fp, now), Decision::InFlight { lease_until: later });
        assert_eq!(decide(inflight(fp, now), &fp, now), Decision::Acquire { replaces: Some(token) });
        assert_eq!(decide(inflight(other, later), &fp, now), Decision::Mismatch);
        assert_eq!(decide(inflight(other, now), &fp, now), Decision::Mismatch);
        assert_eq!(decide(done(fp, later), &fp, now), Decision::Completed);
        assert_eq!(decide(done(other, later), &fp, now), Decision::Mismatch);
        assert_eq!(decide(done(other, now), &fp, now), Decision::Acquire { replaces: None });
    }
}
