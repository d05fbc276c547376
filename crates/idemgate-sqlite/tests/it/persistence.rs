//! What is written stays written: across a reopen, and against newer files.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idemgate::{Claim, ErrorKind, ManualClock, RecordState, Store};
use idemgate_sqlite::SqliteStore;
use idemgate_testkit::{START, fp, key, sample_response};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
}

#[test]
fn records_survive_closing_and_reopening_the_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("store.db");
    let clock = ManualClock::new(START);
    let response = sample_response(START);

    let in_flight = runtime().block_on(async {
        let store = SqliteStore::builder().with_clock(clock.clone()).open(&path).expect("the store opens");
        let Claim::Acquired(done) = store.claim(&key(1), &fp(1), LEASE).await.expect("claim") else {
            panic!("a fresh key is acquired")
        };
        store.complete(&done, &response, TTL).await.expect("complete");
        let Claim::Acquired(running) = store.claim(&key(2), &fp(2), LEASE).await.expect("claim") else {
            panic!("a fresh key is acquired")
        };
        running
        // The store drops here: its thread finishes and closes the file.
    });

    runtime().block_on(async {
        let store = SqliteStore::builder().with_clock(clock.clone()).open(&path).expect("the store reopens");
        match store.claim(&key(1), &fp(1), LEASE).await.expect("claim") {
            Claim::Completed(got) => assert!(*got == response, "the response is byte-identical after a reopen"),
            other => panic!("expected Completed after a reopen, got {other:?}"),
        }
        assert_eq!(
            store.get(&key(2)).await.expect("get").map(|r| r.state),
            Some(RecordState::InFlight { token: in_flight.token, lease_until: in_flight.lease_until }),
            "an in-flight lease survives too, token and all"
        );
        // The owner from before the restart can still finish its work.
        store.complete(&in_flight, &response, TTL).await.expect("the old owner completes");
    });
}

/// What another process writes to the file (here a second store on it, as `idemgate
/// purge` would be) is what the next claim sees: no stale replay, no stale lease.
#[test]
fn claims_read_what_another_process_wrote() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("store.db");
    let clock = ManualClock::new(START);
    runtime().block_on(async {
        let a = SqliteStore::builder().with_clock(clock.clone()).open(&path).expect("the store opens");
        let b = SqliteStore::builder().with_clock(clock.clone()).open(&path).expect("a second store opens");
        let Claim::Acquired(lease) = a.claim(&key(1), &fp(1), LEASE).await.expect("claim") else {
            panic!("a fresh key is acquired")
        };
        assert!(matches!(b.claim(&key(1), &fp(1), LEASE).await.expect("claim"), Claim::InFlight { .. }));
        assert!(matches!(b.claim(&key(1), &fp(2), LEASE).await.expect("claim"), Claim::Mismatch));
        a.complete(&lease, &sample_response(START), TTL).await.expect("complete");
        assert!(matches!(b.claim(&key(1), &fp(1), LEASE).await.expect("claim"), Claim::Completed(_)));
        assert!(b.purge(&key(1)).await.expect("purge"));
        // Purged by `b`: `a` must not replay it, but execute again.
        assert!(matches!(a.claim(&key(1), &fp(1), LEASE).await.expect("claim"), Claim::Acquired(_)));
        // Expiry is read on the reader too: past the TTL a completed key is free again.
        let Claim::Acquired(lease) = a.claim(&key(2), &fp(2), LEASE).await.expect("claim") else {
            panic!("a fresh key is acquired")
        };
        a.complete(&lease, &sample_response(START), TTL).await.expect("complete");
        clock.advance(TTL);
        assert!(matches!(b.claim(&key(2), &fp(2), LEASE).await.expect("claim"), Claim::Acquired(_)));
    });
}

