//! Per-route behaviour of the layer. Every choice that crosses the API is an enum.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, StatusCode};

use crate::fingerprint::MEANINGFUL_HEADERS;
use crate::key::{IDEMPOTENCY_KEY, Key};
use crate::scope::Scope;
use crate::usage::Prices;

/// What a duplicate does while the original is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnInFlight {
    /// Wait (up to `max_wait`) and answer with the original's result.
    #[default]
    Wait,
    /// Answer `409` with `Retry-After` at once.
    Conflict,
}

/// Whether requests must carry a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyRequirement {
    /// A request without a key passes through unprotected (counted as `bypassed`).
    #[default]
    Optional,
    /// A request without a key gets `400`: for routes whose calls have side effects.
    Required,
}

/// What happens when the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreError {
    /// Answer `503` with `Retry-After`; nothing is forwarded.
    #[default]
    FailClosed,
    /// Forward without protection, counted as `store_error`.
    FailOpen,
}

/// Whether upstream 5xx answers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerErrors {
    /// Release the key so the retry executes again (the default: for an LLM call, a
    /// 5xx means nothing was generated).
    #[default]
    Release,
    /// Store them and replay them, as Stripe does.
    Store,
}

/// What reaches the inner service of the client's key header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KeyForwarding {
    /// Unchanged, so a provider that honours keys adds its own protection.
    #[default]
    Forward,
    /// Under another header name.
    Rename(HeaderName),
    /// Removed.
    Strip,
}

/// How a recorded stream is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplayPace {
    /// As fast as the client reads.
    #[default]
    Immediate,
    /// At the pace the chunks originally arrived, for clients that render tokens as
    /// they come. Records without timings replay immediately.
    Recorded,
}

/// A key derived from request headers and the time, for clients that cannot send
/// one: `Key::derive(header values, now, bucket)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedKey {
    headers: Vec<HeaderName>,
    bucket: Duration,
}

impl DerivedKey {
    /// Derives from the values of `headers` (all must be present) and the current
    /// `bucket` of time (e.g. the minute).
    pub fn new(headers: Vec<HeaderName>, bucket: Duration) -> Self {
        Self { headers, bucket }
    }

    /// The key for a request, or `None` when one of the headers is missing.
    pub fn derive(&self, headers: &HeaderMap, now: SystemTime) -> Option<Key> {
        let parts: Option<Vec<&[u8]>> = self.headers.iter().map(|n| headers.get(n).map(|v| v.as_bytes())).collect();
        Some(Key::derive(&parts?, now, self.bucket))
    }
}

/// The headers kept with a stored response and sent on replay. Everything else the
/// upstream sent (cookies, rate-limit counters, dates) is specific to one execution.
pub const REPLAY_HEADERS: [HeaderName; 11] = [
    http::header::CONTENT_TYPE,
    http::header::CONTENT_ENCODING,
    http::header::CONTENT_LANGUAGE,
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("request-id"),
    HeaderName::from_static("openai-model"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-processing-ms"),
    HeaderName::from_static("openai-version"),
    HeaderName::from_static("anthropic-organization-id"),
    HeaderName::from_static("x-amzn-requestid"),
];

/// Response header names that LLM providers send on every call and `http` has no
/// constant for (the replayable ones of [`REPLAY_HEADERS`] among them), which
/// [`header_name`] shares instead of allocating each per response or record. A
/// `static`, not a `const`: a `const` array would be built, and its 24 names dropped,
/// at every lookup (3k instructions per proxied call).
static PROVIDER_HEADERS: [HeaderName; 24] = [
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("request-id"),
    HeaderName::from_static("openai-processing-ms"),
    HeaderName::from_static("openai-version"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
    HeaderName::from_static("openai-model"),
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
    HeaderName::from_static("x-envoy-upstream-service-time"),
    HeaderName::from_static("x-should-retry"),
    HeaderName::from_static("anthropic-organization-id"),
    HeaderName::from_static("anthropic-ratelimit-requests-limit"),
    HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
    HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
    HeaderName::from_static("x-amzn-requestid"),
    HeaderName::from_static("cf-ray"),
    HeaderName::from_static("cf-cache-status"),
    HeaderName::from_static("retry-after-ms"),
];

/// `name` as a header name (lowercase), or `None` when it is not a valid one. `http`
/// parses the standard names without allocating, and the names providers send on every
/// call come from a static table (matched ignoring case, as HTTP matches names): only
/// other names are copied. For the upstream client's responses and stored records.
pub fn header_name(name: &[u8]) -> Option<HeaderName> {
    match PROVIDER_HEADERS.iter().find(|known| known.as_str().as_bytes().eq_ignore_ascii_case(name)) {
        Some(known) => Some(known.clone()),
        None => HeaderName::from_bytes(name).ok(),
    }
}

/// How the layer treats one route's requests.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) route: Arc<str>,
    pub(crate) lease: Duration,
    pub(crate) ttl: Duration,
    pub(crate) on_in_flight: OnInFlight,
    pub(crate) max_wait: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) key_requirement: KeyRequirement,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) server_errors: ServerErrors,
    pub(crate) max_body: usize,
    pub(crate) key_headers: Vec<HeaderName>,
    pub(crate) key_forwarding: KeyForwarding,
    pub(crate) derived_key: Option<DerivedKey>,
    pub(crate) scope: Scope,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) replay_headers: Vec<HeaderName>,
    pub(crate) replay_pace: ReplayPace,
    pub(crate) prices: Option<Arc<Prices>>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            route: Arc::from(""),
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(24 * 60 * 60),
            on_in_flight: OnInFlight::Wait,
            max_wait: Duration::from_secs(60),
            poll_interval: Duration::from_millis(500),
            key_requirement: KeyRequirement::Optional,
            on_store_error: OnStoreError::FailClosed,
            server_errors: ServerErrors::Release,
            max_body: 32 * 1024 * 1024,
            key_headers: vec![IDEMPOTENCY_KEY],
            key_forwarding: KeyForwarding::Forward,
            derived_key: None,
            scope: Scope::default(),
            fingerprint_headers: MEANINGFUL_HEADERS.to_vec(),
            replay_headers: REPLAY_HEADERS.to_vec(),
            replay_pace: ReplayPace::Immediate,
            prices: None,
        }
    }
}

