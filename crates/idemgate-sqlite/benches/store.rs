//! Claim + complete of a fresh key with a 2 KiB response: `SqliteStore` on a
//! temporary file against `MemoryStore`, one at a time and 64 at once (where the
//! SQLite writer's group commit pays off).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime};
use idemgate::{Claim, Clock, MemoryStore, Store, StoredResponse, SystemClock};
use idemgate_sqlite::SqliteStore;
use idemgate_testkit::{fp, key, large_response};
use tempfile::TempDir;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
const CONCURRENT: u64 = 64;

/// A fresh store, and the directory it lives in, if any.
type Make = fn() -> (Arc<dyn Store>, Option<TempDir>);

fn memory() -> (Arc<dyn Store>, Option<TempDir>) {
    (Arc::new(MemoryStore::new()), None)
}

fn sqlite() -> (Arc<dyn Store>, Option<TempDir>) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(dir.path().join("bench.db")).expect("the store opens");
    (Arc::new(store), Some(dir))
}

async fn claim_complete(store: &dyn Store, n: u64, response: &StoredResponse) {
    let Claim::Acquired(lease) = store.claim(&key(n), &fp(n), LEASE).await.expect("claim") else {
        panic!("key {n} is fresh")
    };
    store.complete(&lease, response, TTL).await.expect("complete");
}

fn one_at_a_time(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, make: Make, response: &StoredResponse) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    group.bench_function(name, |b| {
        // A fresh store per sample keeps stores (and files) from growing without
        // bound over millions of iterations; creating it is not timed.
        b.iter_custom(|iters| {
            let (store, _dir) = make();
            let start = Instant::now();
            rt.block_on(async {
                for n in 0..iters {
                    claim_complete(store.as_ref(), n, response).await;
                }
            });
            start.elapsed()
        });
    });
}

fn concurrently(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, make: Make, response: &StoredResponse) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let (store, _dir) = make();
            let start = Instant::now();
            rt.block_on(async {
                for i in 0..iters {
                    let tasks: Vec<_> = (0..CONCURRENT)
                        .map(|j| {
                            let (store, response) = (Arc::clone(&store), response.clone());
                            tokio::spawn(
                                async move { claim_complete(store.as_ref(), i * CONCURRENT + j, &response).await },
                            )
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("a claim task");
                    }
                }
            });
            start.elapsed()
        });
    });
}

fn claim_complete_2k(c: &mut Criterion) {
    let response = large_response(SystemClock.now(), 2048, 512);

    let mut group = c.benchmark_group("claim_complete_2k");
    group.throughput(Throughput::Elements(1));
    one_at_a_time(&mut group, "memory", memory, &response);
    one_at_a_time(&mut group, "sqlite", sqlite, &response);
    group.finish();

    let mut group = c.benchmark_group("claim_complete_2k_x64");
    group.throughput(Throughput::Elements(CONCURRENT));
    concurrently(&mut group, "memory", memory, &response);
    concurrently(&mut group, "sqlite", sqlite, &response);
    group.finish();
}

criterion_group!(benches, claim_complete_2k);
criterion_main!(benches);
