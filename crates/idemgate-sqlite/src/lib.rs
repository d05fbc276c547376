//! The embedded default store for idemgate: one SQLite file, crash-safe, with no
//! set-up.
//!
//! ```
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use idemgate::{Claim, Fingerprint, StorageKey, Store, StoredResponse, Timestamp};
//! use idemgate::http::{HeaderName, HeaderValue};
//! use idemgate_sqlite::SqliteStore;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let dir = tempfile::tempdir()?;
//! // Opening blocks (it creates the file and the schema): do it at start-up.
//! let store = SqliteStore::open(dir.path().join("idemgate.db"))?;
//!
//! # let rt = tokio::runtime::Builder::new_current_thread().build()?;
//! # rt.block_on(async {
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
//! // A retry of the same request gets the recorded response.
//! assert_eq!(store.claim(&key, &fp, Duration::from_secs(30)).await?, Claim::Completed(Box::new(response)));
//! # Ok::<_, idemgate::StoreError>(())
//! # })?;
//! # Ok(())
//! # }
//! ```
//!
//! # Behavior
//!
//! - **Expiry.** A completed record expires at its `completed_at` plus the TTL given to
//!   `complete`, stored as `expires_at_ms`; from then on a claim treats the key as
//!   absent and reuses the row. [`Store::sweep`] deletes expired records (and in-flight
//!   records more than [`STALE_IN_FLIGHT_GRACE`] past their lease) in batches of the
//!   limit given; until then [`Store::get`] still shows them.
//! - **Durability.** The file is in WAL mode with `synchronous=NORMAL`: an operation
//!   that has answered survives the process crashing or being killed. A power cut or
//!   OS crash may roll back the last few commits but never corrupts the file.
//! - **Lost connection, disk errors.** There is no connection to lose. When SQLite
//!   fails (disk full, I/O error, the file locked by another process for longer than
//!   the 5 s busy timeout) the operations of that batch fail with
//!   [`ErrorKind::Unavailable`](idemgate::ErrorKind::Unavailable) and write nothing;
//!   the next operation tries again. A row this build cannot read answers
//!   [`ErrorKind::Corrupt`](idemgate::ErrorKind::Corrupt) and can be removed with
//!   [`Store::purge`]. If the writer thread is gone, every operation answers
//!   `Unavailable`.
//! - **A failed sync halts the store.** Linux reports a failed write-back to one sync
//!   and then forgets it, so retrying would report success over pages that never
//!   reached the disk, and the next checkpoint would rewind the WAL over their only
//!   copy. When a sync of the file or its WAL fails, the store stops writing and
//!   checkpointing (also when it closes), every operation that needs the file answers
//!   `Unavailable` (`/readyz` too; replays already held in memory, being committed, are
//!   still served), and an error in the log says to restart the process: the next open
//!   rebuilds the WAL's index and copies every committed operation into the file.
//!   Another process that opens the file meanwhile (`idemgate inspect`, `purge`) does
//!   not know of the failure and may checkpoint: restart the gateway first.
//! - **A lease dropped without `complete` or `release`** (the owner crashed) runs out
//!   at its `lease_until`; the next claim of the same request takes it over, and the
//!   old owner's token is fenced out. The key stays bound to its request until then.
//! - **Cancellation.** An operation runs once it has been handed to the writer
//!   thread, even if its future is dropped: a claim abandoned that way leaves a lease
//!   that nobody holds, which runs out like a crashed owner's.
//! - **Several processes** may open one file (the CLI's `inspect` or `purge` beside
//!   `serve`): every operation is one `IMMEDIATE` transaction, so claims stay atomic
//!   across them. Wake-ups of [`Store::watch`] are in-process only; waiters in other
//!   processes find out by polling.
//! - **Replays from memory.** A record a claim found completed is kept in the process
//!   (up to 4,096 records, 32 MiB), so the next replays of it skip the writer thread.
//!   It is served until its expiry, or until a purge by any process: every
//!   [`Store::purge`] rewrites the *purge marker*, the file `<file>-purges` beside the
//!   database (the path SQLite resolved, with the database's permissions and, as root,
//!   its owner), inside its transaction, and every claim reads that marker first. Keep
//!   the marker with the database (like `-wal` and `-shm`), and delete records only
//!   through `purge` (or `idemgate purge`): a row deleted with plain SQL may still be
//!   replayed from a cache until it expires.
//!
//! # Design
//!
//! One writer thread owns the write connection and commits in groups (see
//! `writer.rs`): it blocks for the first operation, takes up to 255 more that are
//! queued, runs each in its own savepoint (none when it is alone) inside one `BEGIN
//! IMMEDIATE` transaction (its statements prepared once and cached), commits, and only
//! then answers and wakes waiters. It never checkpoints: a second thread with its own
//! connection runs a `PASSIVE` checkpoint every 100 ms and syncs the file after it, so
//! no commit (and no claim queued behind it) waits for pages to be copied into the
//! file and synced — except when the log has grown past 32 MiB and must be rewound:
//! then the checkpointer takes the writer's turn (an in-process mutex the writer holds
//! per batch) for one `RESTART`, which has only the last few frames left to copy.
//! Claims run the shared [`idemgate::store::decide`] between reading and writing the
//! row. Reads (`get`, `ping`) go through the same thread: they see every committed
//! write, in order, and the hot path is a write anyway; replays of records already
//! found are answered from `replays.rs`' cache without it.
//!
//! The schema (`idemgate_records`, `idemgate_meta`) is documented in `schema.rs` and
//! readable with the stock `sqlite3` CLI.
//!
//! [`STALE_IN_FLIGHT_GRACE`]: idemgate::store::STALE_IN_FLIGHT_GRACE

