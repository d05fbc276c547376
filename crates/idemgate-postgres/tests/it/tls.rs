//! TLS: `sslmode=require` really negotiates TLS and verifies the server's
//! certificate (the test server's is self-signed, so it is refused), while
//! `prefer` connects in plain text rather than encrypting without verification.

use std::error::Error as _;

use idemgate::{Claim, ErrorKind, Store};
use idemgate_postgres::PostgresStore;
use idemgate_testkit::{fp, key};

use crate::scratch::Scratch;

/// The error and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn require_verifies_the_certificate_and_prefer_is_plain_text() {
    let Some(scratch) = Scratch::new("require_verifies_the_certificate_and_prefer_is_plain_text") else { return };
    let admin = scratch.admin().await;
    let ssl: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);

    let app = "idemgate-tls-require";
    let refused = PostgresStore::builder()
        .with_schema(scratch.schema())
        .connect(&format!("{}&sslmode=require", scratch.url(app)))
        .await
        .expect_err("an unverifiable server is refused");
    assert_eq!(refused.kind(), ErrorKind::Unavailable);
    let why = chain(&refused);
    if ssl == "on" {
        // The handshake ran, and rustls refused the self-signed certificate.
        assert!(why.contains("certificate"), "{why}");
    } else {
        assert!(why.to_lowercase().contains("tls"), "{why}");
    }
    assert!(refused.source().is_some());

    let app = "idemgate-tls-prefer";
    let store = PostgresStore::builder()
        .with_schema(scratch.schema())
        .connect(&format!("{}&sslmode=prefer", scratch.url(app)))
        .await
        .expect("prefer connects");
    assert!(matches!(store.claim(&key(1), &fp(1), std::time::Duration::from_secs(30)).await, Ok(Claim::Acquired(_))));
    let encrypted: Vec<bool> = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!encrypted.is_empty() && encrypted.iter().all(|&tls| !tls), "prefer sessions: {encrypted:?}");
}
