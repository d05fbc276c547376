//! Integration tests of `SqliteStore`: the shared conformance suite, then what only a
//! file can do: survive a reopen, a `SIGKILL` mid-write, and hand-edited rows.

mod corruption;
// Needs SIGKILL.
#[cfg(unix)]
mod crash;
mod persistence;

/// The conformance suite on a fresh file per case.
mod file {
    use idemgate_sqlite::SqliteStore;
    use idemgate_testkit::Fixture;

    idemgate_testkit::store_suite!(|clock| async move {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store =
            SqliteStore::builder().with_clock(clock).open(dir.path().join("store.db")).expect("the store opens");
        Fixture::new(store).with_guard(dir)
    });
}

/// The conformance suite on an in-memory database.
mod in_memory {
    use idemgate_sqlite::SqliteStore;

    idemgate_testkit::store_suite!(|clock| async move {
        SqliteStore::builder().with_clock(clock).open_in_memory().expect("the store opens")
    });
}

/// The conformance suite on a file and the system clock, as the gateway runs it.
mod file_real_time {
    use idemgate_sqlite::SqliteStore;
    use idemgate_testkit::Fixture;

    idemgate_testkit::store_suite!(real_time, |_clock| async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = SqliteStore::open(dir.path().join("store.db")).expect("the store opens");
        Fixture::new(store).with_guard(dir)
    });
}

/// The conformance suite in memory on the system clock.
mod real_time {
    use idemgate_sqlite::SqliteStore;

    idemgate_testkit::store_suite!(real_time, |_clock| async {
        SqliteStore::open_in_memory().expect("the store opens")
    });
}
