//! Accept loops for the proxy and admin listeners, with graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use idemgate::Store;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tower::service_fn;

use crate::route::Proxy;

/// How long shutdown waits for open connections (and the calls they carry) to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves the proxy on `listener`, on the runtime this runs on, until `shutdown`
/// resolves; then stops accepting and waits up to [`SHUTDOWN_GRACE`] for open
/// connections to finish, and up to as long again for the calls that outlived their
/// clients (an owner whose client hung up, a stream still being recorded), so that
/// what the upstream produced is recorded.
pub async fn serve(listener: TcpListener, proxy: Proxy, shutdown: impl Future<Output = ()>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    accept_loop(listener, shutdown, |stream, watcher| spawn_connection(&builder, stream, watcher, proxy.clone())).await;
    drain(&proxy).await;
}

/// [`serve`], with connections served on threads of their own, one per core (as
/// [`std::thread::available_parallelism`] counts them), each with a single-threaded
/// runtime, as nginx runs one process per core: a request runs start to end on one
/// thread, without the wake-ups of idle workers and the task stealing that a shared
/// multi-threaded runtime does for every event. The runtime this runs on only accepts.
///
/// For stores that answer without tasks of their own (memory, SQLite's writer
/// thread), or that give each such thread connections of its own (Redis). A store
/// whose connections are all driven by tasks on the runtime that made them (the
/// PostgreSQL pool) would have every call cross threads twice: serve it with
/// [`serve`]. Fails only when the threads cannot be started.
pub async fn serve_on_cores(
    listener: TcpListener,
    proxy: Proxy,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let cores = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    serve_on_threads(listener, proxy, cores, shutdown).await
}

/// [`serve_on_cores`] with `threads` connection threads, whatever the cores.
pub async fn serve_on_threads(
    listener: TcpListener,
    proxy: Proxy,
    threads: NonZeroUsize,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let workers = Workers::start(&proxy, threads.get()).await?;
    let mut next = 0;
    accept_loop(listener, shutdown, |stream, watcher| workers.hand(&mut next, stream, watcher)).await;
    drain(&proxy).await;
    workers.stop().await;
    Ok(())
}

/// Waits for the calls that outlived their clients, up to [`SHUTDOWN_GRACE`].
async fn drain(proxy: &Proxy) {
    let running = proxy.running_on();
    if running > 0 {
        tracing::info!(target: "idemgate::server", calls = running, "waiting for calls that outlived their clients");
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, proxy.drain()).await.is_err() {
        tracing::warn!(
            target: "idemgate::server",
            calls = proxy.running_on(),
            "calls still running after {SHUTDOWN_GRACE:?}; their leases will run out and retries will run them again"
        );
    }
}

/// Connections open in this process, over every listener.
static OPEN_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// How many connections every `serve`, `serve_on_cores` and `serve_admin` of this
/// process hold open: a load figure that covers the connection threads too, whose
/// tasks the caller's runtime does not see.
pub fn open_connections() -> usize {
    OPEN_CONNECTIONS.load(Ordering::Relaxed)
}

/// Counts a connection open until dropped, however its task ends.
struct Open;

impl Open {
    fn new() -> Self {
        OPEN_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one connection on a task of the current runtime, under `watcher`.
fn spawn_connection<S, B>(builder: &auto::Builder<TokioExecutor>, stream: TcpStream, watcher: Watcher, svc: S)
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc));
    let conn = watcher.watch(conn.into_owned());
    let open = Open::new();
    tokio::spawn(async move {
        let _open = open;
        if let Err(e) = conn.await {
            tracing::debug!(target: "idemgate::server", error = %e, "connection ended with an error");
        }
    });
}

/// A connection on its way to a worker, and the graceful-shutdown watch it runs under.
type Handed = (std::net::TcpStream, Watcher);

