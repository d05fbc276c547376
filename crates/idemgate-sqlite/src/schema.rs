//! Opening the file: connection settings, the schema, and its version.
//!
//! The schema is plain enough to inspect with the stock `sqlite3` CLI (Debian's
//! 3.40 reads it): keys, fingerprints and tokens are text, times are unix
//! milliseconds, and the response is the versioned [`StoredResponse::encode`] blob.
//!
//! [`StoredResponse::encode`]: idemgate::StoredResponse::encode

use std::path::Path;
use std::time::Duration;

use idemgate::StoreError;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};

/// The schema version this build writes and reads.
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// How long a statement waits for a lock held by another connection (the CLI's
/// `inspect`, a second process on the same file) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const META: &str = "CREATE TABLE IF NOT EXISTS idemgate_meta (name TEXT PRIMARY KEY, value TEXT) STRICT;";

/// Version 1. The comments are kept by SQLite and shown by the CLI's `.schema`.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS idemgate_records (
    key             TEXT PRIMARY KEY,  -- storage key: 64 hex digits
    fingerprint     TEXT NOT NULL,     -- request fingerprint: 64 hex digits
    state           TEXT NOT NULL CHECK (state IN ('in_flight', 'completed')),
    token           TEXT,              -- in flight: the owner's fencing token (a UUID)
    lease_until_ms  INTEGER,           -- in flight: unix ms when the lease runs out
    created_at_ms   INTEGER NOT NULL,  -- unix ms of the claim
    completed_at_ms INTEGER,           -- completed: unix ms the response completed
    expires_at_ms   INTEGER,           -- completed: completed_at_ms + ttl
    status          INTEGER,           -- completed: HTTP status
    response        BLOB,              -- completed: StoredResponse::encode, format v1
    CHECK (state <> 'in_flight' OR (token IS NOT NULL AND lease_until_ms IS NOT NULL)),
    CHECK (state <> 'completed' OR (completed_at_ms IS NOT NULL AND expires_at_ms IS NOT NULL
                                    AND status IS NOT NULL AND response IS NOT NULL))
) STRICT;
-- Sweeps: expired completed records, and in-flight records long past their lease.
CREATE INDEX IF NOT EXISTS idemgate_records_completed_expiry
    ON idemgate_records (expires_at_ms) WHERE state = 'completed';
CREATE INDEX IF NOT EXISTS idemgate_records_in_flight_lease
    ON idemgate_records (lease_until_ms) WHERE state = 'in_flight';
";

/// Maps a SQLite error to a [`StoreError`]: corruption as `Corrupt`, anything else
/// (I/O, a full disk, a lock held too long) as `Unavailable`.
pub(crate) fn sqlite_error(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            StoreError::corrupt(format!("{}: {e}", context.into()))
        }
        _ => StoreError::unavailable(context, e),
    }
}

/// Opens (creating if needed) the database at `path`, or an in-memory one, and
/// brings it to the current schema. Blocking.
pub(crate) fn open(path: Option<&Path>) -> Result<Connection, StoreError> {
    let mut conn = match path {
        Some(path) => Connection::open(path).map_err(|e| {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let message = match dir {
                Some(dir) if !dir.is_dir() => {
                    format!("sqlite cannot open {}: directory {} does not exist", path.display(), dir.display())
                }
                _ => format!("sqlite cannot open {}", path.display()),
            };
            StoreError::unavailable(message, e)
        })?,
        None => Connection::open_in_memory().map_err(sqlite_error("sqlite cannot open an in-memory database"))?,
    };
    // Errors from here on name the file: SQLite's own messages ("file is not a
    // database") do not.
    let name = path.map_or_else(|| ":memory:".to_owned(), |p| p.display().to_string());
    configure(&conn, &name, path.is_some())?;
    // Room for every statement the writer runs (ten operations, six for framing the
    // batches): an evicted one would be parsed again on its next use.
    conn.set_prepared_statement_cache_capacity(32);
    migrate(&mut conn, &name)?;
    Ok(conn)
}

