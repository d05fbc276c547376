//! Configuration, in two stages: [`RawConfig`] is what the TOML file, the
//! `IDEMGATE_*` environment variables and the flags say (layered in that order, later
//! wins); `Config::try_from(raw)` is the only place values are checked, and every
//! error names the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use http::{HeaderName, Uri};
use idemgate::tls::CertificateDer;
use idemgate::usage::{ModelPrice, Prices};
use idemgate::{
    DerivedKey, KeyForwarding, KeyRequirement, OnInFlight, OnStoreError, Policy, ReplayPace, Scope, Secret,
    ServerErrors,
};
use idemgate_proxy::{Route, Timeouts};
use serde::Deserialize;

/// `--listen`'s environment twin, and so on for each flag.
pub(crate) const ENV_CONFIG: &str = "IDEMGATE_CONFIG";

/// The flags shared by `serve`, `inspect`, `purge` and `check-config`. Each has an
/// `IDEMGATE_*` environment twin; a flag beats its variable, and both beat the file.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ConfigArgs {
    /// TOML file with settings and routes
    #[arg(long, env = ENV_CONFIG, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Address of the proxy listener [default: 127.0.0.1:8080]
    #[arg(long, env = "IDEMGATE_LISTEN", value_name = "ADDR")]
    pub(crate) listen: Option<String>,
    /// Address of the admin listener (/metrics, /healthz, /readyz) [default: 127.0.0.1:9090]
    #[arg(long, env = "IDEMGATE_ADMIN_LISTEN", value_name = "ADDR")]
    pub(crate) admin_listen: Option<String>,
    // `help` rather than a doc comment: rustdoc would flag the bare URL.
    #[arg(
        long,
        env = "IDEMGATE_UPSTREAM",
        value_name = "URL",
        help = "Upstream base URL when no routes are configured [default: https://api.openai.com]"
    )]
    pub(crate) upstream: Option<String>,
    #[arg(
        long,
        env = "IDEMGATE_STORE",
        value_name = "URL",
        help = "Store URL: sqlite://PATH, memory://, redis[s]://…, redis[s]+cluster://… or postgres://… \
                [default: sqlite://idemgate.db]"
    )]
    pub(crate) store: Option<String>,
    /// How long completed records are kept, e.g. 24h [default: 24h]
    #[arg(long, env = "IDEMGATE_TTL", value_name = "DURATION")]
    pub(crate) ttl: Option<String>,
    /// How long a claim lives without renewal, e.g. 30s [default: 30s]
    #[arg(long, env = "IDEMGATE_LEASE", value_name = "DURATION")]
    pub(crate) lease: Option<String>,
    /// What a duplicate does while the original runs: wait or conflict [default: wait]
    #[arg(long = "on-inflight", env = "IDEMGATE_ON_INFLIGHT", value_name = "POLICY")]
    pub(crate) on_inflight: Option<String>,
    /// Longest wait for an in-flight original before 409 [default: 60s]
    #[arg(long, env = "IDEMGATE_MAX_WAIT", value_name = "DURATION")]
    pub(crate) max_wait: Option<String>,
    /// Refuse requests without a key (400)
    #[arg(long, env = "IDEMGATE_REQUIRE_KEY", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub(crate) require_key: Option<bool>,
    /// Forward without protection when the store fails, instead of 503
    #[arg(long, env = "IDEMGATE_FAIL_OPEN", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub(crate) fail_open: Option<bool>,
    /// Largest request body in bytes; larger ones get 413 [default: 33554432]
    #[arg(long, env = "IDEMGATE_MAX_BODY", value_name = "BYTES")]
    pub(crate) max_body: Option<u64>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "IDEMGATE_LOG_FORMAT", value_name = "FORMAT")]
    pub(crate) log_format: Option<String>,
    /// Threads that serve requests [default: one per core]
    #[arg(long, env = "IDEMGATE_THREADS", value_name = "N")]
    pub(crate) threads: Option<usize>,
    /// PEM file of CA certificates trusted for https upstreams, beside the public roots
    #[arg(long, env = "IDEMGATE_UPSTREAM_CA_FILE", value_name = "FILE")]
    pub(crate) upstream_ca_file: Option<PathBuf>,
    /// Secret that keys tenant hashes; set it so credentials cannot be tested offline
    #[arg(long, env = "IDEMGATE_TENANT_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub(crate) tenant_secret: Option<String>,
}

