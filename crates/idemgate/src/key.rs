//! The client's idempotency key: parsing the header, generating and deriving keys.
//!
//! The header follows `draft-ietf-httpapi-idempotency-key-header`, whose value is a
//! structured-field string (`"abc"`), and also accepts the bare token that Stripe-style
//! clients send (`abc`). Keys are case-sensitive and never normalised.

use std::fmt;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use crate::clock::{Timestamp, duration_millis};

/// The `Idempotency-Key` request header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The longest key accepted, in bytes (Stripe's limit).
pub const MAX_KEY_LEN: usize = 255;

/// A validated client key: 1 to 255 bytes of printable ASCII.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key(Box<str>);

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The header was present with an empty value (or `""`).
    #[error("the idempotency key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("the idempotency key is {len} bytes long; at most {MAX_KEY_LEN} are allowed")]
    TooLong {
        /// The key's length in bytes.
        len: usize,
    },
    /// A byte outside printable ASCII (0x21..=0x7e, and space inside quotes).
    #[error("the idempotency key contains a byte outside printable ASCII at position {position}")]
    InvalidByte {
        /// Zero-based byte offset in the header value.
        position: usize,
    },
    /// A quoted key that does not follow the structured-field string syntax.
    #[error("the idempotency key is not a valid quoted string")]
    BadQuoting,
    /// More than one key header field (or more than one alias) was sent.
    #[error("more than one idempotency key header was sent")]
    Multiple,
}

impl Key {
    /// Parses one header value: a quoted structured-field string or a bare token.
    pub fn parse(value: &[u8]) -> Result<Self, KeyError> {
        if value.is_empty() {
            return Err(KeyError::Empty);
        }
        let key = if value[0] == b'"' {
            unquote(value)?
        } else {
            if let Some(position) = value.iter().position(|b| !(0x21..=0x7e).contains(b)) {
                return Err(KeyError::InvalidByte { position });
            }
            // Checked above: every byte is printable ASCII.
            String::from_utf8_lossy(value).into_owned()
        };
        Self::from_string(key)
    }

    fn from_string(key: String) -> Result<Self, KeyError> {
        match key.len() {
            0 => Err(KeyError::Empty),
            len if len > MAX_KEY_LEN => Err(KeyError::TooLong { len }),
            _ => Ok(Self(key.into_boxed_str())),
        }
    }

    /// Finds the key among `names` (the primary header first, then aliases).
    ///
    /// `Ok(None)` means no key was sent. Two fields, under one name or across aliases,
    /// are an error: a proxy that adds a second key must not silently win or lose.
    pub fn from_headers(headers: &HeaderMap, names: &[HeaderName]) -> Result<Option<Self>, KeyError> {
        let mut found = None;
        for name in names {
            for value in headers.get_all(name) {
                if found.is_some() {
                    return Err(KeyError::Multiple);
                }
                found = Some(value);
            }
        }
        found.map(|v| Self::parse(v.as_bytes())).transpose()
    }

    /// A fresh random key, a UUIDv7 (time-ordered, 74 random bits).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string().into_boxed_str())
    }

    /// A key derived from caller-chosen parts and a time bucket, for clients that
    /// cannot send a key: the same parts within one bucket give the same key.
    ///
    /// `idemgate keygen --user U --operation O --at T` and per-route derived keys use
    /// this one rule, so a key can be computed offline.
    pub fn derive(parts: &[&[u8]], at: SystemTime, bucket: Duration) -> Self {
        let bucket_ms = duration_millis(bucket).max(1);
        let index = Timestamp::from_system_time(at).as_millis() / bucket_ms;
        let mut h = Sha256::new();
        h.update(b"idemgate/derived-key/v1");
        for part in parts {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(bucket_ms.to_be_bytes());
        h.update(index.to_be_bytes());
        Self(format!("d-{}", hex::encode(&h.finalize()[..16])).into_boxed_str())
    }

    /// The key as sent (unquoted).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Structured-field string (RFC 9651 §3.3.3): `"` chars `"`, where `\"` and `\\` are
/// the only escapes and the content is printable ASCII or space.
fn unquote(value: &[u8]) -> Result<String, KeyError> {
    let inner = match value {
        [b'"', inner @ .., b'"'] if value.len() >= 2 => inner,
        _ => return Err(KeyError::BadQuoting),
    };
    let mut out = String::with_capacity(inner.len());
    let mut bytes = inner.iter().enumerate();
    while let Some((i, &b)) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some((_, &e @ (b'"' | b'\\'))) => out.push(char::from(e)),
                _ => return Err(KeyError::BadQuoting),
            },
            b'"' => return Err(KeyError::BadQuoting),
            0x20..=0x7e => out.push(char::from(b)),
            _ => return Err(KeyError::InvalidByte { position: i + 1 }),
        }
    }
    Ok(out)
}

