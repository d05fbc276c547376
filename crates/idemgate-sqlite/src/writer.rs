//! The writer thread: the one connection that touches the file, fed by a channel,
//! committing in groups.
//!
//! SQLite calls block, so none of them runs on a tokio worker. The thread blocks for
//! the first queued operation, takes whatever else is queued (up to [`MAX_BATCH`]),
//! runs them all in one `BEGIN IMMEDIATE` transaction, each inside its own savepoint
//! (one queued alone needs none: its failure rolls back the transaction), commits,
//! and only then answers them and wakes their waiters. Under load one commit (one WAL
//! append) thus serves many requests; when idle an operation waits for no one.
//! Because this thread is the only writer in the process, a claim's read and write
//! cannot interleave with another claim's.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use idemgate::store::Notifier;
use idemgate::{Clock, StorageKey, StoreError, Timestamp};
use parking_lot::{Mutex, MutexGuard};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ffi};
use tokio::sync::oneshot;

use crate::schema::sqlite_error;

/// The most operations one transaction carries. Enough to amortise the commit;
/// small enough that the first operation in a batch is not kept waiting long.
pub(crate) const MAX_BATCH: usize = 256;

/// Whose turn it is to write in this process: the writer thread's, for a batch, or
/// the checkpointer's, for a `RESTART` (which must hold commits back while it copies
/// the last frames and rewinds the log). Without it the writer finds SQLite's write
/// lock taken and its busy handler sleeps 1, 2, 5, 10 ms... between tries, so a
/// 4 ms restart stalled every queued claim for 8 ms and a 12 ms one for 18; waiting
/// here, the writer resumes the moment the restart ends. The writer hands its turn
/// over fairly after each batch: re-taking it within microseconds, it would
/// otherwise keep a waiting checkpointer out for many batches while the log grows.
#[derive(Clone, Default)]
pub(crate) struct Turns(Arc<Mutex<()>>);

impl Turns {
    fn take(&self) -> MutexGuard<'_, ()> {
        self.0.lock()
    }
}

/// Set for good once a sync of the file or of its WAL has failed.
///
/// Linux reports a failed write-back to the next sync and then forgets it: a second
/// sync succeeds, though the pages it could not write are lost from the cache and the
/// disk alike. A checkpoint after that would rewind the WAL over the only good copy of
/// those pages, and SQLite has no way to copy them again. So a halted store writes
/// and checkpoints nothing more, not even when it closes, and every operation that
/// reaches the writer fails as unavailable (replays already held in memory, which are
/// committed, are still served); the WAL keeps every committed operation, and the next
/// process to open the file rebuilds the WAL's index and copies all of it again.
#[derive(Clone, Default)]
pub(crate) struct Halt(Arc<OnceLock<String>>);

impl Halt {
    /// Halts for good if `error` is a failed sync of `file` (logging it the first
    /// time); whether it was one.
    fn on(&self, error: &rusqlite::Error, file: &str) -> bool {
        let failed_sync =
            matches!(error, rusqlite::Error::SqliteFailure(e, _) if e.extended_code == ffi::SQLITE_IOERR_FSYNC);
        if failed_sync && self.0.set(format!("a sync of {file} failed: {error}")).is_ok() {
            tracing::error!(
                target: "idemgate::store",
                file,
                error = %error,
                "sqlite could not sync the file; the store has stopped so that nothing overwrites the WAL, which \
                 still holds every committed operation: restart the process to recover them",
            );
        }
        failed_sync
    }

    fn reason(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    /// Keeps `conn`'s close from checkpointing once halted.
    fn keep_wal(&self, conn: &Connection) {
        if self.reason().is_some() {
            let _ = conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true);
        }
    }
}

/// One queued operation.
pub(crate) trait Job: Send {
    /// Runs the operation inside the batch's transaction (and its own savepoint when
    /// the batch has others); whether it succeeded (and its changes are to be kept).
    fn run(&mut self, conn: &Connection, now: Timestamp) -> bool;

    /// Answers the caller once the batch is over: with its own outcome if the batch
    /// committed, or with `failure` if it did not.
    fn finish(self: Box<Self>, failure: Option<&Failure>, notifier: &Notifier);

    /// The SQLite error the operation itself failed with, if any: a sync can fail
    /// inside one (the first write after the WAL was rewound syncs its header).
    fn sqlite_error(&self) -> Option<&rusqlite::Error>;
}