mod records;
mod replays;
mod schema;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use idemgate::store::Notifier;
use idemgate::{
    Claim, Clock, Fingerprint, Lease, Record, StorageKey, Store, StoreError, StoredResponse, SystemClock, Timestamp,
};
use rusqlite::Connection;

use self::records::Completion;
use self::replays::Replays;
use self::writer::{Checkpointer, Halt, Task, Turns, Writer};

/// The schema version this build reads and writes (in `idemgate_meta`).
pub const SCHEMA_VERSION: u32 = schema::SCHEMA_VERSION;

/// A [`Store`] in one SQLite file. Clones share the file and the writer thread;
/// dropping the last one finishes the queued operations and closes the file.
///
/// That last drop waits for the writer thread (the batch in progress, then the
/// close, which checkpoints the WAL unless the store halted after a failed sync):
/// milliseconds. Drop it at shutdown, not in a hot path.
///
/// See the [crate docs](crate) for its behaviour on expiry, errors and crashes.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    // Stopped first: the writer's close then checkpoints whatever is left (unless halted).
    _checkpointer: Option<Checkpointer>,
    // Dropped next: it finishes the queued operations and closes the file.
    writer: Writer,
    notifier: Arc<Notifier>,
    replays: Arc<Replays>,
    clock: Arc<dyn Clock>,
    path: Option<PathBuf>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let location = self.inner.path.as_ref().map_or_else(|| ":memory:".into(), |p| p.display().to_string());
        f.debug_struct("SqliteStore").field("path", &location).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store in the file at `path`, on the system
    /// clock.
    ///
    /// This blocks on file I/O: call it at start-up, or from `spawn_blocking`. It fails
    /// if the file cannot be opened or switched to WAL, or if it was written by a newer
    /// idemgate with a schema this build does not know.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::builder().open(path)
    }

    /// A store in memory, gone when the last handle is dropped (for tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::builder().open_in_memory()
    }

    /// Options for opening a store (its clock).
    pub fn builder() -> SqliteStoreBuilder {
        SqliteStoreBuilder::default()
    }

    /// The file this store lives in; `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    fn start(conn: Connection, clock: Arc<dyn Clock>, path: Option<PathBuf>) -> Result<Self, StoreError> {
        let turns = Turns::default();
        let halt = Halt::default();
        let checkpointer = match &path {
            Some(path) => Some(Checkpointer::spawn(
                schema::open_checkpointer(path)?,
                turns.clone(),
                halt.clone(),
                path.display().to_string(),
            )?),
            None => None,
        };
        // SQLite's own resolved path (symlinks followed), where its `-wal` and `-shm` go.
        let resolved = path
            .as_ref()
            .map(|given| conn.path().filter(|p| !p.is_empty()).map_or_else(|| given.clone(), PathBuf::from));
        let replays = Arc::new(Replays::open(resolved.as_deref())?);
        let notifier = Arc::new(Notifier::new());
        let writer = Writer::spawn(conn, turns, halt, Arc::clone(&clock), Arc::clone(&notifier))?;
        Ok(Self { inner: Arc::new(Inner { _checkpointer: checkpointer, writer, notifier, replays, clock, path }) })
    }

    /// Runs `op` on the writer thread, waking the waiters of `wake` once it has
    /// committed. Nothing is queued until the future is first polled.
    fn run<T, F>(&self, wake: Option<StorageKey>, op: F) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, Timestamp) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        async move {
            let (job, answer) = Task::job(op, wake);
            inner.writer.submit(job)?;
            answer.await.unwrap_or_else(|_| Err(writer::gone()))
        }
        .boxed()
    }
}

