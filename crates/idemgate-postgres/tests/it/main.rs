//! Integration tests of `PostgresStore` against a real server
//! (`IDEMGATE_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`),
//! each in a fresh schema: the shared conformance suite, then what only a shared
//! database can show: several gateways on one store, lost connections, outages, and
//! the migration. Without a server the tests say that they skip, and pass; under CI
//! they fail instead.

mod fleet;
mod migration;
mod outage;
mod proxy;
mod scratch;
mod stress;
mod tls;

/// The conformance suite, on the server's clock.
mod suite {
    use idemgate_testkit::Fixture;

    use crate::scratch::Scratch;

    idemgate_testkit::store_suite!(real_time, |_clock| async {
        let Some(scratch) = Scratch::new("the postgres conformance suite") else { return Fixture::skip() };
        let store = scratch.store("idemgate-suite").await;
        Fixture::new(store).with_guard(scratch)
    });
}
