//! What the tests share: the servers (or a skip), a fresh prefix per test, clean-up of
//! the test's keys, and a private `redis-server` that a test may kill.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idemgate::{StorageKey, Token};
use idemgate_redis::RedisStore;
use idemgate_testkit::{Fixture, backend};
use redis::Commands;

/// The running test's name (libtest names each test's thread after it).
pub(crate) fn test_name() -> String {
    std::thread::current().name().unwrap_or("redis test").to_owned()
}

/// A prefix no other test (or earlier run) uses.
pub(crate) fn fresh_prefix() -> String {
    format!("idemgate-test-{}", Token::generate().to_text())
}

/// The single-node URL, or `None` (the test is skipped; under CI it fails instead).
pub(crate) fn single_url() -> Option<String> {
    backend::redis_url(&test_name())
}

/// The cluster URL, or `None` (the test is skipped; under CI it fails instead).
pub(crate) fn cluster_url() -> Option<String> {
    backend::redis_cluster_url(&test_name())
}

/// The addresses of the nodes a URL names (the seeds of a cluster, which are all its
/// primaries in the test cluster).
pub(crate) fn nodes(url: &str) -> Vec<String> {
    match url.strip_prefix("redis+cluster://") {
        Some(hosts) => {
            hosts.split(['/', '?']).next().unwrap_or("").split(',').map(|h| format!("redis://{h}")).collect()
        }
        None => vec![url.to_owned()],
    }
}

/// A store on `url` under a fresh prefix, and the guard that deletes its keys.
pub(crate) async fn store(url: &str) -> (RedisStore, Cleanup) {
    let prefix = fresh_prefix();
    let store = RedisStore::connect(url).await.expect("redis answers").with_prefix(prefix.clone());
    let cleanup = Cleanup::new(url, &prefix);
    (store, cleanup)
}

/// The conformance-suite fixture for `url`, or a skip.
pub(crate) async fn fixture(url: Option<String>) -> Fixture {
    let Some(url) = url else { return Fixture::skip() };
    let (store, cleanup) = store(&url).await;
    Fixture::new(store).with_guard(cleanup)
}

/// Deletes every key of a test's prefix when dropped, so that test runs do not pile
/// up records (in-flight ones would stay for a day) in a developer's Redis.
pub(crate) struct Cleanup {
    nodes: Vec<String>,
    prefix: String,
}

impl Cleanup {
    /// Cleans up `prefix` on the nodes of `url`.
    pub(crate) fn new(url: &str, prefix: &str) -> Self {
        Self { nodes: nodes(url), prefix: prefix.to_owned() }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for node in &self.nodes {
            // Best effort: a test that killed its server has nothing left to clean.
            let Ok(mut conn) =
                redis::Client::open(node.as_str()).and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            else {
                continue;
            };
            let pattern = format!("{{{}:*", self.prefix);
            let keys: Vec<String> = match conn.scan_match(&pattern) {
                Ok(iter) => iter.filter_map(Result::ok).collect(),
                Err(_) => continue,
            };
            // One at a time: in a cluster the keys are in different slots.
            for key in keys {
                let _: redis::RedisResult<i64> = conn.unlink(&key);
            }
        }
    }
}

/// The wake-up channel of `key` under `prefix`, as the crate docs lay it out.
pub(crate) fn channel(prefix: &str, key: &StorageKey) -> String {
    format!("{{{prefix}:{}}}:ch", key.to_hex())
}

/// How many connections subscribe to `channel` on the nodes of `url` (sharded
/// subscribers on a cluster's nodes, plain ones on a single server).
pub(crate) fn subscribers(url: &str, channel: &str) -> i64 {
    let sharded = url.starts_with("redis+cluster://");
    let mut total = 0;
    for node in nodes(url) {
        let mut conn = redis::Client::open(node.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("a test node answers");
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg(if sharded { "SHARDNUMSUB" } else { "NUMSUB" })
            .arg(channel)
            .query(&mut conn)
            .expect("PUBSUB answers");
        total += n;
    }
    total
}

/// Waits until someone subscribes to the wake-up channel of `key` (a store's
/// subscriber does so shortly after a `watch`).
pub(crate) async fn until_subscribed(url: &str, prefix: &str, key: &StorageKey) {
    let channel = channel(prefix, key);
    let deadline = Instant::now() + Duration::from_secs(5);
    while subscribers(url, &channel) == 0 {
        assert!(Instant::now() < deadline, "nobody subscribed to {channel} within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `redis-server` of the test's own, on a free port in a temporary directory, so
/// that the test can kill it and start it again on the same port.
pub(crate) struct PrivateServer {
    dir: tempfile::TempDir,
    port: u16,
    tls: bool,
    child: Option<Child>,
}

impl PrivateServer {
    /// Starts one, or answers `None` when there is no `redis-server` to run (skipped
    /// locally, a failure under CI).
    pub(crate) fn start() -> Option<Self> {
        Self::start_with(false)
    }

    /// Starts one that speaks TLS only, with a certificate for 127.0.0.1 from a
    /// private CA made by the `openssl` CLI (`ca.pem` in [`dir`](Self::dir)); `None`
    /// when either is missing (skipped locally, a failure under CI).
    pub(crate) fn start_tls() -> Option<Self> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Option<Self> {
        let tools: &[(&str, &str)] = if tls {
            &[("redis-server", "--version"), ("openssl", "version")]
        } else {
            &[("redis-server", "--version")]
        };
        for (tool, version) in tools {
            let found = Command::new(tool).arg(version).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
            if !found {
                assert!(!backend::in_ci(), "{}: {tool} is not installed; CI never skips a backend test", test_name());
                eprintln!("SKIPPED {}: {tool} is not installed", test_name());
                return None;
            }
        }
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let dir = tempfile::tempdir().expect("a temporary directory");
        if tls {
            idemgate_testkit::pki::make(dir.path());
        }
        let mut server = Self { dir, port, tls, child: None };
        server.restart();
        Some(server)
    }

    /// Where the server keeps its files (and, with TLS, the CA's `ca.pem`).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) const fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (no shutdown, no goodbye to its clients).
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on its port, and waits until it accepts connections.
    pub(crate) fn restart(&mut self) {
        self.kill();
        let child = spawn_server(self.dir.path(), self.port, self.tls);
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {addr} within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn_server(dir: &Path, port: u16, tls: bool) -> Child {
    let port = port.to_string();
    let mut cmd = Command::new("redis-server");
    if tls {
        cmd.args(["--port", "0", "--tls-port", &port, "--tls-cert-file", "leaf.pem", "--tls-key-file", "leaf.key"]);
        cmd.args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"]);
    } else {
        cmd.args(["--port", &port]);
    }
    cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts")
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}
