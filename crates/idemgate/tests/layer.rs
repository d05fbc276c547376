//! The layer around an in-process service that counts its calls: no network.

#![expect(clippy::unwrap_used, reason = "tests")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, join_all};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use idemgate::store::{Claim, Lease};
use idemgate::{
    Clock, Fingerprint, IdempotencyLayer, KeyRequirement, MemoryStore, OnInFlight, OnStoreError, Policy, Record,
    ReplayPace, RequestBody, ResponseBody, StorageKey, Store, StoreError, StoredResponse, Timestamp,
};
use tower::{Layer, Service, ServiceExt, service_fn};

/// An inner service that counts calls. Each answer carries the call number, so two
/// executions never produce the same bytes. Headers steer it: `x-status` (the status
/// to answer), `x-delay-ms` (how long to think), `x-fail-first` (answer 500 to the
/// first N calls), `x-panic-first` (panic in the first call).
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

impl Upstream {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn service(
        &self,
    ) -> impl Service<Request<RequestBody>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        let (calls, finished) = (self.calls.clone(), self.finished.clone());
        service_fn(move |req: Request<RequestBody>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let finished = finished.clone();
            async move {
                let (delay, fail_first, mut status) = {
                    let header =
                        |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                    (
                        header("x-delay-ms"),
                        header("x-fail-first").unwrap_or(0),
                        header("x-status").map_or(200, |s| s as u16),
                    )
                };
                if (n as u64) <= fail_first {
                    status = 500;
                }
                assert!(n > 1 || req.headers().get("x-panic-first").is_none(), "the upstream service panicked");
                let body = req.into_body().collect().await.unwrap().to_bytes();
                if let Some(ms) = delay {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                finished.fetch_add(1, Ordering::SeqCst);
                let text = format!(r#"{{"id":"gen-{n}","status":{status},"echo":{}}}"#, body.len());
                let res = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .header("x-request-id", format!("req-{n}"))
                    .header("set-cookie", "session=secret")
                    .body(Full::new(Bytes::from(text)))
                    .unwrap();
                Ok::<_, Infallible>(res)
            }
        })
    }
}

type Svc = tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<ResponseBody>, Infallible>;

fn gateway(store: Arc<dyn Store>, policy: Policy, upstream: &Upstream) -> Svc {
    tower::util::BoxCloneSyncService::new(IdempotencyLayer::with_policy(store, policy).layer(upstream.service()))
}

fn setup(policy: Policy) -> (Svc, Upstream) {
    let upstream = Upstream::default();
    (gateway(Arc::new(MemoryStore::new()), policy, &upstream), upstream)
}

fn post(key: Option<&str>, body: &'static str) -> http::request::Builder {
    let b = Request::post("/v1/chat/completions").header("authorization", "Bearer sk-test");
    let b = match key {
        Some(k) => b.header("idempotency-key", k),
        None => b,
    };
    let _ = body;
    b
}