/// Why a whole batch failed: it could not begin, a savepoint could not be taken or
/// undone, or the commit failed. Nothing in the batch was written.
#[derive(Debug)]
pub(crate) struct Failure {
    context: &'static str,
    error: rusqlite::Error,
}

impl Failure {
    fn new(context: &'static str) -> impl FnOnce(rusqlite::Error) -> Self {
        move |error| Self { context, error }
    }

    /// The failure of every batch once the store has halted.
    fn halted(reason: &str) -> Self {
        let restart = format!("{reason}; restart the process to recover the file from its WAL");
        let error = rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_IOERR_FSYNC), Some(restart));
        Self { context: "sqlite store stopped after a failed sync", error }
    }

    fn to_error(&self) -> StoreError {
        // One failure answers many callers, and errors are not `Clone`: each gets
        // its own copy, with SQLite's message (and code) kept.
        match self.error.sqlite_error() {
            Some(&code) => {
                sqlite_error(self.context)(rusqlite::Error::SqliteFailure(code, Some(self.error.to_string())))
            }
            None => StoreError::unavailable(self.context, self.error.to_string()),
        }
    }
}

/// An operation `op` and where its answer goes.
pub(crate) struct Task<T, F> {
    op: Option<F>,
    outcome: Option<Result<T, StoreError>>,
    /// A key whose waiters are woken once the operation is committed.
    wake: Option<StorageKey>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Task<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection, Timestamp) -> Result<T, StoreError> + Send + 'static,
{
    /// A task and the receiver of its answer.
    pub(crate) fn job(op: F, wake: Option<StorageKey>) -> (Box<dyn Job>, oneshot::Receiver<Result<T, StoreError>>) {
        let (reply, rx) = oneshot::channel();
        (Box::new(Self { op: Some(op), outcome: None, wake, reply }), rx)
    }
}

impl<T, F> Job for Task<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection, Timestamp) -> Result<T, StoreError> + Send + 'static,
{
    fn run(&mut self, conn: &Connection, now: Timestamp) -> bool {
        let Some(op) = self.op.take() else { return false };
        let outcome = op(conn, now);
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn sqlite_error(&self) -> Option<&rusqlite::Error> {
        let error = self.outcome.as_ref()?.as_ref().err()?;
        std::iter::successors(std::error::Error::source(error), |e| e.source()).find_map(|e| e.downcast_ref())
    }

    fn finish(self: Box<Self>, failure: Option<&Failure>, notifier: &Notifier) {
        let answer = match (self.outcome, failure) {
            // The operation's own error stands either way: its savepoint was rolled
            // back, so it changed nothing whether or not the batch committed.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(value)), None) => {
                if let Some(key) = self.wake {
                    notifier.notify(&key);
                }
                Ok(value)
            }
            (_, Some(failure)) => Err(failure.to_error()),
            (None, None) => Err(StoreError::unavailable("sqlite writer skipped an operation", "it was never run")),
        };
        // The caller may have stopped waiting; the work is done regardless.
        let _ = self.reply.send(answer);
    }
}

/// The handle of the writer thread. Dropping it closes the channel, lets the thread
/// finish what is queued, and waits for it to close the connection.
pub(crate) struct Writer {
    jobs: Option<Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread, which owns `conn` from now on.
    pub(crate) fn spawn(
        conn: Connection,
        turns: Turns,
        halt: Halt,
        clock: Arc<dyn Clock>,
        notifier: Arc<Notifier>,
    ) -> Result<Self, StoreError> {
        let (jobs, rx) = channel();
        let thread = thread::Builder::new()
            .name("idemgate-sqlite".into())
            .spawn(move || run(conn, &turns, &halt, &rx, clock.as_ref(), &notifier))
            .map_err(|e| StoreError::unavailable("sqlite cannot start its writer thread", e))?;
        Ok(Self { jobs: Some(jobs), thread: Some(thread) })
    }

    /// Queues `job`; fails if the thread is gone.
    pub(crate) fn submit(&self, job: Box<dyn Job>) -> Result<(), StoreError> {
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(gone()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            // Joining from the writer thread itself would wait forever.
            if thread.thread().id() != thread::current().id() {
                // A panic on the writer thread has already answered every caller
                // (their channels closed); there is nobody left to tell.
                let _ = thread.join();
            }
        }
    }
}

/// The error for an operation the writer thread can no longer run.
pub(crate) fn gone() -> StoreError {
    StoreError::unavailable("sqlite writer thread is gone", "the store is shutting down or its thread panicked")
}

