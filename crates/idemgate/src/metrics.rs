//! The metrics the engine emits through the `metrics` facade. The library owns no
//! registry: the binary installs a recorder (Prometheus in `idemgate serve`), and a
//! library user may install any other or none, before the layer serves its first
//! request: each layer takes its handles then (see `Meters`).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram};

use crate::usage::{Prices, Usage};

/// Requests by `route` and `outcome` (see [`Outcome`]).
pub const REQUESTS_TOTAL: &str = "idemgate_requests_total";
/// Requests that found their key already claimed or completed.
pub const DUPLICATES_TOTAL: &str = "idemgate_duplicates_total";
/// Store operation latency in seconds, by `backend` and `op`.
pub const STORE_OP_SECONDS: &str = "idemgate_store_op_seconds";
/// Store operations that failed, by `backend` and `op`.
pub const STORE_ERRORS_TOTAL: &str = "idemgate_store_errors_total";
/// Calls this process is executing for a key right now.
pub const INFLIGHT: &str = "idemgate_inflight";
/// Claims that took over an expired lease.
pub const LEASE_TAKEOVERS_TOTAL: &str = "idemgate_lease_takeovers_total";
/// Completions or releases refused because the lease had been lost.
pub const LEASE_LOST_TOTAL: &str = "idemgate_lease_lost_total";
/// Tokens that replays and joins did not pay for again, by `kind` (`input`,
/// `cached_input`, `output`, `reasoning`).
pub const TOKENS_SAVED_TOTAL: &str = "idemgate_tokens_saved_total";
/// Money that replays and joins did not spend again, by `currency`, from the
/// configured price table: a gauge that only grows (money is fractional).
pub const COST_SAVED_TOTAL: &str = "idemgate_cost_saved_total";

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Forwarded under a fresh claim; the result is being recorded.
    Executed,
    /// Forwarded under a claim, with a result that will not be stored (a transient
    /// status or a failure): the claim is released so a retry executes again.
    Released,
    /// Answered from a completed record.
    Replayed,
    /// Waited for the in-flight original and got its result.
    Joined,
    /// The original was in flight and the request was not allowed to wait: 409.
    Conflict,
    /// The key was used for another request: 422.
    Mismatch,
    /// No key: forwarded without protection.
    Bypassed,
    /// The key (or a required key) was missing or malformed: 400.
    InvalidKey,
    /// The request was refused before any claim (body too large or unreadable).
    Rejected,
    /// The store failed: 503, or forwarded without protection under `fail_open`.
    StoreError,
}

impl Outcome {
    /// Every outcome, in the order of [`Self::index`].
    pub(crate) const ALL: [Self; 10] = [
        Self::Executed,
        Self::Released,
        Self::Replayed,
        Self::Joined,
        Self::Conflict,
        Self::Mismatch,
        Self::Bypassed,
        Self::InvalidKey,
        Self::Rejected,
        Self::StoreError,
    ];

    /// The position in [`Self::ALL`]: a match, so that a new outcome does not compile
    /// until it has a place there.
    const fn index(self) -> usize {
        match self {
            Self::Executed => 0,
            Self::Released => 1,
            Self::Replayed => 2,
            Self::Joined => 3,
            Self::Conflict => 4,
            Self::Mismatch => 5,
            Self::Bypassed => 6,
            Self::InvalidKey => 7,
            Self::Rejected => 8,
            Self::StoreError => 9,
        }
    }

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Released => "released",
            Self::Replayed => "replayed",
            Self::Joined => "joined",
            Self::Conflict => "conflict",
            Self::Mismatch => "mismatch",
            Self::Bypassed => "bypassed",
            Self::InvalidKey => "invalid_key",
            Self::Rejected => "rejected",
            Self::StoreError => "store_error",
        }
    }
}

/// Registers descriptions of every metric with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(REQUESTS_TOTAL, "Requests by route and outcome");
    describe_counter!(DUPLICATES_TOTAL, "Requests whose key was already claimed or completed");
    describe_histogram!(STORE_OP_SECONDS, metrics::Unit::Seconds, "Store operation latency by backend and op");
    describe_counter!(STORE_ERRORS_TOTAL, "Store operations that failed, by backend and op");
    describe_gauge!(INFLIGHT, "Keyed calls this process is executing now");
    describe_counter!(LEASE_TAKEOVERS_TOTAL, "Claims that took over an expired lease");
    describe_counter!(LEASE_LOST_TOTAL, "Completions or releases refused because the lease was lost");
    describe_counter!(TOKENS_SAVED_TOTAL, "Tokens replays and joins did not pay for again, by kind");
    describe_gauge!(COST_SAVED_TOTAL, "Money replays and joins did not spend again, by currency (only grows)");
}