fn req(key: &str, body: &'static str) -> Request<Full<Bytes>> {
    post(Some(key), body).body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap()
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn send(svc: &Svc, req: Request<Full<Bytes>>) -> Answer {
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Answer { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

fn replayed(a: &Answer) -> &str {
    a.headers.get("idempotent-replayed").map_or("absent", |v| v.to_str().unwrap())
}

fn problem_type(a: &Answer) -> String {
    assert_eq!(a.headers["content-type"], "application/problem+json");
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    v["type"].as_str().unwrap().to_owned()
}

const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn sequential_duplicate_is_replayed_byte_for_byte() {
    let (svc, upstream) = setup(Policy::default());
    let first = send(&svc, req("k1", BODY)).await;
    let second = send(&svc, req("k1", BODY)).await;
    assert_eq!(upstream.calls(), 1);
    assert_eq!(first.status, 200);
    assert_eq!(second.status, 200);
    assert_eq!(first.body, second.body);
    assert_eq!(first.body, Bytes::from_static(br#"{"id":"gen-1","status":200,"echo":62}"#));
    assert_eq!(replayed(&first), "false");
    assert_eq!(replayed(&second), "true");
    // Allow-listed headers are replayed; per-execution ones are not.
    assert_eq!(second.headers["content-type"], "application/json");
    assert_eq!(second.headers["x-request-id"], "req-1");
    assert!(second.headers.get("set-cookie").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_duplicates_cause_one_call() {
    let (svc, upstream) = setup(Policy::default());
    let mut r = req("burst", BODY);
    r.headers_mut().insert("x-delay-ms", "200".parse().unwrap());
    let template = r;
    let answers = join_all((0..100).map(|_| {
        let mut r = Request::new(Full::new(Bytes::from_static(BODY.as_bytes())));
        *r.method_mut() = template.method().clone();
        *r.uri_mut() = template.uri().clone();
        *r.headers_mut() = template.headers().clone();
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, r).await })
    }))
    .await;
    assert_eq!(upstream.calls(), 1);
    let answers: Vec<Answer> = answers.into_iter().map(Result::unwrap).collect();
    assert!(answers.iter().all(|a| a.status == 200 && a.body == answers[0].body));
    assert_eq!(answers.iter().filter(|a| replayed(a) == "false").count(), 1);
    assert_eq!(answers.iter().filter(|a| replayed(a) == "true").count(), 99);
}

#[tokio::test]
async fn same_key_different_request_is_422_without_a_call() {
    let (svc, upstream) = setup(Policy::default());
    send(&svc, req("k", BODY)).await;
    let other = send(&svc, req("k", r#"{"model":"gpt-4o","messages":[]}"#)).await;
    assert_eq!(other.status, 422);
    assert_eq!(problem_type(&other), "https://idemgate.dev/problems/idempotency-key-mismatch");
    assert_eq!(other.headers["x-should-retry"], "false");
    // The stored body never leaks into the error.
    assert!(!String::from_utf8_lossy(&other.body).contains("gen-1"));
    assert_eq!(upstream.calls(), 1);
    // Reordered keys and whitespace are the same request, not a mismatch.
    let same = send(&svc, req("k", r#"{ "messages":[{"content":"hi","role":"user"}], "model":"gpt-4o" }"#)).await;
    assert_eq!(same.status, 200);
    assert_eq!(replayed(&same), "true");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn missing_key_passes_through_or_is_refused_when_required() {
    let (svc, upstream) = setup(Policy::default());
    let a = send(&svc, post(None, BODY).body(Full::new(Bytes::from_static(BODY.as_bytes()))).unwrap()).await;
    let b = send(&svc, post(None, BODY).body(Full::new(Bytes::from_static(BODY.as_bytes()))).unwrap()).await;
    assert_eq!(upstream.calls(), 2);
    assert_ne!(a.body, b.body);
    assert!(a.headers.get("idempotent-replayed").is_none());
    // Untouched: the cookie the upstream set reaches the client.
    assert_eq!(a.headers["set-cookie"], "session=secret");

    let (svc, upstream) = setup(Policy::default().with_key_requirement(KeyRequirement::Required));
    let refused = send(&svc, post(None, BODY).body(Full::new(Bytes::from_static(BODY.as_bytes()))).unwrap()).await;
    assert_eq!(refused.status, 400);
    assert_eq!(problem_type(&refused), "https://idemgate.dev/problems/missing-idempotency-key");
    assert_eq!(upstream.calls(), 0);
}

#[tokio::test]
async fn malformed_keys_are_400_and_change_nothing() {
    let (svc, upstream) = setup(Policy::default());
    let long = "k".repeat(300);
    for bad in [long.as_str(), "", "\"unterminated"] {
        let r = Request::post("/v1/x").header("idempotency-key", bad).body(Full::new(Bytes::new())).unwrap();
        let a = send(&svc, r).await;
        assert_eq!(a.status, 400, "key {bad:?}");
        assert_eq!(problem_type(&a), "https://idemgate.dev/problems/invalid-idempotency-key");
    }
    let mut r = Request::post("/v1/x").body(Full::new(Bytes::new())).unwrap();
    r.headers_mut().insert("idempotency-key", http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
    assert_eq!(send(&svc, r).await.status, 400);
    let r = Request::post("/v1/x")
        .header("idempotency-key", "a")
        .header("idempotency-key", "a")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&svc, r).await.status, 400);
    assert_eq!(upstream.calls(), 0);
}

#[tokio::test]
async fn server_error_is_released_and_the_retry_executes() {
    let (svc, upstream) = setup(Policy::default());
    let mut r = req("flaky", BODY);
    r.headers_mut().insert("x-fail-first", "1".parse().unwrap());
    let failed = send(&svc, r).await;
    assert_eq!(failed.status, 500);
    assert_eq!(replayed(&failed), "false");

    let mut r = req("flaky", BODY);
    r.headers_mut().insert("x-fail-first", "1".parse().unwrap());
    let ok = send(&svc, r).await;
    assert_eq!(ok.status, 200);
    assert_eq!(upstream.calls(), 2);

    let mut r = req("flaky", BODY);
    r.headers_mut().insert("x-fail-first", "1".parse().unwrap());
    let again = send(&svc, r).await;
    assert_eq!(replayed(&again), "true");
    assert_eq!(again.body, ok.body);
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn deterministic_client_errors_are_stored_and_transient_ones_are_not() {
    for (status, stored) in [(400, true), (401, true), (404, true), (422, true), (408, false), (429, false)] {
        let (svc, upstream) = setup(Policy::default());
        let mut first = req("k", BODY);
        first.headers_mut().insert("x-status", status.to_string().parse().unwrap());
        let a = send(&svc, first).await;
        let mut second = req("k", BODY);
        second.headers_mut().insert("x-status", status.to_string().parse().unwrap());
        let b = send(&svc, second).await;
        assert_eq!(a.status, status);
        assert_eq!(b.status, status);
        if stored {
            assert_eq!(upstream.calls(), 1, "status {status} should be stored");
            assert_eq!(a.body, b.body);
            assert_eq!(replayed(&b), "true");
        } else {
            assert_eq!(upstream.calls(), 2, "status {status} should be released");
            assert_eq!(replayed(&b), "false");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_response_future_still_completes_and_is_replayed() {
    let (svc, upstream) = setup(Policy::default());
    let mut r = req("hangup", BODY);
    r.headers_mut().insert("x-delay-ms", "300".parse().unwrap());
    // The client gives up after 50 ms: the future is dropped mid-call.
    let timed_out = tokio::time::timeout(Duration::from_millis(50), svc.clone().oneshot(r)).await;
    assert!(timed_out.is_err());
    assert_eq!(upstream.calls(), 1);
    // The retry arrives while the call still runs: it joins and gets the result.
    let mut r = req("hangup", BODY);
    r.headers_mut().insert("x-delay-ms", "300".parse().unwrap());
    let retry = send(&svc, r).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.body, Bytes::from_static(br#"{"id":"gen-1","status":200,"echo":62}"#));
    assert_eq!(replayed(&retry), "true");
    // And a later one replays it.
    let later = send(&svc, req("hangup", BODY)).await;
    assert_eq!(later.body, retry.body);
    assert_eq!(upstream.calls(), 1);
}

/// A graceful shutdown waits for the calls whose clients hung up: their results
/// were paid for upstream, and dropping them would make the retries run them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_calls_whose_clients_hung_up() {
    let upstream = Upstream::default();
    let policy = Policy::default().with_max_wait(Duration::ZERO);
    let layer = IdempotencyLayer::with_policy(Arc::new(MemoryStore::new()), policy);
    let svc: Svc = tower::util::BoxCloneSyncService::new(layer.layer(upstream.service()));
    let mut r = req("drain", BODY);
    r.headers_mut().insert("x-delay-ms", "300".parse().unwrap());
    let timed_out = tokio::time::timeout(Duration::from_millis(50), svc.clone().oneshot(r)).await;
    assert!(timed_out.is_err(), "the client hung up mid-call");
    assert_eq!(layer.running_on(), 1, "its call runs on");
    // Still running: a duplicate that may not wait is told so.
    assert_eq!(send(&svc, req("drain", BODY)).await.status, 409);

    tokio::time::timeout(Duration::from_secs(5), layer.drain()).await.expect("the call ends");
    assert_eq!(upstream.finished.load(Ordering::SeqCst), 1, "drain returned once the call was done");
    assert_eq!(layer.running_on(), 0);
    let retry = send(&svc, req("drain", BODY)).await;
    assert_eq!((retry.status, replayed(&retry)), (StatusCode::OK, "true"), "and recorded");
    assert_eq!(upstream.calls(), 1);
    // Nothing left: a second drain returns at once, and the layer keeps serving.
    tokio::time::timeout(Duration::from_millis(100), layer.drain()).await.expect("nothing to wait for");
    assert_eq!(send(&svc, req("after", BODY)).await.status, 200);
}

#[tokio::test]
async fn a_panic_in_the_call_is_a_500_and_the_key_is_not_stored() {
    let policy = Policy::default().with_lease(Duration::from_millis(200)).with_max_wait(Duration::ZERO);
    let (svc, upstream) = setup(policy);
    let mut r = req("boom", BODY);
    r.headers_mut().insert("x-panic-first", "1".parse().unwrap());
    let first = send(&svc, r).await;
    assert_eq!(first.status, 500);
    assert!(problem_type(&first).ends_with("/idempotency-internal-error"));
    assert_eq!(first.headers["x-should-retry"], "true");
    // The claim is left to its lease, as a crashed process's would be; after it, the
    // retry executes.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let retry = send(&svc, req("boom", BODY)).await;
    assert_eq!(retry.status, 200);
    assert_eq!(replayed(&retry), "false");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_future_with_no_retry_in_flight_still_stores() {
    let (svc, upstream) = setup(Policy::default());
    let mut r = req("gone", BODY);
    r.headers_mut().insert("x-delay-ms", "100".parse().unwrap());
    drop(tokio::time::timeout(Duration::from_millis(10), svc.clone().oneshot(r)).await);
    // Wait for the detached call to finish, then retry after it.
    while upstream.finished.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let mut retry = send(&svc, req("gone", BODY)).await;
    for _ in 0..100 {
        if replayed(&retry) == "true" {
            break;
        }
        retry = send(&svc, req("gone", BODY)).await;
    }
    assert_eq!(replayed(&retry), "true");
    assert_eq!(retry.body, Bytes::from_static(br#"{"id":"gen-1","status":200,"echo":62}"#));
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn two_tenants_with_one_key_are_two_calls() {
    let (svc, upstream) = setup(Policy::default());
    let with = |cred: &'static str| {
        Request::post("/v1/chat/completions")
            .header("authorization", cred)
            .header("idempotency-key", "shared")
            .body(Full::new(Bytes::from_static(BODY.as_bytes())))
            .unwrap()
    };
    let a = send(&svc, with("Bearer sk-a")).await;
    let b = send(&svc, with("Bearer sk-b")).await;
    assert_eq!(upstream.calls(), 2);
    assert_ne!(a.body, b.body);
    assert_eq!(replayed(&b), "false");
    assert_eq!(send(&svc, with("Bearer sk-a")).await.body, a.body);
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_policy_and_prefer_wait_0_answer_409_with_retry_headers() {
    let (svc, upstream) = setup(Policy::default().with_on_in_flight(OnInFlight::Conflict));
    let slow = || {
        let mut r = req("busy", BODY);
        r.headers_mut().insert("x-delay-ms", "300".parse().unwrap());
        r
    };
    let original = tokio::spawn({
        let svc = svc.clone();
        let r = slow();
        async move { send(&svc, r).await }
    });
    while upstream.calls() == 0 {
        tokio::task::yield_now().await;
    }
    let dup = send(&svc, slow()).await;
    assert_eq!(dup.status, 409);
    assert_eq!(problem_type(&dup), "https://idemgate.dev/problems/idempotency-key-in-use");
    assert_eq!(dup.headers["x-should-retry"], "true");
    assert_eq!(dup.headers["retry-after"], "1");
    let ms: u64 = dup.headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!((100..=1000).contains(&ms), "retry-after-ms {ms}");
    assert_eq!(original.await.unwrap().status, 200);
    assert_eq!(upstream.calls(), 1);

    // With the default `wait` policy, `Prefer: wait=0` asks for the 409 too.
    let (svc, upstream) = setup(Policy::default());
    let original = tokio::spawn({
        let svc = svc.clone();
        let r = slow();
        async move { send(&svc, r).await }
    });
    while upstream.calls() == 0 {
        tokio::task::yield_now().await;
    }
    let mut r = slow();
    r.headers_mut().insert("prefer", "wait=0".parse().unwrap());
    assert_eq!(send(&svc, r).await.status, 409);
    assert_eq!(original.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_past_max_wait_is_409() {
    let (svc, upstream) = setup(Policy::default().with_max_wait(Duration::from_millis(100)));
    let slow = || {
        let mut r = req("long", BODY);
        r.headers_mut().insert("x-delay-ms", "600".parse().unwrap());
        r
    };
    let original = tokio::spawn({
        let svc = svc.clone();
        let r = slow();
        async move { send(&svc, r).await }
    });
    while upstream.calls() == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(send(&svc, slow()).await.status, 409);
    assert_eq!(original.await.unwrap().status, 200);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_original_is_released_one_waiter_executes_and_the_others_join_it() {
    let (svc, upstream) = setup(Policy::default());
    let make = || {
        let mut r = req("relay", BODY);
        r.headers_mut().insert("x-delay-ms", "150".parse().unwrap());
        r.headers_mut().insert("x-fail-first", "1".parse().unwrap());
        r
    };
    let original = tokio::spawn({
        let svc = svc.clone();
        let r = make();
        async move { send(&svc, r).await }
    });
    while upstream.calls() == 0 {
        tokio::task::yield_now().await;
    }
    let waiters = join_all((0..10).map(|_| {
        let svc = svc.clone();
        let r = make();
        tokio::spawn(async move { send(&svc, r).await })
    }))
    .await;
    assert_eq!(original.await.unwrap().status, 500);
    let waiters: Vec<Answer> = waiters.into_iter().map(Result::unwrap).collect();
    assert_eq!(upstream.calls(), 2);
    assert!(waiters.iter().all(|a| a.status == 200 && a.body == waiters[0].body));
    assert_eq!(waiters.iter().filter(|a| replayed(a) == "false").count(), 1);
}

#[tokio::test]
async fn body_over_the_limit_is_413_and_claims_nothing() {
    let store = Arc::new(MemoryStore::new());
    let upstream = Upstream::default();
    let svc = gateway(store.clone(), Policy::default().with_max_body(16), &upstream);
    let a = send(&svc, req("big", BODY)).await;
    assert_eq!(a.status, 413);
    assert_eq!(problem_type(&a), "https://idemgate.dev/problems/request-too-large");
    assert_eq!(upstream.calls(), 0);
    // The same key with a small body executes: nothing was claimed.
    assert_eq!(send(&svc, req("big", "{}")).await.status, 200);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn non_json_bodies_are_fingerprinted_raw() {
    let (svc, upstream) = setup(Policy::default());
    assert_eq!(send(&svc, req("raw", "plain text")).await.status, 200);
    assert_eq!(replayed(&send(&svc, req("raw", "plain text")).await), "true");
    assert_eq!(send(&svc, req("raw", "plain text ")).await.status, 422);
    assert_eq!(upstream.calls(), 1);
}

/// A store whose every operation fails, as an unreachable server would.
struct DownStore;

impl Store for DownStore {
    fn backend(&self) -> &'static str {
        "down"
    }
    fn claim<'a>(
        &'a self,
        _: &'a StorageKey,
        _: &'a Fingerprint,
        _: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async { Err(StoreError::unavailable("store down", "connection refused")) })
    }
    fn renew<'a>(&'a self, _: &'a Lease, _: Duration) -> BoxFuture<'a, Result<Timestamp, StoreError>> {
        Box::pin(async { Err(StoreError::unavailable("store down", "connection refused")) })
    }
    fn complete<'a>(
        &'a self,
        _: &'a Lease,
        _: &'a StoredResponse,
        _: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::unavailable("store down", "connection refused")) })
    }
    fn release<'a>(&'a self, _: &'a Lease) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::unavailable("store down", "connection refused")) })
    }
    fn get<'a>(&'a self, _: &'a StorageKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(async { Err(StoreError::unavailable("store down", "connection refused")) })
    }
    fn purge<'a>(&'a self, _: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Err(StoreError::unavailable("store down", "connection refused")) })
    }
    fn sweep(&self, _: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async { Err(StoreError::unavailable("store down", "connection refused")) })
    }
    fn watch(&self, _: &StorageKey) -> BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::unavailable("store down", "connection refused")) })
    }
}

#[tokio::test]
async fn unreachable_store_fails_closed_or_open_by_policy() {
    let upstream = Upstream::default();
    let closed = gateway(Arc::new(DownStore), Policy::default(), &upstream);
    let a = send(&closed, req("k", BODY)).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(problem_type(&a), "https://idemgate.dev/problems/idempotency-store-unavailable");
    assert_eq!(upstream.calls(), 0);

    let open = gateway(Arc::new(DownStore), Policy::default().with_on_store_error(OnStoreError::FailOpen), &upstream);
    let b = send(&open, req("k", BODY)).await;
    assert_eq!(b.status, 200);
    assert_eq!(upstream.calls(), 1);
}

/// Wall-clock time that follows tokio's (paused) clock, so store leases and the
/// layer's renewal ticker move together under `tokio::time::advance`.
#[derive(Clone)]
struct TokioClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(self.base + self.start.elapsed())
    }
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_the_call_is_alive() {
    let clock = TokioClock { base: SystemTime::now(), start: tokio::time::Instant::now() };
    let store = Arc::new(MemoryStore::new().with_clock(clock));
    let upstream = Upstream::default();
    // A 10 s generation under a 1 s lease: without renewal a duplicate would take over.
    let svc = gateway(store, Policy::default().with_lease(Duration::from_secs(1)), &upstream);
    let slow = || {
        let mut r = req("long-gen", BODY);
        r.headers_mut().insert("x-delay-ms", "10000".parse().unwrap());
        r
    };
    let original = tokio::spawn({
        let svc = svc.clone();
        let r = slow();
        async move { send(&svc, r).await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let dup = send(&svc, slow()).await;
    let first = original.await.unwrap();
    assert_eq!(upstream.calls(), 1);
    assert_eq!(dup.body, first.body);
    assert_eq!(replayed(&dup), "true");
}

/// A memory store whose renewals never answer, as a hung server's would not.
struct HungRenewals(MemoryStore);

impl Store for HungRenewals {
    fn backend(&self) -> &'static str {
        "hung-renewals"
    }
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        fp: &'a Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        self.0.claim(key, fp, lease)
    }
    fn renew<'a>(&'a self, _: &'a Lease, _: Duration) -> BoxFuture<'a, Result<Timestamp, StoreError>> {
        Box::pin(std::future::pending())
    }
    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.complete(lease, response, ttl)
    }
    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.release(lease)
    }
    fn get<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        self.0.get(key)
    }
    fn purge<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.purge(key)
    }
    fn sweep(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        self.0.sweep(limit)
    }
    fn watch(&self, key: &StorageKey) -> BoxFuture<'static, ()> {
        self.0.watch(key)
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.0.ping()
    }
}

