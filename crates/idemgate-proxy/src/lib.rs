//! The idemgate reverse proxy: the idempotency layer around an upstream client.
//!
//! A client changes only its SDK's `base_url` to point here and sends an
//! `Idempotency-Key`; [`Proxy`] picks the route by path prefix and runs the request
//! through that route's [`IdempotencyLayer`](idemgate::IdempotencyLayer) around an
//! [`Upstream`]. Responses stream to the client as they arrive.
//!
//! ```no_run
//! use std::sync::Arc;
//! use idemgate::{MemoryStore, Policy};
//! use idemgate_proxy::{Proxy, Route, Timeouts, UpstreamClient, serve};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = UpstreamClient::new(Timeouts::default())?;
//! let route = Route::new("/", "https://api.openai.com".parse()?, Policy::default().with_route("openai"));
//! let proxy = Proxy::new(vec![route], Arc::new(MemoryStore::new()), client)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! serve(listener, proxy, async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```

mod h1;
mod headers;
mod route;
mod server;
mod upstream;

pub use route::{Proxy, Route};
pub use server::{Admin, SHUTDOWN_GRACE, open_connections, serve, serve_admin, serve_on_cores, serve_on_threads};
pub use upstream::{
    ClientError, IdleTimeoutError, Target, TargetError, Timeouts, UPSTREAM_REQUESTS_TOTAL, UPSTREAM_SECONDS, Upstream,
    UpstreamClient,
};
