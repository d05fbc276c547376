//! The proxy end to end in one process: a real mock upstream on port 0, the real
//! `Proxy` served on port 0, a real HTTP client. Asserts upstream call counts and
//! exact bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idemgate::{MemoryStore, Policy, Store};
use idemgate_proxy::{Proxy, Route, Timeouts, UpstreamClient, serve_on_cores};
use idemgate_testkit::mock::{self, MockUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Write the confirmation email"}]}"#;

/// A proxy served on a free port until dropped.
struct Gateway {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Gateway {
    async fn start(routes: Vec<Route>, store: Arc<dyn Store>, timeouts: Timeouts) -> Self {
        let client = UpstreamClient::new(timeouts).expect("client");
        let proxy = Proxy::new(routes, store, client).expect("routes");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_on_cores(listener, proxy, async {
            let _ = stopped.await;
        }));
        Self { addr, stop: Some(stop), task: Some(task) }
    }

    async fn to(mock: &MockUpstream) -> Self {
        let route = Route::new("/", mock.url().parse().expect("url"), Policy::default().with_route("default"));
        Self::start(vec![route], Arc::new(MemoryStore::new()), Timeouts::default()).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("shutdown in time")
                .expect("serve task")
                .expect("serve");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn post(url: &str, key: Option<&str>, body: &str, extra: &[(&str, &str)]) -> Answer {
    let mut b = Request::post(url).header("content-type", "application/json").header("authorization", "Bearer sk-test");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    for (n, v) in extra {
        b = b.header(*n, *v);
    }
    let res = client().request(b.body(Full::new(Bytes::from(body.to_owned()))).expect("request")).await.expect("send");
    let (parts, body) = res.into_parts();
    Answer { status: parts.status, headers: parts.headers, body: body.collect().await.expect("body").to_bytes() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_call_runs_once_and_its_duplicate_is_replayed_byte_for_byte() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::to(&mock).await;
    let url = gw.url("/v1/chat/completions");
    let first = post(&url, Some("order-1"), CHAT, &[]).await;
    let second = post(&url, Some("order-1"), CHAT, &[]).await;
    assert_eq!(mock.calls(), 1);
    assert_eq!(first.status, 200);
    assert_eq!(first.body, second.body);
    assert_eq!(first.headers["idempotent-replayed"], "false");
    assert_eq!(second.headers["idempotent-replayed"], "true");
    assert_eq!(second.headers["content-type"], first.headers["content-type"]);
    assert_eq!(second.headers["x-request-id"], first.headers["x-request-id"]);
    assert_eq!(second.headers["content-length"], first.body.len().to_string());
    // Per-execution headers reach the first caller only.
    assert!(first.headers.contains_key("x-ratelimit-remaining-requests"));
    assert!(!second.headers.contains_key("x-ratelimit-remaining-requests"));
    assert!(!second.headers.contains_key("set-cookie"));
    // The upstream saw its own host, the credential, and the key (forwarded by default).
    let seen = &mock.requests()[0];
    assert_eq!(seen.header("host"), Some(mock.addr().to_string().as_str()));
    assert_eq!(seen.header("authorization"), Some("Bearer sk-test"));
    assert_eq!(seen.header("idempotency-key"), Some("order-1"));
    assert_eq!(seen.body, Bytes::from_static(CHAT.as_bytes()));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_key_pass_through_every_time() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::to(&mock).await;
    let a = post(&gw.url("/v1/messages"), None, CHAT, &[]).await;
    let b = post(&gw.url("/v1/messages"), None, CHAT, &[]).await;
    assert_eq!(mock.calls(), 2);
    assert_ne!(a.body, b.body);
    assert!(!a.headers.contains_key("idempotent-replayed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_upstream_by_prefix_strip_it_and_refuse_other_paths() {
    let openai = MockUpstream::start().await;
    let anthropic = MockUpstream::start().await;
    let routes = vec![
        Route::new("/openai", openai.url().parse().expect("url"), Policy::default().with_route("openai"))
            .with_strip_prefix(true),
        Route::new("/anthropic", anthropic.url().parse().expect("url"), Policy::default().with_route("anthropic"))
            .with_strip_prefix(true),
    ];
    let gw = Gateway::start(routes, Arc::new(MemoryStore::new()), Timeouts::default()).await;
    assert_eq!(post(&gw.url("/openai/v1/chat/completions"), Some("k"), CHAT, &[]).await.status, 200);
    assert_eq!(post(&gw.url("/anthropic/v1/messages?beta=true"), Some("k"), CHAT, &[]).await.status, 200);
    assert_eq!(openai.requests()[0].path, "/v1/chat/completions");
    assert_eq!(anthropic.requests()[0].path, "/v1/messages");
    assert_eq!(anthropic.requests()[0].query.as_deref(), Some("beta=true"));
    // The same key on two routes is two records.
    assert_eq!(openai.calls() + anthropic.calls(), 2);

    let lost = post(&gw.url("/elsewhere/v1/chat/completions"), Some("k"), CHAT, &[]).await;
    assert_eq!(lost.status, 404);
    assert_eq!(lost.headers["content-type"], "application/problem+json");
    assert_eq!(openai.calls() + anthropic.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_502_and_the_key_is_released() {
    // A port with nothing behind it: bind, note the address, close.
    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let route = Route::new("/", format!("http://{dead}").parse().expect("url"), Policy::default());
    let gw = Gateway::start(vec![route], store.clone(), Timeouts::default()).await;
    let a = post(&gw.url("/v1/chat/completions"), Some("k"), CHAT, &[]).await;
    assert_eq!(a.status, 502);
    assert_eq!(a.headers["x-should-retry"], "true");
    gw.stop().await;

    // The same store behind a live upstream: the retry executes (nothing was stored).
    let mock = MockUpstream::start().await;
    let route = Route::new("/", mock.url().parse().expect("url"), Policy::default());
    let gw = Gateway::start(vec![route], store, Timeouts::default()).await;
    let b = post(&gw.url("/v1/chat/completions"), Some("k"), CHAT, &[]).await;
    assert_eq!(b.status, 200);
    assert_eq!(b.headers["idempotent-replayed"], "false");
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_hangs_is_504_and_a_silent_body_fails_instead_of_being_stored() {
    let mock = MockUpstream::start().await;
    let timeouts =
        Timeouts { response: Duration::from_millis(200), idle: Duration::from_millis(200), ..Timeouts::default() };
    let route = Route::new("/", mock.url().parse().expect("url"), Policy::default());
    let gw = Gateway::start(vec![route], Arc::new(MemoryStore::new()), timeouts).await;
    let url = gw.url("/v1/chat/completions");
    let hung = post(&url, Some("slow"), CHAT, &[(mock::DELAY_MS.as_str(), "2000")]).await;
    assert_eq!(hung.status, 504);

    // Head arrives, then the JSON body stalls past the idle timeout. The gateway reads
    // a JSON body whole before it answers, so the client gets a 502 that says so, and
    // the key is released rather than stored half-way.
    let stalled = post(&url, Some("stall"), CHAT, &[(mock::BODY_DELAY_MS.as_str(), "2000")]).await;
    assert_eq!(stalled.status, 502);
    assert_eq!(stalled.headers["x-should-retry"], "true");
    assert!(String::from_utf8_lossy(&stalled.body).contains("upstream-body-failed"));
    let retry = post(&url, Some("stall"), CHAT, &[]).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.headers["idempotent-replayed"], "false");
}

const STREAM: &str =
    r#"{"model":"claude-sonnet-4-5","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"Write it"}]}"#;

/// Headers that make the mock stream `chunks` text deltas, `delay_ms` apart.
fn slow_stream(chunks: &'static str, delay_ms: &'static str) -> [(&'static str, &'static str); 2] {
    // The literal names of `mock::CHUNKS` and `mock::CHUNK_DELAY_MS` (consts give no `&'static str`).
    [("x-mock-chunks", chunks), ("x-mock-chunk-delay-ms", delay_ms)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_forwarded_once_and_replayed_byte_for_byte() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::to(&mock).await;
    let url = gw.url("/v1/messages");
    let first = post(&url, Some("s"), STREAM, &slow_stream("5", "5")).await;
    assert_eq!(first.status, 200);
    assert!(first.headers["content-type"].to_str().expect("text").starts_with("text/event-stream"));
    assert!(first.body.ends_with(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    let again = post(&url, Some("s"), STREAM, &[]).await;
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.headers["content-type"], first.headers["content-type"]);
    assert_eq!(again.body, first.body);
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_started_mid_stream_gets_the_whole_stream() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::to(&mock).await;
    let url = gw.url("/v1/messages");
    let original = tokio::spawn({
        let url = url.clone();
        async move { post(&url, Some("mid"), STREAM, &slow_stream("8", "40")).await }
    });
    // Let a few events through first.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let joined = post(&url, Some("mid"), STREAM, &slow_stream("8", "40")).await;
    let original = original.await.expect("original");
    assert_eq!(joined.headers["idempotent-replayed"], "true");
    assert_eq!(original.headers["idempotent-replayed"], "false");
    // The in-process flight hands the joiner the head's allow-listed headers.
    for name in ["content-type", "request-id", "anthropic-organization-id"] {
        assert_eq!(joined.headers.get(name), original.headers.get(name), "{name}");
        assert!(original.headers.contains_key(name), "{name}");
    }
    assert_eq!(joined.body, original.body);
    assert!(joined.body.ends_with(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_duplicates_of_a_running_stream_make_one_call() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::to(&mock).await;
    let url = gw.url("/v1/chat/completions");
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let all = futures_util::future::join_all((0..50).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { post(&url, Some("fan-out"), body, &slow_stream("10", "20")).await })
    }))
    .await;
    let all: Vec<Answer> = all.into_iter().map(|a| a.expect("task")).collect();
    assert_eq!(mock.calls(), 1);
    assert!(all.iter().all(|a| a.status == 200 && a.body == all[0].body));
    assert!(all[0].body.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(all.iter().filter(|a| a.headers["idempotent-replayed"] == "false").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_before_its_terminator_is_not_stored() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::to(&mock).await;
    let url = gw.url("/v1/responses");
    let body = r#"{"model":"gpt-4o-mini","stream":true,"input":"hi"}"#;
    let req = Request::post(&url)
        .header("idempotency-key", "cut")
        .header(mock::CUT_AFTER.as_str(), "3")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request");
    let res = client().request(req).await.expect("head");
    assert_eq!(res.status(), 200);
    assert!(res.into_body().collect().await.is_err(), "the client sees the break");
    // The retry executes again, completes, and only that is replayed.
    let retry = post(&url, Some("cut"), body, &[]).await;
    assert_eq!(retry.headers["idempotent-replayed"], "false");
    assert!(String::from_utf8_lossy(&retry.body).contains("event: response.completed"));
    let replay = post(&url, Some("cut"), body, &[]).await;
    assert_eq!(replay.body, retry.body);
    assert_eq!(mock.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_stream_gets_the_whole_stream_on_retry() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::to(&mock).await;
    let mut conn = TcpStream::connect(gw.addr).await.expect("connect");
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         authorization: Bearer sk-test\r\nidempotency-key: gone\r\n{}: 6\r\n{}: 40\r\n\
         content-length: {}\r\n\r\n{STREAM}",
        mock::CHUNKS.as_str(),
        mock::CHUNK_DELAY_MS.as_str(),
        STREAM.len()
    );
    conn.write_all(head.as_bytes()).await.expect("write");
    // Read the head and the first events, then hang up mid-stream.
    let mut buf = vec![0u8; 512];
    let n = conn.read(&mut buf).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(conn);
    // Wait until the upstream has finished the stream the client abandoned.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let retry = post(&gw.url("/v1/messages"), Some("gone"), STREAM, &[]).await;
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert!(retry.body.ends_with(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    assert_eq!(mock.calls(), 1);
}

/// Sends a keyed call that the mock answers after 300 ms over a raw connection, and
/// hangs up 50 ms later, before the answer.
async fn hang_up_mid_call(gw: &Gateway, key: &str) {
    let mut conn = TcpStream::connect(gw.addr).await.expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer sk-test\r\n\
         idempotency-key: {key}\r\n{}: 300\r\ncontent-length: {}\r\n\r\n{CHAT}",
        mock::DELAY_MS.as_str(),
        CHAT.len()
    );
    conn.write_all(head.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_call_gets_the_result_on_retry_without_a_second_call() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::to(&mock).await;
    hang_up_mid_call(&gw, "hangup").await;
    // The retry arrives while the upstream still works: it waits, then gets the one result.
    let retry = post(&gw.url("/v1/chat/completions"), Some("hangup"), CHAT, &[(mock::DELAY_MS.as_str(), "300")]).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(mock.calls(), 1);
    let later = post(&gw.url("/v1/chat/completions"), Some("hangup"), CHAT, &[(mock::DELAY_MS.as_str(), "300")]).await;
    assert_eq!(later.body, retry.body);
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_waits_for_a_call_whose_client_hung_up_and_records_it() {
    let mock = MockUpstream::start().await;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let route = || Route::new("/", mock.url().parse().expect("url"), Policy::default().with_route("default"));
    let gw = Gateway::start(vec![route()], store.clone(), Timeouts::default()).await;
    hang_up_mid_call(&gw, "outlives").await;
    // The call runs on a connection thread; stopping waits for it before ending them.
    gw.stop().await;
    let gw = Gateway::start(vec![route()], store, Timeouts::default()).await;
    let retry = post(&gw.url("/v1/chat/completions"), Some("outlives"), CHAT, &[]).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.headers["idempotent-replayed"], "true", "recorded before the gateway stopped");
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::to(&mock).await;
    let mut conn = TcpStream::connect(gw.addr).await.expect("connect");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: keep-alive, x-secret-hop\r\n\
         x-secret-hop: 1\r\nkeep-alive: timeout=5\r\nte: trailers\r\ncontent-length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    );
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let seen = &mock.requests()[0];
    for h in ["x-secret-hop", "keep-alive", "te"] {
        assert!(seen.header(h).is_none(), "{h} was forwarded");
    }
}
