//! The Redis store for idemgate: one Redis server or a Redis Cluster shared by a
//! fleet of gateways, with atomic claims, fenced transitions and waiters woken
//! across processes.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use idemgate::{Claim, Fingerprint, StorageKey, Store, StoredResponse, Timestamp};
//! use idemgate::http::{HeaderName, HeaderValue};
//! use idemgate_redis::RedisStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), idemgate::StoreError> {
//! // `redis+cluster://10.0.0.1:7000,10.0.0.2:7000` for a cluster.
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?.with_prefix("idemgate");
//!
//! // In the gateway these come from `Scope::storage_key` and `Fingerprint::compute`.
//! let key = StorageKey::from_bytes([7; 32]);
//! let fp = Fingerprint::from_bytes([1; 32]);
//!
//! let Claim::Acquired(lease) = store.claim(&key, &fp, Duration::from_secs(30)).await? else {
//!     panic!("a fresh key is acquired");
//! };
//! let response = StoredResponse::new(
//!     200,
//!     vec![(HeaderName::from_static("content-type"), HeaderValue::from_static("application/json"))],
//!     vec![Bytes::from_static(b"{\"answer\":42}")],
//!     Timestamp::from_system_time(std::time::SystemTime::now()),
//! );
//! store.complete(&lease, &response, Duration::from_secs(24 * 60 * 60)).await?;
//!
//! // A retry of the same request, on this gateway or any other, gets the response.
//! assert_eq!(store.claim(&key, &fp, Duration::from_secs(30)).await?, Claim::Completed(Box::new(response)));
//! # Ok(())
//! # }
//! ```
//!
//! # Behavior
//!
//! - **Atomicity.** Every operation that changes state is one Lua script, so the check
//!   and the write are one step on the server: `claim` applies
//!   [`idemgate::store::decide`] to the record it finds (a takeover of an expired lease
//!   is a compare-and-swap on the stale token within the script), and `complete`,
//!   `release`, `renew` and the live-log writes change nothing unless the record is
//!   still the caller's (then they answer
//!   [`ErrorKind::Conflict`]).
//! - **Clock.** Leases and expiry are judged on the Redis server's clock (`TIME` inside
//!   the scripts), so gateways whose clocks disagree still agree on when a lease ran
//!   out. A completed record's expiry is its `completed_at` (the completing gateway's
//!   clock) plus the TTL.
//! - **Expiry.** A completed record is served until `completed_at + ttl`, judged from
//!   the stored timestamp; after that a claim treats the key as absent. Redis deletes
//!   the record by itself ten minutes later (`PEXPIRE`), and an in-flight record
//!   ten minutes after [`STALE_IN_FLIGHT_GRACE`] past its lease; until then
//!   [`Store::get`] still shows it. [`Store::sweep`] deletes expired records sooner: a
//!   `SCAN` of this prefix's records that continues where the last call stopped, with
//!   one script per page choosing, on the server's clock, what to delete.
//! - **A lease dropped without `complete` or `release`** (the owner crashed) runs out
//!   at its `lease_until`; the next claim of the same request takes it over, and the
//!   old owner's token is fenced out. The key stays bound to its request until then.
//! - **Lost connection.** Every operation is bounded by a timeout (2 s by default,
//!   see [`RedisStore::connect_with_timeout`]) and answers
//!   [`ErrorKind::Unavailable`] when the server does
//!   not answer in time or the connection is down. The connections reconnect by
//!   themselves: once the server is back, operations succeed again, with no restart.
//!   An operation whose answer was lost may still have run (a claim then leaves a
//!   lease nobody holds, which runs out like a crashed owner's).
//! - **Threads.** Commands go over one shared multiplexed connection, driven by a task
//!   on the runtime that opened the store. A thread that runs a single-threaded
//!   runtime (a gateway serving a thread per core) gets a command connection of its
//!   own, made in the background on its first call, so its calls need not cross to
//!   that runtime and back; until it is ready, and for 5 s after a failed attempt or a
//!   failed call on it, the thread uses the shared one.
//! - **Cluster.** Every key of one storage key carries one hash tag
//!   (`{prefix:<key hex>}:rec`, `…:live`, `…:chunks`, and the channel `…:ch`), so each
//!   script runs within one slot; the cluster client follows slot moves and topology
//!   changes. Wake-ups use sharded pub/sub (`SPUBLISH`), so a cluster needs Redis 7; a
//!   single server uses plain `PUBLISH` and RESP3, so it needs Redis 6.2 or later.
//!   (The tests run against Redis 7.0.)
//! - **Watch.** Changes made through this store wake its own waiters at once. Changes
//!   made by other gateways arrive over pub/sub on a dedicated RESP3 connection that
//!   subscribes to a key's channel while it has waiters (and a few seconds after),
//!   and resubscribes after a reconnection. It is a hint, as the [`Store`] contract
//!   allows: a change made before the subscription took effect, or while the
//!   connection was down, wakes nobody, and the waiters' polling finds it. Losing the
//!   connection wakes every waiter, so that they re-read.
//! - **Live logs.** A streamed response can be followed from other gateways: the
//!   owner's `live_begin`, `live_append` and `live_end` write it (fenced by the lease;
//!   an append whose chunks are in the log already appends nothing), followers read
//!   it with `live_read`. A log lives as long as its owner's lease, and
//!   [`LIVE_LOG_LINGER`] after it ends. Appending is still allowed once the record is
//!   completed (by the same token), so chunks the owner queued before `complete` still
//!   reach the log; after a release, purge or takeover it is not.
//!
//! # Layout
//!
//! The record is a hash `{prefix:<key hex>}:rec` with the fields `state` (`flight` or
//! `done`), `fp` (32 bytes), `token`, `created_at`, `lease_until`, `expires_at`
//! (unix milliseconds as text) and `response` (the `StoredResponse` encoding, which is
//! versioned). A live log is the hash `…:live` (`token`, `head`, `end`) and the list
//! `…:chunks`. `redis-cli --scan --pattern '{idemgate:*}:rec'` lists the records.
//!
//! [`STALE_IN_FLIGHT_GRACE`]: idemgate::store::STALE_IN_FLIGHT_GRACE
//! [`LIVE_LOG_LINGER`]: idemgate::store::LIVE_LOG_LINGER

