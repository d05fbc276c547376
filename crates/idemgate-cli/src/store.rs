//! Opening the store a URL names.

use std::sync::Arc;

use anyhow::Context;
use idemgate::{MemoryStore, Store};
use idemgate_sqlite::SqliteStore;

use crate::config::StoreUrl;

/// Opens the store, off the async runtime for file-backed ones.
pub(crate) async fn open(url: &StoreUrl) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match url {
        StoreUrl::Memory => Arc::new(MemoryStore::new()),
        StoreUrl::Sqlite(path) => {
            let p = path.clone();
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&p))
                .await
                .context("the store opener panicked")?
                .with_context(|| format!("cannot open the store sqlite://{}", path.display()))?;
            Arc::new(store)
        }
    })
}