/// The threads that serve the proxy's connections.
struct Workers {
    inboxes: Vec<mpsc::UnboundedSender<Handed>>,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` threads. Each builds its runtime itself: one built here and
    /// dropped here, should its thread fail to start, would panic (a runtime may not be
    /// dropped inside another).
    async fn start(proxy: &Proxy, count: usize) -> std::io::Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let mut workers = Self { inboxes: Vec::with_capacity(count), stop, threads: Vec::with_capacity(count) };
        for n in 0..count {
            let (tx, rx) = mpsc::unbounded_channel();
            let (built_tx, built) = tokio::sync::oneshot::channel();
            let (proxy, stopped) = (proxy.clone(), stopped.clone());
            let thread = std::thread::Builder::new().name(format!("idemgate-conn-{n}")).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => {
                        let _ = built_tx.send(Ok(()));
                        runtime.block_on(work(rx, proxy, stopped));
                    }
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                    }
                }
            })?;
            // Dropping `workers` on an error lets the threads already started end.
            built.await.unwrap_or_else(|_| Err(std::io::Error::other("a connection thread ended at its start")))?;
            workers.inboxes.push(tx);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Hands a connection to the next worker in turn (the one after, should a worker
    /// have died).
    fn hand(&self, next: &mut usize, stream: TcpStream, watcher: Watcher) {
        let mut handed = match stream.into_std() {
            Ok(stream) => (stream, watcher),
            Err(e) => {
                tracing::warn!(target: "idemgate::server", error = %e, "cannot hand a connection over");
                return;
            }
        };
        for _ in 0..self.inboxes.len() {
            *next = (*next + 1) % self.inboxes.len();
            match self.inboxes[*next].send(handed) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => handed = back,
            }
        }
        tracing::error!(target: "idemgate::server", "every connection worker has stopped; connection closed");
    }

    /// Lets the workers end, once what runs on them has been waited for.
    async fn stop(self) {
        let Self { inboxes, stop, threads } = self;
        drop(inboxes);
        let _ = stop.send(true);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::error!(target: "idemgate::server", "a connection worker panicked");
                }
            }
        })
        .await;
    }
}

/// One worker: serves the connections it is handed, then keeps its runtime turning
/// (for the calls that outlive their connections) until it is told to stop.
async fn work(mut inbox: mpsc::UnboundedReceiver<Handed>, proxy: Proxy, mut stopped: watch::Receiver<bool>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    while let Some((stream, watcher)) = inbox.recv().await {
        match TcpStream::from_std(stream) {
            Ok(stream) => spawn_connection(&builder, stream, watcher, proxy.clone()),
            Err(e) => tracing::warn!(target: "idemgate::server", error = %e, "cannot take a connection over"),
        }
    }
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// What the admin listener serves.
#[derive(Clone)]
pub struct Admin {
    render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("store", &self.store.backend()).finish_non_exhaustive()
    }
}

impl Admin {
    /// `/metrics` answers `render_metrics()`; `/readyz` pings `store`.
    pub fn new(render_metrics: impl Fn() -> String + Send + Sync + 'static, store: Arc<dyn Store>) -> Self {
        Self { render_metrics: Arc::new(render_metrics), store }
    }

    async fn answer(self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: String| {
            let mut res = Response::new(Full::new(Bytes::from(body)));
            *res.status_mut() = status;
            res.headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
            res
        };
        match (req.method(), req.uri().path()) {
            (&http::Method::GET, "/metrics") => {
                let mut res = text(StatusCode::OK, (self.render_metrics)());
                res.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                res
            }
            (&http::Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
            (&http::Method::GET, "/readyz") => {
                match tokio::time::timeout(Duration::from_secs(2), self.store.ping()).await {
                    Ok(Ok(())) => text(StatusCode::OK, "ready\n".into()),
                    Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {e}\n")),
                    Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "store did not answer within 2s\n".into()),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n".into()),
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve_admin(listener: TcpListener, admin: Admin, shutdown: impl Future<Output = ()>) {
    let svc = service_fn(move |req: Request<Incoming>| {
        let admin = admin.clone();
        async move { Ok::<_, Infallible>(admin.answer(req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    accept_loop(listener, shutdown, |stream, watcher| spawn_connection(&builder, stream, watcher, svc.clone())).await;
}

/// Accepts connections and gives each, with its graceful-shutdown watch, to `serve`,
/// until `shutdown` resolves; then waits up to [`SHUTDOWN_GRACE`] for them to end.
async fn accept_loop(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut serve: impl FnMut(TcpStream, Watcher),
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Running out of file descriptors is transient; back off instead of spinning.
                    tracing::warn!(target: "idemgate::server", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        serve(stream, graceful.watcher());
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!(target: "idemgate::server", "connections still open after {SHUTDOWN_GRACE:?}; closing them");
    }
}

#[cfg(test)]
mod tests {
    use idemgate::MemoryStore;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Waits up to a second for `open_connections()` to read `n`.
    async fn until_open(n: usize) {
        for _ in 0..100 {
            if open_connections() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("open connections: {} instead of {n}", open_connections());
    }

    // The only test in this binary that opens a served connection: the count is global.
    #[tokio::test]
    async fn open_connections_counts_a_connection_while_it_is_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let admin = Admin::new(String::new, Arc::new(MemoryStore::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_admin(listener, admin, async {
            let _ = stopped.await;
        }));
        until_open(0).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
        let mut answer = [0u8; 12];
        conn.read_exact(&mut answer).await.expect("read");
        assert_eq!(&answer, b"HTTP/1.1 200");
        until_open(1).await;
        drop(conn);
        until_open(0).await;
        let _ = stop.send(());
        server.await.expect("server");
    }
}