/// The settings as written, before any check.
///
/// Unknown keys are collected and refused by `Config::try_from` (serde's
/// `deny_unknown_fields` does not work together with `flatten`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct RawConfig {
    /// Proxy listener address.
    pub(crate) listen: Option<String>,
    /// Admin listener address.
    pub(crate) admin_listen: Option<String>,
    /// Upstream base URL of the default route.
    pub(crate) upstream: Option<String>,
    /// Store URL.
    pub(crate) store: Option<String>,
    /// `text` or `json`.
    pub(crate) log_format: Option<String>,
    /// Threads that serve requests.
    pub(crate) threads: Option<usize>,
    /// CA certificates (PEM) trusted for https upstreams, beside the public roots.
    pub(crate) upstream_ca_file: Option<PathBuf>,
    /// Secret keying tenant hashes.
    pub(crate) tenant_secret: Option<String>,
    /// Header naming the tenant, instead of the credential.
    pub(crate) tenant_header: Option<String>,
    /// Other headers accepted as the idempotency key.
    pub(crate) key_aliases: Option<Vec<String>>,
    /// Upstream connect timeout.
    pub(crate) connect_timeout: Option<String>,
    /// Upstream time to response head.
    pub(crate) upstream_timeout: Option<String>,
    /// Longest silence between upstream body frames.
    pub(crate) idle_timeout: Option<String>,
    /// How often expired records are swept.
    pub(crate) sweep_interval: Option<String>,
    /// Prices per model, to count the money replays save.
    pub(crate) prices: Option<RawPrices>,
    /// Route defaults, overridable per route.
    #[serde(flatten)]
    pub(crate) policy: RawPolicy,
    /// Routes; without any, one route `default` sends everything to `upstream`.
    #[serde(default)]
    pub(crate) routes: Vec<RawRoute>,
    /// Keys no field took: refused.
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, toml::Value>,
}

/// Policy settings, global or per route.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct RawPolicy {
    /// Completed-record TTL.
    pub(crate) ttl: Option<String>,
    /// Claim lease.
    pub(crate) lease: Option<String>,
    /// `wait` or `conflict`.
    pub(crate) on_inflight: Option<String>,
    /// Longest wait for an in-flight original.
    pub(crate) max_wait: Option<String>,
    /// Whether a key is required.
    pub(crate) require_key: Option<bool>,
    /// Forward unprotected when the store fails.
    pub(crate) fail_open: Option<bool>,
    /// Store and replay upstream 5xx answers.
    pub(crate) store_server_errors: Option<bool>,
    /// Largest request body, bytes.
    pub(crate) max_body: Option<u64>,
    /// What the upstream sees of the key header.
    pub(crate) key_forwarding: Option<RawForwarding>,
    /// A key derived from headers for requests without one.
    pub(crate) derived_key: Option<RawDerivedKey>,
    /// `immediate` or `recorded`: how recorded streams are replayed.
    pub(crate) replay_pace: Option<String>,
}

/// `[prices]`: `currency` and a `[prices.models]` table of per-million-token prices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawPrices {
    /// The unit of every price, e.g. `USD`.
    #[serde(default = "default_currency")]
    pub(crate) currency: String,
    /// Model name (or prefix) → prices.
    #[serde(default)]
    pub(crate) models: BTreeMap<String, RawModelPrice>,
}

fn default_currency() -> String {
    "USD".into()
}

