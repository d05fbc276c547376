//! Lost connections and outages: the store answers `Unavailable` within its
//! timeouts (never hangs, never panics) and works again once the server is back,
//! without being rebuilt; its listener listens again, so waiters are woken again.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use idemgate::{Claim, Clock, ErrorKind, Lease, Store, StoreError, SystemClock};
use idemgate_postgres::PostgresStore;
use idemgate_testkit::{fp, key, sample_response};

use crate::proxy::{Mode, Proxy};
use crate::scratch::Scratch;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

async fn acquire(store: &dyn Store, n: u64) -> Lease {
    match store.claim(&key(n), &fp(n), LEASE).await.expect("claim answers") {
        Claim::Acquired(lease) => lease,
        other => panic!("expected Acquired for key {n}, got {other:?}"),
    }
}

#[track_caller]
fn assert_unavailable<T: std::fmt::Debug>(res: Result<T, StoreError>, what: &str) {
    match res {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Unavailable, "{what}: {e}"),
        Ok(v) => panic!("{what}: expected Unavailable, got Ok({v:?})"),
    }
}

/// How many sessions named `app` the server has, and how many of them last ran
/// `LISTEN` (the listener, once it listens).
async fn sessions(admin: &tokio_postgres::Client, app: &str) -> (i64, i64) {
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE query LIKE 'LISTEN %') FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&app],
        )
        .await
        .expect("pg_stat_activity reads");
    (row.get(0), row.get(1))
}

