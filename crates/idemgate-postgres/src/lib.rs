//! The PostgreSQL store for idemgate: a fleet of gateways sharing one database, with
//! an atomic claim, fenced updates and waiters woken across gateways.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use idemgate::{Claim, Fingerprint, StorageKey, Store, StoredResponse, Timestamp};
//! use idemgate::http::{HeaderName, HeaderValue};
//! use idemgate_postgres::PostgresStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), idemgate::StoreError> {
//! // Connects, creates the tables if needed, and starts listening for other
//! // gateways' changes. Call it inside a Tokio runtime.
//! let store = PostgresStore::connect("postgres://idemgate@db.internal:5432/app?schema=idemgate").await?;
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
//! // A retry of the same request, on this gateway or any other, gets the recorded
//! // response.
//! assert_eq!(store.claim(&key, &fp, Duration::from_secs(30)).await?, Claim::Completed(Box::new(response)));
//! # Ok(())
//! # }
//! ```
//!
//! The URL is `postgres://user[:password]@host[:port]/dbname[?option=value&...]` (or
//! `postgresql://`), with tokio-postgres' options (`sslmode`, `application_name`,
//! `connect_timeout`, ...) and these of idemgate's own, which
//! [`PostgresStoreBuilder`] can also set:
//!
//! | option | default | |
//! |---|---|---|
//! | `schema` | the `search_path` | the schema of the tables (created if missing) |
//! | `pool_size` | 16 | the most connections the pool opens (plus one for `LISTEN`) |
//! | `timeout_ms` | 5000 | the bound on each step of an operation (see below) |
//!
//! # Behavior
//!
//! - **Clock.** Leases and expiry are judged by the database server's clock
//!   (`statement_timestamp()`), never a gateway's, so gateways whose clocks disagree
//!   still agree on who owns a key. `Lease::lease_until` and `renew`'s answer are
//!   server times. A completed record expires at its `completed_at` (taken by the
//!   gateway that recorded the response, and kept in it) plus the TTL, as in every
//!   store: a gateway clock off by seconds moves a TTL of hours by those seconds.
//! - **Expiry.** From `expires_at` on, a claim treats the key as absent and reuses
//!   the row. [`Store::sweep`] deletes expired records (and in-flight records more
//!   than [`STALE_IN_FLIGHT_GRACE`] past their lease) in batches of the limit given,
//!   then as many expired live logs; until then [`Store::get`] still shows them.
//! - **Concurrent duplicates.** A claim is one statement that inserts or reads, then,
//!   to take over an expired lease or reuse an expired record, one compare-and-swap
//!   (on the stale token, or on the record still being expired); see `records.rs`.
//!   Of any number of concurrent claims, on any number of gateways, exactly one
//!   acquires. `complete`, `release` and `renew` change the row only where it is in
//!   flight under the caller's token.
//! - **Lost connection.** Every operation waits at most `timeout_ms` for a pooled
//!   connection (or for a new one to open) and at most `timeout_ms` for its
//!   statements, which the server also cancels past `statement_timeout` (set to the
//!   same value). Past that, or when the server is unreachable or the connection
//!   breaks, the operation fails with
//!   [`ErrorKind::Unavailable`](idemgate::ErrorKind::Unavailable) (the gateway then
//!   answers `503`, or forwards unprotected under `fail_open`). The pool replaces
//!   broken connections as it hands them out, so operations work again as soon as
//!   the server is back, without a restart. An operation whose connection broke while
//!   its statement ran may or may not have committed: a claim that did leaves a lease
//!   that runs out like a crashed owner's.
//! - **Durability** is the server's: with the default `synchronous_commit = on` an
//!   operation that has answered survives a server crash, at the price of a disk
//!   flush per claim and per completion, which bounds throughput on a slow disk. A
//!   DBA may trade that for speed for the gateway alone
//!   (`ALTER ROLE idemgate SET synchronous_commit = off`): a server crash then loses
//!   the last commits (never corrupting anything), so a request whose record was
//!   lost runs again on retry, the trade the SQLite store makes by default.
//! - **A lease dropped without `complete` or `release`** (the owner crashed) runs out
//!   at its `lease_until`; the next claim of the same request takes it over, and the
//!   old owner's token is fenced out. The key stays bound to its request until then.
//! - **Waiters.** `release` and `purge` send `pg_notify` on the channel `idemgate` (or
//!   `idemgate.<schema>`) with the key, in the same statement, so it is delivered when
//!   the change commits. `complete` (on every miss's path) and the live-log writes
//!   notify right after their commit instead, in a statement whose own commit does not
//!   wait for the WAL flush: a notifying transaction holds a server-wide lock until its
//!   commit is flushed, which made them run one flush at a time (misses/s +30–55 %
//!   without it, interleaved A/B). If that notification is lost, the waiters find the
//!   change when they poll. Each store runs one task that `LISTEN`s on a dedicated
//!   connection and wakes the local [`Store::watch`]ers; it reconnects with backoff,
//!   listens again, and then wakes every waiter once, since it may have missed
//!   changes meanwhile. The task stops when the last handle of the store is dropped.
//! - **Live logs** of streamed responses are shared: a duplicate on another gateway
//!   follows the stream while it runs (`idemgate_live`, `idemgate_live_chunks`). An
//!   ended log is kept for [`LIVE_LOG_LINGER`]; the log of an owner that died is swept
//!   with its record.
//! - **PgBouncer.** Use session pooling or connect directly: the listener needs a
//!   session for `LISTEN`, and every pooled connection caches prepared statements,
//!   which transaction pooling breaks ("prepared statement already exists").
//! - **TLS.** `sslmode=require` (or `verify-ca`, `verify-full`) connects with rustls,
//!   which always verifies the server's certificate and host name, against the
//!   Mozilla roots (`webpki-roots`), or, as libpq does, against only the
//!   certificates of the PEM file `sslrootcert=PATH` names (a managed database's CA
//!   bundle, say; `%20` for a space in the path; read when the URL is parsed, so a
//!   wrong file, or an empty value, fails `connect` at once; `sslrootcert=system` is
//!   the default roots). `sslmode` and `sslrootcert` given twice are refused.
//!   Without `sslmode`, or with
//!   `disable` or `prefer`, the connection is plain text: `prefer`'s
//!   unverified encryption is not offered.
//! - **Migration.** [`PostgresStore::connect`] creates the schema and the tables if
//!   they are missing, in one transaction under an advisory lock, so that gateways
//!   starting together do not race, and records the schema version in
//!   `idemgate_meta`. It refuses tables written by a newer idemgate. A DBA who does
//!   not give the gateway's user the right to create tables applies
//!   [`migration_sql`] by hand first; for `schema=idemgate` it is:
//!
//! ```sql
#![doc = include_str!("../migration.sql")]
//! ```
//!
//! [`STALE_IN_FLIGHT_GRACE`]: idemgate::store::STALE_IN_FLIGHT_GRACE
//! [`LIVE_LOG_LINGER`]: idemgate::store::LIVE_LOG_LINGER