fn run(
    conn: Connection,
    turns: &Turns,
    halt: &Halt,
    jobs: &Receiver<Box<dyn Job>>,
    clock: &dyn Clock,
    notifier: &Notifier,
) {
    let file = conn.path().unwrap_or_default().to_owned();
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = jobs.recv() {
        let turn = turns.take();
        // Taken after the turn: claims that queued behind a restart join this batch.
        batch.push(first);
        batch.extend(jobs.try_iter().take(MAX_BATCH - 1));
        let failure = match halt.reason() {
            Some(reason) => Some(Failure::halted(reason)),
            None => {
                let failure = execute(&conn, &mut batch, clock).err();
                // A sync fails at the commit or inside an operation.
                let errors = failure.iter().map(|f| &f.error).chain(batch.iter().filter_map(|job| job.sqlite_error()));
                for error in errors {
                    halt.on(error, &file);
                }
                failure
            }
        };
        MutexGuard::unlock_fair(turn);
        for job in batch.drain(..) {
            job.finish(failure.as_ref(), notifier);
        }
    }
    // Every handle is gone. Closing checkpoints the WAL (unless halted); if that fails
    // the data is still safe in the WAL file, and nobody is left to return the error to.
    halt.keep_wal(&conn);
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "sqlite store did not close cleanly");
    }
}

/// The statements that frame a batch. They go through the connection's statement
/// cache: rusqlite's `Transaction` and `Savepoint` run theirs with `execute_batch`,
/// which parses the SQL again each time (with the savepoint a lone operation does
/// not need, 4–5 % of this thread's CPU per miss).
const BEGIN: &str = "BEGIN IMMEDIATE";
const SAVEPOINT: &str = "SAVEPOINT job";
const ROLLBACK_TO: &str = "ROLLBACK TO job";
const RELEASE: &str = "RELEASE job";
const COMMIT: &str = "COMMIT";
const ROLLBACK: &str = "ROLLBACK";

fn step(conn: &Connection, sql: &str, context: &'static str) -> Result<(), Failure> {
    conn.prepare_cached(sql).and_then(|mut stmt| stmt.execute([])).map(drop).map_err(Failure::new(context))
}

fn execute(conn: &Connection, batch: &mut [Box<dyn Job>], clock: &dyn Clock) -> Result<(), Failure> {
    step(conn, BEGIN, "sqlite cannot begin a transaction")?;
    let done = match batch {
        // Alone in its transaction, an operation needs no savepoint: if it fails, the
        // whole transaction is rolled back (below) and its own error answers it.
        [job] => {
            if job.run(conn, clock.now()) {
                step(conn, COMMIT, "sqlite commit failed")
            } else {
                step(conn, ROLLBACK, "sqlite cannot roll back a transaction")
            }
        }
        _ => run_each(conn, batch, clock),
    };
    // After a failed statement the transaction may still be open (a busy COMMIT
    // leaves it so): nothing of the batch is to be kept.
    if done.is_err() && !conn.is_autocommit() {
        let _ = step(conn, ROLLBACK, "sqlite cannot roll back a transaction");
    }
    done
}

/// Runs each operation in its own savepoint, then commits.
fn run_each(conn: &Connection, batch: &mut [Box<dyn Job>], clock: &dyn Clock) -> Result<(), Failure> {
    for job in batch.iter_mut() {
        step(conn, SAVEPOINT, "sqlite cannot take a savepoint")?;
        // A failed operation rolls back to its savepoint and the batch goes on: one
        // caller's error is not the others'.
        if !job.run(conn, clock.now()) {
            step(conn, ROLLBACK_TO, "sqlite cannot roll back a savepoint")?;
        }
        step(conn, RELEASE, "sqlite cannot release a savepoint")?;
    }
    step(conn, COMMIT, "sqlite commit failed")
}

