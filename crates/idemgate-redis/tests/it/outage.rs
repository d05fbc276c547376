//! The server goes away and comes back: operations fail fast with `Unavailable`
//! meanwhile, and the same store object works again afterwards, wake-ups included.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idemgate::store::{LiveEnd, LiveHead};
use idemgate::{Claim, ErrorKind, Store, StoreError, Timestamp};
use idemgate_redis::RedisStore;
use idemgate_testkit::{fp, key, sample_response};

use crate::support::{PrivateServer, until_subscribed};

/// The store's bound on each operation in this test.
const TIMEOUT: Duration = Duration::from_secs(1);
/// What an operation may take beyond it (a loaded CI machine).
const SLACK: Duration = Duration::from_millis(750);
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// Runs `op`, and asserts it failed with `Unavailable` within the timeout.
async fn unavailable<T: Debug>(what: &str, op: impl Future<Output = Result<T, StoreError>>) {
    let started = Instant::now();
    let res = op.await;
    let took = started.elapsed();
    match res {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Unavailable, "{what}: {e}"),
        Ok(v) => panic!("{what} answered {v:?} with the server down"),
    }
    assert!(took <= TIMEOUT + SLACK, "{what} took {took:?} to fail, over the {TIMEOUT:?} timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_fail_fast_during_an_outage_and_recover_after() {
    let Some(mut server) = PrivateServer::start() else { return };
    let url = server.url();
    let store = RedisStore::connect_with_timeout(&url, TIMEOUT).await.expect("redis answers").with_prefix("outage");
    let Claim::Acquired(lease) = store.claim(&key(1), &fp(1), LEASE).await.expect("claim") else {
        panic!("a fresh key is acquired")
    };
    let head = LiveHead { status: 200, headers: Vec::new() };
    assert!(store.live_begin(&lease, &head).await.expect("live_begin"));
    // A waiter subscribed before the outage is woken by the lost connection, so
    // that it re-reads instead of waiting out its poll.
    let waiting = store.watch(&key(2));
    until_subscribed(&url, "outage", &key(2)).await;
    // A waiter that stays through the outage keeps its channel subscribed: after the
    // reconnection the subscription is restored without anyone asking again.
    let held = store.watch(&key(6));
    until_subscribed(&url, "outage", &key(6)).await;

    server.kill();
    tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("losing the connection wakes waiters");
    let response = sample_response(now());
    let chunks = [Bytes::from_static(b"data: x\n\n")];
    // Twice over: the first attempt finds the connection broken, the second finds
    // nothing to reconnect to.
    for _ in 0..2 {
        unavailable("claim", store.claim(&key(3), &fp(3), LEASE)).await;
        unavailable("renew", store.renew(&lease, LEASE)).await;
        unavailable("complete", store.complete(&lease, &response, TTL)).await;
        unavailable("release", store.release(&lease)).await;
        unavailable("get", store.get(&key(1))).await;
        unavailable("purge", store.purge(&key(1))).await;
        unavailable("sweep", store.sweep(10)).await;
        unavailable("ping", store.ping()).await;
        unavailable("live_append", store.live_append(&lease, 0, &chunks)).await;
        unavailable("live_end", store.live_end(&lease, LiveEnd::Broken)).await;
        unavailable("live_read", store.live_read(&key(1), 0)).await;
    }
    // A watch taken during the outage is no error either; it is a hint.
    drop(store.watch(&key(4)));
    // A new store cannot connect, and says so as quickly.
    unavailable("connect", RedisStore::connect_with_timeout(&url, TIMEOUT)).await;

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = store.ping().await {
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(Instant::now() < deadline, "the store did not reconnect within 10 s: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The same store object works again. The restarted server kept nothing, so the
    // old lease is gone and the key is free.
    match store.complete(&lease, &response, TTL).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Conflict, "{e}"),
        Ok(()) => panic!("a lease the server forgot completed"),
    }
    let Claim::Acquired(lease) = store.claim(&key(1), &fp(1), LEASE).await.expect("claim") else {
        panic!("the key is free again")
    };
    store.complete(&lease, &response, TTL).await.expect("complete");
    assert_eq!(store.claim(&key(1), &fp(1), LEASE).await.expect("claim"), Claim::Completed(Box::new(response.clone())));

    // Wake-ups from other processes work again: the subscription connection is back,
    // with the channel it held before the outage.
    let other = RedisStore::connect(&url).await.expect("redis answers").with_prefix("outage");
    let Claim::Acquired(lease) = other.claim(&key(6), &fp(6), LEASE).await.expect("claim") else {
        panic!("a fresh key is acquired")
    };
    let woken = store.watch(&key(6));
    until_subscribed(&url, "outage", &key(6)).await;
    other.complete(&lease, &response, TTL).await.expect("complete");
    tokio::time::timeout(Duration::from_secs(5), woken).await.expect("a complete elsewhere wakes the watcher");
    drop(held);
    let Claim::Acquired(lease) = other.claim(&key(5), &fp(5), LEASE).await.expect("claim") else {
        panic!("a fresh key is acquired")
    };
    let woken = store.watch(&key(5));
    until_subscribed(&url, "outage", &key(5)).await;
    other.complete(&lease, &response, TTL).await.expect("complete");
    tokio::time::timeout(Duration::from_secs(5), woken).await.expect("a complete elsewhere wakes the watcher");
}
