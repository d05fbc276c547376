//! Deterministic keys, fingerprints and responses that tests share.

use bytes::Bytes;
use idemgate::http::{HeaderName, HeaderValue};
use idemgate::usage::Usage;
use idemgate::{Fingerprint, StorageKey, StoredResponse, Timestamp};

/// Storage key number `n`: distinct for distinct `n`, the same in every run.
pub fn key(n: u64) -> StorageKey {
    StorageKey::from_bytes(spread(0x6b, n))
}

/// Fingerprint number `n`: distinct for distinct `n`, the same in every run.
pub fn fp(n: u64) -> Fingerprint {
    Fingerprint::from_bytes(spread(0x66, n))
}

fn spread(tag: u8, n: u64) -> [u8; 32] {
    // The number at both ends so that neither a prefix nor a suffix comparison would
    // tell two of them apart by accident.
    let mut out = [tag; 32];
    out[..8].copy_from_slice(&n.to_be_bytes());
    out[24..].copy_from_slice(&n.to_le_bytes());
    out
}

/// A response that exercises every part of the encoding: a non-200 status, repeated
/// and non-UTF-8 header values, an empty chunk between two others, chunk timings,
/// usage and a model, and a completion time of `completed_at`.
pub fn sample_response(completed_at: Timestamp) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![
            (HeaderName::from_static("content-type"), HeaderValue::from_static("application/json")),
            (HeaderName::from_static("x-request-id"), HeaderValue::from_static("req_01")),
            (HeaderName::from_static("x-request-id"), HeaderValue::from_static("req_02")),
            (
                HeaderName::from_static("x-opaque"),
                HeaderValue::from_bytes(b"caf\xe9 \xff").expect("obs-text is a valid header value"),
            ),
        ],
        chunks: vec![
            Bytes::from_static(b"{\"id\":\"chatcmpl-1\","),
            Bytes::new(),
            Bytes::from_static(b"\"choices\":[]}"),
            Bytes::from_static(b"\n"),
        ],
        offsets_ms: vec![0, 3, 17, 250],
        usage: Some(Usage { input: 1200, cached_input: 1024, output: 87, reasoning: 64 }),
        model: Some("gpt-4o-mini-2024-07-18".into()),
        completed_at,
    }
}

/// A response with no headers and no body chunks at all (a `204`).
pub fn empty_response(completed_at: Timestamp) -> StoredResponse {
    StoredResponse::new(204, Vec::new(), Vec::new(), completed_at)
}

/// A `total` byte body in `chunk` byte chunks (the last one shorter if `chunk` does
/// not divide `total`), filled with a pattern that differs from chunk to chunk so
/// that a reordered or shifted chunk cannot compare equal.
pub fn large_response(completed_at: Timestamp, total: usize, chunk: usize) -> StoredResponse {
    let pattern: Vec<u8> = (0..total).map(|i| (i % 251) as u8 ^ (i / chunk.max(1)) as u8).collect();
    let chunks = pattern.chunks(chunk.max(1)).map(Bytes::copy_from_slice).collect();
    StoredResponse::new(
        200,
        vec![(HeaderName::from_static("content-type"), HeaderValue::from_static("text/event-stream"))],
        chunks,
        completed_at,
    )
}
