//! What a store URL names: one server or the seed nodes of a cluster, and the CA
//! certificates a TLS connection trusts.
//!
//! `redis://` and `rediss://` (TLS) URLs go to the redis crate as they are; a
//! `redis+cluster://[user:pass@]h1:p1,h2:p2[/db][?query]` URL (or `rediss+cluster://`)
//! becomes one `redis://` URL per seed node, each with the same credentials and
//! options. idemgate's own query options are taken out first: `cacert=PATH`
//! (percent-encoded, as `%20` for a space), a PEM file of CA certificates that TLS
//! connections trust instead of the Mozilla roots, as `redis-cli --cacert` does; and
//! `prefix=NAME`, the namespace of every key (see `RedisStore::with_prefix`). An option
//! the redis crate would ignore is refused, `db`, `user` and `pass` included where it
//! reads them only for a Unix socket, and so is a `#fragment` (ignored by it, or failed
//! at connect). Errors never repeat the URL, which may carry a password.

use std::fmt;
use std::sync::Arc;

/// Where the store's data lives, and whom its TLS connections trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) nodes: Nodes,
    /// The PEM text of `cacert`: trusted instead of the Mozilla roots.
    pub(crate) root_cert: Option<Arc<[u8]>>,
    /// The key namespace `prefix` names, if any.
    pub(crate) prefix: Option<String>,
}

/// One server or a cluster's seed nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Nodes {
    /// One server.
    Single(String),
    /// A Redis Cluster, reached through these seed nodes.
    Cluster(Vec<String>),
}

/// A store URL that names no Redis, or a `cacert` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InvalidUrl(String);

impl fmt::Display for InvalidUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidUrl {}

fn invalid(message: impl Into<String>) -> InvalidUrl {
    InvalidUrl(message.into())
}

const SCHEMES: &str = "a redis store url starts with redis://, rediss:// or redis+cluster://";

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self, InvalidUrl> {
        let Some((scheme, _)) = url.split_once("://") else {
            return Err(invalid(SCHEMES));
        };
        // Before the options, whose checks depend on the scheme.
        if !matches!(scheme, "redis" | "rediss" | "redis+unix" | "unix" | "redis+cluster" | "rediss+cluster") {
            return Err(invalid(SCHEMES));
        }
        let Options { url, cacert, prefix } = Options::take(url, matches!(scheme, "redis+unix" | "unix"))?;
        let prefix = prefix.map(|p| key_prefix(&p)).transpose()?;
        let root_cert = match cacert {
            None => None,
            Some(_) if !matches!(scheme, "rediss" | "rediss+cluster") => {
                return Err(invalid(
                    "cacert in the redis store url needs rediss:// (or rediss+cluster://): without TLS the \
                     certificates would go unused",
                ));
            }
            Some(value) => Some(root_certificates(&value)?),
        };
        let rest = &url[scheme.len() + 3..];
        let node_scheme = match scheme {
            "redis" | "rediss" | "redis+unix" | "unix" => {
                return Ok(Self { nodes: Nodes::Single(url), root_cert, prefix });
            }
            "redis+cluster" => "redis",
            "rediss+cluster" => "rediss",
            _ => return Err(invalid(SCHEMES)),
        };
        let (authority, tail) = rest.find(['/', '?', '#']).map_or((rest, ""), |at| rest.split_at(at));
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((credentials, hosts)) => (Some(credentials), hosts),
            None => (None, authority),
        };
        let nodes: Vec<String> = hosts
            .split(',')
            .map(|host| match credentials {
                Some(c) => format!("{node_scheme}://{c}@{host}{tail}"),
                None => format!("{node_scheme}://{host}{tail}"),
            })
            .collect();
        if hosts.split(',').any(str::is_empty) {
            return Err(invalid("a redis+cluster:// url names its nodes as host:port,host:port,..."));
        }
        Ok(Self { nodes: Nodes::Cluster(nodes), root_cert, prefix })
    }

    pub(crate) const fn is_cluster(&self) -> bool {
        matches!(self.nodes, Nodes::Cluster(_))
    }
}

/// The query options the redis crate reads (`protocol`; `db`, `user`, `pass` in a
/// `redis+unix://` URL). Any other, a misspelt `prefix` say, would be ignored by it.
const REDIS_OPTIONS: [&str; 4] = ["protocol", "db", "user", "pass"];

/// The options of [`REDIS_OPTIONS`] that the redis crate reads from a socket path's
/// URL only, and where a TCP URL says the same.
const UNIX_ONLY_OPTIONS: [(&str, &str); 3] = [
    ("db", "the database as the path: redis://host:6379/2"),
    ("user", "the credentials before the host: redis://user:password@host:6379"),
    ("pass", "the credentials before the host: redis://user:password@host:6379"),
];

/// A URL without idemgate's own query options, and their values as written.
struct Options {
    url: String,
    cacert: Option<String>,
    prefix: Option<String>,
}

