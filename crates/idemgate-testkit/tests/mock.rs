//! The mock upstream answers like the providers, obeys its control headers and counts
//! what it served.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idemgate_testkit::mock::{self, MockConfig, MockUpstream, MockUsage};
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response read to its end: status, headers, the body frames as they arrived, and
/// whether the body ended with an error.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    frames: Vec<Bytes>,
    body_error: bool,
    head_after: Duration,
}

impl Reply {
    fn body(&self) -> Vec<u8> {
        self.frames.concat()
    }

    fn text(&self) -> String {
        String::from_utf8(self.body()).expect("utf-8 body")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body()).expect("json body")
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().expect("text header")).unwrap_or_else(|| panic!("no {name} header"))
    }

    /// The SSE events: (event name or "", data).
    fn events(&self) -> Vec<(String, String)> {
        let text = self.text();
        assert!(text.ends_with("\n\n"), "a stream ends on an event boundary: {text:?}");
        text.trim_end_matches('\n')
            .split("\n\n")
            .map(|block| {
                let mut event = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event: ") {
                        event = name.to_owned();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = d.to_owned();
                    } else {
                        panic!("unexpected SSE line {line:?}");
                    }
                }
                (event, data)
            })
            .collect()
    }
}

async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let started = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("response head within 10 s")
        .expect("response head");
    let head_after = started.elapsed();
    let (parts, mut body) = res.into_parts();
    let mut frames = Vec::new();
    let mut body_error = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("body within 10 s") {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    frames.push(data);
                }
            }
            Some(Err(_)) => {
                body_error = true;
                break;
            }
        }
    }
    Reply { status: parts.status, headers: parts.headers, frames, body_error, head_after }
}

async fn post(mock: &MockUpstream, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    post_raw(mock, path, body.to_string().into(), headers).await
}

async fn post_raw(mock: &MockUpstream, path: &str, body: Bytes, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::post(format!("{}{path}", mock.url())).header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(&client(), req.body(Full::new(body)).expect("request")).await
}

async fn get(mock: &MockUpstream, path: &str) -> Reply {
    let req = Request::get(format!("{}{path}", mock.url())).body(Full::new(Bytes::new())).expect("request");
    send(&client(), req).await
}

fn chat(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello to the test suite."}]}
        ],
        "stream": stream,
    })
}

fn responses(stream: bool) -> Value {
    json!({"model": "gpt-4.1", "instructions": "Be brief.", "input": "Hello there", "stream": stream})
}

fn messages(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hello, Claude"}],
        "stream": stream,
    })
}

