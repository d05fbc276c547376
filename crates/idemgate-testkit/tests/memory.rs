//! The conformance suite against [`MemoryStore`], the reference implementation, in
//! both time modes: this is where the suite itself is checked.

/// Time moved by hand: expiry to the millisecond.
mod manual_clock {
    use idemgate::MemoryStore;

    idemgate_testkit::store_suite!(|clock| async move { MemoryStore::new().with_clock(clock) });
}

/// The system clock, with the cases sleeping: the mode of backends that read a
/// server's clock.
mod real_time {
    use idemgate::MemoryStore;

    idemgate_testkit::store_suite!(real_time, |_clock| async { MemoryStore::new() });
}