/// How often the checkpointer copies committed WAL frames into the database file.
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The checkpointer thread. The writer's connection never checkpoints
/// (`wal_autocheckpoint = 0`): a checkpoint copies pages into the file and syncs it,
/// milliseconds during which the batch that triggered it, and every claim queued
/// behind it, would wait. Here a second connection runs `PASSIVE` checkpoints, which
/// never block the writer, every [`CHECKPOINT_EVERY`].
pub(crate) struct Checkpointer {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread, which owns `conn` (a connection to the same file).
    pub(crate) fn spawn(conn: Connection, turns: Turns, halt: Halt, name: String) -> Result<Self, StoreError> {
        let (stop, rx) = channel();
        let thread = thread::Builder::new()
            .name("idemgate-sqlite-ckpt".into())
            .spawn(move || checkpoint_loop(Checkpoint { conn, turns, synced: 0 }, &halt, &rx, &name))
            .map_err(|e| StoreError::unavailable("sqlite cannot start its checkpoint thread", e))?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn checkpoint_loop(mut ckpt: Checkpoint, halt: &Halt, stop: &Receiver<()>, name: &str) {
    let mut failing = false;
    // Halted, there is nothing left to do until the store closes.
    while halt.reason().is_none() && stop.recv_timeout(CHECKPOINT_EVERY) == Err(RecvTimeoutError::Timeout) {
        match ckpt.run() {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(target: "idemgate::store", file = name, "sqlite checkpoints work again");
            }
            Ok(()) => {}
            Err(e) if halt.on(&e, name) => {}
            // Logged once per run of failures: the WAL keeps every commit meanwhile,
            // and the next success (or the close) copies it all.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(target: "idemgate::store", file = name, error = %e, "sqlite checkpoint failed; the WAL grows until one succeeds");
            }
            Err(_) => {}
        }
    }
    halt.keep_wal(&ckpt.conn);
}

/// How long a `RESTART` waits for SQLite locks held by other processes (the
/// checkpointer connection's busy timeout; a `PASSIVE` checkpoint never waits).
pub(crate) const RESTART_PATIENCE: Duration = Duration::from_millis(50);

/// WAL frames (pages) past which a checkpoint also restarts the log.
pub(crate) const RESTART_AFTER_FRAMES: i64 = 8192;

/// The checkpointer's connection, and how far the database file is synced.
struct Checkpoint {
    conn: Connection,
    turns: Turns,
    /// The WAL frames (counted from the log's start) copied into the file and synced.
    synced: i64,
}

impl Checkpoint {
    /// A `PASSIVE` checkpoint, then a `RESTART` one if the log has grown past
    /// [`RESTART_AFTER_FRAMES`]. Under steady writes a passive checkpoint never catches
    /// up with the frames appended while it runs, and the log is only rewound from its
    /// start when a write begins with every frame copied: without the restart it would
    /// grow for as long as the load lasts. `RESTART` takes the writer's turn (after its
    /// current batch) and holds the next batch back while it copies the frames left,
    /// syncs the log and the file, and lets the next write rewind. It waits at most
    /// [`RESTART_PATIENCE`] for another process's writer or readers, and otherwise gives
    /// up until the next turn: the turn it holds meanwhile stalls this process's writer
    /// too.
    ///
    /// So that the writer is held as briefly as possible, the file is synced here after
    /// every passive checkpoint, outside the turn. SQLite itself syncs it only after a
    /// checkpoint that copied every frame, which under load is the restart: its sync
    /// then flushed every page copied since the last rewind, 3 ms on a fresh file and
    /// 12 ms at 80k records on the benchmark VM, growing with the file. And one more
    /// passive checkpoint just before the restart leaves it only the frames written
    /// meanwhile. (SQLite still syncs before it lets the log be reused; a failed sync
    /// here halts the store, as one of SQLite's own does: see [`Halt`].)
    fn run(&mut self) -> rusqlite::Result<()> {
        let frames = self.passive()?;
        if frames > RESTART_AFTER_FRAMES {
            self.passive()?;
            let _turn = self.turns.take();
            self.conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| row.get::<_, i64>(0))?;
        }
        Ok(())
    }

    /// A `PASSIVE` checkpoint, and a sync of the file if it copied frames not synced
    /// yet; the frames in the log.
    fn passive(&mut self) -> rusqlite::Result<i64> {
        // (busy, frames in the log, frames copied); -1, -1 when another process held
        // the checkpoint.
        let (frames, copied): (i64, i64) =
            self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get(1)?, row.get(2)?)))?;
        // Any count but the last one synced is news: more frames copied, or the first
        // frames of a log rewound since.
        if copied > 0 && copied != self.synced {
            sync_file(&self.conn)?;
            self.synced = copied;
        }
        Ok(frames)
    }
}