mod conn;
mod keys;
mod local;
mod reply;
mod scripts;
mod sweep;
mod target;
mod waiters;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use idemgate::clock::duration_millis;
use idemgate::store::{LIVE_LOG_LINGER, LiveEnd, LiveHead, LiveRead, STALE_IN_FLIGHT_GRACE};
use idemgate::{
    Claim, ErrorKind, Fingerprint, Lease, Record, StorageKey, Store, StoreError, StoredResponse, Timestamp, Token,
};
use redis::{RedisError, Value};

use self::conn::{Conn, SubConn, publish_command};
use self::keys::{Keys, record_pattern};
use self::local::Local;
use self::scripts::SCRIPTS;
use self::target::Target;
use self::waiters::{Subscriber, Waiters};

/// How long an operation may take before it answers `Unavailable`, unless
/// [`RedisStore::connect_with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The key prefix unless [`RedisStore::with_prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "idemgate";

/// How long past its expiry Redis keeps a record (`PEXPIRE`), so that `get` can still
/// show it and `sweep` count it.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10 * 60);

/// A [`Store`] in Redis or a Redis Cluster. Clones share the connections.
///
/// See the [crate docs](crate) for its behaviour on expiry, lost connections and
/// clusters.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
    prefix: Arc<str>,
    sweep: Arc<Mutex<sweep::Cursor>>,
}