/// One model's prices per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawModelPrice {
    /// Input tokens.
    pub(crate) input: f64,
    /// Cached input tokens (default: the input price).
    pub(crate) cached_input: Option<f64>,
    /// Output tokens (reasoning included).
    pub(crate) output: f64,
}

/// `key-forwarding = "forward" | "strip" | { rename = "header" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) enum RawForwarding {
    /// Unchanged.
    Forward,
    /// Removed.
    Strip,
    /// Under another name.
    Rename(String),
}

/// `derived-key = { headers = [...], bucket = "1m" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawDerivedKey {
    /// Headers whose values make the key.
    pub(crate) headers: Vec<String>,
    /// The time bucket.
    pub(crate) bucket: String,
}

/// One `[[routes]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct RawRoute {
    /// Names the route in metrics, logs and storage keys.
    pub(crate) name: String,
    /// Path prefix.
    pub(crate) prefix: String,
    /// Upstream base URL.
    pub(crate) upstream: String,
    /// Remove the prefix before forwarding.
    #[serde(default)]
    pub(crate) strip_prefix: bool,
    /// Overrides of the global policy.
    #[serde(flatten)]
    pub(crate) policy: RawPolicy,
    /// Keys no field took: refused.
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, toml::Value>,
}

/// Where records live.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum StoreUrl {
    /// `memory://`
    Memory,
    /// `sqlite://PATH`
    Sqlite(PathBuf),
    /// `redis://…`, `rediss://…` or `redis+cluster://h1,h2,…`, as written.
    Redis(String),
    /// `postgres://…` or `postgresql://…`, as written.
    Postgres(String),
}

/// Shown with any password replaced: URLs reach logs and `check-config` output.
impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory => f.write_str("memory://"),
            Self::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            Self::Redis(url) | Self::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreUrl({self})")
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') { format!("{user}:***") } else { user.to_owned() };
            format!("{scheme}://{masked}@{hosts}{tail}")
        }
        None => url.to_owned(),
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A route, checked.
#[derive(Debug, Clone)]
pub(crate) struct RouteConfig {
    /// Route name.
    pub(crate) name: String,
    /// Path prefix.
    pub(crate) prefix: String,
    /// Upstream base URL.
    pub(crate) upstream: Uri,
    /// Remove the prefix before forwarding.
    pub(crate) strip_prefix: bool,
    /// The route's policy.
    pub(crate) policy: Policy,
}

impl RouteConfig {
    /// The proxy route.
    pub(crate) fn to_route(&self) -> Route {
        Route::new(self.prefix.clone(), self.upstream.clone(), self.policy.clone()).with_strip_prefix(self.strip_prefix)
    }
}

/// The settings, checked and typed.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Proxy listener.
    pub(crate) listen: SocketAddr,
    /// Admin listener.
    pub(crate) admin_listen: SocketAddr,
    /// Store.
    pub(crate) store: StoreUrl,
    /// Routes (at least one).
    pub(crate) routes: Vec<RouteConfig>,
    /// Upstream client timeouts.
    pub(crate) timeouts: Timeouts,
    /// Log format.
    pub(crate) log_format: LogFormat,
    /// How often expired records are swept.
    pub(crate) sweep_interval: Duration,
    /// Threads that serve requests: one per core unless set.
    pub(crate) threads: NonZeroUsize,
    /// The file named by `upstream-ca-file` and the certificates it holds.
    pub(crate) upstream_ca: Option<(PathBuf, Vec<CertificateDer<'static>>)>,
    /// Tenant scoping, shared by every route.
    pub(crate) scope: Scope,
}

/// A setting that cannot be used. The message names the field.
#[derive(Debug, thiserror::Error)]
#[error("invalid `{field}`: {problem}")]
pub(crate) struct ConfigError {
    field: String,
    problem: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, problem: impl std::fmt::Display) -> Self {
        Self { field: field.into(), problem: problem.to_string() }
    }

    /// The offending field, as written in the file (`routes[1].ttl`).
    #[cfg(test)]
    pub(crate) fn field(&self) -> &str {
        &self.field
    }
}

