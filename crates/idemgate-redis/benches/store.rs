//! Claim + complete of a fresh key with a 2 KiB response against one Redis server
//! (`IDEMGATE_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), one at a time
//! (a round trip per script) and 64 at once (pipelined on one connection). Says so
//! and measures nothing when there is no server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime};
use idemgate::{Claim, Clock, Store, StoredResponse, SystemClock, Token};
use idemgate_redis::RedisStore;
use idemgate_testkit::{backend, fp, key, large_response};
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

/// A store under a prefix of its own, so that every sample claims fresh keys.
async fn fresh(url: &str) -> Arc<RedisStore> {
    let prefix = format!("idemgate-bench-{}", Token::generate().to_text());
    Arc::new(RedisStore::connect(url).await.expect("redis answers").with_prefix(prefix))
}

/// Deletes the sample's records (untimed), so that a long run leaves Redis as it was.
async fn clean(store: &RedisStore, keys: u64) {
    for n in 0..keys {
        store.purge(&key(n)).await.expect("purge");
    }
}

fn one_at_a_time(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, url: &str, response: &StoredResponse) {
    group.bench_function("redis", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let store = fresh(url).await;
                let start = Instant::now();
                for n in 0..iters {
                    claim_complete(store.as_ref(), n, response).await;
                }
                let took = start.elapsed();
                clean(&store, iters).await;
                took
            })
        });
    });
}

fn concurrently(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, url: &str, response: &StoredResponse) {
    group.bench_function("redis", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let store = fresh(url).await;
                let start = Instant::now();
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
                let took = start.elapsed();
                clean(&store, iters * CONCURRENT).await;
                took
            })
        });
    });
}

fn claim_complete_2k(c: &mut Criterion) {
    let Some(url) = backend::redis_url("idemgate-redis bench claim_complete_2k") else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    let response = large_response(SystemClock.now(), 2048, 512);

    let mut group = c.benchmark_group("claim_complete_2k");
    group.throughput(Throughput::Elements(1));
    one_at_a_time(&mut group, &rt, &url, &response);
    group.finish();

    let mut group = c.benchmark_group("claim_complete_2k_x64");
    group.throughput(Throughput::Elements(CONCURRENT));
    concurrently(&mut group, &rt, &url, &response);
    group.finish();
}

criterion_group!(benches, claim_complete_2k);
criterion_main!(benches);
