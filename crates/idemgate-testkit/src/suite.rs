//! The store conformance cases: the [`Store`](idemgate::Store) contract, one case per
//! rule, each asserting exact values.
//!
//! Every case is a `pub async fn case_*(h: Harness)`. Run them all against a backend
//! with [`store_suite!`](crate::store_suite), which makes one `#[test]` per case.
//! Durations are short (leases of 200 ms) so that a backend on real time runs the
//! whole suite in seconds; under a manual clock they take no time at all.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idemgate::http::{HeaderName, HeaderValue};
use idemgate::store::{LiveEnd, LiveHead, LiveRead, STALE_IN_FLIGHT_GRACE};
use idemgate::{
    Claim, ErrorKind, Fingerprint, Lease, Record, RecordState, StorageKey, StoreError, StoredResponse, Timestamp, Token,
};
use tokio::sync::Barrier;

use crate::harness::Harness;
use crate::sample::{empty_response, fp, key, large_response, sample_response};

/// The lease every case claims with.
pub const LEASE: Duration = Duration::from_millis(200);
/// Enough time for a [`LEASE`] to run out.
pub const PAST_LEASE: Duration = Duration::from_millis(250);
/// A TTL no case outlives.
pub const LONG_TTL: Duration = Duration::from_secs(3600);
/// How long a watch may take to resolve before the case fails instead of hanging.
pub const WAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a watch that must not resolve is given to do so anyway.
pub const QUIET: Duration = Duration::from_millis(100);

async fn claim(h: &Harness, k: StorageKey, f: Fingerprint) -> Claim {
    h.store().claim(&k, &f, LEASE).await.expect("claim answers")
}

async fn acquire(h: &Harness, k: StorageKey, f: Fingerprint) -> Lease {
    match claim(h, k, f).await {
        Claim::Acquired(lease) => lease,
        other => panic!("expected Acquired for {k:?}, got {other:?}"),
    }
}

async fn complete(h: &Harness, lease: &Lease, response: &StoredResponse, ttl: Duration) {
    h.store().complete(lease, response, ttl).await.expect("the owner completes");
}

async fn get(h: &Harness, k: StorageKey) -> Option<Record> {
    h.store().get(&k).await.expect("get answers")
}

async fn state(h: &Harness, k: StorageKey) -> Option<RecordState> {
    get(h, k).await.map(|r| r.state)
}

#[track_caller]
fn assert_conflict<T: Debug>(res: Result<T, StoreError>, what: &str) {
    match res {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Conflict, "{what}: {e}"),
        Ok(v) => panic!("{what}: expected a Conflict, got Ok({v:?})"),
    }
}

#[track_caller]
fn assert_completed(claim: Claim, expected: &StoredResponse) {
    let Claim::Completed(got) = claim else { panic!("expected Completed, got {claim:?}") };
    // Field by field first, so that a failure names what differs.
    assert_eq!(got.status, expected.status, "status");
    assert_eq!(got.headers, expected.headers, "headers, in order, byte for byte");
    assert_eq!(got.chunks.len(), expected.chunks.len(), "number of chunks");
    for (i, (g, e)) in got.chunks.iter().zip(&expected.chunks).enumerate() {
        assert!(g == e, "chunk {i} differs ({} bytes stored, {} expected)", g.len(), e.len());
    }
    assert_eq!(got.completed_at, expected.completed_at, "completed_at");
    assert_eq!(*got, *expected);
}

/// Starts `n` claims of one key at once and returns their answers.
async fn race_claims(h: &Harness, n: usize, k: StorageKey, f: Fingerprint) -> Vec<Claim> {
    let barrier = Arc::new(Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let store = Arc::clone(h.store());
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                store.claim(&k, &f, LEASE).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.expect("claim task finishes").expect("claim answers"));
    }
    out
}

/// Splits raced claims into the one acquired lease and the rest, asserting that
/// exactly one acquired and every other claim answered in flight under that lease.
#[track_caller]
fn one_winner(claims: Vec<Claim>) -> Lease {
    let n = claims.len();
    let mut leases = Vec::new();
    let mut in_flight = Vec::new();
    for c in claims {
        match c {
            Claim::Acquired(lease) => leases.push(lease),
            Claim::InFlight { lease_until } => in_flight.push(lease_until),
            other => panic!("a raced claim answered {other:?}"),
        }
    }
    assert_eq!(leases.len(), 1, "exactly one of {n} concurrent claims acquires");
    let lease = leases.remove(0);
    assert_eq!(in_flight.len(), n - 1);
    assert!(in_flight.iter().all(|&until| until == lease.lease_until), "losers see the winner's lease");
    lease
}

