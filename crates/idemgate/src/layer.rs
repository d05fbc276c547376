//! `IdempotencyLayer` and its service `Idempotency<S>`: SPEC section 5 around any HTTP
//! service.
//!
//! # Concurrent duplicates
//!
//! The first request claims the key and executes; a duplicate finds the claim in
//! flight and, by default, subscribes to the key and waits, answering with the
//! original's response when it completes. If the original is released (a transient
//! failure), the waiters claim again: one executes, the others wait on it.
//!
//! # Streaming
//!
//! An event stream (`text/event-stream`) is forwarded chunk by chunk as it arrives and
//! recorded as it passes. It is stored only when it reached its protocol's terminator
//! (`data: [DONE]`, `response.completed|incomplete|failed`, `message_stop`; the clean
//! end of the body for other streams) without an in-band error; otherwise the key is
//! released. A duplicate that arrives while the stream runs in this process joins it:
//! it gets the chunks recorded so far, then the live rest, from the same recording.
//! A later duplicate gets the stored chunks with their original boundaries, at once
//! or, with [`ReplayPace::Recorded`], at their recorded pace. The usage a response
//! reports (streamed or not) is stored with it; every replay and join adds it to
//! `idemgate_tokens_saved_total`, and with a price table to `idemgate_cost_saved_total`.
//!
//! # Client disconnects
//!
//! The call runs on a task of its own, not in the response future, so a client that
//! hangs up (dropping the future or the body) does not cancel it: the task reads the
//! inner response to the end and stores it, and the client's retry replays it
//! without a second call. The task renews the lease while the call is alive.

use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::clock::Timestamp;
use crate::error::{BoxError, ErrorKind};
use crate::fingerprint::Fingerprint;
use crate::flight::{End as FlightEnd, Flights, Head as FlightHead};
use crate::key::Key;
use crate::live::{self, LogWriter};
use crate::metrics::{self as m, Outcome};
use crate::policy::{KeyForwarding, KeyRequirement, OnInFlight, OnStoreError, Policy, ReplayPace};
use crate::problem::Problem;
use crate::record::StoredResponse;
use crate::recording::Recording;
use crate::scope::{Scope, StorageKey};
use crate::sse::Protocol;
use crate::store::{Claim, Lease, LiveEnd, LiveHead, Store};

/// `Idempotent-Replayed: true|false`, on every response to a keyed request.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// `x-should-retry`, which the OpenAI and Anthropic SDKs obey.
pub const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// `retry-after-ms`, the millisecond twin of `Retry-After` that the SDKs prefer.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// `Prefer` (RFC 7240); `wait=N` bounds how long a duplicate waits.
pub const PREFER: HeaderName = HeaderName::from_static("prefer");

/// The request body the inner service receives: the buffered body of a keyed
/// request, or the untouched body of a request without a key.
///
/// A struct rather than an alias of `UnsyncBoxBody<Bytes, BoxError>`: a trait object
/// in a `Service` bound gets a higher-ranked lifetime, and rustc then cannot prove the
/// owner's task `Send`.
pub struct RequestBody(UnsyncBoxBody<Bytes, BoxError>);

impl RequestBody {
    /// Wraps any body.
    pub fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self(body.map_err(Into::into).boxed_unsync())
    }

    /// A body of one buffer.
    pub fn full(bytes: Bytes) -> Self {
        Self::new(Full::new(bytes))
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody").field("size_hint", &self.0.size_hint()).finish()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// The future of [`Idempotency`]'s responses.
pub type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, E>> + Send>>;

/// Bodies above this size are fingerprinted on the blocking pool, off the runtime.
const HASH_INLINE_LIMIT: usize = 64 * 1024;
/// Frames buffered between the owner's task and a slow client.
const LIVE_BUFFER: usize = 16;
/// Bodies of a declared length up to this are read whole before they are answered.
const WHOLE_BODY_LIMIT: u64 = 256 * 1024;
/// How often a failed `complete` is retried before the record is left to its lease.
const COMPLETE_ATTEMPTS: u32 = 3;

/// Applies idempotency keys to a service. See the [crate docs](crate).
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    policy: Policy,
    flights: Flights,
    meters: OnceLock<Arc<m::Meters>>,
    /// The calls that run on after their request is answered or gone (an owner
    /// whose client hung up, a stream still being read and recorded, its live log):
    /// a graceful shutdown waits for them, or their results would be lost after the
    /// upstream did the work.
    owners: TaskTracker,
}

