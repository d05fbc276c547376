//! Two stores on one schema stand for two gateway processes: they see each other's
//! claims, and a waiter on one is woken by the other's change through
//! LISTEN/NOTIFY, well within the layer's poll interval.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idemgate::http::{HeaderName, HeaderValue};
use idemgate::store::{LiveEnd, LiveHead};
use idemgate::{Claim, Clock, Lease, RecordState, Store, SystemClock};
use idemgate_testkit::{fp, key, sample_response};
use tokio::sync::Barrier;

use crate::scratch::Scratch;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
/// The layer polls every 500 ms by default; a wake-up through the server must come
/// before that. (`watch` itself never polls: a wake-up at all proves the NOTIFY
/// arrived; this bounds how late. 250 ms was exceeded once, at 291 ms, with the
/// conformance suites loading the same two cores and the server.)
const PROMPT: Duration = Duration::from_millis(450);

async fn acquire(store: &dyn Store, n: u64) -> Lease {
    match store.claim(&key(n), &fp(n), LEASE).await.expect("claim answers") {
        Claim::Acquired(lease) => lease,
        other => panic!("expected Acquired for key {n}, got {other:?}"),
    }
}

/// Awaits `woken` and returns how long it took, failing after a second.
async fn wake_time(started: Instant, woken: impl Future<Output = ()>) -> Duration {
    tokio::time::timeout(Duration::from_secs(1), woken).await.expect("the other gateway's change wakes the waiter");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_share_claims_and_wake_each_other() {
    let Some(scratch) = Scratch::new("two_gateways_share_claims_and_wake_each_other") else { return };
    let a = scratch.store("idemgate-fleet-a").await;
    let b = scratch.store("idemgate-fleet-b").await;

    // A claims; B sees the same claim, and the same key bound to its request.
    let lease = acquire(&a, 1).await;
    assert_eq!(b.claim(&key(1), &fp(1), LEASE).await.unwrap(), Claim::InFlight { lease_until: lease.lease_until });
    assert_eq!(b.claim(&key(1), &fp(2), LEASE).await.unwrap(), Claim::Mismatch);

    // B waits; A completes; B is woken by the notification alone (its own process
    // changed nothing), then replays.
    let woken = b.watch(&key(1));
    let response = sample_response(SystemClock.now());
    let started = Instant::now();
    a.complete(&lease, &response, TTL).await.expect("A completes");
    let took = wake_time(started, woken).await;
    assert!(took < PROMPT, "B woke {took:?} after A completed");
    assert_eq!(b.claim(&key(1), &fp(1), LEASE).await.unwrap(), Claim::Completed(Box::new(response)));

    // The other way round, on release: A waits, B releases, A claims afresh.
    let lease = acquire(&b, 2).await;
    let woken = a.watch(&key(2));
    let started = Instant::now();
    b.release(&lease).await.expect("B releases");
    let took = wake_time(started, woken).await;
    assert!(took < PROMPT, "A woke {took:?} after B released");
    assert!(!acquire(&a, 2).await.took_over);

    // And on purge.
    let woken = b.watch(&key(2));
    let started = Instant::now();
    assert!(a.purge(&key(2)).await.unwrap());
    let took = wake_time(started, woken).await;
    assert!(took < PROMPT, "B woke {took:?} after A purged");

    // A waiter on an untouched key stays asleep.
    let quiet = b.watch(&key(3));
    assert!(tokio::time::timeout(Duration::from_millis(200), quiet).await.is_err(), "nothing changed key 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_on_another_gateway_reads_the_live_log() {
    let Some(scratch) = Scratch::new("a_follower_on_another_gateway_reads_the_live_log") else { return };
    let owner = scratch.store("idemgate-live-owner").await;
    let follower = scratch.store("idemgate-live-follower").await;
    let lease = acquire(&owner, 1).await;
    let head = LiveHead {
        status: 200,
        headers: vec![(HeaderName::from_static("content-type"), HeaderValue::from_static("text/event-stream"))],
    };
    assert!(owner.live_begin(&lease, &head).await.expect("the owner opens its log"));

    let chunks: Vec<Bytes> = (0..5).map(|i| Bytes::from(format!("data: {i}\n\n"))).collect();
    let mut next = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let woken = follower.watch(&key(1));
        let started = Instant::now();
        owner.live_append(&lease, i as u64, std::slice::from_ref(chunk)).await.expect("the owner appends");
        let took = wake_time(started, woken).await;
        assert!(took < PROMPT, "the follower woke {took:?} after append {i}");
        let read = follower.live_read(&key(1), next).await.unwrap().expect("the follower sees the log");
        assert_eq!((read.token, &read.head, read.end), (lease.token, &head, None));
        assert_eq!(read.chunks, chunks[next as usize..=i], "the follower reads what it has not seen");
        next += read.chunks.len() as u64;
    }
    let woken = follower.watch(&key(1));
    owner.complete(&lease, &sample_response(SystemClock.now()), TTL).await.unwrap();
    owner.live_end(&lease, LiveEnd::Complete).await.expect("the owner ends its log after completing");
    wake_time(Instant::now(), woken).await;
    let read = follower.live_read(&key(1), 0).await.unwrap().expect("an ended log lingers");
    assert_eq!((read.chunks, read.end), (chunks, Some(LiveEnd::Complete)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_on_two_gateways_acquire_once() {
    let Some(scratch) = Scratch::new("concurrent_claims_on_two_gateways_acquire_once") else { return };
    let stores: [Arc<dyn Store>; 2] =
        [Arc::new(scratch.store("idemgate-race-a").await), Arc::new(scratch.store("idemgate-race-b").await)];
    let barrier = Arc::new(Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = Arc::clone(&stores[i % 2]);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                store.claim(&key(7), &fp(7), LEASE).await.expect("claim answers")
            })
        })
        .collect();
    let mut won = Vec::new();
    let mut waiting = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Claim::Acquired(lease) => won.push(lease),
            Claim::InFlight { lease_until } => waiting.push(lease_until),
            other => panic!("a raced claim answered {other:?}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one of 64 claims over two gateways acquires");
    assert!(waiting.iter().all(|&until| until == won[0].lease_until), "the others see the winner's lease");
    let record = stores[1].get(&key(7)).await.unwrap().expect("the winner's record");
    assert_eq!(record.state, RecordState::InFlight { token: won[0].token, lease_until: won[0].lease_until });
}