/// Replays are answered from the process's cache once a claim has found the record;
/// a purge through any store on the file (another process, `idemgate purge`) ends that
/// at once, and a row deleted behind the store's back (not through `purge`) is still
/// replayed from the cache, which is how the test knows the cache answered.
#[test]
fn a_cached_replay_ends_with_a_purge_from_another_process() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("store.db");
    let clock = ManualClock::new(START);
    let response = sample_response(START);
    runtime().block_on(async {
        let a = SqliteStore::builder().with_clock(clock.clone()).open(&path).expect("the store opens");
        let b = SqliteStore::builder().with_clock(clock.clone()).open(&path).expect("a second store opens");
        for k in [1, 2] {
            let Claim::Acquired(lease) = a.claim(&key(k), &fp(k), LEASE).await.expect("claim") else {
                panic!("a fresh key is acquired")
            };
            a.complete(&lease, &response, TTL).await.expect("complete");
            // The first replay reads the file and fills the cache.
            assert_eq!(
                a.claim(&key(k), &fp(k), LEASE).await.expect("claim"),
                Claim::Completed(Box::new(response.clone()))
            );
        }
        let raw = rusqlite::Connection::open(&path).expect("a raw connection");
        raw.execute("DELETE FROM idemgate_records WHERE key = ?1", [key(2).to_hex()]).expect("a raw delete");
        assert_eq!(
            a.claim(&key(2), &fp(2), LEASE).await.expect("claim"),
            Claim::Completed(Box::new(response.clone())),
            "answered from the cache"
        );
        // Another fingerprint is never answered from the cache.
        assert_eq!(a.claim(&key(1), &fp(9), LEASE).await.expect("claim"), Claim::Mismatch);

        assert!(b.purge(&key(1)).await.expect("purge"));
        assert!(matches!(a.claim(&key(1), &fp(1), LEASE).await.expect("claim"), Claim::Acquired(_)));
        // The purge emptied the whole cache: key 2, deleted behind its back, is gone too.
        assert!(matches!(a.claim(&key(2), &fp(2), LEASE).await.expect("claim"), Claim::Acquired(_)));
        assert!(dir.path().join("store.db-purges").exists(), "the purge marker sits beside the file");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &str| std::fs::metadata(dir.path().join(p)).expect("a file").permissions().mode() & 0o777;
            assert_eq!(mode("store.db-purges"), mode("store.db"), "the marker has the database's permissions");
        }

        // A cached record expires with its TTL, like the row.
        let Claim::Acquired(lease) = a.claim(&key(3), &fp(3), LEASE).await.expect("claim") else {
            panic!("a fresh key is acquired")
        };
        a.complete(&lease, &response, TTL).await.expect("complete");
        assert!(matches!(a.claim(&key(3), &fp(3), LEASE).await.expect("claim"), Claim::Completed(_)));
        clock.advance(TTL);
        assert!(matches!(a.claim(&key(3), &fp(3), LEASE).await.expect("claim"), Claim::Acquired(_)));
    });
}

/// A gateway on a symlink to the file and `idemgate purge` on its real path share one
/// marker, as they share one WAL: the one SQLite resolved.
#[cfg(unix)]
#[test]
fn a_purge_by_the_real_path_reaches_a_store_opened_through_a_symlink() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let real = dir.path().join("store.db");
    let link = dir.path().join("current.db");
    let clock = ManualClock::new(START);
    let response = sample_response(START);
    runtime().block_on(async {
        let b = SqliteStore::builder().with_clock(clock.clone()).open(&real).expect("the store opens");
        std::os::unix::fs::symlink(&real, &link).expect("a symlink");
        let a = SqliteStore::builder().with_clock(clock.clone()).open(&link).expect("the store opens by the link");
        let Claim::Acquired(lease) = a.claim(&key(1), &fp(1), LEASE).await.expect("claim") else {
            panic!("a fresh key is acquired")
        };
        a.complete(&lease, &response, TTL).await.expect("complete");
        assert!(matches!(a.claim(&key(1), &fp(1), LEASE).await.expect("claim"), Claim::Completed(_)));
        assert!(b.purge(&key(1)).await.expect("purge"));
        assert!(matches!(a.claim(&key(1), &fp(1), LEASE).await.expect("claim"), Claim::Acquired(_)));
        assert!(!dir.path().join("current.db-purges").exists(), "one marker, by the real path");
    });
}