impl Shared {
    /// Taken at the first request, after the binary installed its recorder.
    fn meters(&self) -> &Arc<m::Meters> {
        self.meters.get_or_init(|| {
            Arc::new(m::Meters::new(&self.policy.route, self.store.backend(), self.policy.prices.clone()))
        })
    }

    /// Waits for the tracked calls; see [`IdempotencyLayer::drain`].
    async fn drain(&self) {
        self.owners.close();
        self.owners.wait().await;
        // Ready for more, should requests keep coming after all.
        self.owners.reopen();
    }

    fn running_on(&self) -> usize {
        self.owners.len()
    }
}

impl IdempotencyLayer {
    /// A layer over `store` with the default [`Policy`].
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_policy(store, Policy::default())
    }

    /// A layer over `store` with `policy`.
    pub fn with_policy(store: Arc<dyn Store>, policy: Policy) -> Self {
        let owners = TaskTracker::new();
        Self {
            shared: Arc::new(Shared { store, policy, flights: Flights::default(), meters: OnceLock::new(), owners }),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.shared.policy
    }

    /// Waits until every call of this layer that runs on after its request (an
    /// owner whose client hung up, a stream still being read and recorded) has ended
    /// and been recorded or released. For a graceful shutdown, once no new requests
    /// come in: exiting earlier would drop results the upstream already produced, and
    /// the retries would run them again once the leases ran out.
    pub async fn drain(&self) {
        self.shared.drain().await;
    }

    /// How many such calls are running.
    pub fn running_on(&self) -> usize {
        self.shared.running_on()
    }
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.shared.store.backend())
            .field("policy", &self.shared.policy)
            .finish()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency { inner, shared: self.shared.clone() }
    }
}

/// The service [`IdempotencyLayer`] wraps around `S`.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").field("route", &self.shared.policy.route()).finish_non_exhaustive()
    }
}

impl<S> Idempotency<S> {
    /// [`IdempotencyLayer::drain`] for the layer this service came from.
    pub async fn drain(&self) {
        self.shared.drain().await;
    }

    /// [`IdempotencyLayer::running_on`] for the layer this service came from.
    pub fn running_on(&self) -> usize {
        self.shared.running_on()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    /// Always ready: the inner service is driven with `oneshot` on a clone, after the
    /// claim, because the call may outlive this service's caller.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = self.shared.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let started = Instant::now();
            let mut seen = Seen::default();
            let res = handle(&shared, inner, req, &mut seen).await;
            let route = shared.policy.route.clone();
            shared.meters().request(seen.outcome);
            let status = res.as_ref().map_or(0, |r| r.status().as_u16());
            tracing::info!(
                target: "idemgate::request",
                route = &*route,
                outcome = seen.outcome.as_str(),
                status,
                // Whole microseconds: `0.006`, not `0.005710000000000001`.
                latency_ms = started.elapsed().as_micros() as f64 / 1000.0,
                key = seen.key.as_ref().map(StorageKey::short).as_deref().unwrap_or("-"),
                "request"
            );
            res
        })
    }
}

/// What the edge logs about a request.
struct Seen {
    outcome: Outcome,
    key: Option<StorageKey>,
}

impl Default for Seen {
    fn default() -> Self {
        Self { outcome: Outcome::Bypassed, key: None }
    }
}

