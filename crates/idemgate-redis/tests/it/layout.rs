//! What Redis holds for a key, read with a plain connection: the expiry safety nets,
//! the live log's linger, records this build cannot read, and prefixes that do not
//! see each other.

use std::time::Duration;

use bytes::Bytes;
use idemgate::store::{LIVE_LOG_LINGER, LiveEnd, LiveHead, STALE_IN_FLIGHT_GRACE};
use idemgate::{Claim, ErrorKind, StorageKey, Store, Timestamp};
use idemgate_redis::RedisStore;
use idemgate_testkit::{fp, key, sample_response};
use redis::Commands;

use crate::support::{cluster_url, nodes, single_url, store};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);
/// How far a `PTTL` may be off what the test computed (it counts down meanwhile).
const TOLERANCE_MS: i64 = 2000;

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// A plain connection to the node that holds `key`: the one server, or the cluster
/// node that answers for it (the others answer `MOVED`).
fn node_of(url: &str, key: &str) -> redis::Connection {
    for node in nodes(url) {
        let mut conn = redis::Client::open(node.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("a test node answers");
        let owned: redis::RedisResult<i64> = conn.exists(key);
        if owned.is_ok() {
            return conn;
        }
    }
    panic!("no node holds {key}")
}

fn rec(prefix: &str, k: &StorageKey, suffix: &str) -> String {
    format!("{{{prefix}:{}}}:{suffix}", k.to_hex())
}

#[track_caller]
fn assert_pttl(conn: &mut redis::Connection, key: &str, expected: Duration) {
    let pttl: i64 = conn.pttl(key).expect("PTTL answers");
    let expected = i64::try_from(expected.as_millis()).expect("a short duration");
    assert!((pttl - expected).abs() <= TOLERANCE_MS, "PTTL of {key} is {pttl} ms, expected about {expected} ms");
}

async fn redis_expires_what_it_holds(url: String) {
    let (store, _cleanup) = store(&url).await;
    let margin = Duration::from_secs(600);
    let (k, f) = (key(1), fp(1));
    let Claim::Acquired(lease) = store.claim(&k, &f, LEASE).await.expect("claim") else { panic!("acquired") };
    let name = rec(store.prefix(), &k, "rec");
    let mut conn = node_of(&url, &name);
    assert_pttl(&mut conn, &name, LEASE + STALE_IN_FLIGHT_GRACE + margin);

    let head = LiveHead { status: 200, headers: Vec::new() };
    assert!(store.live_begin(&lease, &head).await.expect("live_begin"));
    let chunk = Bytes::from_static(b"data: 1\n\n");
    store.live_append(&lease, 0, std::slice::from_ref(&chunk)).await.expect("live_append");
    // The log lives as long as the lease, and lingers after it.
    assert_pttl(&mut conn, &rec(store.prefix(), &k, "live"), LEASE + LIVE_LOG_LINGER);
    assert_pttl(&mut conn, &rec(store.prefix(), &k, "chunks"), LEASE + LIVE_LOG_LINGER);

    let response = sample_response(now());
    store.complete(&lease, &response, TTL).await.expect("complete");
    assert_pttl(&mut conn, &name, TTL + margin);
    // Chunks the owner queued before completing still reach the log.
    let last = Bytes::from_static(b"data: [DONE]\n\n");
    store.live_append(&lease, 1, std::slice::from_ref(&last)).await.expect("an append after complete");
    store.live_end(&lease, LiveEnd::Complete).await.expect("live_end");
    let read = store.live_read(&k, 0).await.expect("live_read").expect("the log is there");
    assert_eq!((read.chunks, read.end), (vec![chunk, last], Some(LiveEnd::Complete)));
    assert_pttl(&mut conn, &rec(store.prefix(), &k, "live"), LIVE_LOG_LINGER);
    assert_pttl(&mut conn, &rec(store.prefix(), &k, "chunks"), LIVE_LOG_LINGER);

    // Durations past what a Lua double holds exactly are capped, not overflowed.
    let Claim::Acquired(lease) = store.claim(&key(3), &fp(3), Duration::MAX).await.expect("claim") else {
        panic!("acquired")
    };
    let century = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    assert!(lease.lease_until > now() + (century - Duration::from_secs(60)), "{:?}", lease.lease_until);
    let until = store.renew(&lease, Duration::MAX).await.expect("renew");
    assert!(until >= lease.lease_until);
    store.complete(&lease, &response, Duration::MAX).await.expect("complete");
    assert_eq!(store.claim(&key(3), &fp(3), LEASE).await.expect("claim"), Claim::Completed(Box::new(response)));

    // An append that would leave a hole in the log is refused.
    let Claim::Acquired(lease) = store.claim(&key(2), &fp(2), LEASE).await.expect("claim") else { panic!("acquired") };
    assert!(store.live_begin(&lease, &head).await.expect("live_begin"));
    let err = store.live_append(&lease, 5, &[Bytes::from_static(b"x")]).await.expect_err("a gap");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_eq!(store.live_read(&key(2), 0).await.expect("live_read").map(|r| r.chunks), Some(Vec::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_redis_expires_what_it_holds() {
    if let Some(url) = single_url() {
        redis_expires_what_it_holds(url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_redis_expires_what_it_holds() {
    if let Some(url) = cluster_url() {
        redis_expires_what_it_holds(url).await;
    }
}

async fn unreadable_records_answer_corrupt(url: String) {
    let (store, _cleanup) = store(&url).await;
    let k = key(1);
    let name = rec(store.prefix(), &k, "rec");
    let mut conn = node_of(&url, &name);
    let _: () = conn.hset_multiple(&name, &[("state", "weird"), ("fp", "x")]).expect("HSET answers");
    for res in [store.claim(&k, &fp(1), LEASE).await.map(drop), store.get(&k).await.map(drop)] {
        assert_eq!(res.map_err(|e| e.kind()), Err(ErrorKind::Corrupt));
    }
    let _: () = conn.hset(&name, "state", "done").expect("HSET answers");
    let res = store.claim(&k, &fp(1), LEASE).await;
    assert_eq!(res.map_err(|e| e.kind()), Err(ErrorKind::Corrupt), "a completed record without expiry");
    // Purge clears it, and the key works again.
    assert!(store.purge(&k).await.expect("purge"));
    assert!(matches!(store.claim(&k, &fp(1), LEASE).await, Ok(Claim::Acquired(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_unreadable_records_answer_corrupt() {
    if let Some(url) = single_url() {
        unreadable_records_answer_corrupt(url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_unreadable_records_answer_corrupt() {
    if let Some(url) = cluster_url() {
        unreadable_records_answer_corrupt(url).await;
    }
}

async fn prefixes_do_not_see_each_other(url: String) {
    let (a, _cleanup_a) = store(&url).await;
    // A prefix that starts with the other's, the case a careless pattern would match;
    // set by the URL's `prefix` option, as the CLI's `--store` can.
    let b_prefix = format!("{}:b", a.prefix());
    let _cleanup_b = crate::support::Cleanup::new(&url, &b_prefix);
    let sep = if url.contains('?') { '&' } else { '?' };
    let b = RedisStore::connect(&format!("{url}{sep}prefix={b_prefix}")).await.expect("redis answers");
    assert_eq!(b.prefix(), b_prefix);
    let old = Timestamp::from_millis(now().as_millis() - 10_000);
    for store in [&a, &b] {
        let Claim::Acquired(lease) = store.claim(&key(1), &fp(1), LEASE).await.expect("claim") else {
            panic!("acquired")
        };
        store.complete(&lease, &sample_response(old), Duration::from_secs(1)).await.expect("complete");
    }
    assert_eq!(a.claim(&key(1), &fp(2), LEASE).await.map(|c| matches!(c, Claim::Acquired(_))).ok(), Some(true));
    assert!(b.get(&key(1)).await.expect("get").is_some(), "a claim under one prefix leaves the other's record");
    assert_eq!(a.sweep(100).await.expect("sweep"), 0, "the only record under a is live");
    assert_eq!(b.sweep(100).await.expect("sweep"), 1);
    assert_eq!(b.get(&key(1)).await.expect("get"), None);
    assert!(a.get(&key(1)).await.expect("get").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_prefixes_do_not_see_each_other() {
    if let Some(url) = single_url() {
        prefixes_do_not_see_each_other(url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_prefixes_do_not_see_each_other() {
    if let Some(url) = cluster_url() {
        prefixes_do_not_see_each_other(url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_names_and_urls() {
    if let Some(url) = single_url() {
        let (store, _cleanup) = store(&url).await;
        assert_eq!(store.backend(), "redis");
    }
    if let Some(url) = cluster_url() {
        let (store, _cleanup) = store(&url).await;
        assert_eq!(store.backend(), "redis-cluster");
    }
    for url in ["postgres://user:secret@127.0.0.1/db", "redis+cluster://", "127.0.0.1:6379"] {
        let err = RedisStore::connect(url).await.expect_err(url);
        assert_eq!(err.kind(), ErrorKind::Invalid, "a bad url is a setting to fix, not an outage");
        assert!(!format!("{err:#}").contains("secret"), "{err:#}");
    }
}