/// Reads the file (if any) and lays the flags over it, then checks everything.
pub(crate) fn load(args: &ConfigArgs) -> Result<Config, ConfigError> {
    let mut raw = match &args.config {
        Some(path) => read_file(path)?,
        None => RawConfig::default(),
    };
    raw.apply(args);
    Config::try_from(raw)
}

fn read_file(path: &Path) -> Result<RawConfig, ConfigError> {
    let field = format!("--config {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&field, format!("cannot read it: {e}")))?;
    toml::from_str(&text).map_err(|e| ConfigError::new(&field, e.to_string().trim_end()))
}

impl RawConfig {
    /// Lays flags (and their environment twins) over the file's values.
    pub(crate) fn apply(&mut self, a: &ConfigArgs) {
        fn set<T: Clone>(slot: &mut Option<T>, v: &Option<T>) {
            if v.is_some() {
                slot.clone_from(v);
            }
        }
        set(&mut self.listen, &a.listen);
        set(&mut self.admin_listen, &a.admin_listen);
        set(&mut self.upstream, &a.upstream);
        set(&mut self.store, &a.store);
        set(&mut self.log_format, &a.log_format);
        set(&mut self.threads, &a.threads);
        set(&mut self.upstream_ca_file, &a.upstream_ca_file);
        set(&mut self.tenant_secret, &a.tenant_secret);
        set(&mut self.policy.ttl, &a.ttl);
        set(&mut self.policy.lease, &a.lease);
        set(&mut self.policy.on_inflight, &a.on_inflight);
        set(&mut self.policy.max_wait, &a.max_wait);
        set(&mut self.policy.require_key, &a.require_key);
        set(&mut self.policy.fail_open, &a.fail_open);
        set(&mut self.policy.max_body, &a.max_body);
    }
}

/// `30s`, `24h`, `1h 30m`.
fn duration(field: &str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v)
        .map_err(|e| ConfigError::new(field, format!("{e} (write durations like 30s, 5m, 24h)")))
}

fn addr(field: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|e| ConfigError::new(field, format!("{e} (write an address like 127.0.0.1:8080)")))
}

fn header(field: &str, v: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(v.as_bytes()).map_err(|_| ConfigError::new(field, format!("{v:?} is not a header name")))
}

fn upstream(field: &str, v: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = v.parse().map_err(|e| ConfigError::new(field, e))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.authority().is_none() || uri.query().is_some() {
        return Err(ConfigError::new(field, format!("{v:?} is not an http:// or https:// base URL")));
    }
    Ok(uri)
}

fn store_url(v: &str) -> Result<StoreUrl, ConfigError> {
    if v == "memory://" || v == "memory" {
        return Ok(StoreUrl::Memory);
    }
    if let Some(path) = v.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(ConfigError::new("store", "sqlite:// needs a path, e.g. sqlite://idemgate.db"));
        }
        return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
    }
    let scheme = v.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("redis" | "rediss" | "redis+cluster" | "rediss+cluster") if v.len() > scheme.map_or(0, str::len) + 3 => {
            Ok(StoreUrl::Redis(v.to_owned()))
        }
        Some("postgres" | "postgresql") => Ok(StoreUrl::Postgres(v.to_owned())),
        _ => Err(ConfigError::new(
            "store",
            format!(
                "{}: expected sqlite://PATH, memory://, redis://HOST:PORT, redis+cluster://H1,H2,... or postgres://...",
                redact(v)
            ),
        )),
    }
}