/// Syncs the main database file of `conn` through SQLite's own handle, as a checkpoint
/// does. Not through a descriptor of our own: closing it would release every POSIX
/// lock this process holds on the file, the writer connection's included, and another
/// process could then think itself the last one open and delete the WAL.
#[expect(unsafe_code, reason = "SQLite offers its file handle and sync only through its C API")]
fn sync_file(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::ffi;
    let failed = |rc| rusqlite::Error::SqliteFailure(ffi::Error::new(rc), Some("cannot sync the database file".into()));
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: `conn` is open and used by this thread only; FILE_POINTER writes a
    // pointer to the main database's `sqlite3_file`, which the connection owns and
    // keeps open until it closes, into `file`.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_FILE_POINTER,
            (&raw mut file).cast(),
        )
    };
    if rc != ffi::SQLITE_OK {
        return Err(failed(rc));
    }
    #[cfg(test)]
    if tests::syncs_fail(conn) {
        return Err(failed(ffi::SQLITE_IOERR_FSYNC));
    }
    // SAFETY: `file`, if set, is that open `sqlite3_file`; its methods are the VFS's,
    // and no other call uses it meanwhile (the connection is ours and idle).
    let rc = unsafe {
        match file.as_ref().and_then(|f| f.pMethods.as_ref()).and_then(|m| m.xSync) {
            Some(sync) => sync(file, ffi::SQLITE_SYNC_NORMAL | ffi::SQLITE_SYNC_DATAONLY),
            // Not opened: nothing written to sync.
            None => ffi::SQLITE_OK,
        }
    };
    if rc == ffi::SQLITE_OK { Ok(()) } else { Err(failed(rc)) }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use idemgate::{Claim, ErrorKind, RecordState, Store, SystemClock};
    use idemgate_testkit::{fp, key, sample_response};

    use super::*;
    use crate::SqliteStore;

    /// Files whose syncs fail, as after a write-back error.
    static FAILING: Mutex<Vec<String>> = Mutex::new(Vec::new());

    pub(super) fn syncs_fail(conn: &Connection) -> bool {
        conn.path().is_some_and(|p| FAILING.lock().iter().any(|f| f == p))
    }

    fn fail_syncs(path: &Path, fail: bool) {
        let path = path.to_str().unwrap().to_owned();
        let mut failing = FAILING.lock();
        failing.retain(|f| *f != path);
        if fail {
            failing.push(path);
        }
    }

    /// A sync that fails inside an operation (SQLite syncing the WAL's header) halts
    /// the writer too: the next batch is refused, not retried.
    #[test]
    fn a_sync_failing_inside_an_operation_halts_the_writer() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER)").unwrap();
        let halt = Halt::default();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let writer = Writer::spawn(conn, Turns::default(), halt.clone(), clock, Arc::new(Notifier::new())).unwrap();
        let (job, failed) = Task::job(
            |_: &Connection, _| -> Result<(), StoreError> {
                let sync = ffi::Error::new(ffi::SQLITE_IOERR_FSYNC);
                Err(sqlite_error("sqlite commit failed")(rusqlite::Error::SqliteFailure(sync, None)))
            },
            None,
        );
        writer.submit(job).unwrap();
        assert!(failed.blocking_recv().unwrap().is_err());
        let (job, refused) = insert(1, false);
        writer.submit(job).unwrap();
        let error = refused.blocking_recv().unwrap().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable);
        assert!(error.to_string().contains("failed sync"), "{error}");
        assert!(halt.reason().is_some());
    }

    /// A sync that fails halts the store for good: every operation fails from then
    /// on, even once syncs work again; nothing is checkpointed, not even at close; and
    /// the next open finds every committed record in the WAL.
    #[test]
    fn a_failed_sync_halts_the_store_and_keeps_the_wal() {
        const LEASE: Duration = Duration::from_secs(30);
        const TTL: Duration = Duration::from_secs(3600);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let wal = dir.path().join("t.db-wal");
        let store = SqliteStore::open(&path).unwrap();
        let response = sample_response(SystemClock.now());
        let committed = rt.block_on(async {
            for n in 0..50 {
                let Ok(Claim::Acquired(lease)) = store.claim(&key(n), &fp(n), LEASE).await else { panic!("claim {n}") };
                store.complete(&lease, &response, TTL).await.unwrap();
            }
            // A replay of it is now held in memory.
            assert!(matches!(store.claim(&key(0), &fp(0), LEASE).await, Ok(Claim::Completed(_))));
            // Writes go on until the checkpointer's next sync fails.
            fail_syncs(&path, true);
            let mut n = 50;
            let error = loop {
                match store.claim(&key(n), &fp(n), LEASE).await {
                    Ok(Claim::Acquired(_)) => n += 1,
                    Ok(other) => panic!("a fresh key answered {other:?}"),
                    Err(e) => break e,
                }
                assert!(n < 5_000, "a checkpoint runs every {CHECKPOINT_EVERY:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            assert_eq!(error.kind(), ErrorKind::Unavailable);
            assert!(error.to_string().contains("failed sync"), "{error}");
            fail_syncs(&path, false);
            tokio::time::sleep(CHECKPOINT_EVERY * 3).await;
            assert_eq!(store.claim(&key(n), &fp(n), LEASE).await.unwrap_err().kind(), ErrorKind::Unavailable);
            assert!(store.get(&key(0)).await.is_err(), "reads fail too");
            assert!(store.ping().await.is_err(), "and so does readiness");
            // Committed before the failure and held in memory: still replayed.
            assert!(matches!(store.claim(&key(0), &fp(0), LEASE).await, Ok(Claim::Completed(_))));
            n
        });
        let wal_size = std::fs::metadata(&wal).unwrap().len();
        assert!(wal_size > 0);
        drop(store);
        assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).ok(), Some(wal_size), "the close checkpointed nothing");

        let store = SqliteStore::open(&path).unwrap();
        rt.block_on(async {
            for n in 0..50 {
                let record = store.get(&key(n)).await.unwrap().expect("a record written before the failure");
                assert!(matches!(record.state, RecordState::Completed { .. }), "record {n}: {:?}", record.state);
            }
            for n in 50..committed {
                let record = store.get(&key(n)).await.unwrap().expect("a claim answered before the halt");
                assert!(matches!(record.state, RecordState::InFlight { .. }), "record {n}: {:?}", record.state);
            }
        });
    }

    /// A job that inserts `n` into `t`, then fails if `fail`.
    fn insert(n: i64, fail: bool) -> (Box<dyn Job>, oneshot::Receiver<Result<(), StoreError>>) {
        Task::job(
            move |conn: &Connection, _now| {
                conn.execute("INSERT INTO t (n) VALUES (?1)", [n]).map_err(sqlite_error("insert"))?;
                if fail { Err(StoreError::corrupt(format!("job {n} fails after writing"))) } else { Ok(()) }
            },
            None,
        )
    }

    fn rows(conn: &Connection) -> Vec<i64> {
        let mut stmt = conn.prepare("SELECT n FROM t ORDER BY n").unwrap();
        stmt.query_map([], |row| row.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    /// What a failed operation wrote is undone, whether it ran alone (no savepoint)
    /// or among others (its own savepoint), and the others' writes stay.
    #[test]
    fn a_failed_operation_leaves_nothing_behind() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER)").unwrap();
        let notifier = Notifier::new();
        for jobs in [vec![(1, true)], vec![(2, false)], vec![(3, false), (4, true), (5, false)]] {
            let (mut batch, answers): (Vec<_>, Vec<_>) = jobs.iter().map(|&(n, fail)| insert(n, fail)).unzip();
            let failure = execute(&conn, &mut batch, &SystemClock).err();
            assert!(failure.is_none(), "{failure:?}");
            assert!(conn.is_autocommit(), "the transaction is over");
            for ((job, mut answer), (n, fail)) in batch.into_iter().zip(answers).zip(jobs) {
                job.finish(None, &notifier);
                assert_eq!(answer.try_recv().expect("answered").is_err(), fail, "job {n}");
            }
        }
        assert_eq!(rows(&conn), [2, 3, 5]);
    }

    /// The sync goes through SQLite's own handle of a real file, and the checkpoint
    /// bookkeeping syncs only for frames it has not synced yet.
    #[test]
    fn passive_checkpoints_sync_what_they_copied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = Connection::open(&path).unwrap();
        writer.execute_batch("PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (n)").unwrap();
        let mut ckpt = Checkpoint { conn: Connection::open(&path).unwrap(), turns: Turns::default(), synced: 0 };
        sync_file(&ckpt.conn).unwrap();

        writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let frames = ckpt.passive().unwrap();
        assert!(frames > 0);
        assert_eq!(ckpt.synced, frames, "everything copied is synced");
        assert_eq!(ckpt.passive().unwrap(), frames);
        assert_eq!(ckpt.synced, frames);

        // Rewound: the next write starts the log over, and its frames (more of them
        // than before, so that the count differs) are synced again.
        ckpt.conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())).unwrap();
        writer.execute("INSERT INTO t VALUES (2), (zeroblob(20000))", []).unwrap();
        let rewound = ckpt.passive().unwrap();
        assert_ne!(rewound, frames);
        assert_eq!(ckpt.synced, rewound);
        let n: i64 = writer.query_row("SELECT count(*) FROM t", [], |row| row.get(0)).unwrap();
        assert_eq!(n, 3);
    }
}