/// Handles of one layer's per-request metrics, taken at its first request: looking a
/// labelled metric up in the recorder's registry costs more than the increment, and
/// a replay made six such lookups. A recorder installed after a layer served its
/// first request is not seen by that layer.
pub(crate) struct Meters {
    requests: [Counter; Outcome::ALL.len()],
    duplicates: Counter,
    /// `claim`, `complete`, `release`, `renew` latency for the layer's store.
    ops: [Histogram; 4],
    /// By [`Usage::kinds`], in its order.
    tokens: [Counter; 4],
    /// The price table and the gauge of its currency.
    cost: Option<(Arc<Prices>, Gauge)>,
    inflight: Gauge,
    backend: &'static str,
}

/// A store operation, as [`Meters::timed`] labels it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Claim,
    Complete,
    Release,
    Renew,
}

impl Op {
    /// Every op, in the order of [`Self::index`].
    const ALL: [Self; 4] = [Self::Claim, Self::Complete, Self::Release, Self::Renew];

    const fn index(self) -> usize {
        match self {
            Self::Claim => 0,
            Self::Complete => 1,
            Self::Release => 2,
            Self::Renew => 3,
        }
    }

    const fn as_str(self) -> &'static str {
        match self {
            Self::Claim => "claim",
            Self::Complete => "complete",
            Self::Release => "release",
            Self::Renew => "renew",
        }
    }
}

impl Meters {
    pub(crate) fn new(route: &str, backend: &'static str, prices: Option<Arc<Prices>>) -> Self {
        let route: Arc<str> = Arc::from(route);
        let op = |op: Op| metrics::histogram!(STORE_OP_SECONDS, "backend" => backend, "op" => op.as_str());
        let kinds = Usage::default().kinds().map(|(kind, _)| metrics::counter!(TOKENS_SAVED_TOTAL, "kind" => kind));
        Self {
            requests: Outcome::ALL.map(
                |outcome| metrics::counter!(REQUESTS_TOTAL, "route" => route.clone(), "outcome" => outcome.as_str()),
            ),
            duplicates: metrics::counter!(DUPLICATES_TOTAL),
            ops: Op::ALL.map(op),
            tokens: kinds,
            cost: prices.map(|prices| {
                let gauge = metrics::gauge!(COST_SAVED_TOTAL, "currency" => prices.currency().to_owned());
                (prices, gauge)
            }),
            inflight: metrics::gauge!(INFLIGHT),
            backend,
        }
    }

    /// Counts a keyed call this process executes until the guard is dropped.
    pub(crate) fn inflight(&self) -> Inflight {
        self.inflight.increment(1.0);
        Inflight(self.inflight.clone())
    }

    pub(crate) fn request(&self, outcome: Outcome) {
        self.requests[outcome.index()].increment(1);
    }

    pub(crate) fn duplicate(&self) {
        self.duplicates.increment(1);
    }

    /// Counts what one replay or join of a response with `usage` saved.
    pub(crate) fn saved(&self, usage: Option<&Usage>, model: Option<&str>) {
        let Some(usage) = usage else { return };
        // A zero changes nothing, and each increment is an atomic write to a cache line
        // that every connection thread writes (most responses have no cached or
        // reasoning tokens).
        for (counter, (_, n)) in self.tokens.iter().zip(usage.kinds()).filter(|(_, (_, n))| *n > 0) {
            counter.increment(n);
        }
        if let (Some((prices, gauge)), Some(model)) = (&self.cost, model)
            && let Some(cost) = prices.cost(model, usage)
        {
            // The facade's counters count integers; money is fractional, so this is a
            // gauge that only ever grows.
            gauge.increment(cost);
        }
    }

    /// Runs a store operation, recording its latency (and failure) by backend and op.
    pub(crate) async fn timed<T, E>(&self, op: Op, fut: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        let start = Instant::now();
        let res = fut.await;
        self.ops[op.index()].record(start.elapsed());
        if res.is_err() {
            metrics::counter!(STORE_ERRORS_TOTAL, "backend" => self.backend, "op" => op.as_str()).increment(1);
        }
        res
    }
}

/// One keyed call in [`INFLIGHT`] while it lives.
pub(crate) struct Inflight(Gauge);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_own_slot() {
        for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome.index(), i, "{outcome:?}");
        }
        for (i, op) in Op::ALL.into_iter().enumerate() {
            assert_eq!(op.index(), i, "{op:?}");
        }
    }
}
