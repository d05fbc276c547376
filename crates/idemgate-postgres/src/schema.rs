//! The tables, created at connect by one migration transaction.
//!
//! Several gateways starting together would race on `CREATE TABLE IF NOT EXISTS`
//! (PostgreSQL can fail one of two concurrent creations with a duplicate key in its
//! catalog), so the migration takes a transaction-scoped advisory lock first. The SQL
//! is [`migration_sql`], printed in the crate docs so that a DBA can apply it by hand.

use idemgate::StoreError;
use tokio_postgres::Client;

use crate::pool::pg_error;

/// The schema version this build writes and reads (in `idemgate_meta`).
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// The first key of the advisory lock the migration takes; the second is a hash of
/// the schema name, so that stores in different schemas migrate independently.
const MIGRATION_LOCK: i32 = 0x1de9_a7e0;

/// Version 1, with `{s}` standing for the schema prefix (`"name".` or nothing).
const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS {s}idemgate_records (
    key          bytea PRIMARY KEY CHECK (octet_length(key) = 32),  -- storage key (SHA-256)
    fingerprint  bytea NOT NULL CHECK (octet_length(fingerprint) = 32),
    state        text NOT NULL CHECK (state IN ('in_flight', 'completed')),
    token        uuid,         -- in flight: the owner's fencing token
    lease_until  timestamptz,  -- in flight: when the lease runs out (server time)
    created_at   timestamptz NOT NULL,  -- when the current claim was made
    completed_at timestamptz,  -- completed: when the response completed
    expires_at   timestamptz,  -- completed: completed_at + ttl
    status       integer,      -- completed: HTTP status
    response     bytea,        -- completed: StoredResponse::encode
    CHECK (state <> 'in_flight' OR (token IS NOT NULL AND lease_until IS NOT NULL)),
    CHECK (state <> 'completed' OR (completed_at IS NOT NULL AND expires_at IS NOT NULL
                                    AND status IS NOT NULL AND response IS NOT NULL))
);
-- Sweeps: expired completed records, and in-flight records long past their lease.
CREATE INDEX IF NOT EXISTS idemgate_records_completed_expiry
    ON {s}idemgate_records (expires_at) WHERE state = 'completed';
CREATE INDEX IF NOT EXISTS idemgate_records_in_flight_lease
    ON {s}idemgate_records (lease_until) WHERE state = 'in_flight';
-- Live logs of streamed responses still running, for duplicates on other gateways.
CREATE TABLE IF NOT EXISTS {s}idemgate_live (
    key         bytea PRIMARY KEY,
    token       uuid NOT NULL,         -- the owner's fencing token
    status      integer NOT NULL,      -- the response head: HTTP status
    headers     bytea NOT NULL,        -- and headers, as StoredResponse::encode
    ended       text CHECK (ended IN ('complete', 'broken')),  -- null while running
    expires_at  timestamptz NOT NULL   -- when sweep may delete it
);
CREATE INDEX IF NOT EXISTS idemgate_live_expiry ON {s}idemgate_live (expires_at);
CREATE TABLE IF NOT EXISTS {s}idemgate_live_chunks (
    key   bytea NOT NULL REFERENCES {s}idemgate_live (key) ON DELETE CASCADE,
    seq   bigint NOT NULL CHECK (seq >= 0),  -- chunk number, from 0
    data  bytea NOT NULL,
    PRIMARY KEY (key, seq)
);
"#;

const META: &str = "CREATE TABLE IF NOT EXISTS {s}idemgate_meta (name text PRIMARY KEY, value text NOT NULL);";

/// The schema prefix for SQL: `"name".`, or nothing for the `search_path`.
pub(crate) fn prefix(schema: Option<&str>) -> String {
    schema.map(|s| format!("\"{s}\".")).unwrap_or_default()
}

/// The whole migration as a DBA would run it by hand, for `schema` (or the
/// `search_path` when `None`).
pub fn migration_sql(schema: Option<&str>) -> String {
    let s = prefix(schema);
    let create_schema = schema.map(|name| format!("CREATE SCHEMA IF NOT EXISTS \"{name}\";\n")).unwrap_or_default();
    format!(
        "BEGIN;\n{create_schema}{meta}\n{tables}INSERT INTO {s}idemgate_meta (name, value) VALUES ('schema_version', \
         '{SCHEMA_VERSION}')\n    ON CONFLICT (name) DO NOTHING;\nCOMMIT;\n",
        meta = META.replace("{s}", &s),
        tables = SCHEMA_V1.trim_start().replace("{s}", &s),
    )
}

