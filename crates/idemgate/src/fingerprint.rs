//! What makes two requests "the same request": a SHA-256 over method, path and query,
//! the body (canonical JSON when it parses, raw bytes otherwise) and the headers that
//! change a request's meaning. Each part is length-prefixed, so no two different
//! requests can be made to hash alike by moving bytes between parts.

use std::fmt;

use http::{HeaderMap, HeaderName, Method, Uri};
use sha2::{Digest, Sha256};

/// The headers that change what an LLM request means (API version, beta features,
/// billing organisation), hashed into the fingerprint.
pub const MEANINGFUL_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
    HeaderName::from_static("openai-beta"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
];

/// The SHA-256 fingerprint of a request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprints a request whose body has been read in full.
    pub fn compute(method: &Method, uri: &Uri, headers: &HeaderMap, allow: &[HeaderName], body: &[u8]) -> Self {
        let mut h = Sha256::new();
        part(&mut h, b"idemgate/fingerprint/v1");
        part(&mut h, method.as_str().as_bytes());
        part(&mut h, uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
        match canonical_json(body) {
            Some(canonical) => {
                part(&mut h, b"json");
                part(&mut h, &canonical);
            }
            None => {
                part(&mut h, b"raw");
                part(&mut h, body);
            }
        }
        for name in allow {
            let values = headers.get_all(name);
            let count = values.iter().count() as u64;
            if count == 0 {
                continue;
            }
            part(&mut h, name.as_str().as_bytes());
            h.update(count.to_be_bytes());
            for v in values {
                part(&mut h, v.as_bytes());
            }
        }
        Self(h.finalize().into())
    }

    /// A fingerprint from its 32 bytes (as read back from a store).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the hex form (as stores that keep text write it).
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex::encode(&self.0[..6]))
    }
}

fn part(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// Compact JSON with object keys sorted, or `None` when the body is not JSON.
///
/// `serde_json::Value` keeps objects in a `BTreeMap` (the crate's `preserve_order`
/// feature is off in this workspace), so serialising it again sorts the keys and drops
/// insignificant whitespace.
pub fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if !matches!(first, b'{' | b'[') {
        // Scalars are JSON too, but no LLM API takes one; hashing them raw is cheaper.
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    serde_json::to_vec(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    fn fp(body: &[u8]) -> Fingerprint {
        fp_with(body, &HeaderMap::new())
    }

    fn fp_with(body: &[u8], headers: &HeaderMap) -> Fingerprint {
        let uri: Uri = "/v1/chat/completions".parse().unwrap();
        Fingerprint::compute(&Method::POST, &uri, headers, &MEANINGFUL_HEADERS, body)
    }

    #[test]
    fn whitespace_and_key_order_do_not_matter_in_json() {
        assert_eq!(fp(br#"{"a":1,"b":[1,2]}"#), fp(b" {\n \"b\" : [1, 2],\t\"a\": 1 } "));
        assert_ne!(fp(br#"{"a":1}"#), fp(br#"{"a":2}"#));
        assert_ne!(fp(br#"{"b":[1,2]}"#), fp(br#"{"b":[2,1]}"#));
    }

    #[test]
    fn non_json_bodies_are_hashed_raw() {
        assert_ne!(fp(b"hello"), fp(b"hello "));
        assert_eq!(fp(b"{not json"), fp(b"{not json"));
        assert_ne!(fp(b"{not json"), fp(b"{not json "));
    }

    #[test]
    fn method_path_query_and_meaningful_headers_count() {
        let h = HeaderMap::new();
        let a: Uri = "/v1/x?a=1".parse().unwrap();
        let b: Uri = "/v1/x?a=2".parse().unwrap();
        let base = Fingerprint::compute(&Method::POST, &a, &h, &MEANINGFUL_HEADERS, b"{}");
        assert_ne!(base, Fingerprint::compute(&Method::POST, &b, &h, &MEANINGFUL_HEADERS, b"{}"));
        assert_ne!(base, Fingerprint::compute(&Method::PUT, &a, &h, &MEANINGFUL_HEADERS, b"{}"));

        let mut v1 = HeaderMap::new();
        v1.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        let mut v2 = HeaderMap::new();
        v2.insert("anthropic-version", HeaderValue::from_static("2024-01-01"));
        assert_ne!(fp_with(b"{}", &v1), fp_with(b"{}", &v2));
        assert_ne!(fp_with(b"{}", &v1), fp(b"{}"));
        // Headers outside the allow-list do not count.
        let mut other = HeaderMap::new();
        other.insert("x-trace-id", HeaderValue::from_static("abc"));
        assert_eq!(fp_with(b"{}", &other), fp(b"{}"));
    }

    /// Any JSON value, with objects nested a few levels.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-zA-Z0-9 \\\\\"é]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    /// Writes `v` with object keys in an order chosen by `seed`, and random spacing.
    fn shuffled(v: &Value, seed: &mut u64, out: &mut String) {
        fn next(seed: &mut u64) -> usize {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (*seed >> 33) as usize
        }
        let space = |n: usize| [" ", "", "\n  ", "\t"][n % 4];
        match v {
            Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                for i in (1..entries.len()).rev() {
                    entries.swap(i, next(seed) % (i + 1));
                }
                out.push('{');
                for (i, (k, val)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(space(next(seed)));
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push_str(space(next(seed)));
                    out.push(':');
                    shuffled(val, seed, out);
                }
                out.push_str(space(next(seed)));
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, val) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(space(next(seed)));
                    shuffled(val, seed, out);
                }
                out.push(']');
            }
            other => out.push_str(&serde_json::to_string(other).unwrap()),
        }
    }

    proptest! {
        #[test]
        fn any_permutation_of_object_keys_gives_the_same_fingerprint(
            fields in prop::collection::btree_map("[a-z]{1,6}", json_value(), 1..8),
            seed in any::<u64>(),
        ) {
            let value = Value::Object(fields.into_iter().collect());
            let compact = serde_json::to_vec(&value).unwrap();
            let mut s = seed;
            let mut permuted = String::new();
            shuffled(&value, &mut s, &mut permuted);
            prop_assert_eq!(fp(&compact), fp(permuted.as_bytes()));
        }

        #[test]
        fn different_json_gives_different_fingerprints(a in json_value(), b in json_value()) {
            prop_assume!(a != b);
            let wrap = |v: &Value| serde_json::to_vec(&json!({"messages": v})).unwrap();
            prop_assert_ne!(fp(&wrap(&a)), fp(&wrap(&b)));
        }
    }
}
