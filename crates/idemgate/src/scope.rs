//! Who a key belongs to: the tenant, and the storage key that scopes a client key to
//! one tenant and one route.
//!
//! Two tenants that pick the same key never see each other's records, because the
//! storage key is `H(tenant ‖ route ‖ key)` and the tenant is a keyed hash of the
//! caller's credential. The raw credential is never kept.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use crate::key::Key;

/// A secret whose `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into().into_boxed_slice())
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The credential headers a tenant is derived from, first match wins.
pub static CREDENTIAL_HEADERS: [HeaderName; 3] =
    [http::header::AUTHORIZATION, HeaderName::from_static("x-api-key"), HeaderName::from_static("api-key")];

/// A keyed hash of the caller's credential (or tenant header).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tenant([u8; 32]);

impl Tenant {
    /// The hash bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tenant({})", hex::encode(&self.0[..6]))
    }
}

/// Where a record lives in a store: `SHA-256(tenant ‖ route ‖ client key)`.
///
/// Stores see only this, never the client key or the credential.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey([u8; 32]);

impl StorageKey {
    /// A storage key from its 32 bytes (as read back from a store).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, the form stores and the CLI show.
    pub fn to_hex(&self) -> String {
        hex32(&self.0)
    }

    /// Parses the lowercase or uppercase hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }

    /// A short hash for logs: it identifies a record without revealing the key.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageKey({})", self.short())
    }
}

impl fmt::Display for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How tenants are told apart.
#[derive(Clone)]
pub struct Scope {
    /// The HMAC keyed with the tenant secret, cloned for each tenant: keying it hashes
    /// two blocks, which every request would otherwise pay again. Derived from the
    /// secret, so never printed.
    keyed: Hmac<Sha256>,
    tenant_header: Option<HeaderName>,
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope").field("secret", &"<redacted>").field("tenant_header", &self.tenant_header).finish()
    }
}

/// The secret used when none is configured. Tenant hashes are then still scoped, but
/// anyone with the store could test a guessed credential against them: set your own.
const DEFAULT_SECRET: &[u8] = b"idemgate default tenant secret; configure tenant-secret";

impl Default for Scope {
    fn default() -> Self {
        Self::new(Secret::new(DEFAULT_SECRET))
    }
}

impl Scope {
    /// Tenants keyed by `secret`, taken from the credential headers.
    pub fn new(secret: Secret) -> Self {
        // HMAC accepts keys of any length, so this cannot fail.
        let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.expose())
            .unwrap_or_else(|_| unreachable!("hmac takes any key length"));
        Self { keyed, tenant_header: None }
    }

    /// Takes the tenant from this header instead of the credential (for gateways
    /// behind an authenticating proxy that names the tenant).
    pub fn with_tenant_header(mut self, header: HeaderName) -> Self {
        self.tenant_header = Some(header);
        self
    }

    /// The tenant of a request. A request with no credential belongs to the anonymous
    /// tenant, which is still a tenant: anonymous keys never match credentialed ones.
    pub fn tenant(&self, headers: &HeaderMap) -> Tenant {
        let found = match &self.tenant_header {
            Some(name) => headers.get(name).map(|v| (name, v)),
            None => CREDENTIAL_HEADERS.iter().find_map(|n| headers.get(n).map(|v| (n, v))),
        };
        match found {
            Some((name, value)) => self.tenant_of(name.as_str().as_bytes(), value.as_bytes()),
            None => self.tenant_of(b"", b""),
        }
    }

    /// The tenant for one credential, as `idemgate inspect --tenant` computes it.
    pub fn tenant_of(&self, header: &[u8], value: &[u8]) -> Tenant {
        let mut mac = self.keyed.clone();
        mac.update(&(header.len() as u64).to_be_bytes());
        mac.update(header);
        mac.update(&(value.len() as u64).to_be_bytes());
        mac.update(value);
        Tenant(mac.finalize().into_bytes().into())
    }

    /// The storage key of `key` for `tenant` on `route`.
    pub fn storage_key(tenant: &Tenant, route: &str, key: &Key) -> StorageKey {
        let mut h = Sha256::new();
        h.update(b"idemgate/storage-key/v1");
        h.update(tenant.0);
        h.update((route.len() as u64).to_be_bytes());
        h.update(route.as_bytes());
        h.update((key.as_str().len() as u64).to_be_bytes());
        h.update(key.as_str().as_bytes());
        StorageKey(h.finalize().into())
    }
}

/// Lowercase hex of 32 bytes, which the SQLite and Redis stores spell a key in on
/// every operation: 46 ns against `hex::encode`'s 157, which collects its string a
/// `char` at a time (criterion `key/storage_key_to_hex`).
pub(crate) fn hex32(bytes: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn tenants_differ_by_credential_and_secret() {
        let s = Scope::default();
        let a = s.tenant(&headers(&[("authorization", "Bearer sk-a")]));
        let b = s.tenant(&headers(&[("authorization", "Bearer sk-b")]));
        let anon = s.tenant(&HeaderMap::new());
        assert_ne!(a, b);
        assert_ne!(a, anon);
        assert_eq!(a, s.tenant(&headers(&[("authorization", "Bearer sk-a")])));
        let other = Scope::new(Secret::new("x"));
        assert_ne!(a, other.tenant(&headers(&[("authorization", "Bearer sk-a")])));
        // The same value under another header is another tenant.
        assert_ne!(s.tenant(&headers(&[("x-api-key", "k")])), s.tenant(&headers(&[("api-key", "k")])));
    }

    #[test]
    fn tenant_header_overrides_credentials() {
        let s = Scope::default().with_tenant_header(HeaderName::from_static("x-tenant"));
        let a = s.tenant(&headers(&[("x-tenant", "t1"), ("authorization", "Bearer a")]));
        let b = s.tenant(&headers(&[("x-tenant", "t1"), ("authorization", "Bearer b")]));
        assert_eq!(a, b);
    }

    #[test]
    fn hex32_is_lowercase_hex() {
        let bytes: [u8; 32] = std::array::from_fn(|i| u8::try_from(i * 8 + 1).unwrap_or(0));
        assert_eq!(hex32(&bytes), hex::encode(bytes));
        assert_eq!(hex32(&[0xff; 32]), "f".repeat(64));
    }

    #[test]
    fn storage_key_separates_tenant_route_and_key() {
        let s = Scope::default();
        let t = s.tenant(&HeaderMap::new());
        let k = Key::parse(b"k").unwrap();
        let base = Scope::storage_key(&t, "chat", &k);
        assert_ne!(base, Scope::storage_key(&t, "messages", &k));
        assert_ne!(base, Scope::storage_key(&t, "chat", &Key::parse(b"K").unwrap()));
        assert_eq!(StorageKey::from_hex(&base.to_hex()), Some(base));
    }

    /// Stored keys depend on it: HMAC-SHA256 under the secret of the length-prefixed
    /// header name and value (the value checked against Python's `hmac`).
    #[test]
    fn tenant_is_the_hmac_of_the_length_prefixed_credential() {
        let s = Scope::new(Secret::new("x"));
        for _ in 0..2 {
            let t = s.tenant(&headers(&[("authorization", "Bearer sk-a")]));
            assert_eq!(hex::encode(t.as_bytes()), "68c1ef5cdcb48b01c17aeba276ee609e0c97d91b54a808dada7101e4e2716f00");
        }
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(<redacted>)");
        let scope = format!("{:?}", Scope::new(Secret::new("hunter2")));
        assert_eq!(scope, r#"Scope { secret: "<redacted>", tenant_header: None }"#);
    }
}