/// A claim on an absent key acquires; the same request again is in flight under the
/// owner's lease; another request on the key is a mismatch.
pub async fn case_claim_on_absent_key_acquires(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    assert_eq!(lease.key, k);
    assert!(!lease.took_over, "nothing was taken over");
    h.assert_from_now(lease.lease_until, LEASE, "lease_until of a fresh claim");

    assert_eq!(claim(&h, k, f).await, Claim::InFlight { lease_until: lease.lease_until });
    assert_eq!(claim(&h, k, fp(2)).await, Claim::Mismatch);
    // Neither answer disturbed the owner.
    assert_eq!(state(&h, k).await, Some(RecordState::InFlight { token: lease.token, lease_until: lease.lease_until }));

    // Keys are independent.
    let other = acquire(&h, key(2), f).await;
    assert_eq!(other.key, key(2));
    assert_ne!(other.token, lease.token, "every claim gets its own token");
}

/// Of 64 claims of one key started together, exactly one acquires.
pub async fn case_concurrent_claims_acquire_exactly_once(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let lease = one_winner(race_claims(&h, 64, k, f).await);
    assert!(!lease.took_over);
    assert_eq!(state(&h, k).await, Some(RecordState::InFlight { token: lease.token, lease_until: lease.lease_until }));
}

/// A completed response replays byte for byte: status, headers in order, and the
/// chunk boundaries, empty chunks and empty bodies included. Another request on the
/// key is a mismatch and never sees the response.
pub async fn case_complete_then_claim_replays_byte_identical(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    let response = sample_response(h.now());
    complete(&h, &lease, &response, LONG_TTL).await;

    assert_completed(claim(&h, k, f).await, &response);
    assert_completed(claim(&h, k, f).await, &response);
    assert_eq!(claim(&h, k, fp(2)).await, Claim::Mismatch);

    let (k2, f2) = (key(2), fp(2));
    let lease = acquire(&h, k2, f2).await;
    let empty = empty_response(h.now());
    complete(&h, &lease, &empty, LONG_TTL).await;
    assert_completed(claim(&h, k2, f2).await, &empty);

    // One empty chunk is not the same as none.
    let (k3, f3) = (key(3), fp(3));
    let lease = acquire(&h, k3, f3).await;
    let one_empty_chunk = StoredResponse { chunks: vec![bytes::Bytes::new()], ..empty_response(h.now()) };
    complete(&h, &lease, &one_empty_chunk, LONG_TTL).await;
    assert_completed(claim(&h, k3, f3).await, &one_empty_chunk);
}

/// A released key is absent: the next claim acquires afresh, with a new token.
pub async fn case_release_lets_the_next_claim_acquire(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let first = acquire(&h, k, f).await;
    h.store().release(&first).await.expect("the owner releases");
    assert_eq!(get(&h, k).await, None, "a released key is absent");

    let second = acquire(&h, k, f).await;
    assert!(!second.took_over, "a released key is not taken over");
    assert_ne!(second.token, first.token);
    h.assert_from_now(second.lease_until, LEASE, "lease_until after release");

    // Released, the key is free for any request, not only the same one.
    h.store().release(&second).await.expect("the owner releases");
    let third = acquire(&h, k, fp(2)).await;
    assert_eq!(get(&h, k).await.map(|r| r.fingerprint), Some(fp(2)));
    assert!(!third.took_over);
}

/// `complete`, `release` and `renew` with a token that does not own the key fail
/// with `Conflict` and change nothing.
pub async fn case_fenced_operations_with_a_foreign_token_change_nothing(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    let foreign = Lease { token: Token::generate(), ..lease.clone() };
    let response = sample_response(h.now());

    let before = get(&h, k).await;
    assert_conflict(h.store().complete(&foreign, &response, LONG_TTL).await, "complete with a foreign token");
    assert_conflict(h.store().renew(&foreign, LONG_TTL).await, "renew with a foreign token");
    assert_conflict(h.store().release(&foreign).await, "release with a foreign token");
    assert_eq!(get(&h, k).await, before, "an in-flight record is untouched");

    // Once completed, the owner's own token is stale too: a second complete must not
    // replace the stored response, nor may a release or renew undo it.
    complete(&h, &lease, &response, LONG_TTL).await;
    let done = get(&h, k).await;
    let other = empty_response(h.now());
    assert_conflict(h.store().complete(&lease, &other, LONG_TTL).await, "a second complete");
    assert_conflict(h.store().release(&lease).await, "release after complete");
    assert_conflict(h.store().renew(&lease, LONG_TTL).await, "renew after complete");
    assert_eq!(get(&h, k).await, done, "a completed record is untouched");
    assert_completed(claim(&h, k, f).await, &response);

    // A lease on a key that has no record at all.
    let nowhere = Lease { key: key(2), ..foreign };
    assert_conflict(h.store().complete(&nowhere, &response, LONG_TTL).await, "complete on an absent key");
    assert_conflict(h.store().renew(&nowhere, LONG_TTL).await, "renew on an absent key");
    assert_conflict(h.store().release(&nowhere).await, "release on an absent key");
    assert_eq!(get(&h, key(2)).await, None, "a fenced operation never creates a record");
}