/// A renewal that hangs holds up the next renewal, not the call: the response comes
/// when the upstream answers, and is recorded.
#[tokio::test(start_paused = true)]
async fn a_hung_renewal_does_not_hold_up_the_call() {
    let clock = TokioClock { base: SystemTime::now(), start: tokio::time::Instant::now() };
    let store = Arc::new(HungRenewals(MemoryStore::new().with_clock(clock)));
    let upstream = Upstream::default();
    // The first renewal starts after 333 ms and never ends; the call takes 2 s.
    let svc = gateway(store, Policy::default().with_lease(Duration::from_secs(1)), &upstream);
    let slow = || {
        let mut r = req("hung-renewal", BODY);
        r.headers_mut().insert("x-delay-ms", "2000".parse().unwrap());
        r
    };
    let started = tokio::time::Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(60), send(&svc, slow())).await.expect("the call is answered");
    assert_eq!(first.status, 200);
    assert!(started.elapsed() < Duration::from_secs(3), "answered after {:?}", started.elapsed());
    let again = send(&svc, slow()).await;
    assert_eq!(replayed(&again), "true");
    assert_eq!(again.body, first.body);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn a_refusal_before_the_body_is_read_closes_the_connection_only_when_a_body_is_left() {
    let (svc, upstream) = setup(Policy::default().with_key_requirement(KeyRequirement::Required));
    let with_body = post(None, BODY).body(Full::new(Bytes::from_static(BODY.as_bytes()))).unwrap();
    let a = send(&svc, with_body).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.headers["connection"], "close");
    let empty = Request::post("/v1/x").header("idempotency-key", "").body(Full::new(Bytes::new())).unwrap();
    let b = send(&svc, empty).await;
    assert_eq!(b.status, 400);
    assert!(b.headers.get("connection").is_none());
    assert_eq!(upstream.calls(), 0);
}

