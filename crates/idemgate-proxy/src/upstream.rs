//! The upstream client: pooled HTTP/1.1 connections (`h1.rs`) over TCP or rustls
//! (ring, Mozilla roots and any the caller adds), as a tower `Service` that the
//! idempotency layer wraps.
//!
//! It never follows redirects (a 3xx goes back to the client as is), bounds the
//! connect time, the time to the response head and the silence between body frames,
//! and turns its own failures into `502`/`504` problem responses, which the layer
//! treats as transient (the key is released and the retry executes).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use idemgate::{BoxError, RequestBody, ResponseBody};
use metrics::{Counter, Histogram};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::h1::{self, HostPool};
use crate::headers::strip_hop_by_hop;

/// Upstream calls by `route` and `status` (`error` when no response came back).
pub const UPSTREAM_REQUESTS_TOTAL: &str = "idemgate_upstream_requests_total";
/// Time from sending the request to the upstream's response head, by `route`.
pub const UPSTREAM_SECONDS: &str = "idemgate_upstream_seconds";

/// Timeouts of the upstream client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing a TCP (and TLS) connection.
    pub connect: Duration,
    /// From sending the request to the response head.
    pub response: Duration,
    /// The longest silence between two body frames (long generations stream for
    /// minutes, so this bounds idleness, not total time).
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(10), response: Duration::from_secs(600), idle: Duration::from_secs(300) }
    }
}

/// Each upstream host's pool, by scheme and authority.
type Pools = HashMap<(Scheme, Authority), Arc<HostPool>>;

/// A pooled client shared by every route: one pool of keep-alive connections per
/// upstream host.
#[derive(Clone)]
pub struct UpstreamClient {
    settings: h1::Settings,
    pools: Arc<Mutex<Pools>>,
    timeouts: Timeouts,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient").field("timeouts", &self.timeouts).finish_non_exhaustive()
    }
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for the upstream client")]
pub struct ClientError(#[source] rustls::Error);

impl UpstreamClient {
    /// A client with HTTP/1.1 keep-alive pooling (HTTP/2 to upstreams queues long
    /// streams on one connection once its stream limit is reached, so it is not used).
    pub fn new(timeouts: Timeouts) -> Result<Self, ClientError> {
        Self::trusting(timeouts, Vec::new())
    }

    /// Like [`new`](Self::new), trusting `extra_roots` (a private CA's certificates,
    /// say) beside the Mozilla roots, for upstreams whose certificates chain to them.
    /// Fails if one of them cannot be a trust anchor.
    pub fn trusting(
        timeouts: Timeouts,
        extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> Result<Self, ClientError> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for cert in extra_roots {
            roots.add(cert).map_err(ClientError)?;
        }
        let settings = h1::Settings {
            tls: h1::tls_connector(roots).map_err(ClientError)?,
            connect_timeout: timeouts.connect,
            idle_timeout: Duration::from_secs(60),
            // Enough to reuse connections under steady load; after a burst of
            // hundreds of streams the rest close rather than hold their buffers.
            max_idle: 32,
        };
        Ok(Self { settings, pools: Arc::default(), timeouts })
    }

    /// The pool of `target`'s host, shared by every route that goes there.
    fn pool(&self, target: &Target) -> Arc<HostPool> {
        let key = (target.scheme.clone(), target.authority.clone());
        let mut pools = self.pools.lock();
        let pool = pools
            .entry(key)
            .or_insert_with(|| HostPool::new(target.scheme == Scheme::HTTPS, &target.authority, self.settings.clone()));
        Arc::clone(pool)
    }
}

/// Where a route sends its requests.
#[derive(Debug, Clone)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
    /// The upstream URL's path, without a trailing slash (`""` for the root).
    base_path: Arc<str>,
    /// A path prefix removed from incoming paths before `base_path` is prepended.
    strip: Option<Arc<str>>,
}

/// An upstream URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the upstream URL must be absolute http:// or https:// with a host, and no query: {0}")]
pub struct TargetError(String);

