//! `rediss://`: the store speaks TLS with rustls (ring) and trusts the webpki roots
//! only, so a server whose certificate chains to none of them is refused, never
//! talked to in plain text.

use std::time::{Duration, Instant};

use idemgate::ErrorKind;
use idemgate_redis::RedisStore;

use crate::support::PrivateServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused() {
    let Some(server) = PrivateServer::start_tls() else { return };
    // The server does speak TLS (redis-cli trusts its certificate explicitly).
    let cli = std::process::Command::new("redis-cli")
        .args(["--tls", "--cacert"])
        .arg(server.dir().join("cert.pem"))
        .args(["-h", "127.0.0.1", "-p", &server.port().to_string(), "ping"])
        .output()
        .expect("redis-cli runs");
    assert_eq!(String::from_utf8_lossy(&cli.stdout).trim(), "PONG", "the test server answers over TLS");

    let started = Instant::now();
    let err = RedisStore::connect_with_timeout(&server.url(), Duration::from_secs(1)).await.expect_err("self-signed");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let why = std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default();
    assert!(why.contains("certificate"), "refused for its certificate, not for something else: {why}");
    assert!(started.elapsed() < Duration::from_secs(3), "refused quickly");
    // Plain text to a TLS port gets nowhere either.
    let plain = server.url().replacen("rediss://", "redis://", 1);
    let err = RedisStore::connect_with_timeout(&plain, Duration::from_secs(1)).await.expect_err("plain text");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}
