//! idemgate makes LLM API calls happen once.
//!
//! A client sends the same logical request again (after a timeout, a dropped
//! connection, a crash) with the same `Idempotency-Key`, and gets the original result
//! back instead of a second generation and a second bill. This crate is the engine:
//! a [`tower::Layer`](tower_layer::Layer) around any HTTP service, the [`Store`] trait
//! and the in-memory store. `idemgate-sqlite` is the embedded default store, and the
//! `idemgate` binary puts the same layer in front of OpenAI- and Anthropic-compatible
//! APIs.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//!
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use idemgate::{IdempotencyLayer, MemoryStore, RequestBody};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counter = calls.clone();
//! let generate = service_fn(move |_req: Request<RequestBody>| {
//!     let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
//!     async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("generation {n}"))))) }
//! });
//! let svc = ServiceBuilder::new().layer(IdempotencyLayer::new(Arc::new(MemoryStore::new()))).service(generate);
//!
//! let request = || {
//!     Request::post("/v1/chat/completions")
//!         .header("idempotency-key", "order-42-confirmation")
//!         .body(Full::new(Bytes::from_static(br#"{"model":"m","messages":[]}"#)))
//! };
//! let first = svc.clone().oneshot(request()?).await?;
//! assert_eq!(first.headers()["idempotent-replayed"], "false");
//! let first = first.into_body().collect().await?.to_bytes();
//!
//! let retry = svc.clone().oneshot(request()?).await?;
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(retry.into_body().collect().await?.to_bytes(), first);
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # Ok(())
//! # }
//! ```
//!
//! What each request gets is SPEC section 5: the first request with a key executes
//! and is recorded; a duplicate gets the recorded status, headers (an allow-list) and
//! body, byte for byte, with `Idempotent-Replayed: true`; a duplicate of a call still
//! running waits for it (or gets `409` under the `conflict` policy); the same key on
//! a different request gets `422`. Transient outcomes (408, 409, 425, 429, 5xx,
//! broken bodies) are released so the retry executes again. See [`layer`] for
//! concurrent duplicates and client disconnects.

pub mod body;
pub mod clock;
pub mod error;
pub mod fingerprint;
mod flight;
pub mod key;
pub mod layer;
mod live;
pub mod metrics;
pub mod policy;
pub mod problem;
pub mod record;
mod recording;
pub mod scope;
pub mod sse;
pub mod store;
#[cfg(feature = "tls")]
pub mod tls;
pub mod usage;

pub use body::ResponseBody;
pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use error::{BoxError, ErrorKind, StoreError};
pub use fingerprint::Fingerprint;
/// The `http` crate whose header types stored responses carry, for stores built on
/// this one.
pub use http;
pub use key::{IDEMPOTENCY_KEY, Key, KeyError};
pub use layer::{IDEMPOTENT_REPLAYED, Idempotency, IdempotencyLayer, RequestBody};
pub use policy::{
    DerivedKey, KeyForwarding, KeyRequirement, OnInFlight, OnStoreError, Policy, ReplayPace, ServerErrors,
};
pub use problem::PROBLEM_BASE;
pub use record::{Record, RecordState, StoredResponse, Token};
pub use scope::{Scope, Secret, StorageKey, Tenant};
pub use store::{Claim, Lease, MemoryStore, Store};