impl Target {
    /// Requests go to `upstream` (e.g. `https://api.openai.com`), with `strip` removed
    /// from the front of the incoming path first.
    pub fn new(upstream: &Uri, strip: Option<&str>) -> Result<Self, TargetError> {
        let bad = || TargetError(upstream.to_string());
        let scheme = upstream.scheme().filter(|s| **s == Scheme::HTTP || **s == Scheme::HTTPS).ok_or_else(bad)?;
        let authority = upstream.authority().ok_or_else(bad)?.clone();
        if upstream.query().is_some() {
            return Err(bad());
        }
        Ok(Self {
            scheme: scheme.clone(),
            authority,
            base_path: Arc::from(upstream.path().trim_end_matches('/')),
            strip: strip.map(|s| Arc::from(s.trim_end_matches('/'))),
        })
    }

    /// The request-target (path and query) upstream for an incoming request's URI.
    fn request_target(&self, incoming: &Uri) -> Result<PathAndQuery, http::uri::InvalidUri> {
        let mut path = incoming.path();
        if let Some(prefix) = &self.strip {
            path = path.strip_prefix(&**prefix).unwrap_or(path);
        }
        let sep = if path.starts_with('/') { "" } else { "/" };
        let mut target =
            String::with_capacity(self.base_path.len() + 1 + path.len() + incoming.query().map_or(0, |q| q.len() + 1));
        target.push_str(&self.base_path);
        target.push_str(sep);
        target.push_str(path);
        if let Some(q) = incoming.query() {
            target.push('?');
            target.push_str(q);
        }
        PathAndQuery::try_from(target)
    }
}

/// One route's upstream: the service the idempotency layer wraps.
#[derive(Debug, Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: Arc<HostPool>,
    timeouts: Timeouts,
    target: Target,
    route: Arc<str>,
    /// Taken at the first request, once the process has installed its recorder.
    meters: OnceLock<Meters>,
}

/// The route's metric handles that every request touches.
struct Meters {
    seconds: Histogram,
    ok: Counter,
}

impl std::fmt::Debug for Meters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meters").finish_non_exhaustive()
    }
}

impl Upstream {
    /// Sends requests of `route` to `target` through `client`.
    pub fn new(client: UpstreamClient, target: Target, route: impl Into<Arc<str>>) -> Self {
        let pool = client.pool(&target);
        let inner = Inner { pool, timeouts: client.timeouts, target, route: route.into(), meters: OnceLock::new() };
        Self { inner: Arc::new(inner) }
    }
}

impl Service<Request<RequestBody>> for Upstream {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The pool opens connections on demand; there is no capacity to wait for.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { Ok(inner.forward(req).await) })
    }
}

impl Inner {
    fn meters(&self) -> &Meters {
        self.meters.get_or_init(|| Meters {
            seconds: metrics::histogram!(UPSTREAM_SECONDS, "route" => self.route.to_string()),
            ok: metrics::counter!(UPSTREAM_REQUESTS_TOTAL, "route" => self.route.to_string(), "status" => "200"),
        })
    }

    async fn forward(&self, req: Request<RequestBody>) -> Response<ResponseBody> {
        let (mut parts, body) = req.into_parts();
        let Ok(target) = self.target.request_target(&parts.uri) else { return bad_path() };
        strip_hop_by_hop(&mut parts.headers);
        let started = Instant::now();
        let sent = self.pool.send(&parts.method, target.as_str(), &parts.headers, body);
        let res = tokio::time::timeout(self.timeouts.response, sent).await;
        let meters = self.meters();
        meters.seconds.record(started.elapsed());
        let route = &*self.route;
        match res {
            Ok(Ok(res)) => {
                if res.status() == StatusCode::OK {
                    meters.ok.increment(1);
                } else {
                    let status = res.status().as_u16().to_string();
                    metrics::counter!(UPSTREAM_REQUESTS_TOTAL, "route" => route.to_owned(), "status" => status)
                        .increment(1);
                }
                let (mut parts, body) = res.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, ResponseBody::new(IdleTimeout::new(body, self.timeouts.idle)))
            }
            Ok(Err(e)) => {
                metrics::counter!(UPSTREAM_REQUESTS_TOTAL, "route" => route.to_owned(), "status" => "error")
                    .increment(1);
                tracing::warn!(target: "idemgate::upstream", route, error = %ErrorChain(&e), "upstream request failed");
                idemgate::problem::response(
                    StatusCode::BAD_GATEWAY,
                    "upstream-unreachable",
                    "The upstream could not be reached",
                    "the request may not have reached the upstream; retry with the same key",
                    true,
                    Some(Duration::from_secs(1)),
                )
            }
            Err(_) => {
                metrics::counter!(UPSTREAM_REQUESTS_TOTAL, "route" => route.to_owned(), "status" => "timeout")
                    .increment(1);
                tracing::warn!(target: "idemgate::upstream", route, "upstream response timed out");
                idemgate::problem::response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    "The upstream did not answer in time",
                    "retry with the same key",
                    true,
                    Some(Duration::from_secs(1)),
                )
            }
        }
    }
}