#[tokio::test]
async fn chat_completion_echoes_the_model_and_reports_predictable_usage() {
    let mock = MockUpstream::start().await;
    let request = chat(false);
    let reply = post(&mock, "/v1/chat/completions", &request, &[]).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "application/json");
    assert!(reply.header("x-request-id").starts_with("req_"));
    reply.header("openai-processing-ms").parse::<u64>().expect("a number of milliseconds");
    assert_eq!(reply.header("x-ratelimit-remaining-requests"), "9999");
    assert!(reply.header("set-cookie").starts_with("__cf_bm="));
    let body = reply.json();
    assert!(body["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert!(body["created"].as_u64().expect("created") > 1_600_000_000);
    let content = body["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(content.contains("call 1"), "{content}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    // 14 + 28 characters of prompt: 8 + ceil(42 / 4) = 19 tokens.
    let usage = MockUsage::for_request(&request, mock::DEFAULT_CHUNKS);
    assert_eq!(usage.input_tokens, 19);
    assert_eq!(
        body["usage"],
        json!({
            "prompt_tokens": 19,
            "completion_tokens": 12,
            "total_tokens": 31,
            "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 4, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
            }
        })
    );
}

#[tokio::test]
async fn responses_and_messages_answer_in_their_own_shape() {
    let mock = MockUpstream::start().await;

    let request = responses(false);
    let reply = post(&mock, "/v1/responses", &request, &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert!(body["id"].as_str().expect("id").starts_with("resp_"));
    assert_eq!(body["status"], "completed");
    assert_eq!(body["model"], "gpt-4.1");
    let item = &body["output"][0];
    assert!(item["id"].as_str().expect("item id").starts_with("msg_"));
    assert!(item["content"][0]["text"].as_str().expect("text").contains("call 1"));
    let usage = MockUsage::for_request(&request, 4);
    assert_eq!(
        body["usage"],
        json!({
            "input_tokens": usage.input_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_input_tokens},
            "output_tokens": 12,
            "output_tokens_details": {"reasoning_tokens": 4},
            "total_tokens": usage.input_tokens + 12
        })
    );

    let request = messages(false);
    let reply = post(&mock, "/v1/messages", &request, &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header("request-id").starts_with("req_"));
    assert!(reply.headers.get("x-request-id").is_none());
    reply.header("anthropic-ratelimit-requests-remaining");
    let body = reply.json();
    assert!(body["id"].as_str().expect("id").starts_with("msg_01"));
    assert_eq!(body["type"], "message");
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert!(body["content"][0]["text"].as_str().expect("text").contains("call 2"));
    assert_eq!(body["stop_reason"], "end_turn");
    let usage = MockUsage::for_request(&request, 4);
    assert_eq!(usage.input_tokens, 8 + 6); // "Be brief." + "Hello, Claude": 22 characters.
    assert_eq!(body["usage"]["input_tokens"], usage.input_tokens - usage.cached_input_tokens - 1);
    assert_eq!(body["usage"]["cache_read_input_tokens"], usage.cached_input_tokens);
    assert_eq!(body["usage"]["cache_creation_input_tokens"], usage.cache_creation_input_tokens);
    assert_eq!(body["usage"]["output_tokens"], 12);
}

#[tokio::test]
async fn two_executions_never_produce_the_same_bytes() {
    let mock = MockUpstream::start().await;
    for (path, request) in [("/v1/chat/completions", chat(false)), ("/v1/messages", messages(false))] {
        let first = post(&mock, path, &request, &[]).await;
        let second = post(&mock, path, &request, &[]).await;
        assert_ne!(first.body(), second.body());
        assert_ne!(first.json()["id"], second.json()["id"]);
    }
}

#[tokio::test]
async fn chat_stream_ends_with_done_and_carries_usage_only_when_asked() {
    let mock = MockUpstream::start().await;
    let mut request = chat(true);
    let reply = post(&mock, "/v1/chat/completions", &request, &[("x-mock-chunks", "3")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header("content-type").starts_with("text/event-stream"));
    let events = reply.events();
    // role, 3 deltas, finish, [DONE]
    assert_eq!(events.len(), 6, "{events:?}");
    assert!(events.iter().all(|(name, _)| name.is_empty()));
    assert_eq!(events.last().expect("events").1, "[DONE]");
    assert!(!reply.text().contains("\"usage\""));

    request["stream_options"] = json!({"include_usage": true});
    let reply = post(&mock, "/v1/chat/completions", &request, &[("x-mock-chunks", "3")]).await;
    let events = reply.events();
    assert_eq!(events.len(), 7, "{events:?}");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|(_, data)| serde_json::from_str(data).expect("chunk")).collect();
    let id = chunks[0]["id"].as_str().expect("id");
    assert!(chunks.iter().all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Hello from mock call 2. Part 1. Part 2.");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    let usage_chunk = &chunks[5];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 9);
    assert_eq!(events.last().expect("events").1, "[DONE]");
}

#[tokio::test]
async fn responses_stream_ends_with_completed_and_usage() {
    let mock = MockUpstream::start().await;
    let reply = post(&mock, "/v1/responses", &responses(true), &[("x-mock-chunks", "2")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let events = reply.events();
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (seq, (name, data)) in events.iter().enumerate() {
        let data: Value = serde_json::from_str(data).expect("event data");
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], seq);
    }
    let completed: Value = serde_json::from_str(&events[9].1).expect("completed");
    assert_eq!(completed["response"]["status"], "completed");
    assert_eq!(completed["response"]["usage"]["output_tokens"], 6);
    assert_eq!(completed["response"]["usage"]["output_tokens_details"]["reasoning_tokens"], 2);
}

#[tokio::test]
async fn messages_stream_follows_the_anthropic_event_flow() {
    let mock = MockUpstream::start().await;
    let reply = post(&mock, "/v1/messages", &messages(true), &[("x-mock-chunks", "2")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let events = reply.events();
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    for (name, data) in &events {
        let data: Value = serde_json::from_str(data).expect("event data");
        assert_eq!(data["type"], name.as_str());
    }
    let start: Value = serde_json::from_str(&events[0].1).expect("message_start");
    assert!(start["message"]["usage"]["input_tokens"].as_u64().expect("input tokens") > 0);
    let delta: Value = serde_json::from_str(&events[6].1).expect("message_delta");
    assert_eq!(delta["usage"]["output_tokens"], 6);
}

#[tokio::test]
async fn each_event_is_its_own_chunk_with_the_configured_gap() {
    let mock = MockUpstream::start().await;
    let started = Instant::now();
    let reply =
        post(&mock, "/v1/messages", &messages(true), &[("x-mock-chunks", "5"), ("x-mock-chunk-delay-ms", "20")]).await;
    assert_eq!(reply.frames.len(), 11, "one frame per event");
    assert!(reply.frames.iter().all(|f| f.starts_with(b"event: ") && f.ends_with(b"\n\n")));
    assert!(started.elapsed() >= Duration::from_millis(200), "10 gaps of 20 ms");

    let mock = MockUpstream::start_with(MockConfig::new().with_chunks(2).with_chunk_delay(Duration::from_millis(30)))
        .await
        .expect("mock");
    let started = Instant::now();
    let reply = post(&mock, "/v1/chat/completions", &chat(true), &[]).await;
    assert_eq!(reply.frames.len(), 5, "role, 2 deltas, finish, [DONE]");
    assert!(started.elapsed() >= Duration::from_millis(120));
}

#[tokio::test]
async fn fail_n_fails_the_first_n_calls_of_each_scenario() {
    let mock = MockUpstream::start().await;
    let a = [("x-mock-scenario", "a"), ("x-mock-fail", "2")];
    for _ in 0..2 {
        let reply = post(&mock, "/v1/chat/completions", &chat(false), &a).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.header("retry-after-ms"), "10");
        assert_eq!(reply.header("x-should-retry"), "true");
        assert_eq!(reply.json()["error"]["type"], "server_error");
    }
    let b = [("x-mock-scenario", "b"), ("x-mock-fail", "1")];
    let reply = post(&mock, "/v1/messages", &messages(false), &b).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"]["type"], "overloaded_error");

    assert_eq!(post(&mock, "/v1/chat/completions", &chat(false), &a).await.status, StatusCode::OK);
    assert_eq!(post(&mock, "/v1/messages", &messages(false), &b).await.status, StatusCode::OK);
    assert_eq!(mock.calls_for_scenario("a"), 3);
    assert_eq!(mock.calls_for_scenario("b"), 2);
    assert_eq!(mock.calls_for_scenario("c"), 0);
    assert_eq!(mock.calls(), 5);
}

#[tokio::test]
async fn status_answers_a_provider_shaped_error() {
    let mock = MockUpstream::start().await;
    let reply = post(&mock, "/v1/chat/completions", &chat(false), &[("x-mock-status", "429")]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(reply.header("retry-after-ms"), "10");

    let reply = post(&mock, "/v1/messages", &messages(false), &[("x-mock-status", "400")]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let body = reply.json();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["request_id"], reply.header("request-id"));
    assert!(reply.headers.get("retry-after-ms").is_none());

    let reply = post(&mock, "/v1/chat/completions", &chat(false), &[("x-mock-status", "banana")]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.json()["error"]["message"].as_str().expect("message").contains("x-mock-status"));
}

#[tokio::test]
async fn cut_after_ends_the_body_with_an_error() {
    let mock = MockUpstream::start().await;
    for (path, request, terminator) in [
        ("/v1/chat/completions", chat(true), "[DONE]"),
        ("/v1/responses", responses(true), "response.completed"),
        ("/v1/messages", messages(true), "message_stop"),
    ] {
        let reply = post(&mock, path, &request, &[("x-mock-cut-after", "3")]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.body_error, "{path}: the body must end with an error, not a clean end");
        let text = reply.text();
        assert_eq!(text.matches("\n\n").count(), 3, "{path}: three events arrived: {text:?}");
        assert!(!text.contains(terminator));
    }

    // More than the stream holds still withholds the terminator.
    let reply = post(&mock, "/v1/messages", &messages(true), &[("x-mock-cut-after", "1000")]).await;
    assert!(reply.body_error);
    assert!(!reply.text().contains("message_stop"));

    let reply = post(&mock, "/v1/chat/completions", &chat(false), &[("x-mock-cut-after", "10")]).await;
    assert!(reply.body_error);
    assert_eq!(reply.body().len(), 10);
}

#[tokio::test]
async fn delays_hold_the_head_or_the_body() {
    let mock = MockUpstream::start().await;
    let reply = post(&mock, "/v1/chat/completions", &chat(false), &[("x-mock-delay-ms", "150")]).await;
    assert!(reply.head_after >= Duration::from_millis(150));
    assert!(reply.header("openai-processing-ms").parse::<u64>().expect("ms") >= 150);

    let started = Instant::now();
    let reply = post(&mock, "/v1/chat/completions", &chat(false), &[("x-mock-body-delay-ms", "300")]).await;
    assert!(reply.head_after < Duration::from_millis(250), "the head comes first: {:?}", reply.head_after);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(reply.json()["object"], "chat.completion");
}

#[tokio::test]
async fn calls_and_requests_are_counted_and_recorded() {
    let mock = MockUpstream::start().await;
    post(&mock, "/v1/chat/completions", &chat(false), &[("idempotency-key", "k-1")]).await;
    post(&mock, "/v1/messages", &messages(false), &[("x-mock-scenario", "s")]).await;
    let raw = post_raw(&mock, "/v1/messages?beta=true", Bytes::from_static(b"not json"), &[]).await;
    assert_eq!(raw.status, StatusCode::BAD_REQUEST);
    let unknown = post(&mock, "/v2/nothing", &json!({}), &[]).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    assert_eq!(mock.calls(), 4);
    assert_eq!(mock.calls_for("/v1/chat/completions"), 1);
    assert_eq!(mock.calls_for("/v1/messages"), 2);
    assert_eq!(mock.calls_for("/v2/nothing"), 1);
    assert_eq!(mock.calls_for("/v1/responses"), 0);

    let requests = mock.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[0].call, 1);
    assert_eq!(requests[0].header("idempotency-key"), Some("k-1"));
    assert_eq!(requests[0].json(), Some(chat(false)));
    assert_eq!(requests[2].path, "/v1/messages");
    assert_eq!(requests[2].query.as_deref(), Some("beta=true"));
    assert_eq!(requests[2].body, Bytes::from_static(b"not json"));

    let stats = get(&mock, "/_mock/stats").await.json();
    assert_eq!(
        stats,
        json!({
            "calls": 4,
            "by_path": {"/v1/chat/completions": 1, "/v1/messages": 2, "/v2/nothing": 1},
            "by_scenario": {"s": 1}
        })
    );
    assert_eq!(stats, mock.stats().to_json());
    let listed = get(&mock, "/_mock/requests").await.json();
    assert_eq!(listed.as_array().expect("list").len(), 4);
    assert_eq!(listed[0]["headers"]["idempotency-key"], "k-1");
    assert_eq!(listed[0]["method"], "POST");
    assert_eq!(listed[2]["body"], "not json");
    assert_eq!(mock.calls(), 4, "/_mock/ requests are not calls");

    let reset = post_raw(&mock, "/_mock/reset", Bytes::new(), &[]).await;
    assert_eq!(reset.status, StatusCode::OK);
    assert_eq!(mock.calls(), 0);
    assert!(mock.requests().is_empty());
    let reply = post(&mock, "/v1/chat/completions", &chat(false), &[]).await;
    assert!(reply.json()["choices"][0]["message"]["content"].as_str().expect("text").contains("call 1"));
    mock.reset();
    assert_eq!(mock.stats(), Default::default());
}

#[tokio::test]
async fn recording_is_bounded() {
    let mock = MockUpstream::start_with(MockConfig::new().with_max_recorded(2)).await.expect("mock");
    for _ in 0..3 {
        post(&mock, "/v1/chat/completions", &chat(false), &[]).await;
    }
    let calls: Vec<u64> = mock.requests().iter().map(|r| r.call).collect();
    assert_eq!(calls, [2, 3]);
    assert_eq!(mock.calls(), 3);
}

#[tokio::test]
async fn shutdown_closes_the_listener() {
    let mock = MockUpstream::start().await;
    let addr = mock.addr();
    mock.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    let mock = MockUpstream::start().await;
    let addr = mock.addr();
    drop(mock);
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener closes after drop");
}
