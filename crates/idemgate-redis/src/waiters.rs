//! Wake-ups for [`Store::watch`](idemgate::Store::watch) across gateway processes.
//!
//! Every script that changes a key's state publishes on the key's channel. A waiter
//! registers in an in-process [`Notifier`] at once, and asks for the key's channel;
//! one background task (the subscriber) keeps the subscription connection subscribed
//! to exactly the channels that have waiters, plus those whose last waiter left less
//! than [`LINGER`] ago (a waiter that polls in a loop drops and retakes its watch
//! every few milliseconds; the linger spares the server a subscribe and unsubscribe
//! each time). Messages arrive as RESP3 pushes and wake the key's waiters.
//!
//! It is a hint, as the `Store` contract allows: a change published before the
//! subscription took effect, or while the connection was down, wakes nobody (the
//! waiters poll). Changes made through this store wake its own waiters directly, with
//! no round trip. A lost subscription connection wakes every waiter at once, so that
//! they re-read the state instead of waiting out their poll.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use idemgate::StorageKey;
use idemgate::store::Notifier;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{Notify, oneshot};

use crate::conn::SubConn;
use crate::keys::key_of_channel;

/// How long a channel stays subscribed after its last waiter left.
pub(crate) const LINGER: Duration = Duration::from_secs(5);
/// How often the subscriber drops lingering channels, retries failed subscriptions
/// and checks its connection.
const TICK: Duration = Duration::from_secs(1);

/// The waiters of one store, by channel.
pub(crate) struct Waiters {
    notifier: Notifier,
    channels: Mutex<HashMap<String, Channel>>,
    /// Tells the subscriber that a channel gained its first waiter.
    changed: Notify,
}

struct Channel {
    key: StorageKey,
    waiters: usize,
    /// When the last waiter left, if none is left.
    idle_since: Option<Instant>,
}

impl Waiters {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self { notifier: Notifier::new(), channels: Mutex::default(), changed: Notify::new() })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Channel>> {
        // Every critical section below leaves the map consistent at each step.
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a waiter of `key` now, and has the subscriber subscribe to its
    /// `channel` if it is not yet.
    pub(crate) fn watch(self: &Arc<Self>, key: &StorageKey, channel: String) -> BoxFuture<'static, ()> {
        let woken = self.notifier.subscribe(key);
        let first = {
            let mut channels = self.lock();
            let entry = channels.entry(channel.clone()).or_insert(Channel { key: *key, waiters: 0, idle_since: None });
            entry.waiters += 1;
            entry.idle_since = None;
            entry.waiters == 1
        };
        if first {
            self.changed.notify_one();
        }
        let guard = Waiter { waiters: Arc::clone(self), channel };
        async move {
            let _guard = guard;
            woken.await;
        }
        .boxed()
    }

    /// Wakes the waiters of `key` in this process.
    pub(crate) fn notify(&self, key: &StorageKey) {
        self.notifier.notify(key);
    }

    /// How many channels are wanted (with waiters or lingering).
    pub(crate) fn channels(&self) -> usize {
        self.lock().len()
    }

    fn on_push(&self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                if let Some(Value::BulkString(channel)) = push.data.first()
                    && let Some(key) = key_of_channel(channel)
                {
                    self.notifier.notify(&key);
                }
            }
            PushKind::Disconnection => {
                let keys: Vec<StorageKey> = self.lock().values().map(|c| c.key).collect();
                for key in &keys {
                    self.notifier.notify(key);
                }
            }
            _ => {}
        }
    }

    /// The push handler for the subscription connection. It holds the waiters weakly:
    /// the connection must not keep them alive.
    pub(crate) fn push_handler(
        self: &Arc<Self>,
    ) -> impl Fn(PushInfo) -> Result<(), Infallible> + Send + Sync + 'static {
        let weak: Weak<Self> = Arc::downgrade(self);
        move |push| {
            if let Some(waiters) = weak.upgrade() {
                waiters.on_push(push);
            }
            Ok(())
        }
    }

    /// Forgets channels that lingered long enough; answers the channels to subscribe
    /// to and those to unsubscribe from, given what is subscribed.
    fn plan(&self, subscribed: &HashSet<String>) -> (Vec<String>, Vec<String>) {
        let now = Instant::now();
        let mut channels = self.lock();
        channels.retain(|_, c| c.idle_since.is_none_or(|since| now.duration_since(since) < LINGER));
        let wanted = channels.keys().filter(|ch| !subscribed.contains(*ch)).cloned().collect();
        let unwanted = subscribed.iter().filter(|ch| !channels.contains_key(*ch)).cloned().collect();
        (wanted, unwanted)
    }
}

/// One waiter's place; leaving it (the watch resolved or was dropped) starts the
/// channel's linger when it was the last.
struct Waiter {
    waiters: Arc<Waiters>,
    channel: String,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut channels = self.waiters.lock();
        if let Some(c) = channels.get_mut(&self.channel) {
            c.waiters = c.waiters.saturating_sub(1);
            if c.waiters == 0 {
                c.idle_since = Some(Instant::now());
            }
        }
    }
}

/// Stops the subscriber when dropped (with the store).
pub(crate) struct Subscriber {
    _stop: oneshot::Sender<()>,
}

impl Subscriber {
    /// Starts the subscriber task on the current tokio runtime.
    pub(crate) fn spawn(waiters: Arc<Waiters>, conn: SubConn, timeout: Duration) -> Self {
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(subscribe(waiters, conn, timeout, stopped));
        Self { _stop: stop }
    }
}

async fn subscribe(waiters: Arc<Waiters>, mut conn: SubConn, timeout: Duration, mut stopped: oneshot::Receiver<()>) {
    let mut subscribed = HashSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            () = waiters.changed.notified() => {}
            _ = tick.tick() => {
                waiters.notifier.prune();
                // A connection lost while idle reconnects (and resubscribes) only when
                // used: use it.
                if !subscribed.is_empty()
                    && let Err(e) = with_timeout(timeout, conn.ping()).await
                {
                    tracing::debug!(target: "idemgate::store", error = %e, "redis subscription connection is down");
                }
            }
        }
        let (wanted, unwanted) = waiters.plan(&subscribed);
        // The first failure (the server is likely down) leaves the rest to the next
        // tick, so that an outage costs one timeout per tick, not one per channel; the
        // waiters poll meanwhile.
        for channel in wanted {
            if let Err(e) = with_timeout(timeout, conn.subscribe(&channel)).await {
                tracing::debug!(target: "idemgate::store", error = %e, "redis subscribe failed");
                break;
            }
            subscribed.insert(channel);
        }
        for channel in unwanted {
            if let Err(e) = with_timeout(timeout, conn.unsubscribe(&channel)).await {
                tracing::debug!(target: "idemgate::store", error = %e, "redis unsubscribe failed");
                break;
            }
            subscribed.remove(&channel);
        }
    }
}

async fn with_timeout(
    timeout: Duration,
    op: impl Future<Output = redis::RedisResult<()>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Ok(tokio::time::timeout(timeout, op).await??)
}
