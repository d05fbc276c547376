//! A fake OpenAI and Anthropic upstream on a real TCP listener, for tests that need
//! to count how many times the gateway really called the provider.
//!
//! [`MockUpstream`] serves HTTP/1.1 with keep-alive on `127.0.0.1:0`:
//!
//! | endpoint | API |
//! |---|---|
//! | `POST /v1/chat/completions` | OpenAI Chat Completions |
//! | `POST /v1/responses` | OpenAI Responses |
//! | `POST /v1/messages` | Anthropic Messages |
//!
//! Each execution answers with fresh ids (`chatcmpl-…`, `resp_…` and `msg_…`, `msg_01…`),
//! the current `created` time, the request's `model`, and a text that names the call
//! number, so two executions never produce the same bytes while a replay does. With
//! `"stream": true` the answer is `text/event-stream` in the provider's exact framing,
//! one SSE event per body chunk.
//!
//! Headers are the providers': `content-type`, a request id (`x-request-id` for
//! OpenAI, `request-id` for Anthropic), `openai-processing-ms`, and some that change on
//! every execution and that a gateway must not replay: the remaining rate limit
//! (`x-ratelimit-remaining-requests`, `anthropic-ratelimit-requests-remaining`), a
//! `set-cookie`, and `x-mock-call`, the call number.
//!
//! # Usage
//!
//! Token counts follow from the request, so tests can predict them ([`MockUsage`]):
//! `input = 8 + ceil(prompt_chars / 4)`, of which `input / 4` are cached reads and
//! `input / 8` (Anthropic) cache writes; `output = 3 × chunks`, of which `chunks` are
//! reasoning tokens (OpenAI). The chat stream carries usage only when the request sets
//! `stream_options.include_usage`.
//!
//! # Controls
//!
//! Request headers steer one call; the gateway forwards them untouched:
//!
//! | header | effect |
//! |---|---|
//! | [`DELAY_MS`] | sleep before the response head |
//! | [`STATUS`] | answer that status with a provider-shaped error body |
//! | [`SCENARIO`] + [`FAIL`] | the first N calls of the scenario answer `503` with `retry-after-ms: 10` and `x-should-retry: true` |
//! | [`CHUNKS`] | number of text deltas (default 4) |
//! | [`CHUNK_DELAY_MS`] | pause between two SSE events |
//! | [`CUT_AFTER`] | send N chunks (SSE events, or bytes of a JSON body), then abort the connection |
//! | [`BODY_DELAY_MS`] | send the head, wait, then the body |
//!
//! # Accounting
//!
//! Every request outside `/_mock/` is a call: it is counted (total, by path, by
//! scenario) and recorded (the last [`MockConfig::with_max_recorded`] requests). Other
//! processes read the same figures over HTTP: `GET /_mock/stats`, `GET /_mock/requests`
//! and `POST /_mock/reset`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mock = idemgate_testkit::mock::MockUpstream::start().await;
//! assert!(mock.url().starts_with("http://127.0.0.1:"));
//! assert_eq!(mock.calls(), 0);
//! # }
//! ```

mod body;
mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue, SET_COOKIE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use self::body::MockBody;
use self::wire::{Api, Reply};

/// Sleep this many milliseconds before sending the response head.
pub const DELAY_MS: HeaderName = HeaderName::from_static("x-mock-delay-ms");
/// Answer this status with a provider-shaped JSON error body.
pub const STATUS: HeaderName = HeaderName::from_static("x-mock-status");
/// The scenario a call belongs to; calls are counted per scenario.
pub const SCENARIO: HeaderName = HeaderName::from_static("x-mock-scenario");
/// The first N calls of the [`SCENARIO`] answer `503` with retry hints.
pub const FAIL: HeaderName = HeaderName::from_static("x-mock-fail");
/// Pause this many milliseconds between two SSE events.
pub const CHUNK_DELAY_MS: HeaderName = HeaderName::from_static("x-mock-chunk-delay-ms");
/// The number of text deltas in a stream, and of pieces of the text.
pub const CHUNKS: HeaderName = HeaderName::from_static("x-mock-chunks");
/// Send this many chunks (SSE events, or bytes of a JSON body), then abort the connection.
pub const CUT_AFTER: HeaderName = HeaderName::from_static("x-mock-cut-after");
/// Send the response head, wait this many milliseconds, then send the body.
pub const BODY_DELAY_MS: HeaderName = HeaderName::from_static("x-mock-body-delay-ms");