/// After an expired lease is taken over, the old owner is fenced out and the new
/// owner is in charge. Until then the key stays bound to its request.
pub async fn case_takeover_fences_out_the_old_owner(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let old = acquire(&h, k, f).await;
    h.advance(PAST_LEASE).await;

    assert_eq!(claim(&h, k, fp(2)).await, Claim::Mismatch, "an expired lease still binds the key to its request");
    let new = acquire(&h, k, f).await;
    assert!(new.took_over, "the claim took over an expired lease");
    assert_ne!(new.token, old.token);
    h.assert_from_now(new.lease_until, LEASE, "lease_until after takeover");
    let taken = get(&h, k).await;
    assert_eq!(taken.as_ref().map(|r| r.fingerprint), Some(f));
    assert_eq!(taken.map(|r| r.state), Some(RecordState::InFlight { token: new.token, lease_until: new.lease_until }));

    let response = sample_response(h.now());
    let before = get(&h, k).await;
    assert_conflict(h.store().renew(&old, LONG_TTL).await, "the old owner renews");
    assert_conflict(h.store().complete(&old, &response, LONG_TTL).await, "the old owner completes");
    assert_conflict(h.store().release(&old).await, "the old owner releases");
    assert_eq!(get(&h, k).await, before, "the old owner changed nothing");

    let until = h.store().renew(&new, LEASE).await.expect("the new owner renews");
    h.assert_from_now(until, LEASE, "renewed lease_until");
    complete(&h, &new, &response, LONG_TTL).await;
    assert_completed(claim(&h, k, f).await, &response);
}

/// Of 32 claims racing for one expired lease, exactly one takes it over.
pub async fn case_expired_lease_is_taken_over_exactly_once(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let old = acquire(&h, k, f).await;
    h.advance(PAST_LEASE).await;

    let new = one_winner(race_claims(&h, 32, k, f).await);
    assert!(new.took_over);
    assert_ne!(new.token, old.token);
    assert_eq!(state(&h, k).await, Some(RecordState::InFlight { token: new.token, lease_until: new.lease_until }));
}

/// An owner whose lease ran out keeps its key until someone takes it over: it can
/// still complete, and still renew.
pub async fn case_expired_owner_can_still_complete(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    h.advance(PAST_LEASE).await;
    let response = sample_response(h.now());
    complete(&h, &lease, &response, LONG_TTL).await;
    assert_completed(claim(&h, k, f).await, &response);

    let (k2, f2) = (key(2), fp(2));
    let lease = acquire(&h, k2, f2).await;
    h.advance(PAST_LEASE).await;
    let until = h.store().renew(&lease, LEASE).await.expect("an expired but unchallenged owner renews");
    h.assert_from_now(until, LEASE, "lease_until renewed after expiry");
    assert_eq!(claim(&h, k2, f2).await, Claim::InFlight { lease_until: until });
}

/// Renewing moves the lease forward from now: past the original expiry the key is
/// still in flight, past the renewed one it is taken over.
pub async fn case_renew_extends_the_lease(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    h.advance(LEASE / 2).await;
    let renewed_for = 3 * LEASE;
    let until = h.store().renew(&lease, renewed_for).await.expect("the owner renews");
    h.assert_from_now(until, renewed_for, "renew returns the new expiry");
    assert!(until > lease.lease_until);
    assert_eq!(state(&h, k).await, Some(RecordState::InFlight { token: lease.token, lease_until: until }));

    // Past the original lease, within the renewed one.
    h.advance(PAST_LEASE).await;
    assert_eq!(claim(&h, k, f).await, Claim::InFlight { lease_until: until });

    // Past the renewed lease.
    h.advance(renewed_for).await;
    let next = acquire(&h, k, f).await;
    assert!(next.took_over);
    assert_conflict(h.store().renew(&lease, LEASE).await, "renew after takeover");
}