/// An inner service that streams an OpenAI chat completion as SSE, one event per
/// frame, `gap` apart, and counts its calls. Without `terminate` it stops before
/// `data: [DONE]`.
fn sse_service(
    calls: Arc<AtomicUsize>,
    gap: Duration,
    terminate: bool,
) -> impl Service<
    Request<RequestBody>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Send + 'static>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ Sync
+ 'static {
    service_fn(move |_req: Request<RequestBody>| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let mut events: Vec<Bytes> = (0..3)
                .map(|i| {
                    Bytes::from(format!(
                        "data: {{\"id\":\"chatcmpl-{n}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"part {i} \"}}}}]}}\n\n"
                    ))
                })
                .collect();
            events.push(Bytes::from_static(
                b"data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"total_tokens\":18,\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n",
            ));
            if terminate {
                events.push(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            let frames = futures_util::stream::iter(events).then(move |e| async move {
                tokio::time::sleep(gap).await;
                Ok::<_, Infallible>(http_body::Frame::data(e))
            });
            let res = Response::builder()
                .header("content-type", "text/event-stream")
                .header("x-request-id", format!("req_{n}"))
                .body(http_body_util::StreamBody::new(frames))
                .unwrap();
            Ok::<_, Infallible>(res)
        }
    })
}

fn sse_upstream(calls: Arc<AtomicUsize>, gap: Duration, terminate: bool, policy: Policy) -> Svc {
    let layer = IdempotencyLayer::with_policy(Arc::new(MemoryStore::new()), policy);
    tower::util::BoxCloneSyncService::new(layer.layer(sse_service(calls, gap, terminate)))
}