/// How many requests the mock remembers by default.
pub const DEFAULT_MAX_RECORDED: usize = 1000;
/// The number of text deltas when a request does not say.
pub const DEFAULT_CHUNKS: usize = 4;

/// The requests per minute the fake rate-limit headers count down from.
const RATE_LIMIT_REQUESTS: u64 = 10_000;

/// How a [`MockUpstream`] listens and answers by default.
#[derive(Debug, Clone)]
pub struct MockConfig {
    listen: SocketAddr,
    chunks: usize,
    chunk_delay: Duration,
    max_recorded: usize,
}

impl MockConfig {
    /// Listens on `127.0.0.1:0`, four text deltas, no pause between events, the last
    /// [`DEFAULT_MAX_RECORDED`] requests kept.
    pub const fn new() -> Self {
        Self {
            listen: SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0)),
            chunks: DEFAULT_CHUNKS,
            chunk_delay: Duration::ZERO,
            max_recorded: DEFAULT_MAX_RECORDED,
        }
    }

    /// Listens on `addr` instead.
    pub const fn with_listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Sends `chunks` text deltas when a request does not set [`CHUNKS`] (at least one).
    pub const fn with_chunks(mut self, chunks: usize) -> Self {
        self.chunks = if chunks == 0 { 1 } else { chunks };
        self
    }

    /// Pauses `delay` between SSE events when a request does not set [`CHUNK_DELAY_MS`].
    pub const fn with_chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// Keeps the last `max` requests.
    pub const fn with_max_recorded(mut self, max: usize) -> Self {
        self.max_recorded = max;
        self
    }
}

impl Default for MockConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// The token counts the mock reports for a request, derived from it alone.
///
/// OpenAI bodies report `input_tokens` as `prompt_tokens`/`input_tokens` with
/// `cached_input_tokens` inside it, and `output_tokens` with `reasoning_tokens` inside
/// it. Anthropic bodies report `input_tokens` net of both cache figures, as the
/// Messages API does: `input_tokens - cached_input_tokens - cache_creation_input_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MockUsage {
    /// All prompt tokens: `8 + ceil(prompt_chars / 4)`.
    pub input_tokens: u64,
    /// Prompt tokens read from the cache: `input_tokens / 4`.
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the cache (Anthropic only): `input_tokens / 8`.
    pub cache_creation_input_tokens: u64,
    /// All output tokens: `3 × chunks`.
    pub output_tokens: u64,
    /// Reasoning tokens within the output (OpenAI only): `chunks`.
    pub reasoning_tokens: u64,
}

impl MockUsage {
    /// The usage reported for a request `body` answered with `chunks` text deltas.
    ///
    /// The prompt is every string under `messages`, `system`, `instructions` and
    /// `input`, following the `content` and `text` fields of objects, counted in
    /// characters.
    pub fn for_request(body: &Value, chunks: usize) -> Self {
        let input_tokens = 8 + wire::prompt_chars(body).div_ceil(4);
        let chunks = chunks as u64;
        Self {
            input_tokens,
            cached_input_tokens: input_tokens / 4,
            cache_creation_input_tokens: input_tokens / 8,
            output_tokens: 3 * chunks,
            reasoning_tokens: chunks,
        }
    }
}

/// The mock's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockStats {
    /// Every request outside `/_mock/`.
    pub calls: u64,
    /// Calls by request path (without the query).
    pub by_path: BTreeMap<String, u64>,
    /// Calls by [`SCENARIO`] header.
    pub by_scenario: BTreeMap<String, u64>,
}