async fn handle<S, ReqBody, ResBody>(
    shared: &Arc<Shared>,
    inner: S,
    req: Request<ReqBody>,
    seen: &mut Seen,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let policy = &shared.policy;
    let key = match Key::from_headers(req.headers(), &policy.key_headers) {
        Ok(Some(key)) => Some(key),
        Ok(None) => policy.derived_key.as_ref().and_then(|d| d.derive(req.headers(), SystemTime::now())),
        Err(e) => return Ok(refuse(seen, Outcome::InvalidKey, Problem::InvalidKey(e), req.body())),
    };
    let Some(key) = key else {
        if policy.key_requirement == KeyRequirement::Required {
            return Ok(refuse(seen, Outcome::InvalidKey, Problem::MissingKey, req.body()));
        }
        seen.outcome = Outcome::Bypassed;
        let req = req.map(RequestBody::new);
        return inner.oneshot(req).await.map(|r| r.map(ResponseBody::new));
    };

    let (parts, body) = req.into_parts();
    let declared = content_length(&parts.headers);
    if declared.is_some_and(|n| n > policy.max_body as u64) {
        return Ok(closing(answer(seen, Outcome::Rejected, Problem::BodyTooLarge { limit: policy.max_body })));
    }
    let body = match Limited::new(body, policy.max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Ok(closing(answer(seen, Outcome::Rejected, Problem::BodyTooLarge { limit: policy.max_body })));
        }
        Err(_) => return Ok(closing(answer(seen, Outcome::Rejected, Problem::BodyUnreadable))),
    };
    let fp = fingerprint(&parts, &body, &policy.fingerprint_headers).await;
    let tenant = policy.scope.tenant(&parts.headers);
    let skey = Scope::storage_key(&tenant, &policy.route, &key);
    seen.key = Some(skey);
    let wait_until = Instant::now() + wait_budget(policy, &parts.headers);
    // Built only when it is forwarded: a replay never needs it.
    let mut unsent = Some((parts, body));
    let mut forwarded = || {
        let (mut parts, body) = unsent.take().unwrap_or_else(|| unreachable!("a request is forwarded once"));
        forward_key(&mut parts.headers, &policy.key_headers, &policy.key_forwarding);
        Request::from_parts(parts, RequestBody::full(body))
    };

    let store = &shared.store;
    let backend = store.backend();
    let meters = shared.meters();
    let mut waiting = false;
    let mut wake = None;
    loop {
        if waiting {
            // Subscribe before reading the state, so a change in between is not missed.
            wake = Some(store.watch(&skey));
        }
        let claim = meters.timed(m::Op::Claim, store.claim(&skey, &fp, policy.lease)).await;
        match claim {
            Ok(Claim::Acquired(lease)) => {
                if lease.took_over {
                    metrics::counter!(m::LEASE_TAKEOVERS_TOTAL).increment(1);
                }
                let (res, outcome) = execute(shared.clone(), inner, forwarded(), lease).await;
                seen.outcome = outcome;
                return res;
            }
            Ok(Claim::Completed(stored)) => {
                if !waiting {
                    meters.duplicate();
                }
                seen.outcome = if waiting { Outcome::Joined } else { Outcome::Replayed };
                meters.saved(stored.usage.as_ref(), stored.model.as_deref());
                return Ok(replay(*stored, policy));
            }
            Ok(Claim::Mismatch) => return Ok(answer(seen, Outcome::Mismatch, Problem::Mismatch)),
            Ok(Claim::InFlight { lease_until }) => {
                if !waiting {
                    meters.duplicate();
                }
                let now = Instant::now();
                if now >= wait_until {
                    let retry_after = retry_after(lease_until);
                    return Ok(answer(seen, Outcome::Conflict, Problem::InFlight { retry_after }));
                }
                // This process runs the original: a stream can be joined live.
                if let Some(flight) = shared.flights.get(&skey)
                    && let Ok(Some(head)) = tokio::time::timeout(wait_until - now, flight.head()).await
                    && head.joinable
                    && let Some(live) = flight.join()
                {
                    seen.outcome = Outcome::Joined;
                    return Ok(joined(head, live));
                }
                // Another process runs it and publishes its stream through the store.
                if let Ok(Some(read)) = store.live_read(&skey, 0).await
                    && read.end.is_none()
                {
                    seen.outcome = Outcome::Joined;
                    let head = FlightHead {
                        status: StatusCode::from_u16(read.head.status).unwrap_or(StatusCode::OK),
                        headers: read.head.headers.clone(),
                        joinable: true,
                    };
                    return Ok(joined(head, live::follow(store.clone(), skey, read, meters.clone())));
                }
                if waiting {
                    let nap = policy.poll_interval.min(wait_until - now);
                    if let Some(w) = wake.take() {
                        let _ = tokio::time::timeout(nap, w).await;
                    }
                }
                waiting = true;
            }
            Err(e) => {
                tracing::warn!(target: "idemgate::store", backend, error = %e, "claim failed");
                seen.outcome = Outcome::StoreError;
                return match policy.on_store_error {
                    OnStoreError::FailClosed => Ok(Problem::StoreUnavailable.into_response()),
                    OnStoreError::FailOpen => inner.oneshot(forwarded()).await.map(|r| r.map(ResponseBody::new)),
                };
            }
        }
    }
}

