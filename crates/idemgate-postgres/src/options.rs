//! The connection URL: what tokio-postgres reads, plus the options idemgate adds.
//!
//! `postgres://user[:password]@host[:port]/dbname[?option=value&...]` (or
//! `postgresql://`). The options tokio-postgres knows (`sslmode`, `application_name`,
//! `connect_timeout`, ...) go to it unchanged; idemgate takes out its own (`schema`,
//! `pool_size`, `timeout_ms`) and libpq's `sslrootcert`, which tokio-postgres lacks,
//! first, because tokio-postgres refuses options it does not know. Error messages
//! never repeat the URL: it may carry a password.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use idemgate::StoreError;
use idemgate::tls::CertificateDer;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The options of one store, from its URL and the builder.
#[derive(Clone)]
pub(crate) struct Options {
    /// The connection settings tokio-postgres uses, for the pool and the listener.
    pub(crate) pg: tokio_postgres::Config,
    /// The schema of the tables; `None` uses the connection's `search_path`.
    pub(crate) schema: Option<String>,
    /// The most connections the pool opens.
    pub(crate) pool_size: usize,
    /// The bound on each step of an operation: waiting for a connection, opening one,
    /// and running the statement.
    pub(crate) timeout: Duration,
    /// The certificates of `sslrootcert`, trusted instead of the Mozilla roots.
    roots: Option<Vec<CertificateDer<'static>>>,
}

/// The pool size when the URL and the builder name none.
pub(crate) const DEFAULT_POOL_SIZE: usize = 16;
/// The operation timeout when the URL and the builder name none.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The `application_name` the gateway's sessions carry unless the URL names one.
const DEFAULT_APPLICATION_NAME: &str = "idemgate";
/// The longest schema name: the notification channel `idemgate.<schema>` must stay
/// within PostgreSQL's 63-byte identifiers.
const MAX_SCHEMA_LEN: usize = 50;