/// Commits go to the WAL and a checkpointer thread copies them into the file, so the
/// file grows while the store is open, without waiting for the close.
#[test]
fn the_wal_is_checkpointed_while_the_store_runs() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("store.db");
    runtime().block_on(async {
        let store = SqliteStore::open(&path).expect("the store opens");
        let before = std::fs::metadata(&path).expect("the file").len();
        for i in 0..200 {
            let Claim::Acquired(lease) = store.claim(&key(i), &fp(i), LEASE).await.expect("claim") else {
                panic!("a fresh key is acquired")
            };
            store.complete(&lease, &sample_response(START), TTL).await.expect("complete");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&path).expect("the file").len() <= before {
            assert!(std::time::Instant::now() < deadline, "nothing was checkpointed into {}", path.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn a_file_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("store.db");
    drop(SqliteStore::open(&path).expect("the store opens"));

    let conn = rusqlite::Connection::open(&path).expect("a second connection");
    let version: String = conn
        .query_row("SELECT value FROM idemgate_meta WHERE name = 'schema_version'", [], |r| r.get(0))
        .expect("the schema version is recorded");
    assert_eq!(version, idemgate_sqlite::SCHEMA_VERSION.to_string());
    conn.execute("UPDATE idemgate_meta SET value = '2' WHERE name = 'schema_version'", []).expect("update");
    drop(conn);

    let err = SqliteStore::open(&path).expect_err("a newer schema is refused");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    let message = err.to_string();
    assert!(message.contains("schema version 2") && message.contains("upgrade idemgate"), "{message}");
    assert!(message.contains(&path.display().to_string()), "the message names the file: {message}");
}

#[test]
fn opening_in_a_missing_directory_says_so() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let missing = dir.path().join("no-such-dir");
    let path = missing.join("store.db");
    let err = SqliteStore::open(&path).expect_err("there is no directory to create the file in");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "the message names the file: {message}");
    assert!(message.contains("does not exist"), "the message says why: {message}");
    assert!(!missing.exists(), "nothing was created");
}

#[test]
fn the_file_is_in_wal_mode_with_the_documented_schema() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).expect("the store opens");
    assert_eq!(store.path(), Some(path.as_path()));
    assert_eq!(store.backend(), "sqlite");

    let conn = rusqlite::Connection::open(&path).expect("a second connection");
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("journal_mode");
    assert_eq!(mode, "wal");
    let strict: Vec<(String, i64)> = conn
        .prepare("SELECT name, strict FROM pragma_table_list WHERE name LIKE 'idemgate_%' ORDER BY name")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .expect("table list");
    assert_eq!(strict, [("idemgate_meta".to_owned(), 1), ("idemgate_records".to_owned(), 1)]);
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('idemgate_records')")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("columns");
    assert_eq!(
        columns,
        [
            "key",
            "fingerprint",
            "state",
            "token",
            "lease_until_ms",
            "created_at_ms",
            "completed_at_ms",
            "expires_at_ms",
            "status",
            "response"
        ]
    );
}

#[test]
fn a_file_that_is_not_a_database_is_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "these are not the pages you are looking for\n".repeat(200)).expect("write a text file");
    let err = SqliteStore::open(&path).expect_err("a text file is not a store");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains(&path.display().to_string()), "the message names the file: {err}");
}

/// Rewinds a run waits for.
const REWINDS: u64 = 3;

/// How long a run keeps writing while it waits for them. Generous: how fast the
/// checkpointer can copy and sync is the disk's to say, and right after a fresh build
/// (CI) its fsyncs took seconds while gigabytes of artifacts were written back.
const PATIENCE: Duration = Duration::from_secs(90);

/// A log this large without the rewinds is not going to get them: the run stops.
const GIVE_UP: u64 = 2 << 30;

/// Keys of task `t` are `t * TASK_KEYS + i`.
const TASK_KEYS: u64 = 1 << 32;

