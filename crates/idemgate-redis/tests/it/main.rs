//! Integration tests of `RedisStore` against real servers: the shared conformance
//! suite on one Redis server and on a Redis Cluster, then what only a shared,
//! networked store must do: serve several gateway processes at once, survive its
//! server going away and coming back, and keep its records bounded.
//!
//! The servers come from `IDEMGATE_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`)
//! and `IDEMGATE_TEST_REDIS_CLUSTER_URL` (`scripts/redis-cluster start` prints one).
//! Without them the tests say that they skip, and pass; under CI they fail. Every test
//! works under a fresh key prefix and deletes its keys when it ends.

mod layout;
mod outage;
mod processes;
mod support;
mod tls;

/// The conformance suite on one Redis server, on the server's clock.
mod single_node {
    idemgate_testkit::store_suite!(real_time, |_clock| async {
        crate::support::fixture(crate::support::single_url()).await
    });
}

/// The conformance suite on a Redis Cluster, on the servers' clocks.
mod cluster {
    idemgate_testkit::store_suite!(real_time, |_clock| async {
        crate::support::fixture(crate::support::cluster_url()).await
    });
}
