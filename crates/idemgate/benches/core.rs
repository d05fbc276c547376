//! Micro-benchmarks of the per-request work that does not touch a store: parsing the
//! key and fingerprinting the request. `cargo bench -p idemgate`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, Uri};
use idemgate::fingerprint::MEANINGFUL_HEADERS;
use idemgate::{Fingerprint, Key, Scope};

fn key_parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("key");
    g.bench_function("parse_bare_uuid", |b| b.iter(|| Key::parse(black_box(b"0193b7a2-4c1e-7d3f-9a2b-1c2d3e4f5a6b"))));
    g.bench_function("parse_quoted_uuid", |b| {
        b.iter(|| Key::parse(black_box(b"\"0193b7a2-4c1e-7d3f-9a2b-1c2d3e4f5a6b\"")))
    });
    let mut headers = HeaderMap::new();
    headers.insert("authorization", HeaderValue::from_static("Bearer sk-proj-0123456789abcdef0123456789abcdef"));
    let key = Key::parse(b"0193b7a2-4c1e-7d3f-9a2b-1c2d3e4f5a6b").expect("valid key");
    let scope = Scope::default();
    g.bench_function("tenant_and_storage_key", |b| {
        b.iter(|| Scope::storage_key(&scope.tenant(black_box(&headers)), "chat", black_box(&key)))
    });
    // The SQLite and Redis stores spell the storage key in hex on every operation.
    let storage_key = Scope::storage_key(&scope.tenant(&headers), "chat", &key);
    g.bench_function("storage_key_to_hex", |b| b.iter(|| black_box(&storage_key).to_hex()));
    g.finish();
}

/// A chat-completion request body of about `size` bytes: a realistic shape (nested
/// messages), so canonicalisation does real work.
fn chat_body(size: usize) -> Vec<u8> {
    let mut messages = Vec::new();
    let mut len = 0;
    let mut i = 0;
    while len < size {
        let content = format!("message {i}: {}", "lorem ipsum dolor sit amet ".repeat(8));
        len += content.len() + 40;
        messages.push(serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": content}));
        i += 1;
    }
    serde_json::to_vec(&serde_json::json!({"model": "gpt-4o", "temperature": 0.2, "messages": messages}))
        .expect("serialisable")
}

fn fingerprinting(c: &mut Criterion) {
    let mut g = c.benchmark_group("fingerprint");
    let uri: Uri = "/v1/chat/completions".parse().expect("valid uri");
    let mut headers = HeaderMap::new();
    headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    for size in [4 * 1024, 256 * 1024] {
        let body = chat_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("json", size), &body, |b, body| {
            b.iter(|| Fingerprint::compute(&Method::POST, &uri, &headers, &MEANINGFUL_HEADERS, black_box(body)))
        });
        let mut raw = body.clone();
        raw[0] = b'#'; // not JSON: hashed as raw bytes
        g.bench_with_input(BenchmarkId::new("raw", size), &raw, |b, body| {
            b.iter(|| Fingerprint::compute(&Method::POST, &uri, &headers, &MEANINGFUL_HEADERS, black_box(body)))
        });
    }
    g.finish();
}

/// The usage read from every completed JSON response, for tokens saved: a chat
/// completion of the size the benchmarks' mock upstream answers with.
fn usage_reading(c: &mut Criterion) {
    let body = serde_json::json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_764_374_400,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Dear customer, thank you for your order. ".repeat(12), "refusal": null},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 120,
            "total_tokens": 139,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}
        },
        "system_fingerprint": "fp_bench"
    })
    .to_string()
    .into_bytes();
    let mut g = c.benchmark_group("usage");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("chat_completion", |b| b.iter(|| idemgate::usage::from_json_body(black_box(&body))));
    g.finish();
}

criterion_group!(benches, key_parsing, fingerprinting, usage_reading);
criterion_main!(benches);