fn bad_path() -> Response<ResponseBody> {
    idemgate::problem::response(
        StatusCode::BAD_REQUEST,
        "bad-request-target",
        "The request path cannot be forwarded",
        "the path and query do not form a valid upstream URL",
        false,
        None,
    )
}

/// Displays an error with its sources, `a: b: c`.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// The upstream stopped sending body frames for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?}")]
pub struct IdleTimeoutError(Duration);

pin_project! {
    /// A response body that fails when the upstream falls silent for too long.
    ///
    /// The timer is armed only once a frame is not ready at once, and is not moved per
    /// frame: when it fires it is re-armed from the last frame's time if frames came
    /// since. Registering or moving a tokio timer wakes the runtime's driver (an
    /// `eventfd` write, even from the runtime's own thread) whenever the timer is due
    /// before the driver's next planned wake-up: resetting it per frame cost half a
    /// syscall per proxied request.
    struct IdleTimeout<B> {
        #[pin]
        inner: B,
        sleep: Option<Pin<Box<Sleep>>>,
        idle: Duration,
        // When the last frame came, or the body was made: the silence counts from it.
        last: tokio::time::Instant,
    }
}

impl<B> IdleTimeout<B> {
    fn new(inner: B, idle: Duration) -> Self {
        Self { inner, sleep: None, idle, last: tokio::time::Instant::now() }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            *this.last = tokio::time::Instant::now();
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = *this.last + *this.idle;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired at a deadline armed before the frames that came since.
            let deadline = *this.last + *this.idle;
            if deadline <= tokio::time::Instant::now() {
                return Poll::Ready(Some(Err(IdleTimeoutError(*this.idle).into())));
            }
            sleep.as_mut().reset(deadline);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    /// A body whose frames come after the given pauses.
    fn paced(pauses: &[u64]) -> impl Body<Data = Bytes, Error = Infallible> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let pauses = pauses.to_vec();
        tokio::spawn(async move {
            for (i, pause) in pauses.into_iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if tx.send(Ok(Frame::data(Bytes::from(format!("{i};"))))).await.is_err() {
                    return;
                }
            }
        });
        http_body_util::StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        }))
    }

    /// The silence is measured between frames, not from the start: a stream longer
    /// than the idle timeout runs to its end as long as no gap reaches it, and a gap
    /// that does fails the body, however many frames came before.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_the_silence_between_frames() {
        let idle = Duration::from_millis(100);
        let steady = IdleTimeout::new(paced(&[0, 60, 60, 60, 60, 60, 60, 99]), idle);
        let bytes = steady.collect().await.expect("no gap reached 100 ms").to_bytes();
        assert_eq!(bytes, "0;1;2;3;4;5;6;7;");

        let mut stalled = std::pin::pin!(IdleTimeout::new(paced(&[0, 60, 60, 150, 0]), idle));
        let started = tokio::time::Instant::now();
        let mut frames = 0;
        let error = loop {
            match stalled.frame().await {
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => break e,
                None => panic!("the 150 ms gap ended the body"),
            }
        };
        assert_eq!(frames, 3);
        assert!(error.is::<IdleTimeoutError>(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_millis(220), "failed 100 ms after the last frame");
    }

    #[test]
    fn target_joins_base_path_strips_prefix_and_keeps_query() {
        let t = Target::new(&"https://api.example.com/v2/".parse().unwrap(), Some("/openai")).unwrap();
        assert_eq!(
            t.request_target(&"/openai/v1/chat/completions?x=1".parse().unwrap()).unwrap(),
            "/v2/v1/chat/completions?x=1"
        );
        let root = Target::new(&"http://127.0.0.1:9/".parse().unwrap(), None).unwrap();
        assert_eq!(root.request_target(&"/v1/messages".parse().unwrap()).unwrap(), "/v1/messages");
        assert!(Target::new(&"/relative".parse().unwrap(), None).is_err());
        assert!(Target::new(&"ftp://x".parse().unwrap(), None).is_err());
        assert!(Target::new(&"http://x/?q=1".parse().unwrap(), None).is_err());
    }
}
