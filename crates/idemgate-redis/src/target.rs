//! What a store URL names: one server or the seed nodes of a cluster.
//!
//! `redis://` and `rediss://` (TLS) URLs go to the redis crate as they are; a
//! `redis+cluster://[user:pass@]h1:p1,h2:p2[/db][?query]` URL (or `rediss+cluster://`)
//! becomes one `redis://` URL per seed node, each with the same credentials and
//! options. Errors never repeat the URL, which may carry a password.

use std::fmt;

/// Where the store's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// One server.
    Single(String),
    /// A Redis Cluster, reached through these seed nodes.
    Cluster(Vec<String>),
}

/// A store URL that names no Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InvalidUrl(&'static str);

impl fmt::Display for InvalidUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidUrl {}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self, InvalidUrl> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(InvalidUrl("a redis store url starts with redis://, rediss:// or redis+cluster://"));
        };
        let node_scheme = match scheme {
            "redis" | "rediss" | "redis+unix" | "unix" => return Ok(Self::Single(url.to_owned())),
            "redis+cluster" => "redis",
            "rediss+cluster" => "rediss",
            _ => return Err(InvalidUrl("a redis store url starts with redis://, rediss:// or redis+cluster://")),
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
            return Err(InvalidUrl("a redis+cluster:// url names its nodes as host:port,host:port,..."));
        }
        Ok(Self::Cluster(nodes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_urls_pass_through() {
        for url in ["redis://127.0.0.1:6379", "redis://h:1/2", "rediss://u:p@h:6380/0#insecure"] {
            assert_eq!(Target::parse(url), Ok(Target::Single(url.into())));
        }
    }

    #[test]
    fn cluster_urls_become_one_url_per_node() {
        assert_eq!(
            Target::parse("redis+cluster://a:1,b:2,[::1]:3"),
            Ok(Target::Cluster(vec!["redis://a:1".into(), "redis://b:2".into(), "redis://[::1]:3".into()]))
        );
        assert_eq!(
            Target::parse("rediss+cluster://u:p%40ss@a:1,b:2/?protocol=resp3"),
            Ok(Target::Cluster(vec![
                "rediss://u:p%40ss@a:1/?protocol=resp3".into(),
                "rediss://u:p%40ss@b:2/?protocol=resp3".into()
            ]))
        );
    }

    #[test]
    fn other_urls_are_refused_without_echoing_them() {
        for url in ["postgres://u:secret@h/db", "redis+cluster://a:1,,b:2", "redis+cluster://", "h:6379"] {
            let err = Target::parse(url).expect_err(url);
            assert!(!err.to_string().contains("secret"));
        }
    }
}
