//! What makes two requests "the same request": a SHA-256 over method, path and query,
//! the body (canonical JSON when it parses, raw bytes otherwise) and the headers that
//! change a request's meaning. Each part is length-prefixed, so no two different
//! requests can be made to hash alike by moving bytes between parts.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, HeaderName, Method, Uri};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
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
        // Most requests carry none of them: one pass over the request's few headers
        // tells, where a lookup per allowed name would hash each of them.
        let allowed = if headers.keys().any(|k| allow.contains(k)) { allow } else { &[] };
        for name in allowed {
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
        crate::scope::hex32(&self.0)
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
/// The bytes are exactly those of parsing into a `serde_json::Value` and writing it
/// back (keys sorted bytewise, the last of duplicate keys kept, numbers and string
/// escapes as serde_json writes them): fingerprints already stored must keep matching.
/// But strings and keys are borrowed from the body rather than copied, and objects are
/// sorted vectors rather than `BTreeMap`s, which makes it several times cheaper.
pub fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if !matches!(first, b'{' | b'[') {
        // Scalars are JSON too, but no LLM API takes one; hashing them raw is cheaper.
        return None;
    }
    let mut node: Node<'_> = serde_json::from_slice(body).ok()?;
    let mut out = Vec::with_capacity(body.len());
    node.write(&mut out);
    Some(out)
}

/// A JSON document with its strings borrowed from the text where they need no
/// unescaping: just enough structure to write it back canonically.
enum Node<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(Cow<'a, str>),
    Array(Vec<Node<'a>>),
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
}

impl Node<'_> {
    fn write(&mut self, out: &mut Vec<u8>) {
        // Writing into a `Vec` cannot fail.
        match self {
            Self::Null => out.extend_from_slice(b"null"),
            Self::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Self::Number(n) => drop(serde_json::to_writer(&mut *out, n)),
            Self::String(s) => drop(serde_json::to_writer(&mut *out, s.as_ref())),
            Self::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter_mut().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write(out);
                }
                out.push(b']');
            }
            Self::Object(members) => {
                // Sorted in place (no allocation for the few keys of a request's
                // objects) and stably, so of equal keys the last one written stays last.
                members.sort_by(|a, b| a.0.cmp(&b.0));
                out.push(b'{');
                let mut first = true;
                let mut members = members.iter_mut().peekable();
                while let Some((key, value)) = members.next() {
                    if members.peek().is_some_and(|next| next.0 == *key) {
                        continue;
                    }
                    if !first {
                        out.push(b',');
                    }
                    first = false;
                    drop(serde_json::to_writer(&mut *out, key.as_ref()));
                    out.push(b':');
                    value.write(out);
                }
                out.push(b'}');
            }
        }
    }
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

/// A string borrowed from the text when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(NodeVisitor).and_then(|node| match node {
            Node::String(s) => Ok(Str(s)),
            _ => Err(serde::de::Error::custom("expected a string")),
        })
    }
}

/// Builds a [`Node`] as `serde_json::Value`'s own visitor builds a `Value`.
struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node<'de>, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node<'de>, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node<'de>, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node<'de>, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Node::Null, Node::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_none<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node<'de>, D::Error> {
        Node::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some((Str(key), value)) = map.next_entry()? {
            members.push((key, value));
        }
        Ok(Node::Object(members))
    }
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
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            "[a-zA-Z0-9 \\\\\"é\u{0}-\u{1f}\u{1F600}]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    /// Writes `v` with object keys in an order chosen by `seed`, random spacing, and
    /// now and then a member whose key comes again later (the later one must win).
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
                    if next(seed).is_multiple_of(4) {
                        let decoy = ["null", "[1,{\"z\":2}]", "{\"b\":1,\"a\":0}", "\"shadowed\""][next(seed) % 4];
                        out.push_str(&format!("{}:{decoy},", serde_json::to_string(k).unwrap()));
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

    /// What `canonical_json` wrote before it stopped building a `Value`: the bytes it
    /// must keep producing.
    fn through_value(body: &[u8]) -> Option<Vec<u8>> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
        if !matches!(first, b'{' | b'[') {
            return None;
        }
        serde_json::to_vec(&serde_json::from_slice::<Value>(body).ok()?).ok()
    }

    #[test]
    fn canonical_bytes_are_those_of_a_value_on_the_edge_cases() {
        let cases: [&[u8]; 14] = [
            br#"{"b":1,"a":2,"b":3}"#,
            br#"{"a":{"z":1,"a":[1,{"y":2,"x":3}]},"a":null}"#,
            "[\"\\u00e9\\n\\\"\\\\\\/\\ud83d\\ude00\", \"plain\", \"café\"]".as_bytes(),
            br#"[1.0, 1.50, -0.0, 1e2, 1E-7, 123456789012345678901234567890, -9223372036854775809]"#,
            br#"[18446744073709551615, -9223372036854775808, 0, -1, 3.141592653589793]"#,
            br#"{"":1,"\u0000":2,"A":3,"a":4,"\u00e9":5,"e\u0301":6}"#,
            b" [ true , false , null ] ",
            br#"{"key with \"quote\"":"\t"}"#,
            b"{}",
            b"[]",
            b"[1e400]",
            br#"{"a":1,}"#,
            b"[1] trailing",
            br#"{"unterminated": "x"#,
        ];
        for body in cases {
            assert_eq!(canonical_json(body), through_value(body), "{}", String::from_utf8_lossy(body));
        }
    }

    proptest! {
        #[test]
        fn canonical_bytes_are_those_of_a_value(value in json_value(), seed in any::<u64>()) {
            let mut s = seed;
            let mut text = String::new();
            shuffled(&value, &mut s, &mut text);
            prop_assert_eq!(canonical_json(text.as_bytes()), through_value(text.as_bytes()));
        }

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