fn answer(seen: &mut Seen, outcome: Outcome, problem: Problem) -> Response<ResponseBody> {
    seen.outcome = outcome;
    problem.into_response()
}

/// Answers a request refused before its body was read. The answer goes out at once
/// (a client may be waiting for it before sending the body), with `Connection: close`
/// when a body is left unread, so the client does not reuse a connection the server
/// will close.
fn refuse<B: Body>(seen: &mut Seen, outcome: Outcome, problem: Problem, body: &B) -> Response<ResponseBody> {
    let res = answer(seen, outcome, problem);
    if body.is_end_stream() { res } else { closing(res) }
}

/// Marks a response as the last on its connection: an unread request body is left
/// behind, and the server will not read past it.
fn closing(mut res: Response<ResponseBody>) -> Response<ResponseBody> {
    res.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    res
}

async fn fingerprint(parts: &http::request::Parts, body: &Bytes, allow: &[HeaderName]) -> Fingerprint {
    if body.len() <= HASH_INLINE_LIMIT {
        return Fingerprint::compute(&parts.method, &parts.uri, &parts.headers, allow, body);
    }
    let job = {
        let (method, uri, headers) = (parts.method.clone(), parts.uri.clone(), parts.headers.clone());
        let (allow, body) = (allow.to_vec(), body.clone());
        move || Fingerprint::compute(&method, &uri, &headers, &allow, &body)
    };
    match tokio::task::spawn_blocking(job).await {
        Ok(fp) => fp,
        // The blocking pool is shutting down; hash here rather than fail the request.
        Err(_) => Fingerprint::compute(&parts.method, &parts.uri, &parts.headers, allow, body),
    }
}

fn forward_key(headers: &mut HeaderMap, names: &[HeaderName], forwarding: &KeyForwarding) {
    match forwarding {
        KeyForwarding::Forward => {}
        KeyForwarding::Strip => names.iter().for_each(|n| drop(headers.remove(n))),
        KeyForwarding::Rename(to) => {
            let value = names.iter().find_map(|n| headers.remove(n));
            if let Some(v) = value {
                headers.insert(to.clone(), v);
            }
        }
    }
}

/// How long a duplicate may wait: `Prefer: wait=N` (seconds) lowers the route's
/// `max_wait`; policy `conflict` makes it zero.
fn wait_budget(policy: &Policy, headers: &HeaderMap) -> Duration {
    if policy.on_in_flight == OnInFlight::Conflict {
        return Duration::ZERO;
    }
    let preferred = headers
        .get_all(PREFER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("wait=")?.trim().parse::<u64>().ok());
    match preferred {
        Some(secs) => policy.max_wait.min(Duration::from_secs(secs)),
        None => policy.max_wait,
    }
}

/// When to come back: when the owner's lease would run out, but between 100 ms and
/// 1 s, since the owner usually finishes well before its lease.
fn retry_after(lease_until: Timestamp) -> Duration {
    let now = Timestamp::from_system_time(SystemTime::now());
    lease_until.since(now).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

fn replay(stored: StoredResponse, policy: &Policy) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match policy.replay_pace {
        ReplayPace::Recorded if stored.offsets_ms.len() == stored.chunks.len() => {
            ResponseBody::paced(stored.chunks, stored.offsets_ms)
        }
        _ => ResponseBody::from_chunks(stored.chunks),
    };
    replayed(status, stored.headers, body)
}

/// A duplicate's share of a live stream: the recorded head, then the body so far and
/// the live rest.
fn joined(
    head: FlightHead,
    live: impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static,
) -> Response<ResponseBody> {
    let body = ResponseBody::new(http_body_util::StreamBody::new(live));
    replayed(head.status, head.headers, body)
}

