//! The store conformance suite and shared test helpers for idemgate.
//!
//! Every [`Store`](idemgate::Store) backend — memory, SQLite, and later Redis and
//! PostgreSQL — runs the same cases, so that "passes the suite" is the precise
//! statement of what a backend guarantees. A backend's test crate invokes
//! [`store_suite!`] once; it expands to one `#[test]` per case, each on a fresh store
//! and a fresh multi-threaded runtime, so a failure names the rule it broke:
//!
//! ```ignore
//! use idemgate::MemoryStore;
//!
//! idemgate_testkit::store_suite!(|clock| async move { MemoryStore::new().with_clock(clock) });
//! ```
//!
//! The closure receives a [`ManualClock`](idemgate::ManualClock) that the cases move
//! by hand, and returns the store, or a [`Fixture`] when something (a temporary
//! directory) must outlive it. A backend that reads time on a server instead runs
//! `store_suite!(real_time, ...)`: the cases then sleep to let time pass.
//!
//! A single case can also be run directly, which is what the macro does:
//!
//! ```
//! use idemgate::MemoryStore;
//! use idemgate_testkit::{run_manual, suite};
//!
//! run_manual(
//!     |clock| async move { MemoryStore::new().with_clock(clock) },
//!     suite::case_concurrent_claims_acquire_exactly_once,
//! );
//! ```

pub mod backend;
mod harness;
pub mod mock;
pub mod pki;
mod sample;
pub mod suite;

pub use self::harness::{Fixture, Harness, REAL_TIME_TOLERANCE, START, TimeControl, run_manual, run_real_time};
pub use self::sample::{empty_response, fp, key, large_response, sample_response};

/// Expands to one `#[test]` per conformance case in [`suite`], each running against
/// the store that `make` builds.
///
/// `make` is a closure `Fn(ManualClock) -> impl Future<Output = F>` where `F` is a
/// [`Store`](idemgate::Store) or a [`Fixture`]; [`Fixture::skip`] skips the case (a
/// backend whose server is not there). The tests are named after the cases
/// (`case_claim_on_absent_key_acquires`, ...), so invoke the macro once per module:
/// a crate that runs the suite twice (on a file and in memory) puts each in its own
/// `mod`.
///
/// - `store_suite!(make)`: the store reads the clock it is given, which the cases
///   move by hand; expiry is checked to the millisecond.
/// - `store_suite!(real_time, make)`: the store reads real time (a server's clock);
///   the clock passed to `make` never moves, and the cases sleep instead.
#[macro_export]
macro_rules! store_suite {
    // The one list of cases; `@each` appends it to whatever it is handed. A unit
    // test checks it against the `case_*` functions in `suite.rs`.
    (@each $($head:tt)*) => {
        $crate::store_suite! { $($head)*;
            case_claim_on_absent_key_acquires,
            case_concurrent_claims_acquire_exactly_once,
            case_complete_then_claim_replays_byte_identical,
            case_release_lets_the_next_claim_acquire,
            case_fenced_operations_with_a_foreign_token_change_nothing,
            case_takeover_fences_out_the_old_owner,
            case_expired_lease_is_taken_over_exactly_once,
            case_expired_owner_can_still_complete,
            case_renew_extends_the_lease,
            case_completed_record_expires_after_its_ttl,
            case_sweep_deletes_expired_records_in_batches,
            case_purge_removes_a_record_in_any_state,
            case_watch_wakes_on_complete_release_and_purge,
            case_get_returns_the_record_as_stored,
            case_large_body_round_trips,
            case_fenced_operations_are_atomic_against_takeover,
            case_live_log_keeps_chunks_in_order,
            case_live_log_is_fenced_by_the_lease,
            case_live_log_end_is_readable_until_a_new_owner_begins,
            case_watch_wakes_on_live_append_and_end,
        }
    };
    (@tests $run:ident, $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::$run($make, $crate::suite::$case);
            }
        )*
    };
    (@names; $($case:ident),* $(,)?) => {
        [$(stringify!($case)),*]
    };
    (real_time, $make:expr $(,)?) => {
        $crate::store_suite!(@each @tests run_real_time, $make);
    };
    ($make:expr $(,)?) => {
        $crate::store_suite!(@each @tests run_manual, $make);
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_macro_runs_every_case_in_the_suite() {
        let listed: Vec<&str> = store_suite!(@each @names).to_vec();
        let defined: Vec<&str> = include_str!("suite.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("pub async fn "))
            .filter_map(|rest| rest.split('(').next())
            .collect();
        assert!(defined.len() >= 16, "found the cases in suite.rs: {defined:?}");
        assert_eq!(listed, defined, "store_suite! must list every case, in file order");
    }
}