/// A completed record is served until `completed_at + ttl`, judged from the stored
/// completion time (not from when `complete` ran), then the key is free again, for
/// any request.
pub async fn case_completed_record_expires_after_its_ttl(h: Harness) {
    const TTL: Duration = Duration::from_millis(1000);
    const AGE: Duration = Duration::from_millis(600);
    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    // The response completed AGE ago (the upstream call took that long to record), so
    // it expires TTL - AGE from now.
    let completed_at = Timestamp::from_millis(h.now().as_millis() - AGE.as_millis() as u64);
    let response = sample_response(completed_at);
    complete(&h, &lease, &response, TTL).await;
    assert_eq!(
        state(&h, k).await,
        Some(RecordState::Completed { response: response.clone(), expires_at: completed_at + TTL })
    );
    assert_completed(claim(&h, k, f).await, &response);

    if h.time().is_manual() {
        // To the millisecond: alive one before expiry, gone at it.
        h.advance(TTL - AGE - Duration::from_millis(1)).await;
        assert_completed(claim(&h, k, f).await, &response);
        h.advance(Duration::from_millis(1)).await;
    } else {
        // Had the TTL been counted from the complete call, the record would still
        // have half of it left here.
        h.advance(TTL - AGE + Duration::from_millis(100)).await;
    }
    let next = acquire(&h, k, fp(2)).await;
    assert!(!next.took_over, "an expired completed record is absent, not taken over");
    let record = get(&h, k).await.expect("the new claim wrote a record");
    assert_eq!(record.fingerprint, fp(2), "the key is bound to the new request");
    assert_eq!(record.state, RecordState::InFlight { token: next.token, lease_until: next.lease_until });
}

/// `sweep` deletes expired completed records and in-flight records stale for longer
/// than `STALE_IN_FLIGHT_GRACE`, at most `limit` per call, and nothing else.
pub async fn case_sweep_deletes_expired_records_in_batches(h: Harness) {
    const TTL: Duration = Duration::from_secs(1);
    let mut expired = Vec::new();
    let mut live = Vec::new();

    if h.time().is_manual() {
        // Exactly at lease_until + grace: swept.
        acquire(&h, key(20), fp(20)).await;
        h.advance(LEASE + STALE_IN_FLIGHT_GRACE).await;
        expired.push(key(20));
    }
    // Lease run out, but well within the grace: kept, so that the key stays bound to
    // its request while a retry is likely.
    let stale_in_grace = acquire(&h, key(21), fp(21)).await;
    h.advance(PAST_LEASE).await;
    live.push(key(21));

    // Completed records whose TTL is over (one of them expiring exactly now) or not.
    for n in 1..=5 {
        let lease = acquire(&h, key(n), fp(n)).await;
        let age = if n == 1 { TTL } else { TTL * 2 };
        let completed_at = Timestamp::from_millis(h.now().as_millis() - age.as_millis() as u64);
        complete(&h, &lease, &sample_response(completed_at), TTL).await;
        expired.push(key(n));
    }
    for n in 6..=7 {
        let lease = acquire(&h, key(n), fp(n)).await;
        complete(&h, &lease, &sample_response(h.now()), LONG_TTL).await;
        live.push(key(n));
    }
    acquire(&h, key(8), fp(8)).await;
    live.push(key(8));

    assert_eq!(h.store().sweep(0).await.expect("sweep answers"), 0, "a zero limit deletes nothing");
    let total = expired.len();
    assert_eq!(h.store().sweep(4).await.expect("sweep answers"), 4);
    assert_eq!(h.store().sweep(4).await.expect("sweep answers"), total - 4);
    assert_eq!(h.store().sweep(4).await.expect("sweep answers"), 0, "nothing is left to sweep");

    for k in expired {
        assert_eq!(get(&h, k).await, None, "{k:?} was swept");
    }
    for k in live {
        assert!(get(&h, k).await.is_some(), "{k:?} is live and must be kept");
    }
    assert_eq!(
        state(&h, key(21)).await,
        Some(RecordState::InFlight { token: stale_in_grace.token, lease_until: stale_in_grace.lease_until })
    );
}

/// `purge` deletes a record in any state; the owner of a purged key is fenced out.
pub async fn case_purge_removes_a_record_in_any_state(h: Harness) {
    assert!(!h.store().purge(&key(9)).await.expect("purge answers"), "nothing to purge");

    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    assert!(h.store().purge(&k).await.expect("purge answers"), "an in-flight record is purged");
    assert!(!h.store().purge(&k).await.expect("purge answers"), "a second purge finds nothing");
    assert_eq!(get(&h, k).await, None);
    let response = sample_response(h.now());
    assert_conflict(h.store().complete(&lease, &response, LONG_TTL).await, "the purged owner completes");
    assert_conflict(h.store().renew(&lease, LEASE).await, "the purged owner renews");
    assert_eq!(get(&h, k).await, None, "the purged owner recreated nothing");
    let next = acquire(&h, k, fp(2)).await;
    assert!(!next.took_over, "a purged key is absent");

    let (k2, f2) = (key(2), fp(2));
    let lease = acquire(&h, k2, f2).await;
    complete(&h, &lease, &response, LONG_TTL).await;
    assert!(h.store().purge(&k2).await.expect("purge answers"), "a completed record is purged");
    assert_eq!(get(&h, k2).await, None);
    assert!(!acquire(&h, k2, f2).await.took_over, "the request runs again");
}

