//! Accept loops for the proxy and admin listeners, with graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use idemgate::Store;
use tokio::net::TcpListener;
use tower::service_fn;
use tower_service::Service;

use crate::route::Proxy;

/// How long shutdown waits for open connections (and the calls they carry) to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves the proxy on `listener` until `shutdown` resolves, then stops accepting and
/// waits up to [`SHUTDOWN_GRACE`] for open connections to finish, and up to as long
/// again for the calls that outlived their clients (an owner whose client hung up, a
/// stream still being recorded), so that what the upstream produced is recorded.
pub async fn serve(listener: TcpListener, proxy: Proxy, shutdown: impl Future<Output = ()>) {
    accept_loop(listener, proxy.clone(), shutdown).await;
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
    accept_loop(listener, svc, shutdown).await;
}

async fn accept_loop<S, B>(listener: TcpListener, svc: S, shutdown: impl Future<Output = ()>)
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = auto::Builder::new(TokioExecutor::new());
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
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc.clone()));
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(target: "idemgate::server", error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!(target: "idemgate::server", "connections still open after {SHUTDOWN_GRACE:?}; closing them");
    }
}