/// The response of a duplicate.
fn replayed(status: StatusCode, stored: Vec<(HeaderName, HeaderValue)>, body: ResponseBody) -> Response<ResponseBody> {
    let mut headers = HeaderMap::with_capacity(stored.len() + 1);
    for (name, value) in stored {
        headers.append(name, value);
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    let mut res = Response::new(body);
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    res
}

/// The answer for the client: its head and body, and the outcome when the owner knows
/// better than the status does (a body that broke off is released, whatever its
/// status would say).
type Head<E> = Result<(http::response::Parts, ResponseBody, Option<Outcome>), E>;

/// Runs the call as the owner of `lease`: on the request's own task while it waits for
/// the answer, then (a stream's owner, which reads on, or an owner whose client hung
/// up) on a task of its own that outlives the caller.
async fn execute<S, ResBody>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<RequestBody>,
    lease: Lease,
) -> (Result<Response<ResponseBody>, S::Error>, Outcome)
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (head_tx, head_rx) = oneshot::channel::<Head<S::Error>>();
    let mut owner = Detached::new(own(shared.clone(), inner, req, lease, head_tx), &shared.owners);
    let head = owner.drive_until(head_rx).await;
    drop(owner);
    match head {
        Ok(Ok((parts, body, known))) => {
            let stored = if shared.policy.stores(parts.status) { Outcome::Executed } else { Outcome::Released };
            let outcome = known.unwrap_or(stored);
            (Ok(Response::from_parts(parts, body)), outcome)
        }
        Ok(Err(e)) => (Err(e), Outcome::Released),
        // The owner ended without an answer: it panicked. Its lease was released or
        // will run out.
        Err(_) => (Ok(Problem::Internal.into_response()), Outcome::Released),
    }
}

/// The owner's future. Driven by the request while the request waits for its answer,
/// which for a whole body comes when the owner is done: no task, no channel, no
/// wake-up of another thread. Whatever is left of it when this is dropped (a stream,
/// which the owner reads on after its head, or the whole call when the client hung up)
/// is spawned, so the call still runs to its end and is recorded.
struct Detached<'a>(Option<Pin<Box<dyn Future<Output = ()> + Send>>>, &'a TaskTracker);

impl<'a> Detached<'a> {
    fn new(owner: impl Future<Output = ()> + Send + 'static, tracker: &'a TaskTracker) -> Self {
        Self(Some(Box::pin(owner)), tracker)
    }

    /// Polls the owner until `rx` has its answer. A panic in the owner is caught here,
    /// as a task's would be: the owner is dropped, and `rx` reports it closed.
    async fn drive_until<T>(&mut self, mut rx: oneshot::Receiver<T>) -> Result<T, oneshot::error::RecvError> {
        std::future::poll_fn(|cx| {
            if let Some(owner) = &mut self.0 {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| owner.as_mut().poll(cx))) {
                    Ok(Poll::Pending) => {}
                    Ok(Poll::Ready(())) => self.0 = None,
                    Err(_) => {
                        tracing::error!(target: "idemgate::layer", "the owner of a key panicked; its lease will run out");
                        self.0 = None;
                    }
                }
            }
            // Once the owner is gone, its sender is too: `rx` is ready either way.
            Pin::new(&mut rx).poll(cx)
        })
        .await
    }
}

impl Drop for Detached<'_> {
    fn drop(&mut self) {
        if let Some(owner) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            self.1.spawn_on(owner, &runtime);
        }
    }
}

/// Whether the response's media type (parameters aside) is `media_type`: exactly, so
/// that `application/json` is not `application/jsonl`, a stream of documents.
fn content_type_is(headers: &HeaderMap, media_type: &str) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(media_type))
}

/// Whether a response is read whole before it is answered: JSON (which a client
/// cannot use before its end), or any body of a small declared length. Other bodies
/// (audio, files) go to the client as they arrive.
fn is_whole(headers: &HeaderMap) -> bool {
    content_type_is(headers, "application/json") || content_length(headers).is_some_and(|n| n <= WHOLE_BODY_LIMIT)
}

/// The declared `Content-Length`, when there is a valid one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok())
}

/// An event stream is recorded event-aware: stored only once it reached its
/// protocol's terminator, and joinable live by duplicates.
fn is_event_stream(headers: &HeaderMap) -> bool {
    content_type_is(headers, "text/event-stream")
}

/// What the owner does with the key at the end.
enum Settle {
    Complete(StoredResponse),
    Release,
}