/// Options for [`SqliteStore`]: `SqliteStore::builder().with_clock(c).open(path)`.
pub struct SqliteStoreBuilder {
    clock: Arc<dyn Clock>,
}

impl Default for SqliteStoreBuilder {
    fn default() -> Self {
        Self { clock: Arc::new(SystemClock) }
    }
}

impl fmt::Debug for SqliteStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStoreBuilder").finish_non_exhaustive()
    }
}

impl SqliteStoreBuilder {
    /// Reads time from `clock` instead of the system clock (tests move a
    /// [`ManualClock`](idemgate::ManualClock)).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Opens the store in the file at `path`; see [`SqliteStore::open`].
    pub fn open(self, path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref();
        let conn = schema::open(Some(path))?;
        SqliteStore::start(conn, self.clock, Some(path.to_owned()))
    }

    /// Opens a store in memory; see [`SqliteStore::open_in_memory`].
    pub fn open_in_memory(self) -> Result<SqliteStore, StoreError> {
        let conn = schema::open(None)?;
        SqliteStore::start(conn, self.clock, None)
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        fp: &'a Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        let (key, fp) = (*key, *fp);
        // Read before the database: see `replays.rs` for why this order is safe.
        let generation = self.inner.replays.generation();
        if let Some(response) = self.inner.replays.get(generation, &key, &fp, self.inner.clock.now()) {
            return futures_util::future::ready(Ok(Claim::Completed(Box::new(response)))).boxed();
        }
        let replays = Arc::clone(&self.inner.replays);
        let claimed = self.run(None, move |conn, now| records::claim(conn, &key, &fp, lease, now));
        async move {
            let (claim, expires_at) = claimed.await?;
            if let (Claim::Completed(response), Some(expires_at)) = (&claim, expires_at) {
                replays.insert(generation, key, fp, response, expires_at);
            }
            Ok(claim)
        }
        .boxed()
    }

    fn renew<'a>(&'a self, lease: &'a Lease, duration: Duration) -> BoxFuture<'a, Result<Timestamp, StoreError>> {
        let (key, token) = (lease.key, lease.token);
        self.run(None, move |conn, now| records::renew(conn, &key, token, duration, now))
    }

    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let (key, token) = (lease.key, lease.token);
        let done = Completion {
            status: response.status,
            completed_at: response.completed_at,
            expires_at: response.completed_at + ttl,
            encoded: response.encode(),
        };
        self.run(Some(key), move |conn, _| records::complete(conn, &key, token, &done))
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), StoreError>> {
        let (key, token) = (lease.key, lease.token);
        self.run(Some(key), move |conn, _| records::release(conn, &key, token))
    }

    fn get<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        let key = *key;
        self.run(None, move |conn, _| records::get(conn, &key))
    }

    fn purge<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        let key = *key;
        let replays = Arc::clone(&self.inner.replays);
        self.run(Some(key), move |conn, _| {
            // Inside the transaction, before its commit: see `replays.rs`.
            replays.bump().map_err(|e| StoreError::unavailable("sqlite cannot write its purge marker", e))?;
            records::purge(conn, &key)
        })
    }

    fn sweep(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        let swept = self.run(None, move |conn, now| records::sweep(conn, limit, now));
        let inner = Arc::clone(&self.inner);
        async move {
            let n = swept.await?;
            inner.notifier.prune();
            Ok(n)
        }
        .boxed()
    }

    fn watch(&self, key: &StorageKey) -> BoxFuture<'static, ()> {
        self.inner.notifier.subscribe(key)
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.run(None, |conn, _| records::ping(conn))
    }
}
