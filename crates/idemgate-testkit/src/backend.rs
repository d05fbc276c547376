//! Where the Redis and PostgreSQL backend tests find their servers, and what they do
//! when there is none.
//!
//! Each test takes its URL from an environment variable, with a default that points at
//! the local server a developer (and CI) runs. When the server cannot be reached:
//! under CI (`CI` set) the test fails, because CI never skips; elsewhere it prints
//! plainly which test it skipped and why, and passes. `scripts/test` starts the
//! servers it needs before the tests, so it skips nothing when they can be started.

use std::time::Duration;

/// The Redis server: `IDEMGATE_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub const REDIS_URL_ENV: &str = "IDEMGATE_TEST_REDIS_URL";
/// The Redis Cluster: `IDEMGATE_TEST_REDIS_CLUSTER_URL`, a `redis+cluster://h1,h2,h3`
/// URL; no default (a cluster is started by `scripts/test`).
pub const REDIS_CLUSTER_URL_ENV: &str = "IDEMGATE_TEST_REDIS_CLUSTER_URL";
/// The PostgreSQL server: `IDEMGATE_TEST_DATABASE_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`.
pub const DATABASE_URL_ENV: &str = "IDEMGATE_TEST_DATABASE_URL";

const REDIS_DEFAULT: &str = "redis://127.0.0.1:6379";
const DATABASE_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Whether this run is CI's, where a missing server is a failure.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The URL of a backend for `test`, or `None` when the test is to be skipped.
///
/// `url` comes from `env` or `default`; `reachable` says whether something listens
/// there (a TCP connect is enough: the test itself reports protocol errors). Under CI
/// an unreachable or unset backend panics with the reason.
pub fn backend_url(test: &str, env: &str, default: Option<&str>) -> Option<String> {
    let url = match (std::env::var(env), default) {
        (Ok(url), _) if !url.is_empty() => url,
        (_, Some(default)) => default.to_owned(),
        _ => return skip(test, &format!("{env} is not set")),
    };
    match first_host_port(&url) {
        Some(addr) if reachable(&addr) => Some(url),
        Some(addr) => skip(test, &format!("nothing listens at {addr} ({env}={url})")),
        None => skip(test, &format!("{env}={url} names no host:port")),
    }
}

/// The Redis URL for `test` (see [`backend_url`]).
pub fn redis_url(test: &str) -> Option<String> {
    backend_url(test, REDIS_URL_ENV, Some(REDIS_DEFAULT))
}

/// The Redis Cluster URL for `test` (see [`backend_url`]).
pub fn redis_cluster_url(test: &str) -> Option<String> {
    backend_url(test, REDIS_CLUSTER_URL_ENV, None)
}

/// The PostgreSQL URL for `test` (see [`backend_url`]).
pub fn database_url(test: &str) -> Option<String> {
    backend_url(test, DATABASE_URL_ENV, Some(DATABASE_DEFAULT))
}

fn skip(test: &str, why: &str) -> Option<String> {
    if in_ci() {
        panic!("{test}: {why}; CI never skips a backend test");
    }
    // libtest captures `eprintln!` of a passing test; a direct write to stderr is not
    // captured, so the skip is seen in every run.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why} (run scripts/test to start the servers)");
    None
}

/// `host:port` of the first host in `scheme://[user[:pass]@]host:port[,host:port...][/db]`.
fn first_host_port(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let first = hosts.split(',').next()?;
    if first.contains(':') { Some(first.to_owned()) } else { None }
}

fn reachable(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_host() {
        assert_eq!(first_host_port("redis://127.0.0.1:6379").as_deref(), Some("127.0.0.1:6379"));
        assert_eq!(first_host_port("redis+cluster://a:1,b:2,c:3").as_deref(), Some("a:1"));
        assert_eq!(first_host_port("postgres://u:p@h:5432/test?x=1").as_deref(), Some("h:5432"));
        assert_eq!(first_host_port("memory://"), None);
    }
}
