//! Command connections of their own for threads that run single-threaded runtimes.
//!
//! A connection is driven by a task on the runtime that made it: the store's shared
//! connection lives on the runtime that opened the store. A gateway that serves its
//! clients on a thread per core, each with a single-threaded runtime
//! (`idemgate_proxy::serve_on_cores`), would have every call cross to that runtime's
//! thread and back. Such a thread gets a command connection of its own, made on its
//! runtime in the background the first time it calls; until that connection is ready,
//! and while one cannot be made, the thread's calls use the shared one. Threads of a
//! multi-threaded runtime, and of the runtime that opened the store (a one-shot CLI
//! command's), always use the shared one. A thread keeps one connection per store, for
//! the runtime it made it on: a thread that runs another runtime later replaces it. It
//! is closed when the store is dropped (its task, on the thread's runtime, removes it
//! then, or the thread's next first call on any store if that runtime has ended).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, Id, RuntimeFlavor};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::bounded;
use crate::conn::Conn;
use crate::target::Target;

/// After a failed attempt, or a failed call on the connection, a thread waits this long
/// before making another.
const RETRY_AFTER: Duration = Duration::from_secs(5);

static NEXT_STORE: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's connections, by store.
    static CONNS: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

struct Entry {
    store: u64,
    /// The runtime that drives the connection: a thread may run another one later.
    runtime: Id,
    slot: Slot,
    /// Closed once the store is dropped.
    dropped: watch::Receiver<()>,
    /// The task that made the connection and removes the entry with the store.
    task: AbortHandle,
}

impl Drop for Entry {
    /// An entry replaced (a retry, another runtime) or removed ends its task, which
    /// would otherwise wait for the store's drop.
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Slot {
    Connecting,
    Ready(Conn),
    Failed(Instant),
}

/// The per-thread connections of one store.
pub(crate) struct Local {
    store: u64,
    /// The runtime that opened the store, whose thread the shared connection already
    /// serves without a hop.
    home: Option<Id>,
    /// Dropped with the store, which ends each thread's connection task.
    dropped: watch::Sender<()>,
    target: Target,
    timeout: Duration,
}

impl Local {
    /// Per-thread connections to `target`, for a store opened on the current runtime.
    pub(crate) fn new(target: Target, timeout: Duration) -> Self {
        Self {
            store: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
            home: Handle::try_current().ok().map(|h| h.id()),
            dropped: watch::Sender::new(()),
            target,
            timeout,
        }
    }

    /// This thread's connection, if it runs a single-threaded runtime and the
    /// connection is ready; if none is, starts making one and answers `None`.
    pub(crate) fn get(&self) -> Option<Conn> {
        let handle = Handle::try_current().ok()?;
        if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
            return None;
        }
        let runtime = handle.id();
        if self.home == Some(runtime) {
            return None;
        }
        CONNS.with(|conns| {
            let mut conns = conns.borrow_mut();
            if let Some(entry) = conns.iter().find(|e| e.store == self.store && e.runtime == runtime) {
                match &entry.slot {
                    Slot::Ready(conn) => return Some(conn.clone()),
                    Slot::Connecting => return None,
                    Slot::Failed(at) if at.elapsed() < RETRY_AFTER => return None,
                    Slot::Failed(_) => {}
                }
            }
            // The slow path, once per thread, runtime and store (and per retry): drop this
            // store's entry (of an earlier attempt or runtime), and those of dropped stores
            // whose task could not remove them (its runtime ended first).
            conns.retain(|e| e.store != self.store && e.dropped.has_changed().is_ok());
            let mut dropped = self.dropped.subscribe();
            let entry_dropped = dropped.clone();
            let (store, target, timeout) = (self.store, self.target.clone(), self.timeout);
            // Spawned on this single-threaded runtime, so it runs on this thread, and not
            // before this call returns (the entry is in place by then). It outlives the
            // connection attempt to remove the entry once the store is dropped: another
            // thread cannot reach this thread's entries.
            let task = handle.spawn(async move {
                let connect = bounded("connect", timeout, Conn::connect(&target, timeout));
                let slot = tokio::select! {
                    made = connect => match made {
                        Ok(conn) => Slot::Ready(conn),
                        Err(e) => {
                            tracing::debug!(target: "idemgate::store", error = %e, "no redis connection of this thread's own; using the shared one");
                            Slot::Failed(Instant::now())
                        }
                    },
                    _ = dropped.changed() => Slot::Failed(Instant::now()),
                };
                set(store, runtime, slot);
                // Never sent to: answers once the store is dropped.
                let _ = dropped.changed().await;
                CONNS.with(|conns| conns.borrow_mut().retain(|e| !(e.store == store && e.runtime == runtime)));
            });
            let (slot, task) = (Slot::Connecting, task.abort_handle());
            conns.push(Entry { store: self.store, runtime, slot, dropped: entry_dropped, task });
            None
        })
    }

