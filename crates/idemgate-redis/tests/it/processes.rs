//! Several gateway processes on one store: each `RedisStore` below has its own
//! connections, as a separate process would, and shares only the server.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idemgate::http::{HeaderName, HeaderValue};
use idemgate::store::{LiveEnd, LiveHead};
use idemgate::{Claim, Store, Timestamp};
use idemgate_redis::RedisStore;
use idemgate_testkit::{fp, key, sample_response};
use tokio::sync::Barrier;

use crate::support::{cluster_url, single_url, store, until_subscribed};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
const WAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// A second process: its own connections, the same prefix.
async fn other_process(url: &str, first: &RedisStore) -> RedisStore {
    RedisStore::connect(url).await.expect("redis answers").with_prefix(first.prefix())
}

async fn claims_are_shared(url: String) {
    let (a, _cleanup) = store(&url).await;
    let b = other_process(&url, &a).await;

    let Claim::Acquired(lease) = a.claim(&key(1), &fp(1), LEASE).await.expect("claim") else {
        panic!("a fresh key is acquired")
    };
    assert_eq!(
        b.claim(&key(1), &fp(1), LEASE).await.expect("claim"),
        Claim::InFlight { lease_until: lease.lease_until }
    );
    assert_eq!(b.claim(&key(1), &fp(2), LEASE).await.expect("claim"), Claim::Mismatch);
    assert_eq!(b.get(&key(1)).await.expect("get"), a.get(&key(1)).await.expect("get"));

    // Claims raced from both processes: exactly one acquires.
    let stores: [Arc<dyn Store>; 2] = [Arc::new(a), Arc::new(b)];
    let barrier = Arc::new(Barrier::new(32));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (store, barrier) = (Arc::clone(&stores[i % 2]), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                store.claim(&key(2), &fp(2), LEASE).await.expect("claim")
            })
        })
        .collect();
    let mut acquired = 0;
    for task in tasks {
        match task.await.expect("claim task") {
            Claim::Acquired(_) => acquired += 1,
            Claim::InFlight { .. } => {}
            other => panic!("a raced claim answered {other:?}"),
        }
    }
    assert_eq!(acquired, 1, "exactly one of 32 claims from two processes acquires");

    // One process completes; the other replays the same bytes.
    let response = sample_response(now());
    stores[0].complete(&lease, &response, TTL).await.expect("complete");
    assert_eq!(stores[1].claim(&key(1), &fp(1), LEASE).await.expect("claim"), Claim::Completed(Box::new(response)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_node_processes_share_claims() {
    if let Some(url) = single_url() {
        claims_are_shared(url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_processes_share_claims() {
    if let Some(url) = cluster_url() {
        claims_are_shared(url).await;
    }
}

async fn watch_wakes_across_processes(url: String) {
    let (a, _cleanup) = store(&url).await;
    let b = other_process(&url, &a).await;
    let response = sample_response(now());

    // Complete.
    let Claim::Acquired(lease) = a.claim(&key(1), &fp(1), LEASE).await.expect("claim") else { panic!("acquired") };
    let woken = b.watch(&key(1));
    until_subscribed(&url, a.prefix(), &key(1)).await;
    a.complete(&lease, &response, TTL).await.expect("complete");
    tokio::time::timeout(WAKE_TIMEOUT, woken).await.expect("a complete in one process wakes a watcher in another");
    assert_eq!(b.claim(&key(1), &fp(1), LEASE).await.expect("claim"), Claim::Completed(Box::new(response)));

    // Release.
    let Claim::Acquired(lease) = a.claim(&key(2), &fp(2), LEASE).await.expect("claim") else { panic!("acquired") };
    let woken = b.watch(&key(2));
    until_subscribed(&url, a.prefix(), &key(2)).await;
    a.release(&lease).await.expect("release");
    tokio::time::timeout(WAKE_TIMEOUT, woken).await.expect("a release in one process wakes a watcher in another");

    // Purge.
    a.claim(&key(3), &fp(3), LEASE).await.expect("claim");
    let woken = b.watch(&key(3));
    until_subscribed(&url, a.prefix(), &key(3)).await;
    assert!(a.purge(&key(3)).await.expect("purge"));
    tokio::time::timeout(WAKE_TIMEOUT, woken).await.expect("a purge in one process wakes a watcher in another");

    // A live log: the follower in the other process reads what the owner appends.
    let Claim::Acquired(lease) = a.claim(&key(4), &fp(4), LEASE).await.expect("claim") else { panic!("acquired") };
    let head = LiveHead {
        status: 200,
        headers: vec![(HeaderName::from_static("content-type"), HeaderValue::from_static("text/event-stream"))],
    };
    assert!(a.live_begin(&lease, &head).await.expect("live_begin"));
    let woken = b.watch(&key(4));
    until_subscribed(&url, a.prefix(), &key(4)).await;
    let chunk = Bytes::from_static(b"data: {\"n\":0}\n\n");
    a.live_append(&lease, 0, std::slice::from_ref(&chunk)).await.expect("live_append");
    tokio::time::timeout(WAKE_TIMEOUT, woken).await.expect("an append in one process wakes a follower in another");
    let read = b.live_read(&key(4), 0).await.expect("live_read").expect("the log is there");
    assert_eq!((read.token, read.head, read.chunks, read.end), (lease.token, head, vec![chunk], None));

    let woken = b.watch(&key(4));
    a.live_end(&lease, LiveEnd::Complete).await.expect("live_end");
    tokio::time::timeout(WAKE_TIMEOUT, woken).await.expect("the end wakes a follower in another process");
    assert_eq!(b.live_read(&key(4), 1).await.expect("live_read").map(|r| r.end), Some(Some(LiveEnd::Complete)));

    // A watch on a key nobody touches stays pending.
    let idle = b.watch(&key(5));
    assert!(tokio::time::timeout(Duration::from_millis(200), idle).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_node_watch_wakes_across_processes() {
    if let Some(url) = single_url() {
        watch_wakes_across_processes(url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_watch_wakes_across_processes() {
    if let Some(url) = cluster_url() {
        watch_wakes_across_processes(url).await;
    }
}
