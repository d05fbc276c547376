//! Opening the store a URL names.
//!
//! A shared store (Redis, PostgreSQL) that cannot be reached at start does not stop
//! the gateway: it starts on a [`Deferred`] store that keeps trying to connect, so
//! keyed requests meanwhile get the store-outage answer (503, or unprotected under
//! `fail-open`) and `/readyz` says not ready, exactly as during an outage that begins
//! later. A bad URL or an unreadable SQLite file still stops the start.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use idemgate::store::{BoxFuture, Claim, Lease, LiveEnd, LiveHead, LiveRead};
use idemgate::{ErrorKind, Fingerprint, MemoryStore, Record, StorageKey, Store, StoreError, StoredResponse, Timestamp};
use idemgate_sqlite::SqliteStore;
use tokio::sync::OnceCell;

use crate::config::StoreUrl;

/// How often a deferred store tries to connect again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Opens the store, off the async runtime for file-backed ones. Errors name the URL
/// with its password masked.
pub(crate) async fn open(url: &StoreUrl) -> anyhow::Result<Arc<dyn Store>> {
    match url {
        StoreUrl::Memory => Ok(Arc::new(MemoryStore::new())),
        StoreUrl::Sqlite(path) => {
            let p = path.clone();
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&p))
                .await
                .context("the store opener panicked")?
                .with_context(|| format!("cannot open the store {url}"))?;
            Ok(Arc::new(store))
        }
        StoreUrl::Redis(_) | StoreUrl::Postgres(_) => match connect(url).await {
            Ok(store) => Ok(store),
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                tracing::warn!(store = %url, error = %e, "the store is unreachable; starting anyway and retrying every second");
                Ok(Arc::new(Deferred::new(url.clone())))
            }
            // The context shows `url` through `Display`, which masks a password.
            Err(e) => Err(e).with_context(|| format!("cannot connect to the store {url}")),
        },
    }
}

async fn connect(url: &StoreUrl) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match url {
        StoreUrl::Redis(raw) => Arc::new(idemgate_redis::RedisStore::connect(raw).await?),
        StoreUrl::Postgres(raw) => Arc::new(idemgate_postgres::PostgresStore::connect(raw).await?),
        StoreUrl::Memory | StoreUrl::Sqlite(_) => unreachable!("local stores are opened directly"),
    })
}

/// A shared store not reached yet: every operation first tries to connect (at most
/// once per [`RECONNECT_EVERY`]), then runs on the connected store. Until then
/// operations fail as `Unavailable`, which the layer answers like any outage.
struct Deferred {
    url: StoreUrl,
    store: OnceCell<Arc<dyn Store>>,
    last_try: Mutex<Option<Instant>>,
}

impl Deferred {
    fn new(url: StoreUrl) -> Self {
        Self { url, store: OnceCell::new(), last_try: Mutex::new(None) }
    }

    async fn store(&self) -> Result<&Arc<dyn Store>, StoreError> {
        if let Some(store) = self.store.get() {
            return Ok(store);
        }
        let due = {
            let mut last = self.last_try.lock().unwrap_or_else(PoisonError::into_inner);
            let due = last.is_none_or(|t| t.elapsed() >= RECONNECT_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if !due {
            return Err(StoreError::unavailable("the store is not connected yet", format!("retrying {}", self.url)));
        }
        let store = self.store.get_or_try_init(|| connect(&self.url)).await?;
        tracing::info!(store = %self.url, "connected to the store");
        Ok(store)
    }
}

impl Store for Deferred {
    fn backend(&self) -> &'static str {
        match &self.url {
            StoreUrl::Redis(raw) if raw.starts_with("redis+cluster://") => "redis-cluster",
            StoreUrl::Redis(_) => "redis",
            StoreUrl::Postgres(_) => "postgres",
            StoreUrl::Memory => "memory",
            StoreUrl::Sqlite(_) => "sqlite",
        }
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        fp: &'a Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move { self.store().await?.claim(key, fp, lease).await })
    }

    fn renew<'a>(&'a self, lease: &'a Lease, duration: Duration) -> BoxFuture<'a, Result<Timestamp, StoreError>> {
        Box::pin(async move { self.store().await?.renew(lease, duration).await })
    }

    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.store().await?.complete(lease, response, ttl).await })
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.store().await?.release(lease).await })
    }

    fn get<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(async move { self.store().await?.get(key).await })
    }

    fn purge<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { self.store().await?.purge(key).await })
    }

    fn sweep(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move { self.store().await?.sweep(limit).await })
    }

    fn watch(&self, key: &StorageKey) -> BoxFuture<'static, ()> {
        match self.store.get() {
            Some(store) => store.watch(key),
            // Nothing can change a record we cannot reach; wake the poller soon.
            None => Box::pin(tokio::time::sleep(RECONNECT_EVERY)),
        }
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.store().await?.ping().await })
    }

    fn live_begin<'a>(&'a self, lease: &'a Lease, head: &'a LiveHead) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { self.store().await?.live_begin(lease, head).await })
    }

    fn live_append<'a>(
        &'a self,
        lease: &'a Lease,
        first: u64,
        chunks: &'a [bytes::Bytes],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.store().await?.live_append(lease, first, chunks).await })
    }

    fn live_end<'a>(&'a self, lease: &'a Lease, end: LiveEnd) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.store().await?.live_end(lease, end).await })
    }

    fn live_read<'a>(&'a self, key: &'a StorageKey, from: u64) -> BoxFuture<'a, Result<Option<LiveRead>, StoreError>> {
        Box::pin(async move { self.store().await?.live_read(key, from).await })
    }
}