/// What the WAL went through during a run.
struct WalRun {
    /// The largest size read (reported: it depends on the disk, see [`PATIENCE`]).
    largest: u64,
    /// How many times it was rewound: the checkpoint sequence number in its header
    /// (bytes 12..16), which SQLite increments each time the log restarts from its
    /// first frame. Never rewound, 16,000 pairs leave ~430 MB of log.
    rewinds: u64,
}

/// Runs `tasks` concurrent tasks of claim + complete pairs on a fresh file, each
/// writing at least `pairs` and on until the WAL has been rewound [`REWINDS`] times
/// (or [`PATIENCE`] is spent, or the log reached [`GIVE_UP`]), reading the WAL's size and header every `sample_every`
/// pairs; then checks that every `check_every`-th record written is there, completed.
fn run_wal(runtime: &tokio::runtime::Runtime, tasks: u64, pairs: u64, sample_every: u64, check_every: usize) -> WalRun {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("store.db");
    let wal = dir.path().join("store.db-wal");
    let clock = ManualClock::new(START);
    let started = std::time::Instant::now();
    runtime.block_on(async {
        let store = SqliteStore::builder().with_clock(clock.clone()).open(&path).expect("the store opens");
        let (largest, rewinds) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tasks: Vec<_> = (0..tasks)
            .map(|t| {
                let (store, wal, largest, rewinds) = (store.clone(), wal.clone(), largest.clone(), rewinds.clone());
                tokio::spawn(async move {
                    let response = sample_response(START);
                    let mut i = 0;
                    let waiting = || {
                        rewinds.load(Ordering::Relaxed) < REWINDS
                            && started.elapsed() < PATIENCE
                            && largest.load(Ordering::Relaxed) < GIVE_UP
                    };
                    while i < pairs || waiting() {
                        let n = t * TASK_KEYS + i;
                        let Claim::Acquired(lease) = store.claim(&key(n), &fp(n), LEASE).await.expect("claim") else {
                            panic!("a fresh key is acquired")
                        };
                        store.complete(&lease, &response, TTL).await.expect("complete");
                        if i % sample_every == 0 {
                            let mut log = std::fs::File::open(&wal).expect("the WAL exists");
                            largest.fetch_max(log.metadata().expect("its size").len(), Ordering::Relaxed);
                            let mut header = [0u8; 16];
                            if log.read_exact(&mut header).is_ok() {
                                let seq = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);
                                rewinds.fetch_max(u64::from(seq), Ordering::Relaxed);
                            }
                        }
                        i += 1;
                    }
                    (t, i)
                })
            })
            .collect();
        let mut written = Vec::new();
        for task in tasks {
            written.push(task.await.expect("the task runs to the end"));
        }
        for (t, count) in written {
            for i in (0..count).step_by(check_every) {
                let n = t * TASK_KEYS + i;
                let record = store.get(&key(n)).await.expect("get").expect("the record is there");
                assert!(matches!(record.state, RecordState::Completed { .. }), "record {n}: {:?}", record.state);
            }
        }
        WalRun { largest: largest.load(Ordering::Relaxed), rewinds: rewinds.load(Ordering::Relaxed) }
    })
}

/// Under steady writes the log is rewound (by the checkpointer's `RESTART`, which
/// takes its turn between the writer's batches) instead of growing for as long as
/// the load lasts, and nothing written is lost on the way.
#[test]
fn the_log_is_rewound_under_steady_writes() {
    let run = run_wal(&runtime(), 1, 4_000, 100, 499);
    assert!(
        run.rewinds >= REWINDS,
        "the WAL was rewound {} times in {PATIENCE:?}; it reached {} bytes",
        run.rewinds,
        run.largest
    );
}

/// The same under concurrent writes, where the writer is rarely idle: the checkpointer
/// still gets its turn between two batches, so the log is rewound instead of growing
/// for as long as the writer stays busy.
#[test]
fn the_log_is_rewound_under_concurrent_writes() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    let run = run_wal(&runtime, 64, 100, 20, 997);
    assert!(
        run.rewinds >= REWINDS,
        "the WAL was rewound {} times in {PATIENCE:?}; it reached {} bytes",
        run.rewinds,
        run.largest
    );
}
