//! The record operations: the claim, the fenced transitions, and rows read back as
//! records.
//!
//! The claim runs the shared [`decide`] on the row it read, with the server's time
//! read in the same statement, and writes only through compare-and-swaps: an insert
//! that does nothing when the key exists, a takeover conditioned on the exact stale
//! token, a reuse conditioned on the completed record still being expired. A swap
//! that finds the row changed writes nothing, and the claim reads again; so of any
//! number of concurrent claims exactly one acquires, on any number of gateways.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deadpool_postgres::ClientWrapper;
use idemgate::clock::duration_millis;
use idemgate::store::{Decision, Existing, STALE_IN_FLIGHT_GRACE, decide};
use idemgate::{
    Claim, Fingerprint, Lease, Record, RecordState, StorageKey, StoreError, StoredResponse, Timestamp, Token,
};
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;
use uuid::Uuid;

use crate::pool::pg_error;
use crate::sql::Sql;

/// How many times a claim reads and swaps before it gives up: each retry means
/// another claim changed the row in between, which settles within a round or two.
const CLAIM_ATTEMPTS: usize = 16;

/// The latest time written: 9999-12-31T23:59:59.999Z, far inside what `timestamptz`
/// holds, so that the far future saturates instead of overflowing.
const MAX_TIME_MS: u64 = 253_402_300_799_999;
/// The longest duration added on the server (a thousand years): longer leases or
/// lingers saturate there.
const MAX_DURATION_MS: u64 = 1000 * 366 * 24 * 60 * 60 * 1000;

/// A claim: see the module docs.
pub(crate) async fn claim(
    client: &ClientWrapper,
    sql: &Sql,
    key: &StorageKey,
    fp: &Fingerprint,
    lease: Duration,
) -> Result<Claim, StoreError> {
    let claim = client.prepare_cached(&sql.claim).await.map_err(pg_error("postgres cannot prepare a claim"))?;
    let lease_ms = duration_ms(lease);
    let (k, f) = (&key.as_bytes()[..], &fp.as_bytes()[..]);
    for _ in 0..CLAIM_ATTEMPTS {
        let token = Token::generate();
        let rows = client
            .query(&claim, &[&k, &f, &uuid(token), &lease_ms])
            .await
            .map_err(pg_error("postgres cannot run a claim"))?;
        // No row: the key was claimed by a transaction this statement's snapshot
        // predates; the next statement sees it.
        let Some(row) = rows.first() else { continue };
        let now: SystemTime = get(row, "now", key)?;
        if get::<bool>(row, "inserted", key)? {
            let lease_until = time(get(row, "lease_until", key)?);
            return Ok(Claim::Acquired(Lease { key: *key, token, lease_until, took_over: false }));
        }
        let head = head(row, key)?;
        let swap = match decide(Some(head.existing()), fp, time(now)) {
            Decision::InFlight { lease_until } => return Ok(Claim::InFlight { lease_until }),
            Decision::Mismatch => return Ok(Claim::Mismatch),
            Decision::Completed => {
                let HeadState::Completed { completed_at, status, .. } = head.state else {
                    return Err(corrupt(key, "a completed decision on an in-flight row"));
                };
                let response = response(row, key, completed_at, status)?;
                return Ok(Claim::Completed(Box::new(response)));
            }
            Decision::Acquire { replaces: Some(stale) } => client
                .query_opt(&prepare(client, &sql.take_over).await?, &[&k, &uuid(stale), &uuid(token), &lease_ms, &f])
                .await
                .map(|row| row.map(|r| (r, true))),
            Decision::Acquire { replaces: None } => client
                .query_opt(&prepare(client, &sql.replace_expired).await?, &[&k, &f, &uuid(token), &lease_ms])
                .await
                .map(|row| row.map(|r| (r, false))),
        };
        // No row: another claim (or the owner) changed the record first.
        if let Some((row, took_over)) = swap.map_err(pg_error("postgres cannot write a claim"))? {
            let lease_until = time(get(&row, "lease_until", key)?);
            return Ok(Claim::Acquired(Lease { key: *key, token, lease_until, took_over }));
        }
    }
    Err(StoreError::unavailable(
        "postgres claim did not settle",
        format!("record {} kept changing over {CLAIM_ATTEMPTS} attempts", key.short()),
    ))
}

/// Moves the lease of `lease` to `duration` from the server's now.
pub(crate) async fn renew(
    client: &ClientWrapper,
    sql: &Sql,
    lease: &Lease,
    duration: Duration,
) -> Result<Timestamp, StoreError> {
    let stmt = prepare(client, &sql.renew).await?;
    let row = client
        .query_opt(&stmt, &[&&lease.key.as_bytes()[..], &uuid(lease.token), &duration_ms(duration)])
        .await
        .map_err(pg_error("postgres cannot renew a lease"))?
        .ok_or_else(StoreError::lease_lost)?;
    Ok(time(get(&row, "lease_until", &lease.key)?))
}