/// A watch taken before `complete`, `release` or `purge` resolves after it; a watch
/// on a key nobody touches does not resolve.
pub async fn case_watch_wakes_on_complete_release_and_purge(h: Harness) {
    let untouched = h.store().watch(&key(99));
    let response = sample_response(h.now());

    let lease = acquire(&h, key(1), fp(1)).await;
    // Subscribed now, polled only after the change: the subscription must already
    // be in place, or a waiter that checks the state in between would miss it.
    let woken = h.store().watch(&key(1));
    complete(&h, &lease, &response, LONG_TTL).await;
    tokio::time::timeout(WAKE_TIMEOUT, woken).await.expect("complete wakes a watcher");

    let lease = acquire(&h, key(2), fp(2)).await;
    let woken = h.store().watch(&key(2));
    h.store().release(&lease).await.expect("the owner releases");
    tokio::time::timeout(WAKE_TIMEOUT, woken).await.expect("release wakes a watcher");

    acquire(&h, key(3), fp(3)).await;
    let woken = h.store().watch(&key(3));
    assert!(h.store().purge(&key(3)).await.expect("purge answers"));
    tokio::time::timeout(WAKE_TIMEOUT, woken).await.expect("purge wakes a watcher");

    assert!(tokio::time::timeout(QUIET, untouched).await.is_err(), "a watch on an untouched key stays pending");
    let idle = h.store().watch(&key(98));
    assert!(tokio::time::timeout(QUIET, idle).await.is_err(), "a watch with no change stays pending");
}

/// `get` returns the record as stored, expired or not; `ping` answers; the backend
/// has a name for metrics.
pub async fn case_get_returns_the_record_as_stored(h: Harness) {
    let name = h.store().backend();
    assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'), "backend name {name:?}");
    h.store().ping().await.expect("ping answers");
    assert_eq!(get(&h, key(1)).await, None);

    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    let record = get(&h, k).await.expect("a claimed key has a record");
    assert_eq!(record.key, k);
    assert_eq!(record.fingerprint, f);
    h.assert_from_now(record.created_at, Duration::ZERO, "created_at");
    assert_eq!(record.state, RecordState::InFlight { token: lease.token, lease_until: lease.lease_until });
    let created_at = record.created_at;

    h.advance(LEASE / 2).await;
    let ttl = Duration::from_secs(60);
    let response = sample_response(h.now());
    complete(&h, &lease, &response, ttl).await;
    let expected = Record {
        key: k,
        fingerprint: f,
        created_at,
        state: RecordState::Completed { response: response.clone(), expires_at: response.completed_at + ttl },
    };
    assert_eq!(get(&h, k).await, Some(expected.clone()), "complete keeps created_at and stores the response");

    // An expired record is still there to inspect until it is swept.
    let (k2, f2) = (key(2), fp(2));
    let lease = acquire(&h, k2, f2).await;
    let old = Timestamp::from_millis(h.now().as_millis() - 10_000);
    let stale = sample_response(old);
    complete(&h, &lease, &stale, Duration::from_secs(1)).await;
    assert_eq!(
        state(&h, k2).await,
        Some(RecordState::Completed { response: stale, expires_at: old + Duration::from_secs(1) })
    );
    assert_eq!(get(&h, k).await, Some(expected), "other keys are unaffected");
}

/// A 5 MiB response in 64 KiB chunks round-trips intact.
pub async fn case_large_body_round_trips(h: Harness) {
    const TOTAL: usize = 5 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    let response = large_response(h.now(), TOTAL, CHUNK);
    assert_eq!(response.chunks.len(), TOTAL / CHUNK);
    complete(&h, &lease, &response, LONG_TTL).await;

    let claimed = claim(&h, k, f).await;
    if let Claim::Completed(got) = &claimed {
        assert_eq!(got.body_len(), TOTAL);
        assert!(got.chunks.iter().all(|c| c.len() == CHUNK));
    }
    assert_completed(claimed, &response);
    match state(&h, k).await {
        Some(RecordState::Completed { response: got, .. }) => assert!(got == response, "get returns the same body"),
        other => panic!("expected a completed record, got {other:?}"),
    }
}