async fn frames(svc: &Svc, req: Request<Full<Bytes>>) -> (String, Vec<Bytes>) {
    let (headers, out) = frames_and_headers(svc, req).await;
    (headers["idempotent-replayed"].to_str().unwrap().to_owned(), out)
}

async fn frames_and_headers(svc: &Svc, req: Request<Full<Bytes>>) -> (http::HeaderMap, Vec<Bytes>) {
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, mut body) = res.into_parts();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        out.push(frame.unwrap().into_data().unwrap());
    }
    (parts.headers, out)
}

fn chat_stream_req(key: &str) -> Request<Full<Bytes>> {
    req(key, r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#)
}

#[tokio::test(start_paused = true)]
async fn a_recorded_stream_replays_with_its_chunk_boundaries() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = sse_upstream(calls.clone(), Duration::from_millis(20), true, Policy::default());
    let (first_flag, first) = frames(&svc, chat_stream_req("sse")).await;
    let (again_flag, again) = frames(&svc, chat_stream_req("sse")).await;
    assert_eq!((first_flag.as_str(), again_flag.as_str()), ("false", "true"));
    assert_eq!(first.len(), 5);
    assert_eq!(again, first, "same frames, same boundaries");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_without_its_terminator_is_released() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = sse_upstream(calls.clone(), Duration::from_millis(20), false, Policy::default());
    let (_, first) = frames(&svc, chat_stream_req("no-done")).await;
    let (flag, again) = frames(&svc, chat_stream_req("no-done")).await;
    assert_eq!(flag, "false", "executed again");
    assert_eq!(first.len(), 4);
    assert_ne!(again, first);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn recorded_pace_replays_chunks_at_their_original_offsets() {
    let calls = Arc::new(AtomicUsize::new(0));
    let paced = Policy::default().with_replay_pace(ReplayPace::Recorded);
    let svc = sse_upstream(calls.clone(), Duration::from_millis(100), true, paced);
    let (_, first) = frames(&svc, chat_stream_req("paced")).await;

    // The replay's frames arrive at the recorded offsets: 0, 100, 200, ... ms after
    // the first (tokio's clock is paused, so the offsets are exact).
    let res = svc.clone().oneshot(chat_stream_req("paced")).await.unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let start = tokio::time::Instant::now();
    let mut body = res.into_body();
    let (mut got, mut at) = (Vec::new(), Vec::new());
    while let Some(frame) = body.frame().await {
        got.push(frame.unwrap().into_data().unwrap());
        at.push(start.elapsed().as_millis());
    }
    assert_eq!(got, first);
    assert_eq!(at, [0, 100, 200, 300, 400]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Two layers on one store stand for two gateway processes: a duplicate that lands
/// on the other one joins the live stream through the store's live log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_on_another_process_joins_the_stream_through_the_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new().with_live_logs());
    let calls = Arc::new(AtomicUsize::new(0));
    let process = |calls: &Arc<AtomicUsize>| -> Svc {
        let layer = IdempotencyLayer::with_policy(store.clone(), Policy::default());
        tower::util::BoxCloneSyncService::new(layer.layer(sse_service(calls.clone(), Duration::from_millis(60), true)))
    };
    let (a, b) = (process(&calls), process(&calls));
    let original = tokio::spawn({
        let a = a.clone();
        async move { frames(&a, chat_stream_req("fleet")).await }
    });
    tokio::time::sleep(Duration::from_millis(130)).await;
    let (joined_head, joined) = frames_and_headers(&b, chat_stream_req("fleet")).await;
    let (first_flag, first) = original.await.unwrap();
    assert_eq!((first_flag.as_str(), joined_head["idempotent-replayed"].to_str().unwrap()), ("false", "true"));
    assert_eq!(joined.concat(), first.concat(), "the same bytes");
    // The live log carries the head's allow-listed headers.
    assert_eq!(joined_head["content-type"], "text/event-stream");
    assert_eq!(joined_head["x-request-id"], "req_1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Later, the other process replays the stored stream.
    let (flag, again) = frames(&b, chat_stream_req("fleet")).await;
    assert_eq!(flag, "true");
    assert_eq!(again, first);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_on_another_process_sees_a_broken_original_break() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new().with_live_logs());
    let calls = Arc::new(AtomicUsize::new(0));
    let process = || -> Svc {
        let layer = IdempotencyLayer::with_policy(store.clone(), Policy::default());
        tower::util::BoxCloneSyncService::new(layer.layer(sse_service(calls.clone(), Duration::from_millis(60), false)))
    };
    let (a, b) = (process(), process());
    let original = tokio::spawn({
        let a = a.clone();
        async move { frames(&a, chat_stream_req("fleet-cut")).await }
    });
    tokio::time::sleep(Duration::from_millis(130)).await;
    let res = b.clone().oneshot(chat_stream_req("fleet-cut")).await.unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let mut body = res.into_body();
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the follower's stream breaks off like the original's");
    original.await.unwrap();
    // Nothing was stored: the retry executes.
    let (flag, _) = frames(&b, chat_stream_req("fleet-cut")).await;
    assert_eq!(flag, "false");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