impl RawPolicy {
    /// This route's settings over the global ones.
    fn over(&self, global: &RawPolicy) -> RawPolicy {
        fn pick<T: Clone>(a: &Option<T>, b: &Option<T>) -> Option<T> {
            a.clone().or_else(|| b.clone())
        }
        RawPolicy {
            ttl: pick(&self.ttl, &global.ttl),
            lease: pick(&self.lease, &global.lease),
            on_inflight: pick(&self.on_inflight, &global.on_inflight),
            max_wait: pick(&self.max_wait, &global.max_wait),
            require_key: pick(&self.require_key, &global.require_key),
            fail_open: pick(&self.fail_open, &global.fail_open),
            store_server_errors: pick(&self.store_server_errors, &global.store_server_errors),
            max_body: pick(&self.max_body, &global.max_body),
            key_forwarding: pick(&self.key_forwarding, &global.key_forwarding),
            derived_key: pick(&self.derived_key, &global.derived_key),
            replay_pace: pick(&self.replay_pace, &global.replay_pace),
        }
    }

    fn to_policy(&self, at: &str, route: &str, base: Policy) -> Result<Policy, ConfigError> {
        let f = |name: &str| if at.is_empty() { name.to_owned() } else { format!("{at}.{name}") };
        let mut p = base.with_route(route);
        if let Some(v) = &self.ttl {
            p = p.with_ttl(duration(&f("ttl"), v)?);
        }
        if let Some(v) = &self.lease {
            let lease = duration(&f("lease"), v)?;
            if lease < Duration::from_millis(100) {
                return Err(ConfigError::new(f("lease"), "must be at least 100ms"));
            }
            p = p.with_lease(lease);
        }
        if let Some(v) = &self.on_inflight {
            p = p.with_on_in_flight(match v.as_str() {
                "wait" => OnInFlight::Wait,
                "conflict" => OnInFlight::Conflict,
                other => {
                    return Err(ConfigError::new(f("on-inflight"), format!("{other:?}: expected wait or conflict")));
                }
            });
        }
        if let Some(v) = &self.max_wait {
            p = p.with_max_wait(duration(&f("max-wait"), v)?);
        }
        if let Some(v) = self.require_key {
            p = p.with_key_requirement(if v { KeyRequirement::Required } else { KeyRequirement::Optional });
        }
        if let Some(v) = self.fail_open {
            p = p.with_on_store_error(if v { OnStoreError::FailOpen } else { OnStoreError::FailClosed });
        }
        if let Some(v) = self.store_server_errors {
            p = p.with_server_errors(if v { ServerErrors::Store } else { ServerErrors::Release });
        }
        if let Some(v) = self.max_body {
            let bytes = usize::try_from(v).ok().filter(|&b| b > 0);
            p = p.with_max_body(bytes.ok_or_else(|| ConfigError::new(f("max-body"), "must be a positive byte count"))?);
        }
        if let Some(v) = &self.key_forwarding {
            p = p.with_key_forwarding(match v {
                RawForwarding::Forward => KeyForwarding::Forward,
                RawForwarding::Strip => KeyForwarding::Strip,
                RawForwarding::Rename(to) => KeyForwarding::Rename(header(&f("key-forwarding.rename"), to)?),
            });
        }
        if let Some(v) = &self.replay_pace {
            p = p.with_replay_pace(match v.as_str() {
                "immediate" => ReplayPace::Immediate,
                "recorded" => ReplayPace::Recorded,
                other => {
                    return Err(ConfigError::new(
                        f("replay-pace"),
                        format!("{other:?}: expected immediate or recorded"),
                    ));
                }
            });
        }
        if let Some(d) = &self.derived_key {
            if d.headers.is_empty() {
                return Err(ConfigError::new(f("derived-key.headers"), "name at least one header"));
            }
            let headers =
                d.headers.iter().map(|h| header(&f("derived-key.headers"), h)).collect::<Result<Vec<_>, _>>()?;
            let bucket = duration(&f("derived-key.bucket"), &d.bucket)?;
            if bucket < Duration::from_secs(1) {
                return Err(ConfigError::new(f("derived-key.bucket"), "must be at least 1s"));
            }
            p = p.with_derived_key(DerivedKey::new(headers, bucket));
        }
        Ok(p)
    }
}

