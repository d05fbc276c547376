//! Wake-ups across gateways: a task that `LISTEN`s on the store's channel and wakes
//! local waiters of the keys other gateways (or this one) changed.
//!
//! It runs on a dedicated connection, outside the pool (a pool hides the server's
//! notifications), and drives that connection itself. When the connection fails it
//! reconnects with backoff and listens again; changes notified in between are lost,
//! so every waiter is woken once it listens again, to look for itself. Notifications
//! are a hint either way: waiters poll as well. A periodic query notices a
//! connection that died without a word (a dropped network path). The task ends when
//! the last handle of the store is dropped.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use idemgate::store::Notifier;
use idemgate::{StorageKey, StoreError};
use tokio::sync::{oneshot, watch};
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::options::Options;
use crate::pool::pg_error;

/// The first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often an idle listening connection is checked.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// What the listener wakes: waiters of one key, or every waiter after it listens
/// again.
#[derive(Debug, Default)]
pub(crate) struct Wakeups {
    pub(crate) notifier: Notifier,
    /// Bumped each time the listener listens again after losing its connection.
    pub(crate) resumed: watch::Sender<u64>,
}

/// The running listener; dropping it stops the task.
#[derive(Debug)]
pub(crate) struct Listener {
    _stop: oneshot::Sender<()>,
}

/// What a listener session needs; cloned into the task.
struct Session {
    pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    listen: String,
    channel: String,
    timeout: Duration,
    wakeups: Arc<Wakeups>,
}

impl Listener {
    /// Starts the listener task and waits until it listens, so that a store handed
    /// out is already woken by every change committed from then on.
    pub(crate) async fn start(
        options: &Options,
        tls: MakeRustlsConnect,
        listen: String,
        wakeups: Arc<Wakeups>,
    ) -> Result<Self, StoreError> {
        let session = Session {
            pg: options.pg.clone(),
            tls,
            listen,
            channel: options.channel(),
            timeout: options.timeout,
            wakeups,
        };
        let (stop, stopped) = oneshot::channel();
        let (ready, listening) = oneshot::channel();
        tokio::spawn(session.run(stopped, ready));
        match listening.await {
            Ok(Ok(())) => Ok(Self { _stop: stop }),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(StoreError::unavailable("postgres listener stopped before it listened", e)),
        }
    }
}

impl Session {
    /// Listens until `stop` resolves (its sender dropped). The first outcome goes to
    /// `ready`; if that is a failure, the task ends there.
    async fn run(self, mut stop: oneshot::Receiver<()>, ready: oneshot::Sender<Result<(), StoreError>>) {
        let mut ready = Some(ready);
        let mut backoff = MIN_BACKOFF;
        loop {
            let listening = || {
                backoff = MIN_BACKOFF;
                match ready.take() {
                    Some(ready) => drop(ready.send(Ok(()))),
                    // Changes made while we were away were not heard: wake everyone.
                    None => {
                        tracing::info!(target: "idemgate::store", channel = %self.channel, "postgres listener listens again");
                        self.wakeups.resumed.send_modify(|n| *n += 1);
                    }
                }
            };
            let failure = tokio::select! {
                _ = &mut stop => return,
                failure = self.session(listening) => failure,
            };
            if let Some(ready) = ready.take() {
                let _ = ready.send(Err(failure));
                return;
            }
            tracing::warn!(target: "idemgate::store", error = %failure, retry_in = ?backoff, "postgres listener lost its connection");
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection: connect, listen, then deliver notifications until it fails.
    async fn session(&self, listening: impl FnOnce()) -> StoreError {
        let connected = tokio::time::timeout(self.timeout, self.pg.connect(self.tls.clone())).await;
        let (client, mut connection) = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return pg_error("postgres listener cannot connect")(e),
            Err(e) => return StoreError::unavailable("postgres listener did not connect in time", e),
        };
        // The connection delivers notifications only while it is polled, and the
        // client's queries only make progress then too: drive it alongside.
        let deliver = async {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) if n.channel() == self.channel => {
                        if let Some(key) = StorageKey::from_hex(n.payload()) {
                            self.wakeups.notifier.notify(&key);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return pg_error("postgres listener connection failed")(e),
                    None => {
                        return StoreError::unavailable("postgres listener connection closed", "end of stream");
                    }
                }
            }
        };
        let listen = async {
            match tokio::time::timeout(self.timeout, client.batch_execute(&self.listen)).await {
                Ok(Ok(())) => listening(),
                Ok(Err(e)) => return pg_error("postgres listener cannot LISTEN")(e),
                Err(e) => return StoreError::unavailable("postgres listener did not LISTEN in time", e),
            }
            loop {
                tokio::time::sleep(KEEPALIVE).await;
                match tokio::time::timeout(self.timeout, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return pg_error("postgres listener connection failed")(e),
                    Err(e) => return StoreError::unavailable("postgres listener connection stopped answering", e),
                }
            }
        };
        tokio::select! {
            failure = deliver => failure,
            failure = listen => failure,
        }
    }
}
