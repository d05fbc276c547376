//! Claim + complete of a fresh key with a 2 KiB response on `PostgresStore`, one at a
//! time and 64 at once, against the server of `IDEMGATE_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), in a scratch schema dropped at the end.
//! Without a server it says so and measures nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use idemgate::{Claim, Clock, Store, StoredResponse, SystemClock};
use idemgate_postgres::PostgresStore;
use idemgate_testkit::{fp, key, large_response};
use tokio::runtime::Runtime;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
const CONCURRENT: u64 = 64;

async fn claim_complete(store: &dyn Store, n: u64, response: &StoredResponse) {
    let Claim::Acquired(lease) = store.claim(&key(n), &fp(n), LEASE).await.expect("claim") else {
        panic!("key {n} is fresh")
    };
    store.complete(&lease, response, TTL).await.expect("complete");
}

fn bench(c: &mut Criterion, rt: &Runtime, store: &Arc<dyn Store>) {
    let response = large_response(SystemClock.now(), 2048, 512);
    // Every claim takes a key never used before, across both groups.
    let next = AtomicU64::new(0);

    let mut group = c.benchmark_group("claim_complete_2k");
    group.throughput(Throughput::Elements(1));
    group.bench_function("postgres", |b| {
        b.iter_custom(|iters| {
            let first = next.fetch_add(iters, Ordering::Relaxed);
            let start = Instant::now();
            rt.block_on(async {
                for n in first..first + iters {
                    claim_complete(store.as_ref(), n, &response).await;
                }
            });
            start.elapsed()
        });
    });
    group.finish();

    let mut group = c.benchmark_group("claim_complete_2k_x64");
    group.throughput(Throughput::Elements(CONCURRENT));
    group.bench_function("postgres", |b| {
        b.iter_custom(|iters| {
            let first = next.fetch_add(iters * CONCURRENT, Ordering::Relaxed);
            let start = Instant::now();
            rt.block_on(async {
                for i in 0..iters {
                    let tasks: Vec<_> = (0..CONCURRENT)
                        .map(|j| {
                            let (store, response) = (Arc::clone(store), response.clone());
                            let n = first + i * CONCURRENT + j;
                            tokio::spawn(async move { claim_complete(store.as_ref(), n, &response).await })
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
    group.finish();
}

fn main() {
    let Some(url) = idemgate_testkit::backend::database_url("the postgres store bench") else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    let schema = format!("idemgate_bench_{}", uuid::Uuid::new_v4().simple());
    let store: Arc<dyn Store> = Arc::new(
        rt.block_on(PostgresStore::builder().with_schema(schema.clone()).connect(&url)).expect("the store connects"),
    );

    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &rt, &store);
    c.final_summary();

    drop(store);
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(connection);
        client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.expect("the bench schema is dropped");
    });
}