/// Waits until the listener of the store named `app` listens again.
async fn until_listening(admin: &tokio_postgres::Client, app: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions(admin, app).await.1 == 0 {
        assert!(Instant::now() < deadline, "the listener of {app} did not listen again within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server shows the LISTEN a moment before the listener has read its answer.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Asserts that a change on `other` wakes a waiter on `store` promptly.
async fn assert_woken_by(store: &dyn Store, other: &dyn Store, n: u64) {
    let lease = acquire(other, n).await;
    let woken = store.watch(&key(n));
    let started = Instant::now();
    other.complete(&lease, &sample_response(SystemClock.now()), TTL).await.expect("the other store completes");
    tokio::time::timeout(Duration::from_secs(1), woken).await.expect("the listener wakes the waiter");
    assert!(started.elapsed() < Duration::from_millis(250), "woken after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_sessions_are_replaced_and_the_listener_listens_again() {
    let Some(scratch) = Scratch::new("terminated_sessions_are_replaced_and_the_listener_listens_again") else { return };
    let app = format!("idemgate-terminate-{}", std::process::id());
    let store = scratch.store(&app).await;
    let other = scratch.store("idemgate-terminate-other").await;
    let admin = scratch.admin().await;

    // Open a few pooled sessions besides the listener's.
    let keys: Vec<_> = (0..6).map(|n| (key(n), fp(n))).collect();
    let warm: Vec<_> = keys.iter().map(|(k, f)| store.claim(k, f, LEASE)).collect();
    for claim in futures_util::future::join_all(warm).await {
        assert!(matches!(claim, Ok(Claim::Acquired(_))), "{claim:?}");
    }
    let (open, listening) = sessions(&admin, &app).await;
    assert!(open >= 2 && listening == 1, "{open} sessions, {listening} listening");
    let waiting = store.watch(&key(999));

    let killed: i64 = admin
        .query_one("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", &[&app])
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, open, "every session of the store was terminated");

    // Right after: each operation either works on a fresh session or says the store
    // is unavailable; none hangs or panics.
    let mut worked = 0;
    for n in 100..110 {
        match store.claim(&key(n), &fp(n), LEASE).await {
            Ok(Claim::Acquired(_)) => worked += 1,
            Ok(other) => panic!("a fresh key answered {other:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}"),
        }
    }
    assert!(worked > 0, "the pool replaced its terminated sessions");
    // And from then on, everything works.
    for n in 200..210 {
        let lease = acquire(&store, n).await;
        store.complete(&lease, &sample_response(SystemClock.now()), TTL).await.expect("complete works again");
    }
    store.ping().await.expect("ping works again");

    until_listening(&admin, &app).await;
    // A waiter from before the loss is woken once the listener is back: it may have
    // missed a change meanwhile.
    tokio::time::timeout(Duration::from_secs(1), waiting).await.expect("listening again wakes every waiter");
    assert_woken_by(&store, &other, 300).await;
    assert_woken_by(&store, &other, 301).await;
}

/// The server's address in `url`, and the `host[:port]` text naming it there.
fn split_authority(url: &str) -> Option<(SocketAddr, String)> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let with_port = if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5432") };
    let addr = with_port.to_socket_addrs().ok()?.next()?;
    Some((addr, host_port.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_fails_within_the_timeout_and_the_store_recovers() {
    let Some(scratch) = Scratch::new("an_outage_fails_within_the_timeout_and_the_store_recovers") else { return };
    let admin = scratch.admin().await;
    const TIMEOUT: Duration = Duration::from_millis(300);
    // A connection wait and a statement, each bounded by the timeout, plus slack for
    // a loaded machine.
    const BOUND: Duration = Duration::from_millis(2 * 300 + 500);
    let app = format!("idemgate-outage-{}", std::process::id());
    let url = scratch.url(&app);
    let Some((upstream, host_port)) = split_authority(&url) else {
        eprintln!("SKIPPED an_outage_fails_within_the_timeout_and_the_store_recovers: no TCP address in the test URL");
        return;
    };
    // The same server, reached through the proxy, with a short timeout.
    let proxy = Proxy::start(upstream).await;
    let url = url.replacen(&host_port, &proxy.addr().to_string(), 1);
    let store = PostgresStore::builder()
        .with_schema(scratch.schema())
        .with_timeout(TIMEOUT)
        .connect(&url)
        .await
        .expect("the store connects through the proxy");
    let direct = scratch.store("idemgate-outage-direct").await;
    let lease = acquire(&store, 1).await;
    store.complete(&lease, &sample_response(SystemClock.now()), TTL).await.unwrap();

    // A dead network path: nothing answers, nothing closes. Each operation gives up
    // within its timeouts (a pooled session that hangs, or a new one that does not
    // open), never later.
    proxy.set(Mode::Blackhole);
    for n in 10..14 {
        let started = Instant::now();
        assert_unavailable(store.claim(&key(n), &fp(n), LEASE).await, "a claim across a dead path");
        let took = started.elapsed();
        assert!(took < BOUND, "the claim gave up after {took:?}");
    }
    let started = Instant::now();
    assert_unavailable(store.ping().await, "a ping across a dead path");
    assert!(started.elapsed() < BOUND, "the ping gave up after {:?}", started.elapsed());

    // The server is down: connections reset, new ones refused.
    proxy.set(Mode::Cut);
    for n in 20..24 {
        let started = Instant::now();
        assert_unavailable(store.claim(&key(n), &fp(n), LEASE).await, "a claim while the server is down");
        assert!(started.elapsed() < BOUND, "the claim gave up after {:?}", started.elapsed());
    }
    assert_unavailable(store.get(&key(1)).await, "a read while the server is down");

    // Back: the same store works again, at once.
    proxy.set(Mode::Pass);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.ping().await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}"),
            Err(e) => panic!("the store did not recover within 5 s: {e}"),
        }
    }
    for n in 30..40 {
        let lease = acquire(&store, n).await;
        store.complete(&lease, &sample_response(SystemClock.now()), TTL).await.expect("complete works again");
    }
    assert!(matches!(store.claim(&key(1), &fp(1), LEASE).await, Ok(Claim::Completed(_))), "data survived");

    // The listener backed off during the outage; it listens again within its
    // longest backoff, and then wakes waiters as before.
    until_listening(&admin, &app).await;
    assert_woken_by(&store, &direct, 50).await;
    assert_woken_by(&store, &direct, 51).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_the_last_handle_closes_every_session() {
    let Some(scratch) = Scratch::new("dropping_the_last_handle_closes_every_session") else { return };
    let app = format!("idemgate-drop-{}", std::process::id());
    let store = scratch.store(&app).await;
    let admin = scratch.admin().await;
    let clone = store.clone();
    acquire(&clone, 1).await;
    drop(store);
    // A clone keeps the pool and the listener.
    clone.ping().await.expect("the clone still works");
    let (open, listening) = sessions(&admin, &app).await;
    assert!(open >= 2 && listening == 1, "{open} sessions, {listening} listening");

    drop(clone);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sessions(&admin, &app).await.0 > 0 {
        assert!(Instant::now() < deadline, "the store's sessions outlived it by 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
