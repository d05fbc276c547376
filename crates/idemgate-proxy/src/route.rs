//! Routing: the longest path prefix picks the route, and with it the upstream and
//! the idempotency policy.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use idemgate::{Idempotency, IdempotencyLayer, Policy, RequestBody, ResponseBody, Store};
use tower::{Layer, ServiceExt};
use tower_service::Service;

use crate::upstream::{Target, TargetError, Upstream, UpstreamClient};

/// One route: requests whose path starts with `prefix` (at a segment boundary) go to
/// `upstream` under `policy`.
#[derive(Debug, Clone)]
pub struct Route {
    prefix: String,
    upstream: Uri,
    strip_prefix: bool,
    policy: Policy,
}

impl Route {
    /// A route for `prefix` (`/` for everything) to `upstream`; the policy's route
    /// name scopes its keys.
    pub fn new(prefix: impl Into<String>, upstream: Uri, policy: Policy) -> Self {
        Self { prefix: prefix.into(), upstream, strip_prefix: false, policy }
    }

    /// Removes the prefix from the path before forwarding (`/openai/v1/x` → `/v1/x`).
    pub fn with_strip_prefix(mut self, strip: bool) -> Self {
        self.strip_prefix = strip;
        self
    }

    fn matches(&self, path: &str) -> bool {
        let prefix = self.prefix.trim_end_matches('/');
        match path.strip_prefix(prefix) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// The proxy: routes requests and runs each through its route's idempotency layer
/// around the upstream client.
#[derive(Clone)]
pub struct Proxy {
    routes: Arc<[(Route, Idempotency<Upstream>)]>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.routes.iter().map(|(r, _)| (&r.prefix, r.upstream.to_string()))).finish()
    }
}

impl Proxy {
    /// A proxy over `routes`, all sharing `store` and `client`.
    pub fn new(routes: Vec<Route>, store: Arc<dyn Store>, client: UpstreamClient) -> Result<Self, TargetError> {
        let mut built = routes
            .into_iter()
            .map(|route| {
                let strip = route.strip_prefix.then_some(route.prefix.as_str());
                let target = Target::new(&route.upstream, strip)?;
                let upstream = Upstream::new(client.clone(), target, route.policy.route());
                let svc = IdempotencyLayer::with_policy(store.clone(), route.policy.clone()).layer(upstream);
                Ok((route, svc))
            })
            .collect::<Result<Vec<_>, TargetError>>()?;
        // Longest prefix first, so `/v1/messages` wins over `/`.
        built.sort_by_key(|(r, _)| std::cmp::Reverse(r.prefix.trim_end_matches('/').len()));
        Ok(Self { routes: built.into() })
    }

    /// Waits until every route's calls that run on after their requests (an owner
    /// whose client hung up, a stream still being recorded) have ended: see
    /// [`IdempotencyLayer::drain`](idemgate::IdempotencyLayer::drain).
    pub async fn drain(&self) {
        for (_, svc) in self.routes.iter() {
            svc.drain().await;
        }
    }

    /// How many such calls are running, over every route.
    pub fn running_on(&self) -> usize {
        self.routes.iter().map(|(_, svc)| svc.running_on()).sum()
    }

    fn route(&self, path: &str) -> Option<&Idempotency<Upstream>> {
        self.routes.iter().find(|(r, _)| r.matches(path)).map(|(_, svc)| svc)
    }
}

impl Service<Request<Incoming>> for Proxy {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let Some(svc) = self.route(req.uri().path()).cloned() else {
            return Box::pin(async { Ok(no_route()) });
        };
        Box::pin(svc.oneshot(req.map(RequestBody::new)))
    }
}

fn no_route() -> Response<ResponseBody> {
    idemgate::problem::response(
        StatusCode::NOT_FOUND,
        "no-route",
        "No route covers this path",
        "the gateway is configured with routes, and none has a prefix matching this path",
        false,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        let r = Route::new("/openai/", "http://x".parse().unwrap(), Policy::default());
        assert!(r.matches("/openai"));
        assert!(r.matches("/openai/v1/chat"));
        assert!(!r.matches("/openaiv1"));
        let root = Route::new("/", "http://x".parse().unwrap(), Policy::default());
        assert!(root.matches("/anything"));
    }
}