/// The owner's task: call, stream the response to the client while recording it,
/// then complete or release the key. Renews the lease throughout.
async fn own<S, ResBody>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<RequestBody>,
    lease: Lease,
    head_tx: oneshot::Sender<Head<S::Error>>,
) where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let meters = shared.meters();
    let _inflight = meters.inflight();
    let policy = &shared.policy;
    let store = &shared.store;
    let protocol = Protocol::from_path(req.uri().path());
    let flight = shared.flights.start(lease.key);
    let mut registration = Registration { shared: &shared, key: lease.key, flight: flight.clone(), ended: false };
    // The client's end of the body: dropped only after the record is settled, so a
    // client that has read the whole body finds the record completed.
    let mut client: Option<mpsc::Sender<Result<Frame<Bytes>, BoxError>>> = None;
    let mut log: Option<LogWriter> = None;
    let mut head_tx = Some(head_tx);
    // A whole body's head, sent once the record is settled.
    let mut whole: Option<(http::response::Parts, ResponseBody, Option<Outcome>)> = None;
    let work = async {
        let res = match inner.oneshot(req).await {
            Ok(res) => res,
            Err(e) => {
                if let Some(tx) = head_tx.take() {
                    let _ = tx.send(Err(e));
                }
                return Settle::Release;
            }
        };
        let (mut parts, body) = res.into_parts();
        let keep = policy.stores(parts.status);
        let stream = is_event_stream(&parts.headers);
        let headers = if keep { replay_headers(&parts.headers, &policy.replay_headers) } else { Vec::new() };
        let joinable = keep && stream;
        let flight_headers = if joinable { headers.clone() } else { Vec::new() };
        flight.set_head(FlightHead { status: parts.status, headers: flight_headers, joinable });
        // Duplicates on other gateway processes follow the stream through the store.
        log = joinable.then(|| {
            let head = LiveHead { status: parts.status.as_u16(), headers: headers.clone() };
            LogWriter::start(store.clone(), lease.clone(), head, &shared.owners)
        });
        let mut recording = keep.then(|| match stream {
            true => Recording::stream(protocol, flight.clone()),
            false => Recording::body(content_type_is(&parts.headers, "application/json")),
        });
        parts.headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("false"));
        let status = parts.status.as_u16();
        // Errors become `BoxError` inside `poll_frame`, so no `ResBody::Error` (which
        // need not be `Send`) is held across an await.
        let mut body = pin!(body.map_err(Into::<BoxError>::into));
        if keep && !stream && is_whole(&parts.headers) {
            // Read it all, then answer: the record is settled before the client sees a
            // byte, and the answer needs neither a task nor a channel. The client gets
            // the recorded chunks, so the body is held once, not twice.
            let mut trailers = None;
            let clean = loop {
                match body.frame().await {
                    None => break true,
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            if let Some(rec) = &mut recording {
                                rec.push(&data);
                            }
                        }
                        Err(frame) => trailers = frame.into_trailers().ok(),
                    },
                    Some(Err(e)) => {
                        tracing::warn!(target: "idemgate::upstream", error = %e, "response body failed; releasing the key");
                        break false;
                    }
                }
            };
            let response = recording.and_then(|r| r.finish(status, headers, clean));
            whole = Some(match &response {
                Some(response) => (parts, ResponseBody::whole(response.chunks.clone(), trailers), None),
                // Nothing has reached the client yet: say what happened, rather than
                // send a head whose body then breaks.
                None => {
                    let (parts, body) = Problem::UpstreamBodyFailed.into_response().into_parts();
                    (parts, body, Some(Outcome::Released))
                }
            });
            return response.map_or(Settle::Release, Settle::Complete);
        }
        let (tx, rx) = mpsc::channel(LIVE_BUFFER);
        if let Some(head) = head_tx.take()
            && head.send(Ok((parts, ResponseBody::live(rx), None))).is_ok()
        {
            client = Some(tx);
        }
        let clean = loop {
            match body.frame().await {
                None => break true,
                Some(Ok(frame)) => {
                    if let (Some(rec), Some(data)) = (&mut recording, frame.data_ref()) {
                        rec.push_and_share(data, |kept| {
                            if let Some(log) = &log {
                                log.push(kept.clone());
                            }
                        });
                    }
                    if let Some(tx) = &client
                        && tx.send(Ok(frame)).await.is_err()
                    {
                        // The client hung up; keep reading so the retry finds the result.
                        client = None;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(target: "idemgate::upstream", error = %e, "response body failed; releasing the key");
                    if let Some(tx) = client.take() {
                        let _ = tx.send(Err(e)).await;
                    }
                    break false;
                }
            }
        };
        match recording.and_then(|r| r.finish(status, headers, clean)) {
            Some(response) => Settle::Complete(response),
            None => Settle::Release,
        }
    };
    let settle = renewing(work, store.as_ref(), meters, &lease, policy.lease).await;
    let backend = store.backend();
    match settle {
        Settle::Complete(response) => {
            if let Some(log) = &log {
                log.flush().await;
            }
            for attempt in 1..=COMPLETE_ATTEMPTS {
                match meters.timed(m::Op::Complete, store.complete(&lease, &response, policy.ttl)).await {
                    Ok(()) => break,
                    // A retry after a failed attempt may find the key completed by that
                    // very attempt, whose answer was lost on the way back: check.
                    Err(e)
                        if e.kind() == ErrorKind::Conflict && attempt > 1 && completed_by_us(store, &lease).await =>
                    {
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Conflict => {
                        metrics::counter!(m::LEASE_LOST_TOTAL).increment(1);
                        tracing::warn!(target: "idemgate::store", key = lease.key.short(), "lease lost before complete; result not stored");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(target: "idemgate::store", backend, attempt, error = %e, "complete failed");
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                    }
                }
            }
            // After `complete`: a duplicate that finds the flight over finds the record.
            let followers = registration.end(FlightEnd::Complete);
            if let Some(log) = log.take() {
                log.end(LiveEnd::Complete);
            }
            for _ in 0..followers {
                meters.saved(response.usage.as_ref(), response.model.as_deref());
            }
        }
        Settle::Release => {
            if let Err(e) = meters.timed(m::Op::Release, store.release(&lease)).await {
                if e.kind() == ErrorKind::Conflict {
                    metrics::counter!(m::LEASE_LOST_TOTAL).increment(1);
                }
                tracing::warn!(target: "idemgate::store", backend, error = %e, "release failed; the lease will run out");
            }
            registration.end(FlightEnd::Broken);
            if let Some(log) = log.take() {
                log.end(LiveEnd::Broken);
            }
        }
    }
    drop(client);
    if let (Some(tx), Some(head)) = (head_tx, whole) {
        let _ = tx.send(Ok(head));
    }
}

