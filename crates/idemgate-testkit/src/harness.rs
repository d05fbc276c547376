//! What a conformance case gets: the store under test and a way to move time.
//!
//! Backends that read time from an [`idemgate::Clock`] run the suite on a
//! [`ManualClock`], so a case can jump a day ahead in no time and check expiry to the
//! millisecond. Backends that judge time on a server (Redis `PX`, PostgreSQL `now()`)
//! cannot be steered; they run with [`TimeControl::Real`], where moving time means
//! sleeping, and the cases keep their durations short and their assertions tolerant.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idemgate::{Clock, ManualClock, Store, SystemClock, Timestamp};

/// Where the manual clock of every case starts: a fixed, realistic time, so that runs
/// are reproducible and no arithmetic near the epoch can hide a bug.
pub const START: Timestamp = Timestamp::from_millis(1_700_000_000_000);

/// How far a real-time backend's clock may stray from ours in assertions on
/// timestamps it computed itself (a server's clock, a slow CI machine).
pub const REAL_TIME_TOLERANCE: Duration = Duration::from_secs(2);

/// How a case moves time.
#[derive(Debug, Clone)]
pub enum TimeControl {
    /// The store reads this clock; advancing moves it and takes no time.
    Manual(ManualClock),
    /// The store reads real time (its own or a server's); advancing sleeps.
    Real,
}

impl TimeControl {
    /// Lets `d` pass, as the store sees it.
    pub async fn advance(&self, d: Duration) {
        match self {
            Self::Manual(clock) => clock.advance(d),
            Self::Real => tokio::time::sleep(d).await,
        }
    }

    /// The current time as the store should see it (the system clock for
    /// [`TimeControl::Real`]).
    pub fn now(&self) -> Timestamp {
        match self {
            Self::Manual(clock) => clock.now(),
            Self::Real => SystemClock.now(),
        }
    }

    /// Whether time is steered by hand, so that exact timestamps can be asserted.
    pub const fn is_manual(&self) -> bool {
        matches!(self, Self::Manual(_))
    }
}

/// A store ready for a case, plus anything that must outlive it (a temporary
/// directory, a server's scratch schema).
pub struct Fixture {
    // Field order is drop order: the store goes before the guard it may depend on.
    // `None` marks a skipped case (see `Fixture::skip`).
    store: Option<Arc<dyn Store>>,
    guard: Option<Box<dyn Any + Send>>,
}

impl Fixture {
    /// A fixture holding `store` alone.
    pub fn new(store: impl Store) -> Self {
        Self { store: Some(Arc::new(store)), guard: None }
    }

    /// No store: the case is skipped and passes. For backends whose server is not
    /// there, after [`backend::backend_url`](crate::backend::backend_url) has said so
    /// (and has failed the test instead under CI).
    pub fn skip() -> Self {
        Self { store: None, guard: None }
    }

    /// Whether this fixture skips its case.
    pub const fn is_skipped(&self) -> bool {
        self.store.is_none()
    }

    /// Keeps `guard` alive until the store has been dropped.
    pub fn with_guard(mut self, guard: impl Any + Send) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }
}

impl<S: Store> From<S> for Fixture {
    fn from(store: S) -> Self {
        Self::new(store)
    }
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture").field("backend", &self.store.as_ref().map(|s| s.backend())).finish_non_exhaustive()
    }
}

/// What a case receives: the store under test (as the gateway holds it, an
/// `Arc<dyn Store>`) and the time control.
#[derive(Debug)]
pub struct Harness {
    fixture: Fixture,
    time: TimeControl,
}

impl Harness {
    /// A harness over `fixture`, with time moved by `time`.
    ///
    /// # Panics
    ///
    /// If the fixture is [skipped](Fixture::skip): a skipped case has no store to run on.
    pub fn new(fixture: impl Into<Fixture>, time: TimeControl) -> Self {
        let fixture = fixture.into();
        assert!(!fixture.is_skipped(), "a skipped fixture has no store to run a case on");
        Self { fixture, time }
    }

    /// The store under test.
    pub fn store(&self) -> &Arc<dyn Store> {
        self.fixture.store.as_ref().expect("Harness::new refuses a skipped fixture")
    }

    /// The time control.
    pub const fn time(&self) -> &TimeControl {
        &self.time
    }

    /// Lets `d` pass, as the store sees it.
    pub async fn advance(&self, d: Duration) {
        self.time.advance(d).await;
    }

    /// The current time as the store should see it.
    pub fn now(&self) -> Timestamp {
        self.time.now()
    }

    /// Asserts that `actual` is `d` from now: exactly under a manual clock, within
    /// [`REAL_TIME_TOLERANCE`] in real time.
    #[track_caller]
    pub fn assert_from_now(&self, actual: Timestamp, d: Duration, what: &str) {
        let expected = self.now() + d;
        match self.time {
            TimeControl::Manual(_) => assert_eq!(actual, expected, "{what}"),
            TimeControl::Real => {
                let off = actual.since(expected).max(expected.since(actual));
                assert!(off <= REAL_TIME_TOLERANCE, "{what}: {actual:?} is {off:?} away from {expected:?}");
            }
        }
    }
}

/// Runs `case` against the store `make` builds on a [`ManualClock`] starting at
/// [`START`], on a fresh multi-threaded runtime (four workers, so that concurrent
/// claims really race). [`store_suite!`](crate::store_suite) calls this once per case.
/// A [skipped](Fixture::skip) fixture skips the case.
pub fn run_manual<M, MF, F, C, CF>(make: M, case: C)
where
    M: FnOnce(ManualClock) -> MF,
    MF: Future<Output = F>,
    F: Into<Fixture>,
    C: FnOnce(Harness) -> CF,
    CF: Future<Output = ()>,
{
    runtime().block_on(async move {
        let clock = ManualClock::new(START);
        let fixture = make(clock.clone()).await.into();
        if fixture.is_skipped() {
            return;
        }
        case(Harness::new(fixture, TimeControl::Manual(clock))).await;
    });
}

/// Runs `case` against a store that reads real time: `make` still receives a
/// [`ManualClock`] (so both modes take the same closure), but nothing advances it,
/// and the store is expected to ignore it. A [skipped](Fixture::skip) fixture skips the
/// case.
pub fn run_real_time<M, MF, F, C, CF>(make: M, case: C)
where
    M: FnOnce(ManualClock) -> MF,
    MF: Future<Output = F>,
    F: Into<Fixture>,
    C: FnOnce(Harness) -> CF,
    CF: Future<Output = ()>,
{
    runtime().block_on(async move {
        let fixture = make(ManualClock::new(START)).await.into();
        if fixture.is_skipped() {
            return;
        }
        case(Harness::new(fixture, TimeControl::Real)).await;
    });
}

fn runtime() -> tokio::runtime::Runtime {
    // What `#[tokio::test(flavor = "multi_thread", worker_threads = 4)]` builds; built
    // here so that a backend's test crate needs no particular tokio features.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a test runtime can be built")
}