/// Stores `response` until `completed_at + ttl` if `lease` still owns the key.
pub(crate) async fn complete(
    client: &ClientWrapper,
    sql: &Sql,
    lease: &Lease,
    response: &StoredResponse,
    ttl: Duration,
) -> Result<(), StoreError> {
    let stmt = prepare(client, &sql.complete).await?;
    let encoded = response.encode();
    let changed = client
        .execute(
            &stmt,
            &[
                &&lease.key.as_bytes()[..],
                &uuid(lease.token),
                &system_time(response.completed_at),
                &system_time(response.completed_at + ttl),
                &i32::from(response.status),
                &encoded,
            ],
        )
        .await
        .map_err(pg_error("postgres cannot store a response"))?;
    fenced_then_notify(client, sql, &lease.key, changed).await
}

/// [`fenced`] for a change that committed without notifying (see the `sql` module),
/// then wakes the waiters of `key`. The change stands either way: if the
/// notification is lost, the waiters find it when they poll.
pub(crate) async fn fenced_then_notify(
    client: &ClientWrapper,
    sql: &Sql,
    key: &StorageKey,
    changed: u64,
) -> Result<(), StoreError> {
    fenced(changed)?;
    let sent = async {
        let stmt = prepare(client, &sql.notify).await?;
        client.execute(&stmt, &[&&key.as_bytes()[..]]).await.map_err(pg_error("postgres cannot notify waiters"))
    };
    if let Err(e) = sent.await {
        tracing::warn!(target: "idemgate::store", key = %key.short(), error = %e, "waiters will find the change when they poll");
    }
    Ok(())
}

/// Deletes the in-flight record of `lease`.
pub(crate) async fn release(client: &ClientWrapper, sql: &Sql, lease: &Lease) -> Result<(), StoreError> {
    let stmt = prepare(client, &sql.release).await?;
    let changed = client
        .execute(&stmt, &[&&lease.key.as_bytes()[..], &uuid(lease.token)])
        .await
        .map_err(pg_error("postgres cannot release a lease"))?;
    fenced(changed)
}

/// Reads the whole record, response decoded.
pub(crate) async fn read(client: &ClientWrapper, sql: &Sql, key: &StorageKey) -> Result<Option<Record>, StoreError> {
    let stmt = prepare(client, &sql.get).await?;
    let Some(row) =
        client.query_opt(&stmt, &[&&key.as_bytes()[..]]).await.map_err(pg_error("postgres cannot read a record"))?
    else {
        return Ok(None);
    };
    let head = head(&row, key)?;
    let created_at = time(get(&row, "created_at", key)?);
    let state = match head.state {
        HeadState::InFlight { token, lease_until } => RecordState::InFlight { token, lease_until },
        HeadState::Completed { completed_at, expires_at, status } => {
            RecordState::Completed { response: response(&row, key, completed_at, status)?, expires_at }
        }
    };
    Ok(Some(Record { key: *key, fingerprint: head.fingerprint, created_at, state }))
}

/// Deletes the record in any state; whether there was one.
pub(crate) async fn purge(client: &ClientWrapper, sql: &Sql, key: &StorageKey) -> Result<bool, StoreError> {
    let stmt = prepare(client, &sql.purge).await?;
    let changed =
        client.execute(&stmt, &[&&key.as_bytes()[..]]).await.map_err(pg_error("postgres cannot purge a record"))?;
    Ok(changed > 0)
}

/// Deletes up to `limit` expired records (the count returned), then up to `limit`
/// expired live logs (not counted: they are not records).
pub(crate) async fn sweep(client: &ClientWrapper, sql: &Sql, limit: usize) -> Result<usize, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let grace = duration_ms(STALE_IN_FLIGHT_GRACE);
    let stmt = prepare(client, &sql.sweep_records).await?;
    let row = client.query_one(&stmt, &[&limit, &grace]).await.map_err(pg_error("postgres cannot sweep records"))?;
    let swept: i64 = row.try_get(0).map_err(pg_error("postgres cannot sweep records"))?;
    let stmt = prepare(client, &sql.sweep_live).await?;
    client.query_one(&stmt, &[&limit]).await.map_err(pg_error("postgres cannot sweep live logs"))?;
    Ok(usize::try_from(swept).unwrap_or(0))
}

/// Prepares `sql` once per connection.
pub(crate) async fn prepare(client: &ClientWrapper, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
    client.prepare_cached(sql).await.map_err(pg_error("postgres cannot prepare a statement"))
}

/// One row changed, or the lease was not the owner's.
pub(crate) fn fenced(changed: u64) -> Result<(), StoreError> {
    if changed == 1 { Ok(()) } else { Err(StoreError::lease_lost()) }
}

