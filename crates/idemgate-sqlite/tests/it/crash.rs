//! A process killed with `SIGKILL` in the middle of writing leaves a file that opens,
//! passes `PRAGMA integrity_check`, and still holds every response it reported as
//! committed.
//!
//! The test runs its own binary again as the writer (selected by an environment
//! variable passed to the child only), waits until the child has reported enough
//! commits, and kills it.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use idemgate::http::{HeaderName, HeaderValue};
use idemgate::{Claim, Store, StoredResponse, Timestamp};
use idemgate_sqlite::SqliteStore;
use idemgate_testkit::{fp, key};

/// Set (to the database path) in the child only.
const CHILD_ENV: &str = "IDEMGATE_SQLITE_CRASH_CHILD";
/// This test's name as the harness knows it, for `--exact`.
const TEST_NAME: &str = "crash::a_killed_writer_leaves_a_consistent_file";
/// How many commits the child reports before it is killed.
const COMMITTED_BEFORE_KILL: usize = 200;
/// Concurrent writers in the child, so that the kill lands inside group commits.
const WRITERS: u64 = 8;
/// Long enough that the fixed completion times below never expire.
const TTL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
/// Bounds the child if the parent never kills it.
const MAX_KEYS_PER_WRITER: u64 = 100_000;

/// The response for key `n`: 64 KiB in 16 chunks, with content that depends on `n`.
fn response_for(n: u64) -> StoredResponse {
    let chunks = (0..16u64)
        .map(|c| {
            let seed = n.wrapping_mul(31).wrapping_add(c);
            Bytes::from((0..4096u64).map(|i| (seed.wrapping_add(i * 7) % 251) as u8).collect::<Vec<_>>())
        })
        .collect();
    StoredResponse::new(
        200,
        vec![(
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_str(&format!("req_{n}")).expect("an ASCII value"),
        )],
        chunks,
        Timestamp::from_millis(1_700_000_000_000 + n),
    )
}

#[test]
fn a_killed_writer_leaves_a_consistent_file() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        write_until_killed(Path::new(&path));
        return;
    }

    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("crash.db");
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the child starts");

    // Read the child's reports on a thread so that a silent child fails the test
    // instead of hanging it.
    let stdout = child.stdout.take().expect("the child's stdout");
    let (lines, reports) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("committed ").and_then(|n| n.parse::<u64>().ok())
                && lines.send(n).is_err()
            {
                break;
            }
        }
    });
    let mut committed = BTreeSet::new();
    while committed.len() < COMMITTED_BEFORE_KILL {
        match reports.recv_timeout(Duration::from_secs(60)) {
            Ok(n) => {
                committed.insert(n);
            }
            Err(e) => {
                let _ = child.kill();
                panic!("the child reported {} commits, then stopped ({e})", committed.len());
            }
        }
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    assert_eq!(status.signal(), Some(9), "the child died of SIGKILL, not on its own: {status}");
    // Reports already on their way were committed too.
    reader.join().expect("the reader thread");
    committed.extend(reports.try_iter());

    let conn = rusqlite::Connection::open(&path).expect("the file opens");
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity_check");
    assert_eq!(check, "ok");
    let keys: Vec<String> = conn
        .prepare("SELECT key FROM idemgate_records")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("the keys");
    drop(conn);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    rt.block_on(async {
        let store = SqliteStore::open(&path).expect("the store opens after the crash");
        for hex in &keys {
            let k = idemgate::StorageKey::from_hex(hex).expect("a hex key");
            store.get(&k).await.unwrap_or_else(|e| panic!("row {hex} decodes: {e}"));
        }
        for &n in &committed {
            match store.claim(&key(n), &fp(n), Duration::from_secs(30)).await.expect("claim") {
                Claim::Completed(got) => assert!(*got == response_for(n), "key {n} is byte-identical"),
                other => panic!("key {n} was reported committed but answers {other:?}"),
            }
        }
        assert!(keys.len() >= committed.len(), "{} rows for {} commits", keys.len(), committed.len());
    });
}

/// The child: claims and completes keys until killed, reporting each commit.
fn write_until_killed(path: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    let path: PathBuf = path.to_owned();
    rt.block_on(async move {
        let store = Arc::new(SqliteStore::open(&path).expect("the child opens the store"));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for i in 0..MAX_KEYS_PER_WRITER {
                        let n = i * WRITERS + w;
                        let Ok(Claim::Acquired(lease)) = store.claim(&key(n), &fp(n), Duration::from_secs(30)).await
                        else {
                            panic!("the child acquires key {n}")
                        };
                        store.complete(&lease, &response_for(n), TTL).await.expect("complete");
                        // A closed pipe means the parent is gone: stop.
                        let mut out = std::io::stdout().lock();
                        if writeln!(out, "committed {n}").and_then(|()| out.flush()).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.expect("a writer task");
        }
    });
}
