//! CA certificate files, for the TLS clients that trust a private CA: the upstream
//! client (`upstream-ca-file`), PostgreSQL (`sslrootcert`) and Redis (`cacert`).
//! Available with the `tls` feature.

use std::path::{Path, PathBuf};

pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// The certificates of the PEM file at `path`, each checked to be usable as a trust
/// anchor, so that a wrong file stops a start with its reason rather than failing
/// every handshake later. The error names the file and what is wrong with it.
pub fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    ca_certificates_in(&pem, path)
}

/// [`ca_certificates`] of PEM text already read from `path` (for a client that wants
/// the text itself).
pub fn ca_certificates_in(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bad = |problem: String| format!("{}: {problem}", path.display());
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots.add(cert.clone()).map_err(|e| bad(format!("certificate {} cannot be a trust anchor: {e}", i + 1)))?;
    }
    Ok(certs)
}

/// The path a URL query value names: percent-decoded (`%20` for a space), not empty,
/// and UTF-8 once decoded.
pub fn path_in_url(value: &str) -> Result<PathBuf, String> {
    let decoded = percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map_err(|_| "the path is not UTF-8 once its %-escapes are decoded".to_owned())?;
    if decoded.is_empty() {
        return Err("needs a path".to_owned());
    }
    Ok(PathBuf::from(decoded.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA (P-256, valid to 2126), made with `openssl req -x509`.
    const CA: &str = include_str!("../tests/fixtures/test-ca.pem");

    #[test]
    fn a_file_of_ca_certificates_is_read_whole_or_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("idemgate-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        assert_eq!(ca_certificates(&file("two.pem", &format!("comments are skipped\n{CA}{CA}"))).unwrap().len(), 2);
        let refused = |path: PathBuf, why: &str| {
            let err = ca_certificates(&path).unwrap_err();
            assert!(err.starts_with(&path.display().to_string()) && err.contains(why), "{err}");
        };
        refused(dir.join("missing.pem"), "No such file");
        refused(file("empty.pem", "no certificates here\n"), "holds no PEM certificate");
        refused(file("key.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), "holds no PEM");
        refused(
            file("bad.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "certificate 1 cannot",
        );
        refused(file("cut.pem", &CA[..CA.len() - 30]), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn paths_in_urls_are_decoded_and_checked() {
        assert_eq!(path_in_url("/etc/ca%20bundle.pem").unwrap(), PathBuf::from("/etc/ca bundle.pem"));
        assert_eq!(path_in_url("/a%25b").unwrap(), PathBuf::from("/a%b"));
        assert_eq!(path_in_url("").unwrap_err(), "needs a path");
        assert!(path_in_url("/a%FF").unwrap_err().contains("not UTF-8"));
    }
}