pub(crate) fn uuid(token: Token) -> Uuid {
    Uuid::from_u128(token.as_u128())
}

/// A duration as the milliseconds a statement adds to the server's now.
pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(duration_millis(d).min(MAX_DURATION_MS)).unwrap_or(i64::MAX)
}

/// A timestamp as a `timestamptz` parameter, clamped to what we write at most.
pub(crate) fn system_time(t: Timestamp) -> SystemTime {
    Timestamp::from_millis(t.as_millis().min(MAX_TIME_MS)).to_system_time()
}

/// A `timestamptz` as a timestamp (every time we write is whole milliseconds).
pub(crate) fn time(t: SystemTime) -> Timestamp {
    Timestamp::from_system_time(t)
}

pub(crate) fn corrupt(key: &StorageKey, what: &str) -> StoreError {
    StoreError::corrupt(format!("postgres record {} has {what}", key.short()))
}

/// A column by name; a type the column cannot be read as means the table was
/// changed by hand.
pub(crate) fn get<'r, T: FromSql<'r>>(row: &'r Row, column: &str, key: &StorageKey) -> Result<T, StoreError> {
    row.try_get(column).map_err(|e| corrupt(key, &format!("an unreadable {column} ({e})")))
}

/// A record's columns short of the response, which is decoded only when needed.
struct Head {
    fingerprint: Fingerprint,
    state: HeadState,
}

enum HeadState {
    InFlight { token: Token, lease_until: Timestamp },
    Completed { completed_at: Timestamp, expires_at: Timestamp, status: u16 },
}

impl Head {
    fn existing(&self) -> Existing {
        match self.state {
            HeadState::InFlight { token, lease_until } => {
                Existing::InFlight { fingerprint: self.fingerprint, token, lease_until }
            }
            HeadState::Completed { expires_at, .. } => {
                Existing::Completed { fingerprint: self.fingerprint, expires_at }
            }
        }
    }
}

fn head(row: &Row, key: &StorageKey) -> Result<Head, StoreError> {
    let fingerprint = <[u8; 32]>::try_from(get::<&[u8]>(row, "fingerprint", key)?)
        .map(Fingerprint::from_bytes)
        .map_err(|_| corrupt(key, "a fingerprint that is not 32 bytes"))?;
    let missing = |column: &str| corrupt(key, &format!("no {column}"));
    let state = match get::<&str>(row, "state", key)? {
        "in_flight" => HeadState::InFlight {
            token: get::<Option<Uuid>>(row, "token", key)?
                .map(|u| Token::from_u128(u.as_u128()))
                .ok_or_else(|| missing("token"))?,
            lease_until: get::<Option<SystemTime>>(row, "lease_until", key)?
                .map(time)
                .ok_or_else(|| missing("lease_until"))?,
        },
        "completed" => HeadState::Completed {
            completed_at: get::<Option<SystemTime>>(row, "completed_at", key)?
                .map(time)
                .ok_or_else(|| missing("completed_at"))?,
            expires_at: get::<Option<SystemTime>>(row, "expires_at", key)?
                .map(time)
                .ok_or_else(|| missing("expires_at"))?,
            status: get::<Option<i32>>(row, "status", key)?
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| corrupt(key, "a malformed status"))?,
        },
        _ => return Err(corrupt(key, "an unknown state")),
    };
    Ok(Head { fingerprint, state })
}

fn response(row: &Row, key: &StorageKey, completed_at: Timestamp, status: u16) -> Result<StoredResponse, StoreError> {
    let blob: Option<&[u8]> = get(row, "response", key)?;
    let blob = blob.ok_or_else(|| corrupt(key, "no response"))?;
    let response = StoredResponse::decode(Bytes::copy_from_slice(blob))
        .map_err(|e| corrupt(key, &format!("an unreadable response ({e})")))?;
    // The columns are there for people querying the table; they must agree with the
    // encoded response, or one of them was edited by hand.
    if response.status != status || response.completed_at != completed_at {
        return Err(corrupt(key, "a response that disagrees with its status or completed_at"));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_futures_saturate() {
        assert_eq!(duration_ms(Duration::MAX), i64::try_from(MAX_DURATION_MS).unwrap());
        assert_eq!(duration_ms(Duration::from_millis(1500)), 1500);
        let far = system_time(Timestamp::from_millis(u64::MAX));
        assert_eq!(time(far), Timestamp::from_millis(MAX_TIME_MS));
        let t = Timestamp::from_millis(1_700_000_000_123);
        assert_eq!(time(system_time(t)), t);
    }

    #[test]
    fn tokens_map_to_uuids_and_back() {
        let t = Token::generate();
        assert_eq!(Token::from_u128(uuid(t).as_u128()), t);
        assert_eq!(uuid(t).to_string(), t.to_text());
    }
}
