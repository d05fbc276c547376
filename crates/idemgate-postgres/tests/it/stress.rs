//! Concurrent claims beyond the suite: 64 tasks over two stores each claim the same
//! 50 keys, in different orders; every key is acquired exactly once. Then every lease
//! is made to run out and the same race takes each key over exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idemgate::{Claim, Lease, RecordState, Store, Timestamp};
use idemgate_testkit::{fp, key};
use tokio::sync::Barrier;

use crate::scratch::Scratch;

const TASKS: usize = 64;
const KEYS: u64 = 50;
/// Long enough that no lease runs out while the race runs.
const LEASE: Duration = Duration::from_secs(120);

/// Every task claims every key; returns, per key, the leases acquired and the
/// lease expiries the losers were told.
async fn race(stores: &[Arc<dyn Store>; 2]) -> HashMap<u64, (Vec<Lease>, Vec<Timestamp>)> {
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = Arc::clone(&stores[t % 2]);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                let mut answers = Vec::new();
                // Each task starts at another key, so that the races are spread out.
                for i in 0..KEYS {
                    let n = (i + t as u64) % KEYS;
                    answers.push((n, store.claim(&key(n), &fp(n), LEASE).await.expect("claim answers")));
                }
                answers
            })
        })
        .collect();
    let mut per_key: HashMap<u64, (Vec<Lease>, Vec<Timestamp>)> = HashMap::new();
    for task in tasks {
        for (n, answer) in task.await.expect("a claiming task finishes") {
            let entry = per_key.entry(n).or_default();
            match answer {
                Claim::Acquired(lease) => entry.0.push(lease),
                Claim::InFlight { lease_until } => entry.1.push(lease_until),
                other => panic!("key {n}: a claim answered {other:?}"),
            }
        }
    }
    per_key
}

/// Checks that each key had one winner whose lease everyone else saw, and that the
/// store holds it; returns the winners.
async fn one_winner_per_key(
    store: &dyn Store,
    per_key: HashMap<u64, (Vec<Lease>, Vec<Timestamp>)>,
    took_over: bool,
) -> Vec<Lease> {
    assert_eq!(per_key.len(), KEYS as usize);
    let mut winners = Vec::new();
    for (n, (mut won, lost)) in per_key {
        assert_eq!(won.len(), 1, "key {n} is acquired exactly once by {TASKS} claims");
        let lease = won.remove(0);
        assert_eq!(lease.took_over, took_over, "key {n}");
        assert_eq!(lost.len(), TASKS - 1);
        assert!(lost.iter().all(|&until| until == lease.lease_until), "key {n}: the losers see the winner's lease");
        let record = store.get(&key(n)).await.expect("get answers").expect("the winner's record");
        assert_eq!(record.state, RecordState::InFlight { token: lease.token, lease_until: lease.lease_until });
        winners.push(lease);
    }
    winners
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_key_is_acquired_once_then_taken_over_once() {
    let Some(scratch) = Scratch::new("every_key_is_acquired_once_then_taken_over_once") else { return };
    let stores: [Arc<dyn Store>; 2] =
        [Arc::new(scratch.store("idemgate-stress-a").await), Arc::new(scratch.store("idemgate-stress-b").await)];

    let winners = one_winner_per_key(stores[0].as_ref(), race(&stores).await, false).await;

    // Every owner stalls: its lease runs out at once.
    for lease in &winners {
        stores[0].renew(lease, Duration::ZERO).await.expect("the owner renews");
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let successors = one_winner_per_key(stores[1].as_ref(), race(&stores).await, true).await;
    for lease in successors {
        let old = winners.iter().find(|w| w.key == lease.key).expect("a first owner");
        assert_ne!(old.token, lease.token);
        let lost = stores[0].release(old).await.expect_err("the first owner is fenced out");
        assert_eq!(lost.kind(), idemgate::ErrorKind::Conflict);
    }
}
