//! In-process wake-ups for waiters on a key.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::scope::StorageKey;

/// Wakes the waiters of a key when its state changes. Stores in one process use it
/// directly; shared stores feed it from their pub/sub channel.
#[derive(Debug, Default)]
pub struct Notifier {
    waiters: Mutex<HashMap<StorageKey, watch::Sender<()>>>,
}

impl Notifier {
    /// A notifier with no waiters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes now; the future resolves at the next [`notify`](Self::notify) of `key`.
    pub fn subscribe(&self, key: &StorageKey) -> BoxFuture<'static, ()> {
        let mut rx = {
            let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            waiters.entry(*key).or_insert_with(|| watch::channel(()).0).subscribe()
        };
        // An error means the sender was dropped without a send: wake anyway, the
        // caller re-reads the state.
        async move {
            let _ = rx.changed().await;
        }
        .boxed()
    }

    /// Wakes every current waiter of `key`.
    pub fn notify(&self, key: &StorageKey) {
        let sender = self.waiters.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
        if let Some(tx) = sender {
            tx.send_replace(());
        }
    }

    /// Forgets keys whose waiters have all gone (called from sweeps).
    pub fn prune(&self) {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, tx| tx.receiver_count() > 0);
    }

    /// How many keys have waiters.
    pub fn len(&self) -> usize {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no key has waiters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
