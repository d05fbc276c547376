//! A private CA and a server certificate it signed, for TLS tests against real
//! servers: made by the `openssl` CLI (which CI installs), valid for two days.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A self-signed CA certificate (P-256, valid to 2126), for tests that read CA files
/// without a server to trust it on.
pub const TEST_CA_PEM: &str = include_str!("../../idemgate/tests/fixtures/test-ca.pem");

/// A PEM file that holds a private key and no certificate.
pub const NOT_A_CERTIFICATE_PEM: &str = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";

/// The files a test of a URL option naming a CA file (PostgreSQL's `sslrootcert`,
/// Redis's `cacert`) reads, written by [`ca_files`].
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// [`TEST_CA_PEM`]'s file, at a path with a space, spelt `%20` as a URL carries it.
    pub in_url: String,
    /// The other files, each with a word of the error that refuses it: one that does
    /// not exist, and one that holds no certificate.
    pub refused: [(String, &'static str); 2],
}

/// Writes [`CaFiles`] into `dir`.
pub fn ca_files(dir: &Path) -> CaFiles {
    let ca = dir.join("ca bundle.pem");
    std::fs::write(&ca, TEST_CA_PEM).expect("write the CA file");
    let key = dir.join("key.pem");
    std::fs::write(&key, NOT_A_CERTIFICATE_PEM).expect("write the key file");
    let missing = dir.join("missing.pem");
    CaFiles {
        in_url: ca.display().to_string().replace(' ', "%20"),
        refused: [
            (missing.display().to_string(), "missing.pem"),
            (key.display().to_string(), "holds no PEM certificate"),
        ],
    }
}

/// The PEM files in the directory given to [`make`].
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA's certificate: what a client trusts.
    pub ca: PathBuf,
    /// The server's certificate, for `127.0.0.1` (an IP SAN), signed by the CA.
    pub leaf: PathBuf,
    /// The server certificate's private key (PKCS#8, P-256).
    pub key: PathBuf,
}

/// Makes a CA and a certificate for `127.0.0.1` signed by it in `dir`. Panics if
/// `openssl` fails: a test that needs them cannot go on.
pub fn make(dir: &Path) -> TestPki {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca = ["-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=idemgate test CA", "-days", "2"];
    run(&[&["req", "-x509"][..], &ec, &ca].concat());
    run(&[&["req"][..], &ec, &["-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=127.0.0.1"]].concat());
    std::fs::write(dir.join("leaf.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write");
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    TestPki { ca: dir.join("ca.pem"), leaf: dir.join("leaf.pem"), key: dir.join("leaf.key") }
}

impl TestPki {
    /// A rustls server configuration presenting the leaf certificate (`ring`, no
    /// client authentication), for a TLS listener in a test.
    pub fn server_config(&self) -> std::sync::Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let chain = vec![CertificateDer::from_pem_file(&self.leaf).expect("the leaf certificate")];
        let key = PrivateKeyDer::from_pem_file(&self.key).expect("the leaf key");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("a server configuration");
        std::sync::Arc::new(config)
    }
}