impl Options {
    /// Takes `cacert` and `prefix` out of `url`, in one pass over its query, and refuses
    /// an option given twice or one that neither idemgate nor the redis crate reads
    /// (by name only: a value may be a password). Names are percent-decoded, as the
    /// redis crate decodes them.
    fn take(url: &str, unix: bool) -> Result<Self, InvalidUrl> {
        // The redis crate ignores a fragment on redis:// and, built without its insecure
        // feature, fails a rediss:// one at connect; a `#` in a password starts one.
        if url.contains('#') {
            return Err(invalid(
                "a redis store url takes no #fragment: write a # in a password as %23; #insecure (no certificate \
                 checks) is not supported, and ?cacert=PATH trusts a private CA",
            ));
        }
        let Some((base, query)) = url.split_once('?') else {
            return Ok(Self { url: url.to_owned(), cacert: None, prefix: None });
        };
        let (mut cacert, mut prefix, mut kept) = (None, None, Vec::new());
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
            // Ignored by the redis crate on a TCP URL: a `?pass=` would connect without
            // a password, a `?db=2` to database 0, with nothing said.
            if !unix && let Some((_, instead)) = UNIX_ONLY_OPTIONS.iter().find(|o| o.0 == name) {
                return Err(invalid(format!(
                    "{name} in the query of a redis store url is read by the redis client only from a Unix \
                     socket url; write {instead}"
                )));
            }
            let slot = match &*name {
                "cacert" => &mut cacert,
                "prefix" => &mut prefix,
                known if REDIS_OPTIONS.contains(&known) => {
                    kept.push(pair);
                    continue;
                }
                unknown => {
                    return Err(invalid(format!(
                        "unknown option {unknown:?} in the redis store url (known: cacert, prefix, {})",
                        REDIS_OPTIONS.join(", ")
                    )));
                }
            };
            if slot.replace(value.to_owned()).is_some() {
                return Err(invalid(format!("{name} appears more than once in the redis store url")));
            }
        }
        let mut out = base.to_owned();
        if !kept.is_empty() {
            out = format!("{out}?{}", kept.join("&"));
        }
        Ok(Self { url: out, cacert, prefix })
    }
}

/// The key prefix `value` names: percent-decoded, not empty, and without the braces
/// that delimit each record's hash tag (`{prefix:<key>}`).
fn key_prefix(value: &str) -> Result<String, InvalidUrl> {
    let prefix = percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map_err(|_| invalid("prefix in the redis store url is not UTF-8 once its %-escapes are decoded"))?;
    if prefix.is_empty() || prefix.contains(['{', '}']) {
        return Err(invalid("prefix in the redis store url must be a non-empty name without { or }"));
    }
    Ok(prefix.into_owned())
}