struct Inner {
    conn: Conn,
    local: Local,
    cluster: bool,
    publish: &'static str,
    timeout: Duration,
    waiters: Arc<Waiters>,
    _subscriber: Subscriber,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("backend", &self.backend())
            .field("prefix", &self.prefix)
            .field("timeout", &self.inner.timeout)
            .field("watched_channels", &self.inner.waiters.channels())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `redis://host:port[/db]`, `rediss://…` (TLS, with the webpki roots)
    /// or `redis+cluster://host:port,host:port,…` (a Redis Cluster, by seed nodes), with
    /// [`DEFAULT_TIMEOUT`]. With TLS, `?cacert=PATH` (percent-encoded) names a PEM file
    /// of CA certificates trusted instead of the webpki roots, as `redis-cli --cacert`
    /// does, for a server whose certificate comes from a private CA. `?prefix=NAME`
    /// sets the key prefix, as [`with_prefix`](Self::with_prefix) does (which, called
    /// after, wins): gateways that must not share records (staging and production on
    /// one Redis Cluster, which has no database numbers) each take their own.
    ///
    /// Fails with `Invalid` when the URL's scheme is not one of these, when it has a
    /// query option neither idemgate nor the redis crate reads (a misspelt `prefix`
    /// would otherwise share the default namespace) or one it reads only from a socket
    /// path's URL (`db`, `user`, `pass` on a TCP URL would be ignored: the database and
    /// the credentials go in the URL's path and before its host), when it has a
    /// `#fragment` (a `#` in a password is written `%23`), when `cacert` or
    /// `prefix` is given twice, when `cacert` holds no usable certificate (or is given without TLS), or
    /// when `prefix` is empty or holds `{` or `}`; and with `Unavailable` otherwise: a
    /// URL the redis crate cannot read, a server that does not answer within the
    /// timeout, a certificate it does not trust.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_timeout(url, DEFAULT_TIMEOUT).await
    }

    /// Like [`connect`](Self::connect), with every connection attempt and every
    /// operation bounded by `timeout`. Must run inside a tokio runtime, which the
    /// store's subscriber task then lives on.
    pub async fn connect_with_timeout(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let target = Target::parse(url).map_err(|e| StoreError::invalid("invalid redis store url", e))?;
        let conn = bounded("connect", timeout, Conn::connect(&target, timeout)).await?;
        let waiters = Waiters::new();
        let sub = bounded("connect", timeout, SubConn::connect(&target, timeout, waiters.push_handler())).await?;
        let subscriber = Subscriber::spawn(Arc::clone(&waiters), sub, timeout);
        let inner = Inner {
            conn,
            local: Local::new(target.clone(), timeout),
            cluster: target.is_cluster(),
            publish: publish_command(&target),
            timeout,
            waiters,
            _subscriber: subscriber,
        };
        let prefix = target.prefix.as_deref().unwrap_or(DEFAULT_PREFIX).into();
        Ok(Self { inner: Arc::new(inner), prefix, sweep: Arc::default() })
    }

    /// Namespaces every key under `prefix` (default [`DEFAULT_PREFIX`]), so that
    /// several gateways or tests can share one Redis without seeing each other's
    /// records. A prefix without `{`, `}` keeps keys spread over cluster slots. Not
    /// checked here: the URL's `prefix` option, which users type, refuses an empty
    /// prefix and braces.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().into();
        self.sweep = Arc::default();
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn keys(&self, key: &StorageKey) -> Keys {
        Keys::new(&self.prefix, key)
    }

    /// Runs `op` on a clone of a command connection, bounded by the timeout: this
    /// thread's own (see [`local`]) or the shared one.
    async fn run<T, F, Fut>(&self, name: &'static str, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = self.inner.local.get() else {
            return bounded(name, self.inner.timeout, op(self.inner.conn.clone())).await;
        };
        let answer = bounded(name, self.inner.timeout, op(conn)).await;
        if answer.as_ref().is_err_and(|e| e.kind() == ErrorKind::Unavailable) {
            self.inner.local.failed();
        }
        answer
    }

    /// Answers a fenced script's 1 (done, waiters woken) or 0 (the lease is lost).
    fn fenced(&self, key: &StorageKey, answer: i64) -> Result<(), StoreError> {
        match answer {
            1 => {
                self.inner.waiters.notify(key);
                Ok(())
            }
            0 => Err(StoreError::lease_lost()),
            _ => Err(StoreError::corrupt("a redis script answered in an unknown shape")),
        }
    }
}