    /// Sets this thread's connection aside after a call on it failed (its runtime may
    /// be gone, or its server): the shared one serves until another is made.
    pub(crate) fn failed(&self) {
        if let Ok(handle) = Handle::try_current() {
            set(self.store, handle.id(), Slot::Failed(Instant::now()));
        }
    }

    /// How many entries this thread holds for `store`.
    #[cfg(test)]
    pub(crate) fn entries(store: u64) -> usize {
        CONNS.with(|c| c.borrow().iter().filter(|e| e.store == store).count())
    }

    #[cfg(test)]
    pub(crate) fn id(&self) -> u64 {
        self.store
    }

    /// Whether this thread has a connection of its own ready, on the current runtime.
    #[cfg(test)]
    pub(crate) fn ready(&self) -> bool {
        let Ok(runtime) = Handle::try_current().map(|h| h.id()) else { return false };
        CONNS.with(|c| {
            c.borrow().iter().any(|e| e.store == self.store && e.runtime == runtime && matches!(e.slot, Slot::Ready(_)))
        })
    }
}

fn set(store: u64, runtime: Id, slot: Slot) {
    CONNS.with(|conns| {
        if let Some(entry) = conns.borrow_mut().iter_mut().find(|e| e.store == store && e.runtime == runtime) {
            entry.slot = slot;
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, Method, Uri};
    use idemgate::{Claim, Fingerprint, StorageKey, Store, StoredResponse, Timestamp, Token};
    use idemgate_testkit::backend;

    use super::Local;
    use crate::RedisStore;

    /// A store opened on a runtime of its own, which keeps driving its shared
    /// connection while the test runs others on its thread.
    fn shared_store(url: &str, prefix: &str) -> RedisStore {
        let (url, prefix) = (url.to_owned(), prefix.to_owned());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let store = RedisStore::connect(&url).await.expect("redis answers").with_prefix(prefix);
                tx.send(store).expect("send");
                std::future::pending::<()>().await;
            });
        });
        rx.recv().expect("store")
    }

    /// A retry replaces the thread's entry and ends the task of the one before; the
    /// store's drop ends the last one and removes its entry. No server needed: every
    /// attempt fails at once against a closed port.
    #[test]
    fn a_retry_ends_the_task_before_it_and_the_stores_drop_ends_the_last() {
        use std::time::Instant;

        use super::{CONNS, RETRY_AFTER, Slot, set};
        use crate::target::Target;

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let target = Target::parse(&format!("redis://{closed}")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = Local::new(target, Duration::from_millis(200));
        let id = local.id();
        runtime.block_on(async {
            let alive = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
            let failed =
                || CONNS.with(|c| c.borrow().iter().any(|e| e.store == id && matches!(e.slot, Slot::Failed(_))));
            for attempt in 1..=3 {
                assert!(local.get().is_none());
                for _ in 0..200 {
                    if failed() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                assert!(failed(), "attempt {attempt} failed against the closed port");
                assert_eq!((alive(), Local::entries(id)), (1, 1), "attempt {attempt}: one task, one entry");
                // As if the retry pause were over.
                let long_ago = Instant::now().checked_sub(RETRY_AFTER * 2).expect("an instant 10 s ago");
                set(id, tokio::runtime::Handle::current().id(), Slot::Failed(long_ago));
            }
            drop(local);
            for _ in 0..200 {
                if alive() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!((alive(), Local::entries(id)), (0, 0), "the store's drop ended the task and its entry");
        });

        // A store dropped after its entry's runtime ended: no task is left to remove the
        // entry, so the thread's next slow path (another store's first call) prunes it.
        let gone = Local::new(Target::parse(&format!("redis://{closed}")).unwrap(), Duration::from_millis(200));
        let other = Local::new(Target::parse(&format!("redis://{closed}")).unwrap(), Duration::from_millis(200));
        let gone_id = gone.id();
        let first = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        first.block_on(async { assert!(gone.get().is_none()) });
        drop(first);
        drop(gone);
        assert_eq!(Local::entries(gone_id), 1, "nothing ran to remove it");
        let second = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        second.block_on(async { assert!(other.get().is_none()) });
        assert_eq!(Local::entries(gone_id), 0, "pruned by another store's first call");
    }

    async fn until_ready(store: &RedisStore) {
        for _ in 0..200 {
            if store.inner.local.ready() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no connection of this thread's own after 2 s");
    }

    #[test]
    fn a_single_threaded_runtime_gets_a_connection_of_its_own_and_a_shared_one_does_not() {
        let Some(url) = backend::redis_url("local::a_single_threaded_runtime_gets_a_connection_of_its_own") else {
            return;
        };
        let prefix = format!("idemgate-test-{}", Token::generate().to_text());
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(&Token::generate().as_u128().to_le_bytes());
        let key = StorageKey::from_bytes(bytes);
        let fp = Fingerprint::compute(&Method::POST, &Uri::from_static("/v1/x"), &HeaderMap::new(), &[], b"{}");
        let single = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        single.block_on(async {
            // Opened on this runtime (as a one-shot CLI command does): the shared
            // connection is already this thread's.
            let store = RedisStore::connect(&url).await.expect("redis answers").with_prefix(prefix.clone());
            assert!(matches!(store.get(&key).await, Ok(None)));
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!store.inner.local.ready(), "the store's own runtime uses the shared connection");
            assert_eq!(Local::entries(store.inner.local.id()), 0);
        });
        let store = shared_store(&url, &prefix);
        single.block_on(async {
            // The first call goes over the shared connection and starts this thread's.
            assert!(matches!(store.get(&key).await, Ok(None)));
            until_ready(&store).await;
            // Calls on it answer as on the shared one.
            let Ok(Claim::Acquired(lease)) = store.claim(&key, &fp, Duration::from_secs(30)).await else {
                panic!("a fresh key is acquired");
            };
            let now = Timestamp::from_system_time(std::time::SystemTime::now());
            let response = StoredResponse::new(200, Vec::new(), vec![Bytes::from_static(b"ok")], now);
            store.complete(&lease, &response, Duration::from_secs(60)).await.expect("complete");
            assert!(matches!(store.claim(&key, &fp, Duration::from_secs(30)).await, Ok(Claim::Completed(_))));
            assert!(store.purge(&key).await.expect("purge"));
            // Dropping the store closes this thread's connection.
            let id = store.inner.local.id();
            assert_eq!(Local::entries(id), 1);
            drop(store);
            for _ in 0..100 {
                if Local::entries(id) == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the thread's connection outlived its store by 1 s");
        });
        // The same thread under another runtime, while the first one is not running:
        // the first one's connection (which only that runtime drives) is not used.
        let store = shared_store(&url, &prefix);
        let first = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        first.block_on(async {
            assert!(matches!(store.get(&key).await, Ok(None)));
            until_ready(&store).await;
        });
        let second = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        second.block_on(async {
            let started = std::time::Instant::now();
            assert!(matches!(store.get(&key).await, Ok(None)));
            assert!(started.elapsed() < Duration::from_secs(1), "answered over the shared connection at once");
            until_ready(&store).await;
            assert!(matches!(store.get(&key).await, Ok(None)));
        });
        let shared =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        shared.block_on(async {
            let store = RedisStore::connect(&url).await.expect("redis answers").with_prefix(prefix);
            assert!(matches!(store.get(&key).await, Ok(None)));
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!store.inner.local.ready(), "a multi-threaded runtime's calls stay on the shared connection");
        });
    }
}