impl Options {
    /// Parses `url`; see the module docs for the format.
    pub(crate) fn parse(url: &str) -> Result<Self, StoreError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid("the postgres url must start with postgres:// or postgresql://"));
        };
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(invalid(format!(
                "the postgres url has scheme {scheme:?}; expected postgres:// or postgresql://"
            )));
        }
        let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut schema = None;
        let mut pool_size = None;
        let mut timeout = None;
        let mut tls = false;
        let mut roots = None;
        let mut kept = Vec::new();
        // Names and values are read as tokio-postgres reads them, percent-decoded:
        // `sslmode=requir%65` is `require` to it, and must be to this check too.
        let decoded = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        let mut seen_tls_options = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let (name, value) = (decoded(raw_name), decoded(raw_value));
            // Given twice, one would win, and which is a guess: refused, even when both
            // say the same.
            if matches!(name.as_str(), "sslmode" | "sslrootcert") {
                if seen_tls_options.contains(&name) {
                    return Err(invalid(format!("{name} appears more than once in the postgres url")));
                }
                seen_tls_options.push(name.clone());
            }
            match (name.as_str(), value.as_str()) {
                ("schema", value) => schema = Some(value.to_owned()),
                ("pool_size", value) => {
                    let n = value.parse::<usize>().ok().filter(|&n| n > 0);
                    pool_size =
                        Some(n.ok_or_else(|| invalid("pool_size in the postgres url must be a number above 0"))?);
                }
                ("timeout_ms", value) => {
                    let ms = value.parse::<u64>().ok().filter(|&ms| ms > 0);
                    let ms = ms.ok_or_else(|| invalid("timeout_ms in the postgres url must be a number above 0"))?;
                    timeout = Some(Duration::from_millis(ms));
                }
                // rustls always verifies the certificate and the host name, which is
                // what libpq calls verify-full; tokio-postgres only knows `require`.
                ("sslmode", "require" | "verify-ca" | "verify-full") => {
                    tls = true;
                    kept.push("sslmode=require".to_owned());
                }
                // libpq's `system` (16+) names the default roots.
                ("sslrootcert", "system") => roots = None,
                ("sslrootcert", _) => {
                    // Decoded by `path_in_url` itself, from the text as written.
                    let certs = idemgate::tls::path_in_url(raw_value)
                        .and_then(|path| idemgate::tls::ca_certificates(&path))
                        .map_err(|e| invalid(format!("sslrootcert in the postgres url: {e}")))?;
                    roots = Some(certs);
                }
                _ => kept.push(pair.to_owned()),
            }
        }
        let rebuilt = if kept.is_empty() {
            format!("{scheme}://{base}")
        } else {
            format!("{scheme}://{base}?{}", kept.join("&"))
        };
        let mut pg = tokio_postgres::Config::from_str(&rebuilt)
            .map_err(|e| StoreError::invalid("the postgres url is not valid", e))?;
        if roots.is_some() && !tls {
            return Err(invalid(
                "sslrootcert in the postgres url needs sslmode=require, verify-ca or verify-full: without it the \
                 connection is plain text and the certificates would go unused",
            ));
        }
        if !tls {
            // `prefer`, tokio-postgres' default, would try TLS with a verifying
            // connector and fail on the self-signed certificates `prefer` is meant to
            // tolerate: without an explicit `require`, connect in plain text.
            pg.ssl_mode(SslMode::Disable);
        }
        if pg.get_application_name().is_none() {
            pg.application_name(DEFAULT_APPLICATION_NAME);
        }
        let mut options = Self {
            pg,
            schema: None,
            pool_size: pool_size.unwrap_or(DEFAULT_POOL_SIZE),
            timeout: DEFAULT_TIMEOUT,
            roots,
        };
        if let Some(schema) = schema {
            options.set_schema(schema)?;
        }
        if let Some(timeout) = timeout {
            options.set_timeout(timeout);
        } else {
            options.default_connect_timeout();
        }
        Ok(options)
    }

    /// Puts the tables in `schema`, after checking that it is a plain lowercase name.
    pub(crate) fn set_schema(&mut self, schema: String) -> Result<(), StoreError> {
        let mut bytes = schema.bytes();
        let plain = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && schema.len() <= MAX_SCHEMA_LEN
            && !schema.starts_with("pg_");
        if !plain {
            return Err(invalid(format!(
                "postgres schema {schema:?} must be 1 to {MAX_SCHEMA_LEN} lowercase letters, digits and \
                 underscores, not starting with a digit or pg_"
            )));
        }
        self.schema = Some(schema);
        Ok(())
    }

    /// Sets the operation timeout, and the connect timeout unless the URL set one.
    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.max(Duration::from_millis(1));
        self.default_connect_timeout();
    }

    fn default_connect_timeout(&mut self) {
        if self.pg.get_connect_timeout().is_none_or(|&t| t > self.timeout) {
            self.pg.connect_timeout(self.timeout);
        }
    }

    /// The TLS connector: used only when the URL asked for TLS (otherwise the
    /// `sslmode` is `disable` and tokio-postgres never calls it). rustls with the
    /// `ring` provider and the Mozilla roots, or `sslrootcert`'s certificates instead
    /// (as libpq does), set here rather than process-wide so that no other crate's
    /// provider choice can interfere.
    pub(crate) fn tls_connector(&self) -> Result<MakeRustlsConnect, StoreError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &self.roots {
            None => rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
            Some(certs) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(certs.iter().cloned());
                roots
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::unavailable("postgres cannot set up TLS", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    /// The channel that `pg_notify` and `LISTEN` use: one per schema, so that stores
    /// in other schemas of the database do not wake each other.
    pub(crate) fn channel(&self) -> String {
        match &self.schema {
            Some(schema) => format!("idemgate.{schema}"),
            None => "idemgate".to_owned(),
        }
    }
}

fn invalid(message: impl Into<String>) -> StoreError {
    let message = message.into();
    StoreError::invalid(message.clone(), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_out_its_own_options_and_passes_the_rest() {
        let o = Options::parse(
            "postgres://app:secret@db.internal:6543/idem?schema=gw_1&application_name=gw&pool_size=4&timeout_ms=250",
        )
        .unwrap();
        assert_eq!(o.schema.as_deref(), Some("gw_1"));
        assert_eq!(o.pool_size, 4);
        assert_eq!(o.timeout, Duration::from_millis(250));
        assert_eq!(o.pg.get_application_name(), Some("gw"));
        assert_eq!(o.pg.get_dbname(), Some("idem"));
        assert_eq!(o.pg.get_user(), Some("app"));
        assert_eq!(o.pg.get_ports(), [6543]);
        assert_eq!(o.pg.get_connect_timeout(), Some(&Duration::from_millis(250)));
        assert_eq!(o.pg.get_ssl_mode(), SslMode::Disable);
        assert_eq!(o.channel(), "idemgate.gw_1");
    }

    #[test]
    fn defaults() {
        let o = Options::parse("postgresql://postgres@127.0.0.1/test").unwrap();
        assert_eq!(o.schema, None);
        assert_eq!(o.pool_size, DEFAULT_POOL_SIZE);
        assert_eq!(o.timeout, DEFAULT_TIMEOUT);
        assert_eq!(o.pg.get_application_name(), Some("idemgate"));
        assert_eq!(o.pg.get_connect_timeout(), Some(&DEFAULT_TIMEOUT));
        assert_eq!(o.channel(), "idemgate");
    }

    #[test]
    fn tls_only_when_required() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let o = Options::parse(&format!("postgres://u@h/db?sslmode={mode}")).unwrap();
            assert_eq!(o.pg.get_ssl_mode(), SslMode::Require, "{mode}");
        }
        for mode in ["disable", "prefer"] {
            let o = Options::parse(&format!("postgres://u@h/db?sslmode={mode}")).unwrap();
            assert_eq!(o.pg.get_ssl_mode(), SslMode::Disable, "{mode}");
        }
        assert!(Options::parse("postgres://u@h/db?sslmode=require").unwrap().tls_connector().is_ok());
    }

    #[test]
    fn refuses_bad_urls_without_echoing_them() {
        for url in [
            "redis://h/db",
            "h:5432/db",
            "postgres://u:hunter2@h/db?schema=Bad",
            "postgres://u:hunter2@h/db?schema=pg_catalog",
            "postgres://u:hunter2@h/db?schema=1abc",
            "postgres://u:hunter2@h/db?schema=",
            "postgres://u:hunter2@h/db?pool_size=0",
            "postgres://u:hunter2@h/db?timeout_ms=soon",
            "postgres://u:hunter2@h/db?no_such_option=1",
            "postgres://u:hunter2@h/db?sslmode=sometimes",
        ] {
            let Err(e) = Options::parse(url) else { panic!("{url} parses") };
            let shown = format!("{e} {:?}", std::error::Error::source(&e).map(ToString::to_string));
            assert!(!shown.contains("hunter2"), "{url}: {shown}");
        }
        let long = "a".repeat(MAX_SCHEMA_LEN + 1);
        assert!(Options::parse(&format!("postgres://u@h/db?schema={long}")).is_err());
    }

    #[test]
    fn sslrootcert_is_read_at_parse_time_and_needs_tls() {
        let dir = tempfile::tempdir().unwrap();
        let files = idemgate_testkit::pki::ca_files(dir.path());
        let ca = &files.in_url;
        let o = Options::parse(&format!("postgres://u@h/db?sslmode=verify-full&sslrootcert={ca}")).unwrap();
        assert_eq!(o.roots.as_ref().map(Vec::len), Some(1));
        assert_eq!(o.pg.get_ssl_mode(), SslMode::Require);
        assert!(o.tls_connector().is_ok());
        assert!(Options::parse("postgres://u@h/db?sslmode=require&sslrootcert=system").unwrap().roots.is_none());

        let refused = |url: String, why: &str| {
            let Err(e) = Options::parse(&url) else { panic!("{url} parses") };
            assert_eq!(e.kind(), idemgate::ErrorKind::Invalid);
            assert!(e.to_string().contains(why), "{url}: {e}");
        };
        refused(format!("postgres://u@h/db?sslrootcert={ca}"), "needs sslmode=require");
        refused(format!("postgres://u@h/db?sslmode=prefer&sslrootcert={ca}"), "needs sslmode=require");
        refused(format!("postgres://u@h/db?sslmode=require&sslmode=disable&sslrootcert={ca}"), "more than once");
        refused(format!("postgres://u@h/db?sslmode=require&ssl%6Dode=disable&sslrootcert={ca}"), "more than once");
        // An escaped value is read as tokio-postgres reads it.
        let o = Options::parse(&format!("postgres://u@h/db?sslmode=requir%65&sslrootcert={ca}")).unwrap();
        assert_eq!(o.pg.get_ssl_mode(), SslMode::Require);
        refused(format!("postgres://u@h/db?sslmode=require&sslrootcert={ca}&sslrootcert={ca}"), "more than once");
        refused("postgres://u@h/db?sslmode=require&sslrootcert=".into(), "needs a path");
        for (path, why) in &files.refused {
            refused(format!("postgres://u@h/db?sslmode=require&sslrootcert={path}"), why);
        }
    }

    #[test]
    fn a_connect_timeout_in_the_url_is_kept_when_shorter() {
        let o = Options::parse("postgres://u@h/db?connect_timeout=2").unwrap();
        assert_eq!(o.pg.get_connect_timeout(), Some(&Duration::from_secs(2)));
        let o = Options::parse("postgres://u@h/db?connect_timeout=60").unwrap();
        assert_eq!(o.pg.get_connect_timeout(), Some(&DEFAULT_TIMEOUT));
    }
}