/// An owner's flight while it is registered: unregistered when the owner is done,
/// and ended as broken first if the owner stopped before ending it (it panicked, or
/// its future was dropped with no runtime to finish it on), so that duplicates
/// following it in this process fail and retry instead of waiting for chunks that will
/// never come. The key's lease then runs out.
struct Registration<'a> {
    shared: &'a Shared,
    key: StorageKey,
    flight: Arc<crate::flight::Flight>,
    ended: bool,
}

impl Registration<'_> {
    /// Ends the flight; the number of followers it had.
    fn end(&mut self, end: FlightEnd) -> u64 {
        self.ended = true;
        self.flight.end(end)
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.flight.end(FlightEnd::Broken);
        }
        self.shared.flights.remove(&self.key, &self.flight);
    }
}

/// Whether the key is completed, which after a failed `complete` most likely means
/// that attempt committed and only its answer was lost. (A successor that took over
/// and completed looks the same; either way a result is stored, which is all the
/// caller reports.)
async fn completed_by_us(store: &Arc<dyn Store>, lease: &Lease) -> bool {
    matches!(
        store.get(&lease.key).await,
        Ok(Some(record)) if matches!(record.state, crate::record::RecordState::Completed { .. })
    )
}

/// Drives `work` while renewing `lease` every third of its duration. The renewals run
/// beside the work, not in its place: a store that is slow or hangs delays the next
/// renewal, never the call or the stream it is serving.
async fn renewing<F: Future>(
    work: F,
    store: &dyn Store,
    meters: &m::Meters,
    lease: &Lease,
    duration: Duration,
) -> F::Output {
    let every = duration / 3;
    let renewals = async {
        loop {
            tokio::time::sleep(every).await;
            match meters.timed(m::Op::Renew, store.renew(lease, duration)).await {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Conflict => {
                    tracing::warn!(target: "idemgate::store", key = lease.key.short(), "lease lost while the call ran");
                    break;
                }
                Err(e) => tracing::warn!(target: "idemgate::store", error = %e, "lease renewal failed"),
            }
        }
        // Lost: nothing left to renew while the work finishes.
        std::future::pending::<Infallible>().await
    };
    tokio::select! {
        out = work => out,
        never = renewals => match never {},
    }
}

