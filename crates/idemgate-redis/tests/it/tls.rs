//! `rediss://`: the store speaks TLS with rustls (ring) and trusts the webpki roots,
//! or only the CA certificates `cacert` names, so a server whose certificate chains
//! to none of them is refused, never talked to in plain text.

use std::time::{Duration, Instant};

use idemgate::{Claim, ErrorKind, Store, StoredResponse, Timestamp};
use idemgate_redis::RedisStore;
use idemgate_testkit::{fp, key};

use crate::support::{PrivateServer, fresh_prefix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused() {
    let Some(server) = PrivateServer::start_tls() else { return };
    // The server does speak TLS (redis-cli trusts its certificate explicitly).
    let cli = std::process::Command::new("redis-cli")
        .args(["--tls", "--cacert"])
        .arg(server.dir().join("ca.pem"))
        .args(["-h", "127.0.0.1", "-p", &server.port().to_string(), "ping"])
        .output()
        .expect("redis-cli runs");
    assert_eq!(String::from_utf8_lossy(&cli.stdout).trim(), "PONG", "the test server answers over TLS");

    let started = Instant::now();
    let err = RedisStore::connect_with_timeout(&server.url(), Duration::from_secs(1)).await.expect_err("a private CA");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let why = std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default();
    assert!(why.contains("certificate"), "refused for its certificate, not for something else: {why}");
    assert!(started.elapsed() < Duration::from_secs(3), "refused quickly");
    // Plain text to a TLS port gets nowhere either.
    let plain = server.url().replacen("rediss://", "redis://", 1);
    let err = RedisStore::connect_with_timeout(&plain, Duration::from_secs(1)).await.expect_err("plain text");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_private_ca_named_by_cacert_is_trusted_instead_of_the_public_roots() {
    let Some(server) = PrivateServer::start_tls() else { return };
    let ca = server.dir().join("ca.pem");
    let url = format!("{}/?cacert={}", server.url(), ca.display());
    let store = RedisStore::connect_with_timeout(&url, Duration::from_secs(2))
        .await
        .expect("the private CA is trusted")
        .with_prefix(fresh_prefix());
    // Commands, and the subscription connection's wake-ups, both over TLS.
    let Ok(Claim::Acquired(lease)) = store.claim(&key(1), &fp(1), Duration::from_secs(30)).await else {
        panic!("a fresh key is acquired");
    };
    let woken = store.watch(&key(1));
    let now = Timestamp::from_system_time(std::time::SystemTime::now());
    let response = StoredResponse::new(200, Vec::new(), vec![bytes::Bytes::from_static(b"ok")], now);
    store.complete(&lease, &response, Duration::from_secs(60)).await.expect("complete");
    tokio::time::timeout(Duration::from_secs(2), woken).await.expect("the waiter is woken over the TLS subscription");
    assert!(matches!(store.claim(&key(1), &fp(1), Duration::from_secs(30)).await, Ok(Claim::Completed(_))));

    // Another CA: refused in the handshake.
    let other = tempfile::tempdir().expect("a temporary directory");
    let other = idemgate_testkit::pki::make(other.path());
    let url = format!("{}/?cacert={}", server.url(), other.ca.display());
    let err = RedisStore::connect_with_timeout(&url, Duration::from_secs(1)).await.expect_err("another CA");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let why = std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default();
    assert!(why.contains("certificate"), "refused for its certificate: {why}");

    // A file that holds no certificate: refused before connecting, naming it.
    let err = RedisStore::connect(&format!("{}/?cacert={}", server.url(), server.dir().join("leaf.key").display()))
        .await
        .expect_err("a key is no CA");
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(format!("{err}: {:?}", std::error::Error::source(&err)).contains("leaf.key"), "{err}");
}