/// A fenced `release` or `complete` racing a takeover is atomic with it: either the
/// old owner's operation lands first and the claim sees its result, or the takeover
/// lands first and the old owner gets `Conflict`. Never both, never neither.
pub async fn case_fenced_operations_are_atomic_against_takeover(h: Harness) {
    const KEYS: u64 = 32;
    let mut old = Vec::new();
    for n in 0..KEYS {
        old.push(acquire(&h, key(n), fp(n)).await);
    }
    h.advance(PAST_LEASE).await;
    let response = sample_response(h.now());

    let tasks: Vec<_> = old
        .into_iter()
        .enumerate()
        .map(|(i, lease)| {
            let store = Arc::clone(h.store());
            let response = response.clone();
            tokio::spawn(async move {
                let barrier = Arc::new(Barrier::new(2));
                let fenced = {
                    let (store, barrier, lease) = (Arc::clone(&store), Arc::clone(&barrier), lease.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        if i % 2 == 0 {
                            store.release(&lease).await
                        } else {
                            store.complete(&lease, &response, LONG_TTL).await
                        }
                    })
                };
                barrier.wait().await;
                let claimed = store.claim(&lease.key, &fp(i as u64), LEASE).await;
                (lease, fenced.await.expect("fenced task finishes"), claimed.expect("claim answers"))
            })
        })
        .collect();

    for (i, task) in tasks.into_iter().enumerate() {
        let (lease, fenced, claimed) = task.await.expect("race task finishes");
        let k = lease.key;
        let after = state(&h, k).await;
        match (i % 2 == 0, fenced, claimed) {
            // Released first: the claim found the key absent.
            (true, Ok(()), Claim::Acquired(new)) if !new.took_over => {
                assert_eq!(after, Some(RecordState::InFlight { token: new.token, lease_until: new.lease_until }));
            }
            // Completed first: the claim replayed.
            (false, Ok(()), Claim::Completed(got)) => {
                assert_eq!(*got, response);
                assert!(matches!(after, Some(RecordState::Completed { .. })), "{k:?}: {after:?}");
            }
            // Taken over first: the old owner was fenced out and changed nothing.
            (_, Err(e), Claim::Acquired(new)) if new.took_over => {
                assert_eq!(e.kind(), ErrorKind::Conflict, "{k:?}: {e}");
                assert_eq!(after, Some(RecordState::InFlight { token: new.token, lease_until: new.lease_until }));
            }
            (release, fenced, claimed) => panic!(
                "{k:?}: {} answered {fenced:?} while the racing claim answered {claimed:?}",
                if release { "release" } else { "complete" }
            ),
        }
    }
}

/// The head every live-log case opens its log with.
fn live_head(status: u16) -> LiveHead {
    LiveHead {
        status,
        headers: vec![
            (HeaderName::from_static("content-type"), HeaderValue::from_static("text/event-stream")),
            (
                HeaderName::from_static("x-opaque"),
                HeaderValue::from_bytes(b"caf\xe9 \xff").expect("obs-text is a valid header value"),
            ),
        ],
    }
}

/// `n` distinct chunks numbered from `first`, an empty one among them.
fn live_chunks(first: u64, n: u64) -> Vec<Bytes> {
    (first..first + n)
        .map(|i| if i == 3 { Bytes::new() } else { Bytes::from(format!("data: {{\"n\":{i}}}\n\n")) })
        .collect()
}

async fn live_read(h: &Harness, k: StorageKey, from: u64) -> Option<LiveRead> {
    h.store().live_read(&k, from).await.expect("live_read answers")
}

/// Asserts that a store that does not share live logs (its `live_begin` answered
/// `false`) ignores every other live operation: nothing is readable, nothing fails,
/// and the record is untouched.
async fn assert_no_live_log(h: &Harness, lease: &Lease) {
    let k = lease.key;
    let before = get(h, k).await;
    assert_eq!(live_read(h, k, 0).await, None, "a store that does not share live logs has none to read");
    h.store().live_append(lease, 0, &live_chunks(0, 3)).await.expect("live_append is accepted and ignored");
    h.store().live_end(lease, LiveEnd::Complete).await.expect("live_end is accepted and ignored");
    assert_eq!(live_read(h, k, 0).await, None, "appending and ending created no live log");
    assert_eq!(get(h, k).await, before, "live operations do not touch the record");
}