/// Opens the connection that checkpoints the file at `path` (already opened, in WAL
/// mode, by [`open`]).
pub(crate) fn open_checkpointer(path: &Path) -> Result<Connection, StoreError> {
    let name = path.display().to_string();
    let conn = Connection::open(path)
        .map_err(|e| StoreError::unavailable(format!("sqlite cannot open {name} to checkpoint it"), e))?;
    // Short: only a `RESTART` waits, and it holds this process's writer back meanwhile.
    conn.busy_timeout(crate::writer::RESTART_PATIENCE)
        .map_err(sqlite_error(format!("sqlite cannot set busy_timeout on {name}")))?;
    // The same durability as the writer's: a checkpoint syncs the WAL, then the file.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sqlite_error(format!("sqlite cannot set synchronous on {name}")))?;
    Ok(conn)
}

fn configure(conn: &Connection, name: &str, file: bool) -> Result<(), StoreError> {
    // The busy timeout first: switching to WAL needs a lock another process may hold.
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite_error(format!("sqlite cannot set busy_timeout on {name}")))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(sqlite_error(format!("sqlite cannot switch {name} to WAL")))?;
    // An in-memory database has no WAL ("memory"); a file must have one.
    if file && !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::unavailable(
            format!("sqlite cannot switch {name} to WAL"),
            format!("journal_mode stayed {mode:?}; is the file on a filesystem without shared memory?"),
        ));
    }
    // In WAL mode, NORMAL syncs at checkpoints, not at each commit: a committed write
    // survives the process crashing, and a power loss can roll back the last few
    // commits but never corrupts the file. Process crashes are what we defend against.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sqlite_error(format!("sqlite cannot set synchronous on {name}")))?;
    // The checkpointer thread checkpoints; commits on this connection never do. The
    // WAL is truncated back to this size after a checkpoint that emptied it.
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(sqlite_error(format!("sqlite cannot set wal_autocheckpoint on {name}")))?;
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
        .map_err(sqlite_error(format!("sqlite cannot set journal_size_limit on {name}")))
}

fn migrate(conn: &mut Connection, name: &str) -> Result<(), StoreError> {
    let failed = |what: &str| sqlite_error(format!("sqlite cannot {what} in {name}"));
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(failed("begin a transaction"))?;
    tx.execute_batch(META).map_err(failed("create idemgate_meta"))?;
    let found: Option<String> = tx
        .query_row("SELECT value FROM idemgate_meta WHERE name = 'schema_version'", [], |row| row.get(0))
        .optional()
        .map_err(failed("read the schema version"))?;
    match found.as_deref().map(str::parse::<u32>) {
        None => {
            tx.execute_batch(SCHEMA_V1).map_err(failed("create the schema"))?;
            tx.execute(
                "INSERT INTO idemgate_meta (name, value) VALUES ('schema_version', ?1)",
                [SCHEMA_VERSION.to_string()],
            )
            .map_err(failed("write the schema version"))?;
        }
        // Idempotent, and restores an index dropped by hand.
        Some(Ok(SCHEMA_VERSION)) => tx.execute_batch(SCHEMA_V1).map_err(failed("check the schema"))?,
        Some(Ok(newer)) if newer > SCHEMA_VERSION => {
            return Err(StoreError::corrupt(format!(
                "sqlite file {name} has schema version {newer}, but this build of idemgate reads version \
                 {SCHEMA_VERSION}: upgrade idemgate, or point it at another file"
            )));
        }
        Some(_) => {
            return Err(StoreError::corrupt(format!(
                "sqlite file {name} has an unknown schema version {:?} in idemgate_meta",
                found.as_deref().unwrap_or_default()
            )));
        }
    }
    tx.commit().map_err(failed("commit the schema"))
}