/// The PEM text of the file `value` names, once every certificate in it is known to
/// be usable as a trust anchor, so that a wrong file fails `connect` with its reason.
fn root_certificates(value: &str) -> Result<Arc<[u8]>, InvalidUrl> {
    let bad = |e: String| invalid(format!("cacert in the redis store url: {e}"));
    let path = idemgate::tls::path_in_url(value).map_err(bad)?;
    let pem = std::fs::read(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    idemgate::tls::ca_certificates_in(&pem, &path).map_err(bad)?;
    Ok(pem.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_urls_pass_through() {
        for url in ["redis://127.0.0.1:6379", "redis://h:1/2", "rediss://u:p@h:6380/0"] {
            assert_eq!(
                Target::parse(url),
                Ok(Target { nodes: Nodes::Single(url.into()), root_cert: None, prefix: None })
            );
        }
    }

    #[test]
    fn cluster_urls_become_one_url_per_node() {
        assert_eq!(
            Target::parse("redis+cluster://a:1,b:2,[::1]:3").map(|t| t.nodes),
            Ok(Nodes::Cluster(vec!["redis://a:1".into(), "redis://b:2".into(), "redis://[::1]:3".into()]))
        );
        assert_eq!(
            Target::parse("rediss+cluster://u:p%40ss@a:1,b:2/?protocol=resp3").map(|t| t.nodes),
            Ok(Nodes::Cluster(vec![
                "rediss://u:p%40ss@a:1/?protocol=resp3".into(),
                "rediss://u:p%40ss@b:2/?protocol=resp3".into()
            ]))
        );
    }

    #[test]
    fn cacert_is_taken_out_of_the_url_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let files = idemgate_testkit::pki::ca_files(dir.path());
        let escaped = &files.in_url;
        let pem: Arc<[u8]> = idemgate_testkit::pki::TEST_CA_PEM.as_bytes().into();

        let t = Target::parse(&format!("rediss://u:p@h:6380/0?cacert={escaped}&protocol=resp3")).unwrap();
        assert_eq!(t.nodes, Nodes::Single("rediss://u:p@h:6380/0?protocol=resp3".into()));
        assert_eq!(t.root_cert, Some(Arc::clone(&pem)));
        let t = Target::parse(&format!("rediss+cluster://a:1,b:2/?cacert={escaped}")).unwrap();
        assert_eq!(t.nodes, Nodes::Cluster(vec!["rediss://a:1/".into(), "rediss://b:2/".into()]));
        assert_eq!(t.root_cert, Some(pem));

        let refused = |url: String, why: &str| {
            let err = Target::parse(&url).expect_err(&url).to_string();
            assert!(err.contains(why) && !err.contains("secret"), "{url}: {err}");
        };
        refused(format!("redis://u:secret@h:6379?cacert={escaped}"), "needs rediss://");
        refused(format!("rediss://u:secret@h?cacert={escaped}&cacert={escaped}"), "more than once");
        refused("rediss://u:secret@h?cacert=".into(), "needs a path");
        for (path, why) in &files.refused {
            refused(format!("rediss://u:secret@h?cacert={path}"), why);
        }
    }

    #[test]
    fn prefix_is_taken_out_of_the_url_and_checked() {
        let t = Target::parse("redis://u:p@h:6379/0?prefix=staging%2Dgw&protocol=resp3").unwrap();
        assert_eq!(t.nodes, Nodes::Single("redis://u:p@h:6379/0?protocol=resp3".into()));
        assert_eq!(t.prefix.as_deref(), Some("staging-gw"));
        let t = Target::parse("redis+cluster://a:1,b:2/?prefix=prod").unwrap();
        assert_eq!(t.nodes, Nodes::Cluster(vec!["redis://a:1/".into(), "redis://b:2/".into()]));
        assert_eq!(t.prefix.as_deref(), Some("prod"));
        for url in ["redis://u:secret@h?prefix=", "redis://u:secret@h?prefix=a%7Bb", "redis://u:secret@h?prefix"] {
            let err = Target::parse(url).expect_err(url).to_string();
            assert!(err.contains("non-empty name without") && !err.contains("secret"), "{url}: {err}");
        }
        let err = Target::parse("redis://u:secret@h?prefix=a&prefix=b").expect_err("twice").to_string();
        assert!(err.contains("more than once"), "{err}");
        // A misspelt option is refused, not ignored; an escaped name is the name.
        for url in ["redis://u:secret@h?prefx=staging", "redis://u:secret@h?Prefix=staging"] {
            let err = Target::parse(url).expect_err(url).to_string();
            assert!(err.contains("unknown option") && !err.contains("secret"), "{url}: {err}");
        }
        assert_eq!(Target::parse("redis://h?pre%66ix=staging").unwrap().prefix.as_deref(), Some("staging"));
        assert!(Target::parse("redis+unix:///run/redis.sock?db=2&pass=secret&protocol=resp3").is_ok());
    }

    #[test]
    fn socket_only_options_on_a_tcp_url_are_refused_with_what_to_write_instead() {
        let refused = |url: &str, why: &str| {
            let err = Target::parse(url).expect_err(url).to_string();
            assert!(err.contains(why) && !err.contains("secret"), "{url}: {err}");
        };
        refused("redis://h:6379?db=2", "write the database as the path: redis://host:6379/2");
        refused("rediss://h?pass=secret", "write the credentials before the host");
        refused("redis+cluster://a:1,b:2/?user=gw", "only from a Unix socket url");
        refused("rediss+cluster://a:1,b:2/?db=1", "write the database as the path");
        refused("redis://h?%64b=2", "db in the query");
        refused("valkey+unix:///s?db=2", "a redis store url starts with");
        assert!(Target::parse("redis+unix:///run/redis.sock?%64b=2").is_ok());
        let unix = Target::parse("unix:///run/redis.sock?db=2&user=gw&pass=secret").unwrap();
        assert_eq!(unix.nodes, Nodes::Single("unix:///run/redis.sock?db=2&user=gw&pass=secret".into()));
    }

    #[test]
    fn a_fragment_is_refused_where_the_redis_crate_would_ignore_or_fail_it() {
        for url in ["redis://h#x?db=2", "rediss://u:p@h:6380/0#insecure", "redis://:pa#secret@h:6379", "redis://h/#"] {
            let err = Target::parse(url).expect_err(url).to_string();
            assert!(err.contains("no #fragment") && !err.contains("secret"), "{url}: {err}");
        }
        // Escaped, a # is part of the password.
        assert!(Target::parse("redis://:pa%23secret@h:6379").is_ok());
    }

    #[test]
    fn other_urls_are_refused_without_echoing_them() {
        for url in ["postgres://u:secret@h/db", "redis+cluster://a:1,,b:2", "redis+cluster://", "h:6379"] {
            let err = Target::parse(url).expect_err(url);
            assert!(!err.to_string().contains("secret"));
        }
    }
}