/// The response headers a replay repeats, in the allow-list's order.
///
/// Names come from the allow-list (no allocation); the values are copied into one
/// buffer that they then share. Sharing the response's own values would save the
/// copy but keep the whole response head (a kilobyte, from a provider) alive with each
/// record that a `memory://` store holds, for a few hundred bytes of values.
fn replay_headers(headers: &HeaderMap, allow: &[HeaderName]) -> Vec<(HeaderName, HeaderValue)> {
    let mut kept: Vec<(HeaderName, HeaderValue)> = allow
        .iter()
        // Comparing names with the response's few is cheaper than hashing each allowed
        // name for a lookup that mostly finds nothing.
        .filter(|n| headers.keys().any(|k| k == *n))
        .flat_map(|n| headers.get_all(n).iter().map(move |v| (n.clone(), v.clone())))
        .collect();
    let mut copy = BytesMut::with_capacity(kept.iter().map(|(_, v)| v.len()).sum());
    kept.iter().for_each(|(_, v)| copy.extend_from_slice(v.as_bytes()));
    let mut copy = copy.freeze();
    for (_, value) in &mut kept {
        // Copied from a valid value, so valid: `value` stays as it was otherwise.
        if let Ok(copied) = HeaderValue::from_maybe_shared(copy.split_to(value.len())) {
            *value = copied;
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_headers_keep_the_allowed_values_in_order_in_one_buffer_of_their_own() {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining-tokens", HeaderValue::from_static("9"));
        h.insert("x-request-id", HeaderValue::from_static("req_1"));
        h.append("content-type", HeaderValue::from_static("application/json"));
        h.append("content-type", HeaderValue::from_bytes(b"caf\xe9").expect("obs-text"));
        let allow = crate::policy::REPLAY_HEADERS;
        let kept = replay_headers(&h, &allow);
        let got: Vec<(&str, &[u8])> = kept.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
        let want: [(&str, &[u8]); 3] =
            [("content-type", b"application/json"), ("content-type", b"caf\xe9"), ("x-request-id", b"req_1")];
        assert_eq!(got, want);
        // Contiguous: copied into one buffer, apart from the response's head.
        let ends = kept.windows(2).all(|w| {
            let first = w[0].1.as_bytes();
            first.as_ptr_range().end == w[1].1.as_bytes().as_ptr()
        });
        assert!(ends, "the kept values share one buffer");
        assert_ne!(kept[2].1.as_bytes().as_ptr(), h["x-request-id"].as_bytes().as_ptr());
        assert!(replay_headers(&HeaderMap::new(), &allow).is_empty());
    }

    #[test]
    fn prefer_wait_lowers_the_budget() {
        let policy = Policy::default().with_max_wait(Duration::from_secs(60));
        let mut h = HeaderMap::new();
        assert_eq!(wait_budget(&policy, &h), Duration::from_secs(60));
        h.insert(PREFER, HeaderValue::from_static("respond-async, wait=0"));
        assert_eq!(wait_budget(&policy, &h), Duration::ZERO);
        h.insert(PREFER, HeaderValue::from_static("wait=600"));
        assert_eq!(wait_budget(&policy, &h), Duration::from_secs(60));
        let conflict = policy.with_on_in_flight(OnInFlight::Conflict);
        assert_eq!(wait_budget(&conflict, &HeaderMap::new()), Duration::ZERO);
    }

    #[test]
    fn event_streams_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
        assert!(is_event_stream(&h));
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_event_stream(&h));
        assert!(is_whole(&h));
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("Application/JSON ; charset=utf-8"));
        assert!(is_whole(&h));
        // A stream of JSON documents goes to the client as it comes.
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/jsonl"));
        assert!(!is_whole(&h));
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("1000"));
        assert!(is_whole(&h), "a small declared length is read whole whatever the type");
    }

    #[test]
    fn key_forwarding_renames_and_strips() {
        let names = [crate::IDEMPOTENCY_KEY];
        let mut h = HeaderMap::new();
        h.insert(crate::IDEMPOTENCY_KEY, HeaderValue::from_static("k"));
        forward_key(&mut h, &names, &KeyForwarding::Rename(HeaderName::from_static("x-upstream-key")));
        assert_eq!(h.get("x-upstream-key").unwrap(), "k");
        assert!(h.get(crate::IDEMPOTENCY_KEY).is_none());
        let mut h = HeaderMap::new();
        h.insert(crate::IDEMPOTENCY_KEY, HeaderValue::from_static("k"));
        forward_key(&mut h, &names, &KeyForwarding::Strip);
        assert!(h.is_empty());
    }
}
