//! The upstream client: hyper-util's pooled HTTP/1.1 client over rustls (ring, Mozilla
//! roots), as a tower `Service` that the idempotency layer wraps.
//!
//! It never follows redirects (a 3xx goes back to the client as is), bounds the
//! connect time, the time to the response head and the silence between body frames,
//! and turns its own failures into `502`/`504` problem responses, which the layer
//! treats as transient (the key is released and the retry executes).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idemgate::{BoxError, RequestBody, ResponseBody};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

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

/// A pooled client shared by every route.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpsConnector<HttpConnector>, RequestBody>,
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
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeouts.connect));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(ClientError)?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            // Enough to reuse connections under steady load; after a burst of
            // hundreds of streams the rest close rather than hold their buffers
            // (some 30 KiB each) for the idle timeout.
            .pool_max_idle_per_host(32)
            .build(https);
        Ok(Self { client, timeouts })
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

    fn uri(&self, incoming: &Uri) -> Result<Uri, http::Error> {
        let mut path = incoming.path();
        if let Some(prefix) = &self.strip {
            path = path.strip_prefix(&**prefix).unwrap_or(path);
        }
        let query = incoming.query().map(|q| format!("?{q}")).unwrap_or_default();
        let sep = if path.starts_with('/') { "" } else { "/" };
        let pq = PathAndQuery::try_from(format!("{}{sep}{path}{query}", self.base_path))?;
        Uri::builder().scheme(self.scheme.clone()).authority(self.authority.clone()).path_and_query(pq).build()
    }
}

/// One route's upstream: the service the idempotency layer wraps.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: UpstreamClient,
    target: Target,
    route: Arc<str>,
}

impl Upstream {
    /// Sends requests of `route` to `target` through `client`.
    pub fn new(client: UpstreamClient, target: Target, route: impl Into<Arc<str>>) -> Self {
        Self { client, target, route: route.into() }
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
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(req).await) })
    }
}

impl Upstream {
    async fn forward(self, req: Request<RequestBody>) -> Response<ResponseBody> {
        let (mut parts, body) = req.into_parts();
        parts.uri = match self.target.uri(&parts.uri) {
            Ok(uri) => uri,
            Err(_) => return bad_path(),
        };
        strip_hop_by_hop(&mut parts.headers);
        // hyper sets `Host` from the URI when none is present.
        parts.headers.remove(http::header::HOST);
        parts.version = http::Version::HTTP_11;
        let started = Instant::now();
        let sent = tokio::time::timeout(
            self.client.timeouts.response,
            self.client.client.request(Request::from_parts(parts, body)),
        );
        let res = sent.await;
        let route = self.route.to_string();
        metrics::histogram!(UPSTREAM_SECONDS, "route" => route.clone()).record(started.elapsed());
        match res {
            Ok(Ok(res)) => {
                let status = res.status().as_u16().to_string();
                metrics::counter!(UPSTREAM_REQUESTS_TOTAL, "route" => route, "status" => status).increment(1);
                let (mut parts, body) = res.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, ResponseBody::new(IdleTimeout::new(body, self.client.timeouts.idle)))
            }
            Ok(Err(e)) => {
                metrics::counter!(UPSTREAM_REQUESTS_TOTAL, "route" => route, "status" => "error").increment(1);
                tracing::warn!(target: "idemgate::upstream", route = &*self.route, error = %ErrorChain(&e), "upstream request failed");
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
                metrics::counter!(UPSTREAM_REQUESTS_TOTAL, "route" => route, "status" => "timeout").increment(1);
                tracing::warn!(target: "idemgate::upstream", route = &*self.route, "upstream response timed out");
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
    struct IdleTimeout {
        #[pin]
        inner: Incoming,
        #[pin]
        sleep: Sleep,
        idle: Duration,
    }
}

impl IdleTimeout {
    fn new(inner: Incoming, idle: Duration) -> Self {
        Self { inner, sleep: tokio::time::sleep(idle), idle }
    }
}

impl Body for IdleTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + *this.idle;
                this.sleep.reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(IdleTimeoutError(*this.idle).into()))),
                Poll::Pending => Poll::Pending,
            },
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
    use super::*;

    #[test]
    fn target_joins_base_path_strips_prefix_and_keeps_query() {
        let t = Target::new(&"https://api.example.com/v2/".parse().unwrap(), Some("/openai")).unwrap();
        assert_eq!(
            t.uri(&"/openai/v1/chat/completions?x=1".parse().unwrap()).unwrap(),
            "https://api.example.com/v2/v1/chat/completions?x=1"
        );
        let root = Target::new(&"http://127.0.0.1:9/".parse().unwrap(), None).unwrap();
        assert_eq!(root.uri(&"/v1/messages".parse().unwrap()).unwrap(), "http://127.0.0.1:9/v1/messages");
        assert!(Target::new(&"/relative".parse().unwrap(), None).is_err());
        assert!(Target::new(&"ftp://x".parse().unwrap(), None).is_err());
        assert!(Target::new(&"http://x/?q=1".parse().unwrap(), None).is_err());
    }
}
