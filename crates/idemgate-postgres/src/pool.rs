//! The connection pool, and the time bounds every operation runs within.
//!
//! An operation waits at most `timeout` for a pooled connection (or for a new one to
//! open), then at most `timeout` for its statements; the server also cancels any
//! statement running longer (`statement_timeout`), so that an abandoned one holds no
//! lock. A connection whose statement timed out is closed rather than pooled again:
//! it may be stuck behind a dead network path. A connection the server closed is
//! noticed by the pool when it is next handed out, and replaced.

use std::time::Duration;

use deadpool_postgres::{
    ClientWrapper, Hook, HookError, Manager, ManagerConfig, Object, PoolError, RecyclingMethod, Runtime,
};
use idemgate::StoreError;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::options::Options;

/// A bounded pool of sessions; see the module docs.
#[derive(Clone)]
pub(crate) struct Pool {
    pool: deadpool_postgres::Pool,
    timeout: Duration,
}

impl Pool {
    /// A pool that opens connections as operations need them, up to the pool size.
    pub(crate) fn new(options: &Options, tls: MakeRustlsConnect) -> Result<Self, StoreError> {
        // Fast recycling checks that the connection task is alive, without a round
        // trip; a connection the server closed is dropped and replaced.
        let manager =
            Manager::from_config(options.pg.clone(), tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let set_timeout = format!("SET statement_timeout = {}", options.timeout.as_millis().max(1));
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .post_create(Hook::async_fn(move |client: &mut ClientWrapper, _| {
                let set_timeout = set_timeout.clone();
                Box::pin(async move { client.batch_execute(&set_timeout).await.map_err(HookError::Backend) })
            }))
            .build()
            .map_err(|e| StoreError::unavailable("postgres cannot build its connection pool", e))?;
        Ok(Self { pool, timeout: options.timeout })
    }

    /// A pooled connection, within the timeout.
    pub(crate) async fn get(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Timeout(_) => StoreError::unavailable("postgres did not hand out a connection in time", e),
            PoolError::Backend(e) => StoreError::unavailable("postgres cannot open a connection", e),
            PoolError::PostCreateHook(e) => StoreError::unavailable("postgres cannot set up a new connection", e),
            PoolError::Closed | PoolError::NoRuntimeSpecified => {
                StoreError::unavailable("postgres connection pool is unusable", e)
            }
        })
    }

    /// Runs `op` on a pooled connection, within the timeouts.
    pub(crate) async fn run<T, F>(&self, what: &'static str, op: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&ClientWrapper) -> Result<T, StoreError>,
    {
        let client = self.get().await?;
        match tokio::time::timeout(self.timeout, op(&client)).await {
            Ok(res) => res,
            Err(elapsed) => {
                // Closed, not pooled again: the statement may still be stuck on it.
                drop(Object::take(client));
                Err(StoreError::unavailable(format!("postgres did not answer {what} in time"), elapsed))
            }
        }
    }

    /// The number of connections open now, and the most the pool opens.
    pub(crate) fn size(&self) -> (usize, usize) {
        let status = self.pool.status();
        (status.size, status.max_size)
    }
}

/// Maps a PostgreSQL error: data the server reports corrupt as `Corrupt`, anything
/// else (a lost connection, a timeout, a missing table) as `Unavailable`.
pub(crate) fn pg_error(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| {
        let code = e.code().map(tokio_postgres::error::SqlState::code);
        match code {
            // data_corrupted, index_corrupted
            Some("XX001" | "XX002") => StoreError::corrupt(format!("{}: {e}", context.into())),
            _ => StoreError::unavailable(context, e),
        }
    }
}