/// Brings the database to the current schema, in one transaction under the
/// migration lock. Fails on a schema written by a newer idemgate.
pub(crate) async fn migrate(client: &mut Client, schema: Option<&str>) -> Result<(), StoreError> {
    let failed = |what: &'static str| pg_error(format!("postgres cannot {what}"));
    let s = prefix(schema);
    let tx = client.transaction().await.map_err(failed("begin the migration"))?;
    // Another gateway may hold the lock while it migrates: wait for it longer than
    // an ordinary statement may take.
    tx.batch_execute("SET LOCAL statement_timeout = '60s'").await.map_err(failed("begin the migration"))?;
    tx.query(
        "SELECT pg_advisory_xact_lock($1, hashtext(coalesce($2::text, current_schema())))",
        &[&MIGRATION_LOCK, &schema],
    )
    .await
    .map_err(failed("take the migration lock"))?;
    if let Some(name) = schema {
        let exists = tx
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&name])
            .await
            .map_err(failed("look up the schema"))?
            .is_some();
        // Only when missing: CREATE SCHEMA IF NOT EXISTS still needs the CREATE
        // privilege on the database, which a user given an existing schema may lack.
        if !exists {
            tx.batch_execute(&format!("CREATE SCHEMA \"{name}\"")).await.map_err(failed("create the schema"))?;
        }
    }
    tx.batch_execute(&META.replace("{s}", &s)).await.map_err(failed("create idemgate_meta"))?;
    let found: Option<String> = tx
        .query_opt(&format!("SELECT value FROM {s}idemgate_meta WHERE name = 'schema_version'"), &[])
        .await
        .map_err(failed("read the schema version"))?
        .map(|row| row.try_get(0))
        .transpose()
        .map_err(failed("read the schema version"))?;
    let tables = SCHEMA_V1.replace("{s}", &s);
    match found.as_deref().map(str::parse::<u32>) {
        None => {
            tx.batch_execute(&tables).await.map_err(failed("create the tables"))?;
            tx.execute(
                &format!("INSERT INTO {s}idemgate_meta (name, value) VALUES ('schema_version', $1)"),
                &[&SCHEMA_VERSION.to_string()],
            )
            .await
            .map_err(failed("write the schema version"))?;
        }
        // Idempotent, and restores an index dropped by hand.
        Some(Ok(SCHEMA_VERSION)) => tx.batch_execute(&tables).await.map_err(failed("check the tables"))?,
        Some(Ok(newer)) if newer > SCHEMA_VERSION => {
            return Err(StoreError::corrupt(format!(
                "postgres tables have schema version {newer}, but this build of idemgate reads version \
                 {SCHEMA_VERSION}: upgrade idemgate, or point it at another schema"
            )));
        }
        Some(_) => {
            return Err(StoreError::corrupt(format!(
                "postgres idemgate_meta holds an unknown schema version {:?}",
                found.as_deref().unwrap_or_default()
            )));
        }
    }
    tx.commit().await.map_err(failed("commit the migration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_migration_names_every_table_in_the_schema() {
        let sql = migration_sql(Some("idem"));
        assert!(sql.starts_with("BEGIN;\nCREATE SCHEMA IF NOT EXISTS \"idem\";\n"));
        for table in ["idemgate_meta", "idemgate_records", "idemgate_live", "idemgate_live_chunks"] {
            assert!(sql.contains(&format!("CREATE TABLE IF NOT EXISTS \"idem\".{table} (")), "{table}");
        }
        assert!(!sql.contains("{s}"));
        assert!(sql.trim_end().ends_with("COMMIT;"));
        // The crate docs print this file: it must be what the code runs.
        assert_eq!(include_str!("../migration.sql"), migration_sql(Some("idemgate")), "regenerate migration.sql");
        let plain = migration_sql(None);
        assert!(plain.contains("CREATE TABLE IF NOT EXISTS idemgate_records ("));
        assert!(!plain.contains("CREATE SCHEMA"));
    }
}