/// Bounds a Redis call by `timeout`, and reads its error.
pub(crate) async fn bounded<T>(
    op: &'static str,
    timeout: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(redis_error(op, e)),
        Err(elapsed) => Err(StoreError::unavailable(format!("redis did not answer {op} within {timeout:?}"), elapsed)),
    }
}

/// A script's `IDEMGATE` error is a record it could not read; anything else is Redis
/// failing or being unreachable.
fn redis_error(op: &'static str, e: RedisError) -> StoreError {
    if e.code() == Some("IDEMGATE") {
        return StoreError::corrupt(format!("redis {op}: {}", e.detail().unwrap_or("unreadable record")));
    }
    StoreError::unavailable(format!("redis {op} failed"), e)
}

/// A duration as the scripts take it: whole milliseconds, at most about a century
/// (Lua computes in doubles, and a lease of `Duration::MAX` must not overflow them).
fn ms(d: Duration) -> u64 {
    const CENTURY_MS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;
    duration_millis(d).min(CENTURY_MS)
}

fn grace_ms() -> u64 {
    ms(STALE_IN_FLIGHT_GRACE + EXPIRY_MARGIN)
}

impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        if self.inner.cluster { "redis-cluster" } else { "redis" }
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        fp: &'a Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        async move {
            let k = self.keys(key);
            let token = Token::generate();
            let answer: Value = self
                .run("claim", |mut conn| async move {
                    SCRIPTS
                        .claim
                        .key(&k.rec)
                        .arg(fp.as_bytes().as_slice())
                        .arg(token.to_text())
                        .arg(ms(lease))
                        .arg(grace_ms())
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            reply::claim(answer, *key, token)
        }
        .boxed()
    }

    fn renew<'a>(&'a self, lease: &'a Lease, duration: Duration) -> BoxFuture<'a, Result<Timestamp, StoreError>> {
        async move {
            let k = self.keys(&lease.key);
            let until: Option<i64> = self
                .run("renew", |mut conn| async move {
                    SCRIPTS
                        .renew
                        .key(&k.rec)
                        .key(&k.live)
                        .key(&k.chunks)
                        .arg(lease.token.to_text())
                        .arg(ms(duration))
                        .arg(grace_ms())
                        .arg(ms(LIVE_LOG_LINGER))
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            let until = until.ok_or_else(StoreError::lease_lost)?;
            u64::try_from(until)
                .map(Timestamp::from_millis)
                .map_err(|_| StoreError::corrupt("redis answered a negative time"))
        }
        .boxed()
    }

    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let k = self.keys(&lease.key);
            let expires_at = (response.completed_at + ttl).as_millis();
            let encoded = response.encode();
            let publish = self.inner.publish;
            let answer: i64 = self
                .run("complete", |mut conn| async move {
                    SCRIPTS
                        .complete
                        .key(&k.rec)
                        .arg(lease.token.to_text())
                        .arg(encoded)
                        .arg(expires_at)
                        .arg(ms(EXPIRY_MARGIN))
                        .arg(publish)
                        .arg(&k.channel)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            self.fenced(&lease.key, answer)
        }
        .boxed()
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let k = self.keys(&lease.key);
            let publish = self.inner.publish;
            let answer: i64 = self
                .run("release", |mut conn| async move {
                    SCRIPTS
                        .release
                        .key(&k.rec)
                        .arg(lease.token.to_text())
                        .arg(publish)
                        .arg(&k.channel)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            self.fenced(&lease.key, answer)
        }
        .boxed()
    }

    fn get<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        async move {
            let k = self.keys(key);
            let fields: Vec<Option<Vec<u8>>> = self
                .run("get", |mut conn| async move {
                    redis::cmd("HMGET").arg(&k.rec).arg(&reply::RECORD_FIELDS[..]).query_async(&mut conn).await
                })
                .await?;
            reply::record(*key, fields)
        }
        .boxed()
    }

    fn purge<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        async move {
            let k = self.keys(key);
            let publish = self.inner.publish;
            let existed: i64 = self
                .run("purge", |mut conn| async move {
                    SCRIPTS
                        .purge
                        .key(&k.rec)
                        .key(&k.live)
                        .key(&k.chunks)
                        .arg(publish)
                        .arg(&k.channel)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            self.inner.waiters.notify(key);
            Ok(existed == 1)
        }
        .boxed()
    }

    fn sweep(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        async move {
            if limit == 0 {
                return Ok(0);
            }
            // The cursor is taken out for the call, so no lock is held across an await;
            // a concurrent sweep starts its own pass, which is only redundant work.
            let mut cursor = std::mem::take(&mut *self.sweep.lock().unwrap_or_else(PoisonError::into_inner));
            let pattern = record_pattern(&self.prefix);
            let sweeper = sweep::Sweeper {
                conn: &self.inner.conn,
                pattern: &pattern,
                grace: STALE_IN_FLIGHT_GRACE,
                timeout: self.inner.timeout,
            };
            let res = sweeper.sweep(&mut cursor, limit).await;
            *self.sweep.lock().unwrap_or_else(PoisonError::into_inner) = cursor;
            res
        }
        .boxed()
    }

    fn watch(&self, key: &StorageKey) -> BoxFuture<'static, ()> {
        self.inner.waiters.watch(key, self.keys(key).channel)
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        async move { self.run("ping", |mut conn| async move { redis::cmd("PING").exec_async(&mut conn).await }).await }
            .boxed()
    }

    fn live_begin<'a>(&'a self, lease: &'a Lease, head: &'a LiveHead) -> BoxFuture<'a, Result<bool, StoreError>> {
        async move {
            let k = self.keys(&lease.key);
            let publish = self.inner.publish;
            let answer: i64 = self
                .run("live_begin", |mut conn| async move {
                    SCRIPTS
                        .live_begin
                        .key(&k.rec)
                        .key(&k.live)
                        .key(&k.chunks)
                        .arg(lease.token.to_text())
                        .arg(reply::encode_head(head))
                        .arg(ms(LIVE_LOG_LINGER))
                        .arg(publish)
                        .arg(&k.channel)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            self.fenced(&lease.key, answer).map(|()| true)
        }
        .boxed()
    }

    fn live_append<'a>(
        &'a self,
        lease: &'a Lease,
        first: u64,
        chunks: &'a [Bytes],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let k = self.keys(&lease.key);
            let publish = self.inner.publish;
            let answer: i64 = self
                .run("live_append", |mut conn| async move {
                    let mut call = SCRIPTS.live_append.key(&k.rec);
                    call.key(&k.live)
                        .key(&k.chunks)
                        .arg(lease.token.to_text())
                        .arg(first)
                        .arg(ms(LIVE_LOG_LINGER))
                        .arg(publish)
                        .arg(&k.channel);
                    for chunk in chunks {
                        call.arg(chunk.as_ref());
                    }
                    call.invoke_async(&mut conn).await
                })
                .await?;
            if answer == -1 {
                return Err(StoreError::corrupt("a live log append must start at or before the log's end"));
            }
            self.fenced(&lease.key, answer)
        }
        .boxed()
    }

    fn live_end<'a>(&'a self, lease: &'a Lease, end: LiveEnd) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let k = self.keys(&lease.key);
            let publish = self.inner.publish;
            let answer: i64 = self
                .run("live_end", |mut conn| async move {
                    SCRIPTS
                        .live_end
                        .key(&k.live)
                        .key(&k.chunks)
                        .arg(lease.token.to_text())
                        .arg(reply::end_name(end))
                        .arg(ms(LIVE_LOG_LINGER))
                        .arg(publish)
                        .arg(&k.channel)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            self.fenced(&lease.key, answer)
        }
        .boxed()
    }

    fn live_read<'a>(&'a self, key: &'a StorageKey, from: u64) -> BoxFuture<'a, Result<Option<LiveRead>, StoreError>> {
        async move {
            let k = self.keys(key);
            let from = i64::try_from(from).unwrap_or(i64::MAX);
            let answer: Value = self
                .run("live_read", |mut conn| async move {
                    SCRIPTS.live_read.key(&k.live).key(&k.chunks).arg(from).invoke_async(&mut conn).await
                })
                .await?;
            reply::live_read(answer)
        }
        .boxed()
    }
}