impl Policy {
    /// The defaults: lease 30 s, TTL 24 h, wait up to 60 s, key optional, fail closed,
    /// 5xx released, bodies up to 32 MiB.
    pub fn new() -> Self {
        Self::default()
    }

    /// The route name, part of the storage key: the same key on two routes is two
    /// records. Keep it stable across renames of the path.
    pub fn with_route(mut self, route: impl Into<Arc<str>>) -> Self {
        self.route = route.into();
        self
    }

    /// How long a claim lives without renewal; renewed every third of it while the
    /// call runs, so it bounds how long a crashed owner blocks its key.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(10));
        self
    }

    /// How long completed records are kept.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// What duplicates do while the original runs.
    pub fn with_on_in_flight(mut self, policy: OnInFlight) -> Self {
        self.on_in_flight = policy;
        self
    }

    /// The longest a duplicate waits for the original before `409`.
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// How often a waiting duplicate re-reads the store when no wake-up arrives
    /// (a backstop for stores whose notifications can be lost).
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Whether a key is required.
    pub fn with_key_requirement(mut self, requirement: KeyRequirement) -> Self {
        self.key_requirement = requirement;
        self
    }

    /// What to do when the store fails.
    pub fn with_on_store_error(mut self, policy: OnStoreError) -> Self {
        self.on_store_error = policy;
        self
    }

    /// Whether upstream 5xx answers are stored.
    pub fn with_server_errors(mut self, policy: ServerErrors) -> Self {
        self.server_errors = policy;
        self
    }

    /// The largest request body accepted, in bytes; larger ones get `413`.
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Accepts the key under these headers as well (e.g. `x-idempotency-key`).
    pub fn with_key_aliases(mut self, aliases: impl IntoIterator<Item = HeaderName>) -> Self {
        self.key_headers.extend(aliases);
        self
    }

    /// What the inner service sees of the key header.
    pub fn with_key_forwarding(mut self, forwarding: KeyForwarding) -> Self {
        self.key_forwarding = forwarding;
        self
    }

    /// Derives a key for requests that send none.
    pub fn with_derived_key(mut self, derived: DerivedKey) -> Self {
        self.derived_key = Some(derived);
        self
    }

    /// How tenants are told apart (the secret, an optional tenant header).
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// The headers hashed into the fingerprint (default [`MEANINGFUL_HEADERS`]).
    pub fn with_fingerprint_headers(mut self, headers: Vec<HeaderName>) -> Self {
        self.fingerprint_headers = headers;
        self
    }

    /// The response headers stored and replayed (default [`REPLAY_HEADERS`]).
    pub fn with_replay_headers(mut self, headers: Vec<HeaderName>) -> Self {
        self.replay_headers = headers;
        self
    }

    /// How recorded streams are replayed.
    pub fn with_replay_pace(mut self, pace: ReplayPace) -> Self {
        self.replay_pace = pace;
        self
    }

    /// Prices per model, to count the money replays save (`idemgate_cost_saved_total`).
    pub fn with_prices(mut self, prices: Arc<Prices>) -> Self {
        self.prices = Some(prices);
        self
    }

    /// The route name.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The scope.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The completed-record TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether a response with this status is stored (and replayed) or released.
    ///
    /// Stored: 2xx and the 4xx that will recur (400, 401, 403, 404, 413, 422).
    /// Released: 408, 409, 425, 429, every other status, and 5xx unless
    /// [`ServerErrors::Store`].
    pub fn stores(&self, status: StatusCode) -> bool {
        match status.as_u16() {
            200..=299 | 400 | 401 | 403 | 404 | 413 | 422 => true,
            500..=599 => self.server_errors == ServerErrors::Store,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_shared_when_known_parsed_otherwise_and_lowercase_either_way() {
        assert_eq!(header_name(b"X-REQUEST-ID"), Some(PROVIDER_HEADERS[0].clone()));
        assert_eq!(header_name(b"Content-Type"), Some(http::header::CONTENT_TYPE));
        assert_eq!(header_name(b"X-Request-Idx").map(|n| n.as_str().to_owned()), Some("x-request-idx".to_owned()));
        assert_eq!(header_name(b"bad name"), None);
        assert_eq!(header_name(b""), None);
        for name in REPLAY_HEADERS {
            assert_eq!(header_name(name.as_str().as_bytes()), Some(name));
        }
    }
}