impl fmt::Debug for Key {
    // Keys may carry user data: debug output shows only the length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(<{} bytes>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn bare_and_quoted_forms_give_the_same_key() {
        assert_eq!(Key::parse(b"abc-123").unwrap().as_str(), "abc-123");
        assert_eq!(Key::parse(b"\"abc-123\"").unwrap().as_str(), "abc-123");
        assert_eq!(Key::parse(b"\"a \\\"b\\\\\"").unwrap().as_str(), "a \"b\\");
    }

    #[test]
    fn keys_are_case_sensitive() {
        assert_ne!(Key::parse(b"Abc").unwrap(), Key::parse(b"abc").unwrap());
    }

    #[test]
    fn empty_long_and_badly_quoted_keys_are_refused() {
        assert_eq!(Key::parse(b""), Err(KeyError::Empty));
        assert_eq!(Key::parse(b"\"\""), Err(KeyError::Empty));
        assert_eq!(Key::parse(&[b'a'; 256]), Err(KeyError::TooLong { len: 256 }));
        assert!(Key::parse(&[b'a'; 255]).is_ok());
        assert_eq!(Key::parse(b"\"abc"), Err(KeyError::BadQuoting));
        assert_eq!(Key::parse(b"\""), Err(KeyError::BadQuoting));
        assert_eq!(Key::parse(b"\"a\\nb\""), Err(KeyError::BadQuoting));
        assert_eq!(Key::parse(b"a b"), Err(KeyError::InvalidByte { position: 1 }));
    }

    #[test]
    fn two_fields_or_two_aliases_are_refused() {
        let alias = HeaderName::from_static("x-idempotency-key");
        let names = [IDEMPOTENCY_KEY, alias.clone()];
        let mut h = HeaderMap::new();
        assert_eq!(Key::from_headers(&h, &names), Ok(None));
        h.append(alias.clone(), HeaderValue::from_static("k1"));
        assert_eq!(Key::from_headers(&h, &names).unwrap().unwrap().as_str(), "k1");
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("k1"));
        assert_eq!(Key::from_headers(&h, &names), Err(KeyError::Multiple));
        let mut h = HeaderMap::new();
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(Key::from_headers(&h, &[IDEMPOTENCY_KEY]), Err(KeyError::Multiple));
    }

    #[test]
    fn derived_keys_are_stable_within_a_bucket() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let minute = Duration::from_secs(60);
        let a = Key::derive(&[b"user-1", b"op"], t, minute);
        assert_eq!(a, Key::derive(&[b"user-1", b"op"], t + Duration::from_secs(10), minute));
        assert_ne!(a, Key::derive(&[b"user-1", b"op"], t + minute, minute));
        // Length prefixes keep part boundaries: ("ab","c") is not ("a","bc").
        assert_ne!(Key::derive(&[b"ab", b"c"], t, minute), Key::derive(&[b"a", b"bc"], t, minute));
        assert!(Key::parse(a.as_str().as_bytes()).is_ok());
    }

    #[test]
    fn generated_keys_parse() {
        let k = Key::generate();
        assert_eq!(Key::parse(k.as_str().as_bytes()).unwrap(), k);
    }

    proptest! {
        #[test]
        fn any_printable_token_round_trips(s in "[!-~]{1,255}") {
            prop_assume!(!s.starts_with('"'));
            let key = Key::parse(s.as_bytes()).unwrap();
            prop_assert_eq!(key.as_str(), s.as_str());
        }

        #[test]
        fn any_printable_string_round_trips_quoted(s in "[ -~]{1,200}") {
            let quoted = format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
            let key = Key::parse(quoted.as_bytes()).unwrap();
            prop_assert_eq!(key.as_str(), s.as_str());
        }

        #[test]
        fn any_byte_outside_printable_ascii_is_refused(
            prefix in "[!-~]{0,20}", bad in any::<u8>(), suffix in "[!-~]{0,20}",
        ) {
            prop_assume!(!(0x21..=0x7e).contains(&bad));
            let mut v = prefix.clone().into_bytes();
            v.push(bad);
            v.extend_from_slice(suffix.as_bytes());
            prop_assume!(v[0] != b'"');
            prop_assert_eq!(Key::parse(&v), Err(KeyError::InvalidByte { position: prefix.len() }));
        }

        #[test]
        fn control_bytes_are_refused_inside_quotes(s in "[a-z]{0,10}", bad in 0u8..0x20) {
            let mut v = vec![b'"'];
            v.extend_from_slice(s.as_bytes());
            v.push(bad);
            v.push(b'"');
            let res = Key::parse(&v);
            prop_assert!(matches!(res, Err(KeyError::InvalidByte { .. })), "{:?}", res);
        }
    }
}
