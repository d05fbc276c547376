//! The tables: created once when gateways start together, the same as what the docs
//! print for a DBA, refused when a newer idemgate wrote them, and rows edited by hand
//! read as `Corrupt`.

use std::time::Duration;

use idemgate::{Claim, Clock, ErrorKind, Store, SystemClock};
use idemgate_postgres::{PostgresStore, SCHEMA_VERSION, migration_sql};
use idemgate_testkit::{fp, key, sample_response};

use crate::scratch::Scratch;

const LEASE: Duration = Duration::from_secs(30);

async fn schema_version(admin: &tokio_postgres::Client, schema: &str) -> String {
    admin
        .query_one(&format!("SELECT value FROM \"{schema}\".idemgate_meta WHERE name = 'schema_version'"), &[])
        .await
        .expect("the version row reads")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateways_starting_together_migrate_once() {
    let Some(scratch) = Scratch::new("gateways_starting_together_migrate_once") else { return };
    let connects: Vec<_> = (0..8)
        .map(|i| {
            let scratch = &scratch;
            async move { scratch.store(&format!("idemgate-migrate-{i}")).await }
        })
        .collect();
    let stores = futures_util::future::join_all(connects).await;
    assert_eq!(stores.len(), 8, "every gateway connected");
    for store in &stores {
        assert_eq!(store.schema(), Some(scratch.schema()));
    }
    let admin = scratch.admin().await;
    assert_eq!(schema_version(&admin, scratch.schema()).await, SCHEMA_VERSION.to_string());
    let tables: i64 = admin
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = $1", &[&scratch.schema()])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 4, "idemgate_meta, idemgate_records, idemgate_live, idemgate_live_chunks");

    // They all work on the one set of tables.
    let Claim::Acquired(lease) = stores[0].claim(&key(1), &fp(1), LEASE).await.unwrap() else { panic!() };
    assert_eq!(
        stores[7].claim(&key(1), &fp(1), LEASE).await.unwrap(),
        Claim::InFlight { lease_until: lease.lease_until }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_printed_migration_is_what_the_store_expects() {
    let Some(scratch) = Scratch::new("the_printed_migration_is_what_the_store_expects") else { return };
    let admin = scratch.admin().await;
    // What a DBA would run by hand, twice (it is idempotent).
    let sql = migration_sql(Some(scratch.schema()));
    admin.batch_execute(&sql).await.expect("the printed migration runs");
    admin.batch_execute(&sql).await.expect("the printed migration runs again");
    let store = scratch.store("idemgate-printed").await;
    let Claim::Acquired(lease) = store.claim(&key(1), &fp(1), LEASE).await.unwrap() else { panic!() };
    let response = sample_response(SystemClock.now());
    store.complete(&lease, &response, LEASE).await.expect("the store works on tables made by hand");
    assert_eq!(store.claim(&key(1), &fp(1), LEASE).await.unwrap(), Claim::Completed(Box::new(response)));
    assert_eq!(schema_version(&admin, scratch.schema()).await, SCHEMA_VERSION.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tables_from_a_newer_idemgate_are_refused() {
    let Some(scratch) = Scratch::new("tables_from_a_newer_idemgate_are_refused") else { return };
    drop(scratch.store("idemgate-newer").await);
    let admin = scratch.admin().await;
    admin
        .execute(
            &format!("UPDATE \"{}\".idemgate_meta SET value = '99' WHERE name = 'schema_version'", scratch.schema()),
            &[],
        )
        .await
        .unwrap();
    let refused = PostgresStore::builder()
        .with_schema(scratch.schema())
        .connect(&scratch.url("idemgate-newer"))
        .await
        .expect_err("a newer schema is refused");
    assert_eq!(refused.kind(), ErrorKind::Corrupt);
    assert!(refused.to_string().contains("schema version 99"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_edited_by_hand_read_as_corrupt() {
    let Some(scratch) = Scratch::new("rows_edited_by_hand_read_as_corrupt") else { return };
    let store = scratch.store("idemgate-corrupt").await;
    let admin = scratch.admin().await;
    let table = format!("\"{}\".idemgate_records", scratch.schema());
    for n in 1..=3 {
        let Claim::Acquired(lease) = store.claim(&key(n), &fp(n), LEASE).await.unwrap() else { panic!() };
        store.complete(&lease, &sample_response(SystemClock.now()), LEASE).await.unwrap();
    }
    let edit = |sql: String, n: u64| {
        let admin = &admin;
        async move { admin.execute(&sql, &[&&key(n).as_bytes()[..]]).await.expect("the hand edit applies") }
    };
    edit(format!("UPDATE {table} SET response = '\\x00'::bytea WHERE key = $1"), 1).await;
    edit(format!("UPDATE {table} SET status = 500 WHERE key = $1"), 2).await;
    edit(format!("UPDATE {table} SET completed_at = completed_at + interval '1 second' WHERE key = $1"), 3).await;
    for n in 1..=3 {
        let claimed = store.claim(&key(n), &fp(n), LEASE).await.expect_err("a corrupt row is not replayed");
        assert_eq!(claimed.kind(), ErrorKind::Corrupt, "key {n}: {claimed}");
        let read = store.get(&key(n)).await.expect_err("a corrupt row is not read");
        assert_eq!(read.kind(), ErrorKind::Corrupt, "key {n}: {read}");
        // An operator can still remove it.
        assert!(store.purge(&key(n)).await.unwrap());
        assert!(matches!(store.claim(&key(n), &fp(n), LEASE).await, Ok(Claim::Acquired(_))));
    }
}