impl MockStats {
    /// The counters as `GET /_mock/stats` serves them.
    pub fn to_json(&self) -> Value {
        json!({ "calls": self.calls, "by_path": self.by_path, "by_scenario": self.by_scenario })
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The call number, from 1, counted since the start or the last reset.
    pub call: u64,
    /// The method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query, without the `?`.
    pub query: Option<String>,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl RecordedRequest {
    /// The value of header `name`, if there is exactly one and it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return None;
        }
        first.to_str().ok()
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The request as `GET /_mock/requests` serves it: headers as a map (repeated
    /// fields joined with `, `), the body as text (invalid UTF-8 replaced).
    pub fn to_json(&self) -> Value {
        let mut headers = serde_json::Map::new();
        for name in self.headers.keys() {
            let joined = self
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", ");
            headers.insert(name.as_str().to_owned(), Value::String(joined));
        }
        json!({
            "call": self.call,
            "method": self.method.as_str(),
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body": String::from_utf8_lossy(&self.body),
        })
    }
}

/// A running mock upstream. Dropping it stops the server and closes its connections.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl MockUpstream {
    /// Starts a mock on `127.0.0.1:0` with the default [`MockConfig`].
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound, which leaves a test nothing to do.
    pub async fn start() -> Self {
        match Self::start_with(MockConfig::new()).await {
            Ok(mock) => mock,
            Err(err) => panic!("mock upstream: cannot listen on 127.0.0.1:0: {err}"),
        }
    }