/// A live log holds the head, then the chunks in order; a follower reads it from any
/// chunk number, and an append of chunks already in the log (a retry) adds only the
/// ones that are new. A store that does not share live logs reads none.
pub async fn case_live_log_keeps_chunks_in_order(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    let before = get(&h, k).await;
    if !h.store().live_begin(&lease, &live_head(200)).await.expect("live_begin answers") {
        assert_no_live_log(&h, &lease).await;
        return;
    }
    let read = live_read(&h, k, 0).await.expect("an opened log reads");
    assert_eq!(
        read,
        LiveRead { token: lease.token, head: live_head(200), chunks: Vec::new(), end: None },
        "a fresh log has the head and no chunks"
    );

    let all = live_chunks(0, 6);
    h.store().live_append(&lease, 0, &all[..2]).await.expect("the owner appends");
    h.store().live_append(&lease, 2, &all[2..3]).await.expect("the owner appends");
    h.store().live_append(&lease, 3, &all[3..]).await.expect("the owner appends");
    let read = live_read(&h, k, 0).await.expect("the log reads");
    assert_eq!(read.chunks, all, "every chunk, in order, the empty one included");
    assert_eq!((read.token, read.end), (lease.token, None));
    for from in 1..=all.len() {
        let read = live_read(&h, k, from as u64).await.expect("the log reads");
        assert_eq!(read.chunks, all[from..], "chunks from number {from}");
        assert_eq!(read.head, live_head(200));
    }
    assert_eq!(live_read(&h, k, 100).await.map(|r| r.chunks), Some(Vec::new()), "past the end: no chunks");

    // A retried append (the first try's answer was lost) changes nothing.
    h.store().live_append(&lease, 3, &all[3..]).await.expect("a retried append is accepted");
    h.store().live_append(&lease, 0, &all[..1]).await.expect("a retried append is accepted");
    assert_eq!(live_read(&h, k, 0).await.map(|r| r.chunks), Some(all.clone()), "nothing was appended twice");
    // One that overlaps the end appends only the chunks past it.
    let more = live_chunks(4, 4);
    h.store().live_append(&lease, 4, &more).await.expect("the owner appends");
    let mut expected = all;
    expected.extend_from_slice(&more[2..]);
    assert_eq!(live_read(&h, k, 0).await.map(|r| r.chunks), Some(expected), "only chunks 6 and 7 were new");
    h.store().live_append(&lease, 8, &[]).await.expect("an empty append is accepted");

    assert_eq!(get(&h, k).await, before, "the live log does not touch the record");
    assert_eq!(live_read(&h, key(2), 0).await, None, "a key nobody opened a log for has none");
}

/// Only the lease that owns the record can open its live log or append to it: a
/// foreign token, and an old owner whose lease was taken over, get `Conflict` and
/// change nothing. A new owner's log replaces the old one.
pub async fn case_live_log_is_fenced_by_the_lease(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let old = acquire(&h, k, f).await;
    let foreign = Lease { token: Token::generate(), ..old.clone() };
    match h.store().live_begin(&foreign, &live_head(200)).await {
        Ok(false) => {
            assert_no_live_log(&h, &old).await;
            return;
        }
        Ok(true) => panic!("a foreign token opened a live log"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Conflict, "live_begin with a foreign token: {e}"),
    }
    assert_eq!(live_read(&h, k, 0).await, None, "the foreign begin opened nothing");
    assert!(h.store().live_begin(&old, &live_head(200)).await.expect("the owner opens its log"));
    let chunks = live_chunks(0, 2);
    h.store().live_append(&old, 0, &chunks).await.expect("the owner appends");
    let opened = live_read(&h, k, 0).await;

    assert_conflict(h.store().live_append(&foreign, 2, &live_chunks(2, 1)).await, "live_append with a foreign token");
    assert_conflict(h.store().live_end(&foreign, LiveEnd::Broken).await, "live_end with a foreign token");
    assert_conflict(h.store().live_begin(&foreign, &live_head(500)).await, "live_begin with a foreign token");
    assert_eq!(live_read(&h, k, 0).await, opened, "the foreign token changed nothing");
    let nowhere = Lease { key: key(2), ..old.clone() };
    assert_conflict(h.store().live_begin(&nowhere, &live_head(200)).await, "live_begin on an absent key");
    assert_conflict(h.store().live_append(&nowhere, 0, &chunks).await, "live_append on an absent key");
    assert_eq!(live_read(&h, key(2), 0).await, None, "a fenced live operation never creates a log");

    // The owner stalls; a retry takes the key over and opens its own log.
    h.advance(PAST_LEASE).await;
    let new = acquire(&h, k, f).await;
    assert!(new.took_over);
    assert_conflict(h.store().live_append(&old, 2, &live_chunks(2, 1)).await, "the old owner appends after takeover");
    assert_conflict(h.store().live_begin(&old, &live_head(200)).await, "the old owner reopens after takeover");
    assert_eq!(live_read(&h, k, 0).await, opened, "the old owner changed nothing");

    assert!(h.store().live_begin(&new, &live_head(201)).await.expect("the new owner opens its log"));
    assert_eq!(
        live_read(&h, k, 0).await,
        Some(LiveRead { token: new.token, head: live_head(201), chunks: Vec::new(), end: None }),
        "the new owner's log replaced the old one"
    );
    assert_conflict(h.store().live_append(&old, 2, &live_chunks(2, 1)).await, "the old owner appends to the new log");
    assert_conflict(h.store().live_end(&old, LiveEnd::Complete).await, "the old owner ends the new log");
    let other = live_chunks(10, 1);
    h.store().live_append(&new, 0, &other).await.expect("the new owner appends");
    assert_eq!(
        live_read(&h, k, 0).await,
        Some(LiveRead { token: new.token, head: live_head(201), chunks: other, end: None })
    );
}