mod listener;
mod live;
mod options;
mod pool;
mod records;
mod schema;
mod sql;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use idemgate::store::{LiveEnd, LiveHead, LiveRead};
use idemgate::{Claim, Fingerprint, Lease, Record, StorageKey, Store, StoreError, StoredResponse, Timestamp};

use self::listener::{Listener, Wakeups};
use self::options::Options;
use self::pool::Pool;
pub use self::schema::migration_sql;
use self::sql::Sql;

/// The schema version this build reads and writes (in `idemgate_meta`).
pub const SCHEMA_VERSION: u32 = schema::SCHEMA_VERSION;

/// A [`Store`] in a PostgreSQL database. Clones share the connection pool and the
/// listener; dropping the last one closes them.
///
/// See the [crate docs](crate) for its URL and its behaviour on expiry, lost
/// connections and crashed owners.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    sql: Sql,
    wakeups: Arc<Wakeups>,
    schema: Option<String>,
    // Dropped with the last handle, which stops the listener task.
    _listener: Listener,
}

impl fmt::Debug for PostgresStore {
    // The URL may carry a password: show only what is safe.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (open, max) = self.inner.pool.size();
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.schema)
            .field("connections", &open)
            .field("pool_size", &max)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database at `url`, creates the tables if needed and starts
    /// listening for changes; see the [crate docs](crate) for the URL.
    ///
    /// Must be called inside a Tokio runtime. Fails with `Unavailable` if the URL is
    /// not valid or the server cannot be reached within the timeout, and with
    /// `Corrupt` if the tables were written by a newer idemgate.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().connect(url).await
    }

    /// Options beyond the URL: `PostgresStore::builder().with_schema("idemgate").connect(url)`.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    /// The schema holding the tables; `None` when they follow the `search_path`.
    pub fn schema(&self) -> Option<&str> {
        self.inner.schema.as_deref()
    }

    /// Runs `op` on a pooled connection within the timeouts.
    async fn run<T, F>(&self, what: &'static str, op: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&deadpool_postgres::ClientWrapper, &Sql) -> Result<T, StoreError>,
    {
        let sql = &self.inner.sql;
        self.inner.pool.run(what, async |client| op(client, sql).await).await
    }

    /// Wakes this process's waiters of `key` at once, without waiting for the
    /// notification to come back from the server.
    fn woke(&self, key: &StorageKey) {
        self.inner.wakeups.notifier.notify(key);
    }
}

/// Options for [`PostgresStore`], set in code rather than in the URL (where both
/// name one, the builder wins).
#[derive(Debug, Default, Clone)]
pub struct PostgresStoreBuilder {
    schema: Option<String>,
    pool_size: Option<usize>,
    timeout: Option<Duration>,
}

