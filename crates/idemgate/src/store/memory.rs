//! An in-process store, for tests and for gateways that may forget everything on restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, ready};

use super::{
    Claim, Decision, Existing, LIVE_LOG_LINGER, Lease, LiveEnd, LiveHead, LiveRead, Notifier, STALE_IN_FLIGHT_GRACE,
    Store, decide,
};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::record::{Record, RecordState, StoredResponse, Token};
use crate::scope::StorageKey;

/// A store in `HashMap`s behind mutexes, one per shard of the keys.
///
/// # Behavior
///
/// - Expiry: completed records are served until their TTL from completion, then
///   treated as absent; [`Store::sweep`] deletes them.
/// - Lost connection: there is none; the store lives and dies with the process.
/// - A lease dropped without `complete` or `release` runs out after its duration, and
///   the next claim takes the key over.
/// - Live logs: none by default (one process fans streams out in memory);
///   [`MemoryStore::with_live_logs`] keeps them, for tests of several layers on one store.
pub struct MemoryStore {
    /// Sharded so that growing a map (a rehash that moves every record in it) holds up
    /// the keys of one shard, for a fraction of the time, instead of every request.
    shards: Box<[Mutex<HashMap<StorageKey, Record>>]>,
    /// Live logs, only when enabled with [`MemoryStore::with_live_logs`].
    live: Option<Mutex<HashMap<StorageKey, Log>>>,
    notifier: Notifier,
    clock: Arc<dyn Clock>,
}

/// A live log as the memory store keeps it.
struct Log {
    token: Token,
    head: LiveHead,
    chunks: Vec<Bytes>,
    end: Option<LiveEnd>,
    /// Set when the log ends: it is dropped at this time.
    expires_at: Option<Timestamp>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let records: usize = self.shards.iter().map(|s| lock(s).len()).sum();
        f.debug_struct("MemoryStore").field("records", &records).finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::default()).collect();
        Self { shards, live: None, notifier: Notifier::new(), clock: Arc::new(SystemClock) }
    }

    /// Keeps live logs of streams, as a store shared by several gateway processes does.
    ///
    /// One process needs none (the layer fans a stream out in memory); this is for
    /// tests that put two layers, standing for two processes, on one store.
    pub fn with_live_logs(mut self) -> Self {
        self.live = Some(Mutex::default());
        self
    }

    fn logs(&self) -> Option<MutexGuard<'_, HashMap<StorageKey, Log>>> {
        self.live.as_ref().map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether `lease` still owns its record.
    fn owns(&self, lease: &Lease) -> bool {
        self.lock(&lease.key)
            .get(&lease.key)
            .is_some_and(|r| matches!(r.state, RecordState::InFlight { token, .. } if token == lease.token))
    }

    /// Reads time from `clock` instead (tests move a [`ManualClock`](crate::ManualClock)).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The shard of `key`. Storage keys are hashes already: their first byte spreads
    /// them evenly.
    fn lock(&self, key: &StorageKey) -> MutexGuard<'_, HashMap<StorageKey, Record>> {
        lock(&self.shards[usize::from(key.as_bytes()[0]) % SHARDS])
    }

    fn claim_now(&self, key: &StorageKey, fp: &Fingerprint, lease: Duration) -> Claim {
        let now = self.clock.now();
        let mut records = self.lock(key);
        let existing = records.get(key);
        match decide(existing.map(existing_of), fp, now) {
            Decision::Acquire { replaces } => {
                let token = Token::generate();
                let lease_until = now + lease;
                let record = Record {
                    key: *key,
                    fingerprint: *fp,
                    created_at: now,
                    state: RecordState::InFlight { token, lease_until },
                };
                records.insert(*key, record);
                Claim::Acquired(Lease { key: *key, token, lease_until, took_over: replaces.is_some() })
            }
            Decision::InFlight { lease_until } => Claim::InFlight { lease_until },
            Decision::Completed => match existing.map(|r| &r.state) {
                Some(RecordState::Completed { response, .. }) => Claim::Completed(Box::new(response.clone())),
                _ => unreachable!("decide answers Completed only for a completed record"),
            },
            Decision::Mismatch => Claim::Mismatch,
        }
    }

    /// Runs `f` on the record if `lease` still owns it.
    fn fenced<T>(&self, lease: &Lease, f: impl FnOnce(&mut Record) -> T) -> Result<T, StoreError> {
        let mut records = self.lock(&lease.key);
        match records.get_mut(&lease.key) {
            Some(r) if matches!(r.state, RecordState::InFlight { token, .. } if token == lease.token) => Ok(f(r)),
            _ => Err(StoreError::lease_lost()),
        }
    }
}

/// How many maps the records are spread over.
const SHARDS: usize = 32;

fn lock(shard: &Mutex<HashMap<StorageKey, Record>>) -> MutexGuard<'_, HashMap<StorageKey, Record>> {
    // A panic while holding the lock cannot leave a record half-written: every update
    // is a single insert or remove.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

fn existing_of(r: &Record) -> Existing {
    match &r.state {
        RecordState::InFlight { token, lease_until } => {
            Existing::InFlight { fingerprint: r.fingerprint, token: *token, lease_until: *lease_until }
        }
        RecordState::Completed { expires_at, .. } => {
            Existing::Completed { fingerprint: r.fingerprint, expires_at: *expires_at }
        }
    }
}

impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        fp: &'a Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        ready(Ok(self.claim_now(key, fp, lease))).boxed()
    }

    fn renew<'a>(&'a self, lease: &'a Lease, duration: Duration) -> BoxFuture<'a, Result<Timestamp, StoreError>> {
        let until = self.clock.now() + duration;
        let res = self.fenced(lease, |r| {
            r.state = RecordState::InFlight { token: lease.token, lease_until: until };
            until
        });
        ready(res).boxed()
    }

    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let expires_at = response.completed_at + ttl;
        let res = self.fenced(lease, |r| {
            r.state = RecordState::Completed { response: response.clone(), expires_at };
        });
        if res.is_ok() {
            self.notifier.notify(&lease.key);
        }
        ready(res).boxed()
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), StoreError>> {
        // Check and remove under one lock: a takeover in between must not be deleted.
        let res = {
            let mut records = self.lock(&lease.key);
            match records.get(&lease.key) {
                Some(r) if matches!(r.state, RecordState::InFlight { token, .. } if token == lease.token) => {
                    records.remove(&lease.key);
                    Ok(())
                }
                _ => Err(StoreError::lease_lost()),
            }
        };
        if res.is_ok() {
            self.notifier.notify(&lease.key);
        }
        ready(res).boxed()
    }

    fn get<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        ready(Ok(self.lock(key).get(key).cloned())).boxed()
    }

    fn purge<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        let existed = self.lock(key).remove(key).is_some();
        if let Some(mut logs) = self.logs() {
            logs.remove(key);
        }
        if existed {
            self.notifier.notify(key);
        }
        ready(Ok(existed)).boxed()
    }

    fn sweep(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        let now = self.clock.now();
        let mut swept = 0;
        // One shard at a time: the others serve requests meanwhile.
        for shard in &self.shards {
            let mut records = lock(shard);
            let expired: Vec<StorageKey> = records
                .values()
                .filter(|r| match &r.state {
                    RecordState::Completed { expires_at, .. } => *expires_at <= now,
                    RecordState::InFlight { lease_until, .. } => *lease_until + STALE_IN_FLIGHT_GRACE <= now,
                })
                .map(|r| r.key)
                .take(limit - swept)
                .collect();
            for key in &expired {
                records.remove(key);
            }
            swept += expired.len();
            if swept == limit {
                break;
            }
        }
        if let Some(mut logs) = self.logs() {
            logs.retain(|_, log| log.expires_at.is_none_or(|at| at > now));
        }
        self.notifier.prune();
        ready(Ok(swept)).boxed()
    }

    fn watch(&self, key: &StorageKey) -> BoxFuture<'static, ()> {
        self.notifier.subscribe(key)
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(Ok(())).boxed()
    }

    fn live_begin<'a>(&'a self, lease: &'a Lease, head: &'a LiveHead) -> BoxFuture<'a, Result<bool, StoreError>> {
        // A takeover right after this check is fenced out by `live_append`, which checks
        // both tokens. The two locks are never held together.
        let owns = self.owns(lease);
        let res = match self.logs() {
            None => Ok(false),
            Some(_) if !owns => Err(StoreError::lease_lost()),
            Some(mut logs) => {
                let log =
                    Log { token: lease.token, head: head.clone(), chunks: Vec::new(), end: None, expires_at: None };
                logs.insert(lease.key, log);
                Ok(true)
            }
        };
        ready(res).boxed()
    }

    fn live_append<'a>(
        &'a self,
        lease: &'a Lease,
        first: u64,
        chunks: &'a [Bytes],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let owns = self.owns(lease);
        let res = match self.logs() {
            None => Ok(()),
            Some(mut logs) => match logs.get_mut(&lease.key) {
                Some(log) if owns && log.token == lease.token && log.end.is_none() => {
                    // Chunks already in the log (a retried append) are not added twice.
                    let have = log.chunks.len() as u64;
                    let skip = usize::try_from(have.saturating_sub(first)).unwrap_or(usize::MAX);
                    if first <= have {
                        log.chunks.extend(chunks.iter().skip(skip).cloned());
                    }
                    Ok(())
                }
                _ => Err(StoreError::lease_lost()),
            },
        };
        if res.is_ok() {
            self.notifier.notify(&lease.key);
        }
        ready(res).boxed()
    }

    fn live_end<'a>(&'a self, lease: &'a Lease, end: LiveEnd) -> BoxFuture<'a, Result<(), StoreError>> {
        let now = self.clock.now();
        let res = match self.logs() {
            None => Ok(()),
            Some(mut logs) => match logs.get_mut(&lease.key) {
                Some(log) if log.token == lease.token => {
                    log.end = Some(end);
                    log.expires_at = Some(now + LIVE_LOG_LINGER);
                    Ok(())
                }
                _ => Err(StoreError::lease_lost()),
            },
        };
        if res.is_ok() {
            self.notifier.notify(&lease.key);
        }
        ready(res).boxed()
    }

    fn live_read<'a>(&'a self, key: &'a StorageKey, from: u64) -> BoxFuture<'a, Result<Option<LiveRead>, StoreError>> {
        let now = self.clock.now();
        let read = self.logs().and_then(|mut logs| {
            if logs.get(key).and_then(|l| l.expires_at).is_some_and(|at| at <= now) {
                logs.remove(key);
            }
            let log = logs.get(key)?;
            let skip = usize::try_from(from).unwrap_or(usize::MAX);
            Some(LiveRead {
                token: log.token,
                head: log.head.clone(),
                chunks: log.chunks.iter().skip(skip).cloned().collect(),
                end: log.end,
            })
        });
        ready(Ok(read)).boxed()
    }
}