    /// Starts a mock with `config`. It accepts connections when this returns.
    ///
    /// # Errors
    ///
    /// If the listener cannot be bound.
    pub async fn start_with(config: MockConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State { config, inner: Mutex::default() });
        let task = tokio::spawn(serve(listener, Arc::clone(&state)));
        Ok(Self { addr, state, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:PORT`, with no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls so far.
    pub fn calls(&self) -> u64 {
        self.state.lock().calls
    }

    /// Calls so far to `path` (without the query).
    pub fn calls_for(&self, path: &str) -> u64 {
        self.state.lock().by_path.get(path).copied().unwrap_or(0)
    }

    /// Calls so far that named scenario `id`.
    pub fn calls_for_scenario(&self, id: &str) -> u64 {
        self.state.lock().by_scenario.get(id).copied().unwrap_or(0)
    }

    /// All counters at once.
    pub fn stats(&self) -> MockStats {
        self.state.lock().stats()
    }

    /// The recorded requests, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().requests.iter().cloned().collect()
    }

    /// Forgets every count and recorded request; call numbers start again at 1.
    pub fn reset(&self) {
        *self.state.lock() = Inner::default();
    }

    /// Stops the server and waits until its task and connections are gone.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct State {
    config: MockConfig,
    inner: Mutex<Inner>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while counting leaves the counters usable; keep going.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts and records one call; returns its number and, with a scenario, the
    /// scenario's count including it.
    fn record(&self, parts: &http::request::Parts, body: &Bytes, scenario: Option<&str>) -> (u64, Option<u64>) {
        let mut inner = self.lock();
        inner.calls += 1;
        let call = inner.calls;
        *inner.by_path.entry(parts.uri.path().to_owned()).or_default() += 1;
        let scenario_calls = scenario.map(|id| {
            let count = inner.by_scenario.entry(id.to_owned()).or_default();
            *count += 1;
            *count
        });
        if self.config.max_recorded > 0 {
            while inner.requests.len() >= self.config.max_recorded {
                inner.requests.pop_front();
            }
            inner.requests.push_back(RecordedRequest {
                call,
                method: parts.method.clone(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().map(str::to_owned),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
        }
        (call, scenario_calls)
    }
}

#[derive(Debug, Default)]
struct Inner {
    calls: u64,
    by_path: BTreeMap<String, u64>,
    by_scenario: BTreeMap<String, u64>,
    requests: VecDeque<RecordedRequest>,
}

impl Inner {
    fn stats(&self) -> MockStats {
        MockStats { calls: self.calls, by_path: self.by_path.clone(), by_scenario: self.by_scenario.clone() }
    }
}

/// Accepts connections until aborted; the connections live in a `JoinSet`, so
/// aborting this task closes them too.
async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors or a reset before accept: back off a little.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&state), req));
                    // An aborted response (x-mock-cut-after) ends the connection with an
                    // error; that is the point, so it is not reported.
                    let _ = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// What one call was told to do by its headers.
#[derive(Debug)]
struct Controls {
    delay: Duration,
    status: Option<StatusCode>,
    fail: u64,
    chunks: usize,
    chunk_delay: Duration,
    cut_after: Option<usize>,
    body_delay: Duration,
}

impl Controls {
    fn parse(headers: &HeaderMap, config: &MockConfig) -> Result<Self, String> {
        fn number(headers: &HeaderMap, name: &HeaderName) -> Result<Option<u64>, String> {
            let Some(value) = headers.get(name) else { return Ok(None) };
            let parsed = value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok());
            parsed.map(Some).ok_or_else(|| format!("mock upstream: header {name} must be a non-negative integer"))
        }
        let ms = |name: &HeaderName| number(headers, name).map(|n| Duration::from_millis(n.unwrap_or(0)));
        let status = match number(headers, &STATUS)? {
            None => None,
            Some(code) => Some(
                u16::try_from(code)
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| format!("mock upstream: {code} is not an HTTP status"))?,
            ),
        };
        let chunks = number(headers, &CHUNKS)?.map_or(config.chunks, |n| usize::try_from(n.max(1)).unwrap_or(1));
        Ok(Self {
            delay: ms(&DELAY_MS)?,
            status,
            fail: number(headers, &FAIL)?.unwrap_or(0),
            chunks,
            chunk_delay: match number(headers, &CHUNK_DELAY_MS)? {
                Some(n) => Duration::from_millis(n),
                None => config.chunk_delay,
            },
            cut_after: number(headers, &CUT_AFTER)?.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            body_delay: ms(&BODY_DELAY_MS)?,
        })
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<MockBody>, Infallible> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    if let Some(endpoint) = parts.uri.path().strip_prefix("/_mock/") {
        return Ok(admin(&state, &parts.method, endpoint));
    }
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(plain(StatusCode::BAD_REQUEST, "mock upstream: could not read the request body")),
    };
    let scenario = parts.headers.get(&SCENARIO).and_then(|v| v.to_str().ok());
    let (call, scenario_calls) = state.record(&parts, &body, scenario);
    let api = Api::from_path(parts.uri.path());
    let exec = Execution { api, call, started, nonce: new_nonce() };
    let controls = match Controls::parse(&parts.headers, &state.config) {
        Ok(controls) => controls,
        Err(message) => return Ok(exec.error(StatusCode::BAD_REQUEST, &message)),
    };
    if !controls.delay.is_zero() {
        tokio::time::sleep(controls.delay).await;
    }
    if scenario_calls.is_some_and(|n| n <= controls.fail) {
        let mut res = exec.error(StatusCode::SERVICE_UNAVAILABLE, "The server is overloaded. Please retry.");
        res.headers_mut().insert("x-should-retry", HeaderValue::from_static("true"));
        return Ok(res);
    }
    if let Some(status) = controls.status {
        return Ok(exec.error(status, &format!("Mock error with status {}.", status.as_u16())));
    }
    let Some(api) = api else {
        let message = format!("Unknown request URL: {} {}.", parts.method, parts.uri.path());
        return Ok(exec.error(StatusCode::NOT_FOUND, &message));
    };
    if parts.method != Method::POST {
        return Ok(exec.error(StatusCode::METHOD_NOT_ALLOWED, "Only POST is supported on this endpoint."));
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return Ok(exec.error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP \
             library correctly.)",
        ));
    };
    let model = request.get("model").and_then(Value::as_str).unwrap_or("mock-model");
    let stream = request.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = request.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let nonce = new_nonce();
    let reply = Reply {
        call,
        nonce: &nonce,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model,
        chunks: controls.chunks,
        usage: MockUsage::for_request(&request, controls.chunks),
        include_usage,
    };
    let body = reply_body(api, &reply, stream, &controls);
    let content_type = if stream { "text/event-stream; charset=utf-8" } else { "application/json" };
    let mut res = exec.response(StatusCode::OK, content_type, body);
    if stream {
        res.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    Ok(res)
}

/// The body of a successful answer, streamed or not, cut short if asked.
fn reply_body(api: Api, reply: &Reply<'_>, stream: bool, controls: &Controls) -> MockBody {
    if stream {
        let mut events = reply.events(api);
        // Never the whole stream: a cut stream always lacks its terminator.
        let cut = controls.cut_after.map(|n| n.min(events.len().saturating_sub(1)));
        if let Some(n) = cut {
            events.truncate(n);
        }
        let body = MockBody::new(events, None).with_first_delay(controls.body_delay).with_gap(controls.chunk_delay);
        return if cut.is_some() { body.with_abort() } else { body };
    }
    let json = reply.json(api);
    let length = Some(json.len() as u64);
    match controls.cut_after {
        Some(n) => MockBody::new(vec![json.slice(..n.min(json.len().saturating_sub(1)))], length)
            .with_first_delay(controls.body_delay)
            .with_abort(),
        None => MockBody::new(vec![json], length).with_first_delay(controls.body_delay),
    }
}

/// One call being answered: what every response to it carries.
struct Execution {
    api: Option<Api>,
    call: u64,
    started: Instant,
    /// Random hex digits, from which the request id and the cookie are cut.
    nonce: String,
}

impl Execution {
    /// A response with the provider's headers, including the ones that differ on every
    /// execution and must never be replayed (rate limits, a cookie).
    fn response(&self, status: StatusCode, content_type: &'static str, body: MockBody) -> Response<MockBody> {
        let mut res = Response::new(body);
        *res.status_mut() = status;
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        let remaining = RATE_LIMIT_REQUESTS.saturating_sub(self.call);
        let request_id = self.request_id();
        let mut put = |name: &'static str, value: String| {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.append(name, value);
            }
        };
        if self.api.is_some_and(Api::is_anthropic) {
            put("request-id", request_id);
            put("anthropic-organization-id", "00000000-0000-4000-8000-00000000a11c".to_owned());
            put("anthropic-ratelimit-requests-limit", RATE_LIMIT_REQUESTS.to_string());
            put("anthropic-ratelimit-requests-remaining", remaining.to_string());
        } else {
            put("x-request-id", request_id);
            put("openai-organization", "mock-org".to_owned());
            put("openai-processing-ms", self.started.elapsed().as_millis().to_string());
            put("openai-version", "2020-10-01".to_owned());
            put("x-ratelimit-limit-requests", RATE_LIMIT_REQUESTS.to_string());
            put("x-ratelimit-remaining-requests", remaining.to_string());
        }
        put("x-mock-call", self.call.to_string());
        put(
            SET_COOKIE.as_str(),
            format!("__cf_bm=mock{}; path=/; HttpOnly; Secure; SameSite=None", &self.nonce[32..56]),
        );
        res
    }

    /// The provider's request id for this execution.
    fn request_id(&self) -> String {
        if self.api.is_some_and(Api::is_anthropic) {
            format!("req_011C{}", &self.nonce[..24])
        } else {
            format!("req_{}", &self.nonce[..32])
        }
    }

    /// An error shaped like the provider's, with retry hints on statuses clients retry.
    fn error(&self, status: StatusCode, message: &str) -> Response<MockBody> {
        let body = wire::error_body(self.api, status.as_u16(), message, &self.request_id());
        let mut res = self.response(status, "application/json", MockBody::full(body));
        if matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error() {
            res.headers_mut().insert("retry-after-ms", HeaderValue::from_static("10"));
        }
        res
    }
}

/// Serves `/_mock/{endpoint}`.
fn admin(state: &State, method: &Method, endpoint: &str) -> Response<MockBody> {
    match (method, endpoint) {
        (&Method::GET, "stats") => json_response(&state.lock().stats().to_json()),
        (&Method::GET, "requests") => {
            let requests: Vec<Value> = state.lock().requests.iter().map(RecordedRequest::to_json).collect();
            json_response(&Value::Array(requests))
        }
        (&Method::POST, "reset") => {
            *state.lock() = Inner::default();
            json_response(&json!({ "ok": true }))
        }
        _ => plain(StatusCode::NOT_FOUND, "mock upstream: unknown /_mock/ endpoint"),
    }
}

fn json_response(value: &Value) -> Response<MockBody> {
    let mut res = Response::new(MockBody::full(value.to_string()));
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn plain(status: StatusCode, message: &'static str) -> Response<MockBody> {
    let mut res = Response::new(MockBody::full(Bytes::from_static(message.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

/// 64 random hex digits, from which the ids of one execution are cut.
fn new_nonce() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}