impl PostgresStoreBuilder {
    /// Puts the tables in `schema` (1 to 50 lowercase letters, digits and
    /// underscores), creating it if needed.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Opens at most `size` pooled connections (at least 1).
    pub fn with_pool_size(mut self, size: usize) -> Self {
        self.pool_size = Some(size.max(1));
        self
    }

    /// Bounds each step of an operation (waiting for a connection, opening one,
    /// running the statements) to `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Connects; see [`PostgresStore::connect`].
    pub async fn connect(self, url: &str) -> Result<PostgresStore, StoreError> {
        let mut options = Options::parse(url)?;
        if let Some(schema) = self.schema {
            options.set_schema(schema)?;
        }
        if let Some(size) = self.pool_size {
            options.pool_size = size;
        }
        if let Some(timeout) = self.timeout {
            options.set_timeout(timeout);
        }
        let tls = options.tls_connector()?;
        let pool = Pool::new(&options, tls.clone())?;
        let schema = options.schema.clone();
        {
            let mut client = pool.get().await?;
            // Another gateway may hold the migration lock for a while; the
            // migration's own statement timeout bounds the wait, this the rest.
            let migrated = schema::migrate(&mut client, schema.as_deref());
            tokio::time::timeout(Duration::from_secs(60) + options.timeout, migrated)
                .await
                .map_err(|e| StoreError::unavailable("postgres did not finish the migration in time", e))??;
        }
        let sql = Sql::new(&schema::prefix(schema.as_deref()), &options.channel());
        let wakeups = Arc::new(Wakeups::default());
        let listener = Listener::start(&options, tls, sql.listen.clone(), Arc::clone(&wakeups)).await?;
        Ok(PostgresStore { inner: Arc::new(Inner { pool, sql, wakeups, schema, _listener: listener }) })
    }
}

impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        fp: &'a Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        self.run("a claim", async move |c, sql| records::claim(c, sql, key, fp, lease).await).boxed()
    }

    fn renew<'a>(&'a self, lease: &'a Lease, duration: Duration) -> BoxFuture<'a, Result<Timestamp, StoreError>> {
        self.run("a renewal", async move |c, sql| records::renew(c, sql, lease, duration).await).boxed()
    }

    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            self.run("a completion", async move |c, sql| records::complete(c, sql, lease, response, ttl).await).await?;
            self.woke(&lease.key);
            Ok(())
        }
        .boxed()
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            self.run("a release", async move |c, sql| records::release(c, sql, lease).await).await?;
            self.woke(&lease.key);
            Ok(())
        }
        .boxed()
    }

    fn get<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        self.run("a read", async move |c, sql| records::read(c, sql, key).await).boxed()
    }

    fn purge<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        async move {
            let existed = self.run("a purge", async move |c, sql| records::purge(c, sql, key).await).await?;
            if existed {
                self.woke(key);
            }
            Ok(existed)
        }
        .boxed()
    }

    fn sweep(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        async move {
            let swept = self.run("a sweep", async move |c, sql| records::sweep(c, sql, limit).await).await?;
            self.inner.wakeups.notifier.prune();
            Ok(swept)
        }
        .boxed()
    }

    fn watch(&self, key: &StorageKey) -> BoxFuture<'static, ()> {
        // Both subscriptions are taken now, before the future is polled.
        let changed = self.inner.wakeups.notifier.subscribe(key);
        let mut resumed = self.inner.wakeups.resumed.subscribe();
        async move {
            tokio::select! {
                () = changed => {}
                _ = resumed.changed() => {}
            }
        }
        .boxed()
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.run("a ping", async |c, _| {
            c.simple_query("SELECT 1").await.map(drop).map_err(pool::pg_error("postgres ping failed"))
        })
        .boxed()
    }

    fn live_begin<'a>(&'a self, lease: &'a Lease, head: &'a LiveHead) -> BoxFuture<'a, Result<bool, StoreError>> {
        async move {
            self.run("a live log opening", async move |c, sql| live::begin(c, sql, lease, head).await).await?;
            Ok(true)
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
            self.run("a live log append", async move |c, sql| live::append(c, sql, lease, first, chunks).await).await?;
            self.woke(&lease.key);
            Ok(())
        }
        .boxed()
    }

    fn live_end<'a>(&'a self, lease: &'a Lease, end: LiveEnd) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            self.run("a live log end", async move |c, sql| live::end(c, sql, lease, end).await).await?;
            self.woke(&lease.key);
            Ok(())
        }
        .boxed()
    }

    fn live_read<'a>(&'a self, key: &'a StorageKey, from: u64) -> BoxFuture<'a, Result<Option<LiveRead>, StoreError>> {
        self.run("a live log read", async move |c, sql| live::read(c, sql, key, from).await).boxed()
    }
}
