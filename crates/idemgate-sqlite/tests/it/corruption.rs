//! Rows edited or damaged by hand answer `Corrupt`, never panic, and do not hold up
//! the operations batched with them.

use std::sync::Arc;
use std::time::Duration;

use idemgate::{Claim, ErrorKind, Store};
use idemgate_sqlite::SqliteStore;
use idemgate_testkit::{fp, key, sample_response};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

#[test]
fn hand_damaged_rows_answer_corrupt() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("store.db");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).build().expect("a runtime");
    rt.block_on(async {
        let store = Arc::new(SqliteStore::open(&path).expect("the store opens"));
        let now = idemgate::Timestamp::from_system_time(std::time::SystemTime::now());
        // Keys 1..=4 completed, 5 in flight.
        for n in 1..=5 {
            let Claim::Acquired(lease) = store.claim(&key(n), &fp(n), LEASE).await.expect("claim") else {
                panic!("a fresh key is acquired")
            };
            if n <= 4 {
                store.complete(&lease, &sample_response(now), TTL).await.expect("complete");
            }
        }

        let damage = [
            (1, "UPDATE idemgate_records SET response = x'49444752ff' WHERE key = ?1"),
            (2, "UPDATE idemgate_records SET status = 500 WHERE key = ?1"),
            (3, "UPDATE idemgate_records SET fingerprint = 'not hex' WHERE key = ?1"),
            (4, "UPDATE idemgate_records SET expires_at_ms = -5 WHERE key = ?1"),
            (5, "UPDATE idemgate_records SET token = 'not a uuid' WHERE key = ?1"),
        ];
        let conn = rusqlite::Connection::open(&path).expect("a second connection");
        conn.busy_timeout(Duration::from_secs(5)).expect("busy_timeout");
        for (n, sql) in damage {
            assert_eq!(conn.execute(sql, [key(n).to_hex()]).expect("the damage is done"), 1, "{sql}");
        }
        drop(conn);

        for (n, sql) in damage {
            let err = store.get(&key(n)).await.expect_err(sql);
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{sql}: {err}");
        }
        // A replay needs the response: corrupt. A mismatch does not read it.
        let err = store.claim(&key(1), &fp(1), LEASE).await.expect_err("a replay of a damaged response");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert_eq!(store.claim(&key(1), &fp(9), LEASE).await.expect("claim"), Claim::Mismatch);

        // Claims on damaged rows batched with claims on healthy keys: each gets its
        // own answer.
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let n = if i % 2 == 0 { 100 + i } else { 1 + i % 5 };
                    (n, store.claim(&key(n), &fp(n), LEASE).await)
                })
            })
            .collect();
        for task in tasks {
            let (n, claimed) = task.await.expect("claim task");
            if n >= 100 {
                assert!(matches!(claimed, Ok(Claim::Acquired(_))), "healthy key {n}: {claimed:?}");
            } else {
                let err = claimed.expect_err("a damaged row");
                assert_eq!(err.kind(), ErrorKind::Corrupt, "key {n}: {err}");
            }
        }

        // Purging a damaged row frees its key.
        assert!(store.purge(&key(1)).await.expect("purge"));
        assert!(matches!(store.claim(&key(1), &fp(1), LEASE).await, Ok(Claim::Acquired(_))));
    });
}