fn prices_of(raw: &RawPrices) -> Result<Prices, ConfigError> {
    if raw.currency.trim().is_empty() {
        return Err(ConfigError::new("prices.currency", "must not be empty"));
    }
    let mut prices = Prices::new(raw.currency.trim());
    for (model, p) in &raw.models {
        let field = |name: &str| format!("prices.models.{model:?}.{name}");
        let check = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 { Ok(v) } else { Err(ConfigError::new(field(name), "must be a price >= 0")) }
        };
        let price = ModelPrice {
            input: check("input", p.input)?,
            cached_input: p.cached_input.map(|v| check("cached-input", v)).transpose()?,
            output: check("output", p.output)?,
        };
        prices = prices.with_model(model.clone(), price);
    }
    Ok(prices)
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        if let Some(k) = raw.unknown.keys().next() {
            return Err(ConfigError::new(k, "unknown setting"));
        }
        for (i, r) in raw.routes.iter().enumerate() {
            if let Some(k) = r.unknown.keys().next() {
                return Err(ConfigError::new(format!("routes[{i}].{k}"), "unknown setting"));
            }
        }
        let listen = addr("listen", raw.listen.as_deref().unwrap_or("127.0.0.1:8080"))?;
        let admin_listen = addr("admin-listen", raw.admin_listen.as_deref().unwrap_or("127.0.0.1:9090"))?;
        let store = store_url(raw.store.as_deref().unwrap_or("sqlite://idemgate.db"))?;
        let log_format = match raw.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(ConfigError::new("log-format", format!("{other:?}: expected text or json"))),
        };
        let defaults = Timeouts::default();
        let timeout = |field: &str, v: &Option<String>, default: Duration| match v {
            Some(v) => duration(field, v),
            None => Ok(default),
        };
        let timeouts = Timeouts {
            connect: timeout("connect-timeout", &raw.connect_timeout, defaults.connect)?,
            response: timeout("upstream-timeout", &raw.upstream_timeout, defaults.response)?,
            idle: timeout("idle-timeout", &raw.idle_timeout, defaults.idle)?,
        };
        let sweep_interval = timeout("sweep-interval", &raw.sweep_interval, Duration::from_secs(60))?;
        let threads = match raw.threads {
            None => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            Some(n) => NonZeroUsize::new(n).ok_or_else(|| ConfigError::new("threads", "must be at least 1"))?,
        };

        let mut scope = match &raw.tenant_secret {
            Some(s) if s.is_empty() => return Err(ConfigError::new("tenant-secret", "must not be empty")),
            Some(s) => Scope::new(Secret::new(s.as_bytes())),
            None => Scope::default(),
        };
        if let Some(h) = &raw.tenant_header {
            scope = scope.with_tenant_header(header("tenant-header", h)?);
        }
        let aliases = match &raw.key_aliases {
            Some(names) => names.iter().map(|n| header("key-aliases", n)).collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let mut base = Policy::default().with_scope(scope.clone()).with_key_aliases(aliases);
        if let Some(prices) = &raw.prices {
            base = base.with_prices(Arc::new(prices_of(prices)?));
        }

        let routes = if !raw.routes.is_empty() {
            if raw.upstream.is_some() {
                return Err(ConfigError::new(
                    "upstream",
                    "set each route's upstream instead when routes are configured",
                ));
            }
            let mut names = std::collections::HashSet::new();
            raw.routes
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let at = format!("routes[{i}]");
                    if r.name.is_empty() || !names.insert(r.name.clone()) {
                        return Err(ConfigError::new(
                            format!("{at}.name"),
                            format!("{:?} is empty or used twice", r.name),
                        ));
                    }
                    if !r.prefix.starts_with('/') {
                        return Err(ConfigError::new(format!("{at}.prefix"), "must start with /"));
                    }
                    Ok(RouteConfig {
                        name: r.name.clone(),
                        prefix: r.prefix.clone(),
                        upstream: upstream(&format!("{at}.upstream"), &r.upstream)?,
                        strip_prefix: r.strip_prefix,
                        policy: r.policy.over(&raw.policy).to_policy(&at, &r.name, base.clone())?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            vec![RouteConfig {
                name: "default".into(),
                prefix: "/".into(),
                upstream: upstream("upstream", raw.upstream.as_deref().unwrap_or("https://api.openai.com"))?,
                strip_prefix: false,
                policy: raw.policy.to_policy("", "default", base)?,
            }]
        };
        let upstream_ca = match raw.upstream_ca_file {
            Some(path) => {
                let certs =
                    idemgate::tls::ca_certificates(&path).map_err(|e| ConfigError::new("upstream-ca-file", e))?;
                Some((path, certs))
            }
            None => None,
        };
        Ok(Config {
            listen,
            admin_listen,
            store,
            routes,
            timeouts,
            log_format,
            sweep_interval,
            threads,
            upstream_ca,
            scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Config, ConfigError> {
        Config::try_from(toml::from_str::<RawConfig>(toml_text).map_err(|e| ConfigError::new("file", e))?)
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::try_from(RawConfig::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.store, StoreUrl::Sqlite("idemgate.db".into()));
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].upstream, "https://api.openai.com");
        assert_eq!(c.routes[0].policy.ttl(), Duration::from_secs(86400));
    }

    #[test]
    fn routes_inherit_and_override_the_globals() {
        let c = parse(
            r#"
            ttl = "1h"
            store = "memory://"
            [[routes]]
            name = "openai"
            prefix = "/openai"
            upstream = "https://api.openai.com"
            strip-prefix = true
            [[routes]]
            name = "anthropic"
            prefix = "/anthropic"
            upstream = "https://api.anthropic.com"
            ttl = "2h"
            key-forwarding = { rename = "x-provider-key" }
            derived-key = { headers = ["x-user-id", "x-operation-id"], bucket = "1m" }
            "#,
        )
        .unwrap();
        assert_eq!(c.routes[0].policy.ttl(), Duration::from_secs(3600));
        assert_eq!(c.routes[1].policy.ttl(), Duration::from_secs(7200));
        assert_eq!(c.routes[1].policy.route(), "anthropic");
        assert!(c.routes[0].strip_prefix);
        assert_eq!(c.store, StoreUrl::Memory);
    }

    #[test]
    fn errors_name_the_field() {
        let field = |t: &str| parse(t).unwrap_err().field().to_owned();
        assert_eq!(field(r#"ttl = "forever""#), "ttl");
        assert_eq!(field(r#"listen = "nowhere""#), "listen");
        assert_eq!(field(r#"store = "mysql://x""#), "store");
        assert_eq!(field(r#"on-inflight = "maybe""#), "on-inflight");
        assert_eq!(
            field("[[routes]]\nname = \"a\"\nprefix = \"/a\"\nupstream = \"https://x\"\nlease = \"1ms\""),
            "routes[0].lease"
        );
        assert_eq!(field("[[routes]]\nname = \"a\"\nprefix = \"a\"\nupstream = \"https://x\""), "routes[0].prefix");
        assert_eq!(field("[[routes]]\nname = \"a\"\nprefix = \"/a\"\nupstream = \"ftp://x\""), "routes[0].upstream");
        // Unknown keys are refused, not ignored.
        assert_eq!(field("tll = \"1h\""), "tll");
        assert_eq!(
            field("[[routes]]\nname = \"a\"\nprefix = \"/a\"\nupstream = \"https://x\"\nttll = \"1h\""),
            "routes[0].ttll"
        );
    }

    #[test]
    fn prices_and_replay_pace_are_read_and_checked() {
        let c = parse(
            "replay-pace = \"recorded\"\n[prices]\ncurrency = \"EUR\"\n\
             [prices.models]\n\"gpt-4o\" = { input = 2.5, cached-input = 1.25, output = 10.0 }",
        )
        .unwrap();
        assert_eq!(c.routes[0].policy.route(), "default");
        assert_eq!(parse("replay-pace = \"slow\"").unwrap_err().field(), "replay-pace");
        assert_eq!(
            parse("[prices.models]\n\"m\" = { input = -1.0, output = 1.0 }").unwrap_err().field(),
            "prices.models.\"m\".input"
        );
    }

    #[test]
    fn store_urls_are_recognised_and_passwords_never_shown() {
        assert_eq!(store_url("redis://127.0.0.1:6379").unwrap(), StoreUrl::Redis("redis://127.0.0.1:6379".into()));
        assert!(matches!(store_url("redis+cluster://a:1,b:2").unwrap(), StoreUrl::Redis(_)));
        assert!(matches!(store_url("rediss+cluster://a:1,b:2/?cacert=/ca.pem").unwrap(), StoreUrl::Redis(_)));
        let pg = store_url("postgres://app:hunter2@db:5432/idem").unwrap();
        assert_eq!(pg.to_string(), "postgres://app:***@db:5432/idem");
        assert!(!format!("{pg:?}").contains("hunter2"));
        let err = store_url("mysql://app:hunter2@db/x").unwrap_err().to_string();
        assert!(err.contains("mysql://app:***@db/x") && !err.contains("hunter2"), "{err}");
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn an_upstream_ca_file_is_read_at_load_and_a_bad_one_names_the_setting() {
        use idemgate_testkit::pki::{NOT_A_CERTIFICATE_PEM, TEST_CA_PEM};

        let dir = tempfile::tempdir().unwrap();
        let load = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let mut raw = RawConfig::default();
            raw.apply(&ConfigArgs { upstream_ca_file: Some(path.clone()), ..ConfigArgs::default() });
            (path, Config::try_from(raw))
        };
        let (path, loaded) = load("two.pem", &format!("{TEST_CA_PEM}{TEST_CA_PEM}"));
        let (read, certs) = loaded.unwrap().upstream_ca.expect("read");
        assert_eq!((read, certs.len()), (path, 2));
        idemgate_proxy::UpstreamClient::trusting(Timeouts::default(), certs).expect("a client trusting them");
        assert!(Config::try_from(RawConfig::default()).unwrap().upstream_ca.is_none());

        let (path, loaded) = load("key.pem", NOT_A_CERTIFICATE_PEM);
        let err = loaded.unwrap_err();
        assert_eq!(err.field(), "upstream-ca-file");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()) && text.contains("holds no PEM certificate"), "{text}");
    }

    #[test]
    fn threads_default_to_the_cores_and_are_at_least_one() {
        let cores = std::thread::available_parallelism().unwrap();
        assert_eq!(Config::try_from(RawConfig::default()).unwrap().threads, cores);
        assert_eq!(parse("threads = 3").unwrap().threads.get(), 3);
        assert_eq!(parse("threads = 0").unwrap_err().field(), "threads");
        let mut raw: RawConfig = toml::from_str("threads = 3").unwrap();
        raw.apply(&ConfigArgs { threads: Some(1), ..ConfigArgs::default() });
        assert_eq!(Config::try_from(raw).unwrap().threads.get(), 1);
    }

    #[test]
    fn flags_beat_the_file() {
        let mut raw: RawConfig = toml::from_str("ttl = \"1h\"\nlisten = \"127.0.0.1:1\"").unwrap();
        raw.apply(&ConfigArgs { ttl: Some("2h".into()), ..ConfigArgs::default() });
        let c = Config::try_from(raw).unwrap();
        assert_eq!(c.routes[0].policy.ttl(), Duration::from_secs(7200));
        assert_eq!(c.listen.port(), 1);
    }
}
