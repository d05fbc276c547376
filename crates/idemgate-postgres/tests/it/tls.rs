//! TLS: `sslmode=require` really negotiates TLS and verifies the server's
//! certificate (the test server's is self-signed, so it is refused), while
//! `prefer` connects in plain text rather than encrypting without verification;
//! `sslrootcert` trusts a private CA's certificates instead of the public roots.

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use idemgate::{Claim, ErrorKind, Store};
use idemgate_postgres::PostgresStore;
use idemgate_testkit::pki::{self, TestPki};
use idemgate_testkit::{fp, key};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// PostgreSQL's `SSLRequest`: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A TLS front for the test server, as a server with a certificate from a private CA
/// would be: it answers the client's `SSLRequest` with `S`, completes the handshake
/// with `pki`'s certificate for 127.0.0.1, then passes the session through to the
/// server in plain text. Counts the handshakes that completed.
async fn tls_front(server: String, pki: &TestPki) -> (String, Arc<AtomicUsize>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&handshakes);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (acceptor, server, counted) = (acceptor.clone(), server.clone(), Arc::clone(&counted));
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if socket.read_exact(&mut request).await.is_err() || request != SSL_REQUEST {
                    return;
                }
                if socket.write_all(b"S").await.is_err() {
                    return;
                }
                let Ok(mut tls) = acceptor.accept(socket).await else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(mut plain) = TcpStream::connect(&server).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, handshakes)
}

/// `url` with its host and port replaced by `addr`.
fn at(url: &str, addr: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a scheme");
    let (authority, path) = rest.split_once('/').expect("a database");
    let user = authority.rsplit_once('@').map(|(user, _)| format!("{user}@")).unwrap_or_default();
    format!("{scheme}://{user}{addr}/{path}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sslrootcert_trusts_a_private_ca_instead_of_the_public_roots() {
    let Some(scratch) = Scratch::new("sslrootcert_trusts_a_private_ca_instead_of_the_public_roots") else { return };
    let url = scratch.url("idemgate-tls-rootcert");
    let config: tokio_postgres::Config = url.parse().unwrap();
    let Some(tokio_postgres::config::Host::Tcp(host)) = config.get_hosts().first() else {
        panic!("the test server must be reached over TCP for this test: {:?}", config.get_hosts());
    };
    let server = format!("{host}:{}", config.get_ports().first().copied().unwrap_or(5432));
    let dir = tempfile::tempdir().unwrap();
    let (ours, other) = (dir.path().join("ours"), dir.path().join("other"));
    std::fs::create_dir_all(&ours).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let (pki, other) = (pki::make(&ours), pki::make(&other));
    let (front, handshakes) = tls_front(server, &pki).await;
    let through = at(&url, &front);
    let with = |options: &str| format!("{through}&{options}");
    let schema = scratch.schema().to_owned();
    let connect = |url: String| {
        let schema = schema.clone();
        async move { PostgresStore::builder().with_schema(schema).connect(&url).await }
    };

    // Trusting the private CA: the session runs over TLS, and the store works.
    let rootcert = format!("sslmode=verify-full&sslrootcert={}", pki.ca.display());
    let store = connect(with(&rootcert)).await.expect("the private CA is trusted");
    assert!(matches!(store.claim(&key(1), &fp(1), std::time::Duration::from_secs(30)).await, Ok(Claim::Acquired(_))));
    assert!(handshakes.load(Ordering::SeqCst) >= 1);
    drop(store);

    // The public roots (no sslrootcert), or another private CA: refused in the handshake.
    let before = handshakes.load(Ordering::SeqCst);
    for options in ["sslmode=require".to_owned(), format!("sslmode=require&sslrootcert={}", other.ca.display())] {
        let refused = connect(with(&options)).await.expect_err("a certificate from an untrusted CA");
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        let why = chain(&refused);
        assert!(why.contains("certificate"), "{options}: {why}");
    }
    assert_eq!(handshakes.load(Ordering::SeqCst), before, "no refused handshake completed");

    // A path with a space, escaped in the URL as libpq's users write it.
    let spaced = dir.path().join("with space.pem");
    std::fs::copy(&pki.ca, &spaced).unwrap();
    let escaped = spaced.display().to_string().replace(' ', "%20");
    let store = connect(with(&format!("sslmode=verify-full&sslrootcert={escaped}"))).await.expect("an escaped path");
    assert!(matches!(store.claim(&key(2), &fp(2), std::time::Duration::from_secs(30)).await, Ok(Claim::Acquired(_))));
}