/// Ending a log records how it ended and keeps its chunks readable, also after the
/// record was completed or released (ending is fenced by the log alone). After a
/// release, the next owner's log replaces the ended one.
pub async fn case_live_log_end_is_readable_until_a_new_owner_begins(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let first = acquire(&h, k, f).await;
    if !h.store().live_begin(&first, &live_head(200)).await.expect("live_begin answers") {
        assert_no_live_log(&h, &first).await;
        return;
    }
    let chunks = live_chunks(0, 3);
    h.store().live_append(&first, 0, &chunks).await.expect("the owner appends");
    // The stream broke off: the owner releases the key, then ends its log.
    h.store().release(&first).await.expect("the owner releases");
    h.store().live_end(&first, LiveEnd::Broken).await.expect("the owner ends its log after release");
    let ended =
        LiveRead { token: first.token, head: live_head(200), chunks: chunks.clone(), end: Some(LiveEnd::Broken) };
    assert_eq!(live_read(&h, k, 0).await, Some(ended.clone()), "the ended log is still readable");
    assert_eq!(
        live_read(&h, k, 2).await.map(|r| (r.chunks, r.end)),
        Some((chunks[2..].to_vec(), Some(LiveEnd::Broken)))
    );
    assert_conflict(h.store().live_append(&first, 3, &live_chunks(3, 1)).await, "appending after release");
    assert_eq!(live_read(&h, k, 0).await, Some(ended), "nothing was appended to the ended log");

    // The retry runs again and streams to the end.
    let second = acquire(&h, k, f).await;
    assert!(!second.took_over);
    assert!(h.store().live_begin(&second, &live_head(200)).await.expect("the new owner opens its log"));
    assert_eq!(
        live_read(&h, k, 0).await,
        Some(LiveRead { token: second.token, head: live_head(200), chunks: Vec::new(), end: None }),
        "the new owner's log replaced the ended one"
    );
    assert_conflict(h.store().live_end(&first, LiveEnd::Complete).await, "the first owner ends the new log");
    let all = live_chunks(0, 4);
    h.store().live_append(&second, 0, &all).await.expect("the owner appends");
    let response = sample_response(h.now());
    complete(&h, &second, &response, LONG_TTL).await;
    h.store().live_end(&second, LiveEnd::Complete).await.expect("the owner ends its log after complete");
    assert_eq!(
        live_read(&h, k, 0).await,
        Some(LiveRead { token: second.token, head: live_head(200), chunks: all, end: Some(LiveEnd::Complete) })
    );
    assert_completed(claim(&h, k, f).await, &response);
}

/// A watch taken before an append or the end of a live log resolves after it, so a
/// follower in another process need not poll for every chunk.
pub async fn case_watch_wakes_on_live_append_and_end(h: Harness) {
    let (k, f) = (key(1), fp(1));
    let lease = acquire(&h, k, f).await;
    if !h.store().live_begin(&lease, &live_head(200)).await.expect("live_begin answers") {
        assert_no_live_log(&h, &lease).await;
        return;
    }
    let untouched = h.store().watch(&key(99));
    for n in 0..3 {
        let woken = h.store().watch(&k);
        h.store().live_append(&lease, n, &live_chunks(n, 1)).await.expect("the owner appends");
        tokio::time::timeout(WAKE_TIMEOUT, woken).await.expect("an append wakes a watcher");
    }
    let woken = h.store().watch(&k);
    h.store().live_end(&lease, LiveEnd::Complete).await.expect("the owner ends its log");
    tokio::time::timeout(WAKE_TIMEOUT, woken).await.expect("the end wakes a watcher");
    assert!(tokio::time::timeout(QUIET, untouched).await.is_err(), "a watch on an untouched key stays pending");
}
