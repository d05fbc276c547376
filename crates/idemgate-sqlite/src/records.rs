//! The statements behind each store operation, and rows read back as records.
//!
//! Every function here runs on the writer thread, inside the batch transaction (and
//! the operation's own savepoint), so a read followed by a write is atomic: nothing
//! else writes the file in between (other processes wait for the `IMMEDIATE` lock).

use std::time::Duration;

use bytes::Bytes;
use idemgate::clock::duration_millis;
use idemgate::store::{Decision, Existing, STALE_IN_FLIGHT_GRACE, decide};
use idemgate::{
    Claim, Fingerprint, Lease, Record, RecordState, StorageKey, StoreError, StoredResponse, Timestamp, Token,
};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, Row, ToSql, named_params};

use crate::schema::sqlite_error;

const SELECT: &str = "SELECT fingerprint, state, token, lease_until_ms, created_at_ms, completed_at_ms, \
                      expires_at_ms, status, response FROM idemgate_records WHERE key = :key";
// Column positions in SELECT.
const FINGERPRINT: usize = 0;
const STATE: usize = 1;
const TOKEN: usize = 2;
const LEASE_UNTIL: usize = 3;
const CREATED_AT: usize = 4;
const COMPLETED_AT: usize = 5;
const EXPIRES_AT: usize = 6;
const STATUS: usize = 7;
const RESPONSE: usize = 8;

const INSERT: &str = "INSERT INTO idemgate_records (key, fingerprint, state, token, lease_until_ms, created_at_ms) \
                      VALUES (:key, :fingerprint, 'in_flight', :token, :lease_until, :now)";
/// Reuses the row of an expired completed record.
const REPLACE_EXPIRED: &str = "UPDATE idemgate_records SET fingerprint = :fingerprint, state = 'in_flight', \
                               token = :token, lease_until_ms = :lease_until, created_at_ms = :now, \
                               completed_at_ms = NULL, expires_at_ms = NULL, status = NULL, response = NULL \
                               WHERE key = :key AND state = 'completed' AND expires_at_ms <= :now";
/// A compare-and-swap on the stale token. With one writer it cannot lose; it is there
/// so that a bug elsewhere shows up as an error rather than as two owners.
const TAKE_OVER: &str = "UPDATE idemgate_records SET token = :token, lease_until_ms = :lease_until, \
                         created_at_ms = :now \
                         WHERE key = :key AND state = 'in_flight' AND token = :stale AND lease_until_ms <= :now";
const RENEW: &str = "UPDATE idemgate_records SET lease_until_ms = :lease_until \
                     WHERE key = :key AND state = 'in_flight' AND token = :token";
const COMPLETE: &str = "UPDATE idemgate_records SET state = 'completed', token = NULL, lease_until_ms = NULL, \
                        completed_at_ms = :completed_at, expires_at_ms = :expires_at, status = :status, \
                        response = :response \
                        WHERE key = :key AND state = 'in_flight' AND token = :token";
const RELEASE: &str = "DELETE FROM idemgate_records WHERE key = :key AND state = 'in_flight' AND token = :token";
const PURGE: &str = "DELETE FROM idemgate_records WHERE key = :key";
// The bundled SQLite has no DELETE ... LIMIT; a limited subquery does the same. The
// `state = ...` terms let each use its partial index.
const SWEEP_COMPLETED: &str = "DELETE FROM idemgate_records WHERE key IN (SELECT key FROM idemgate_records \
                               WHERE state = 'completed' AND expires_at_ms <= :now LIMIT :limit)";
const SWEEP_IN_FLIGHT: &str = "DELETE FROM idemgate_records WHERE key IN (SELECT key FROM idemgate_records \
                               WHERE state = 'in_flight' AND lease_until_ms <= :cutoff LIMIT :limit)";

/// A record's columns short of the response, which is decoded only when needed.
struct Head {
    fingerprint: Fingerprint,
    created_at: Timestamp,
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

/// Reads the record, applies the shared claim rule, and writes the new lease if the
/// rule says so. A completed record comes with its expiry (for the replay cache).
pub(crate) fn claim(
    conn: &Connection,
    key: &StorageKey,
    fp: &Fingerprint,
    lease: Duration,
    now: Timestamp,
) -> Result<(Claim, Option<Timestamp>), StoreError> {
    let hex = key.to_hex();
    let (found, decision, replay) = {
        let mut stmt = conn.prepare_cached(SELECT).map_err(sqlite_error("sqlite cannot prepare a read"))?;
        let mut rows =
            stmt.query(named_params! { ":key": hex }).map_err(sqlite_error("sqlite cannot read a record"))?;
        match rows.next().map_err(sqlite_error("sqlite cannot read a record"))? {
            None => (false, decide(None, fp, now), None),
            Some(row) => {
                let head = head(row, key)?;
                let decision = decide(Some(head.existing()), fp, now);
                // The response is read and decoded only for a replay: a corrupt blob
                // must not stand in the way of replacing an expired record.
                let replay = match (decision, &head.state) {
                    (Decision::Completed, &HeadState::Completed { completed_at, expires_at, status }) => {
                        Some((response(row, key, completed_at, status)?, expires_at))
                    }
                    _ => None,
                };
                (true, decision, replay)
            }
        }
    };
    match decision {
        Decision::Acquire { replaces } => {
            let token = Token::generate();
            let lease_until = storable(now + lease);
            let (token_text, lease_ms, now_ms) = (token.to_text(), ms(lease_until), ms(now));
            let changed = match (found, replaces) {
                (false, _) | (true, None) => {
                    let sql = if found { REPLACE_EXPIRED } else { INSERT };
                    let params = named_params! {
                        ":key": hex, ":fingerprint": fp.to_hex(), ":token": token_text,
                        ":lease_until": lease_ms, ":now": now_ms,
                    };
                    execute(conn, sql, params)
                }
                (true, Some(stale)) => {
                    let params = named_params! {
                        ":key": hex, ":stale": stale.to_text(), ":token": token_text,
                        ":lease_until": lease_ms, ":now": now_ms,
                    };
                    execute(conn, TAKE_OVER, params)
                }
            }
            .map_err(sqlite_error("sqlite cannot write a claim"))?;
            if changed != 1 {
                return Err(StoreError::unavailable(
                    "sqlite claim lost its compare-and-swap",
                    format!("record {} changed under the write lock", key.short()),
                ));
            }
            Ok((Claim::Acquired(Lease { key: *key, token, lease_until, took_over: replaces.is_some() }), None))
        }
        Decision::InFlight { lease_until } => Ok((Claim::InFlight { lease_until }, None)),
        Decision::Completed => replay
            .map(|(r, expires_at)| (Claim::Completed(Box::new(r)), Some(expires_at)))
            .ok_or_else(|| corrupt(key, "a completed decision without a completed row")),
        Decision::Mismatch => Ok((Claim::Mismatch, None)),
    }
}

/// Moves the lease of `token` to `duration` from `now`.
pub(crate) fn renew(
    conn: &Connection,
    key: &StorageKey,
    token: Token,
    duration: Duration,
    now: Timestamp,
) -> Result<Timestamp, StoreError> {
    let lease_until = storable(now + duration);
    let params = named_params! { ":key": key.to_hex(), ":token": token.to_text(), ":lease_until": ms(lease_until) };
    let changed = execute(conn, RENEW, params).map_err(sqlite_error("sqlite cannot renew a lease"))?;
    fenced(changed)?;
    Ok(lease_until)
}

/// A response ready to store: encoded on the caller's task, so that the writer
/// thread spends its time on SQLite alone.
pub(crate) struct Completion {
    pub(crate) status: u16,
    pub(crate) completed_at: Timestamp,
    pub(crate) expires_at: Timestamp,
    /// [`StoredResponse::encode`].
    pub(crate) encoded: Vec<u8>,
}

/// Stores the response if `token` still owns the key.
pub(crate) fn complete(conn: &Connection, key: &StorageKey, token: Token, done: &Completion) -> Result<(), StoreError> {
    let params = named_params! {
        ":key": key.to_hex(),
        ":token": token.to_text(),
        ":completed_at": ms(done.completed_at),
        ":expires_at": ms(storable(done.expires_at)),
        ":status": done.status,
        ":response": done.encoded,
    };
    let changed = execute(conn, COMPLETE, params).map_err(sqlite_error("sqlite cannot store a response"))?;
    fenced(changed)
}

/// Deletes the in-flight record of `token`.
pub(crate) fn release(conn: &Connection, key: &StorageKey, token: Token) -> Result<(), StoreError> {
    let params = named_params! { ":key": key.to_hex(), ":token": token.to_text() };
    let changed = execute(conn, RELEASE, params).map_err(sqlite_error("sqlite cannot release a lease"))?;
    fenced(changed)
}

/// Reads the whole record, response decoded.
pub(crate) fn get(conn: &Connection, key: &StorageKey) -> Result<Option<Record>, StoreError> {
    let mut stmt = conn.prepare_cached(SELECT).map_err(sqlite_error("sqlite cannot prepare a read"))?;
    let mut rows =
        stmt.query(named_params! { ":key": key.to_hex() }).map_err(sqlite_error("sqlite cannot read a record"))?;
    let Some(row) = rows.next().map_err(sqlite_error("sqlite cannot read a record"))? else {
        return Ok(None);
    };
    let head = head(row, key)?;
    let state = match head.state {
        HeadState::InFlight { token, lease_until } => RecordState::InFlight { token, lease_until },
        HeadState::Completed { completed_at, expires_at, status } => {
            RecordState::Completed { response: response(row, key, completed_at, status)?, expires_at }
        }
    };
    Ok(Some(Record { key: *key, fingerprint: head.fingerprint, created_at: head.created_at, state }))
}

/// Deletes the record in any state; whether there was one.
pub(crate) fn purge(conn: &Connection, key: &StorageKey) -> Result<bool, StoreError> {
    let changed = execute(conn, PURGE, named_params! { ":key": key.to_hex() })
        .map_err(sqlite_error("sqlite cannot purge a record"))?;
    Ok(changed > 0)
}

/// Deletes up to `limit` expired completed records, then stale in-flight ones.
pub(crate) fn sweep(conn: &Connection, limit: usize, now: Timestamp) -> Result<usize, StoreError> {
    // Never negative: SQLite reads a negative LIMIT as no limit at all.
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let completed = execute(conn, SWEEP_COMPLETED, named_params! { ":now": ms(now), ":limit": limit })
        .map_err(sqlite_error("sqlite cannot sweep completed records"))?;
    let left = limit.saturating_sub(i64::try_from(completed).unwrap_or(i64::MAX)).max(0);
    // lease_until + grace <= now, written so that the index on lease_until_ms applies.
    let grace = i64::try_from(duration_millis(STALE_IN_FLIGHT_GRACE)).unwrap_or(i64::MAX);
    let cutoff = ms(now).saturating_sub(grace);
    let stale = execute(conn, SWEEP_IN_FLIGHT, named_params! { ":cutoff": cutoff, ":limit": left })
        .map_err(sqlite_error("sqlite cannot sweep stale in-flight records"))?;
    Ok(completed + stale)
}

/// Checks that the file answers a query.
pub(crate) fn ping(conn: &Connection) -> Result<(), StoreError> {
    conn.query_row("SELECT 1", [], |row| row.get::<_, i64>(0)).map(drop).map_err(sqlite_error("sqlite ping failed"))
}

fn execute(conn: &Connection, sql: &str, params: &[(&str, &dyn ToSql)]) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn fenced(changed: usize) -> Result<(), StoreError> {
    if changed == 1 { Ok(()) } else { Err(StoreError::lease_lost()) }
}

fn corrupt(key: &StorageKey, what: &str) -> StoreError {
    StoreError::corrupt(format!("sqlite record {} has {what}", key.short()))
}

/// Unix milliseconds as SQLite stores them. [`storable`] keeps every time we write
/// within range, so that what is read back equals what was returned.
fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

/// Clamps `t` to what an SQLite integer holds (some 292 million years).
fn storable(t: Timestamp) -> Timestamp {
    Timestamp::from_millis(t.as_millis().min(i64::MAX as u64))
}

fn head(row: &Row<'_>, key: &StorageKey) -> Result<Head, StoreError> {
    let fingerprint = text(row, FINGERPRINT)?
        .and_then(Fingerprint::from_hex)
        .ok_or_else(|| corrupt(key, "a malformed fingerprint"))?;
    let created_at = time(row, CREATED_AT)?.ok_or_else(|| corrupt(key, "a malformed created_at_ms"))?;
    let state = match text(row, STATE)? {
        Some("in_flight") => HeadState::InFlight {
            token: text(row, TOKEN)?.and_then(Token::from_text).ok_or_else(|| corrupt(key, "a malformed token"))?,
            lease_until: time(row, LEASE_UNTIL)?.ok_or_else(|| corrupt(key, "a malformed lease_until_ms"))?,
        },
        Some("completed") => HeadState::Completed {
            completed_at: time(row, COMPLETED_AT)?.ok_or_else(|| corrupt(key, "a malformed completed_at_ms"))?,
            expires_at: time(row, EXPIRES_AT)?.ok_or_else(|| corrupt(key, "a malformed expires_at_ms"))?,
            status: match column(row, STATUS)? {
                ValueRef::Integer(v) => u16::try_from(v).ok(),
                _ => None,
            }
            .ok_or_else(|| corrupt(key, "a malformed status"))?,
        },
        _ => return Err(corrupt(key, "an unknown state")),
    };
    Ok(Head { fingerprint, created_at, state })
}

fn response(
    row: &Row<'_>,
    key: &StorageKey,
    completed_at: Timestamp,
    status: u16,
) -> Result<StoredResponse, StoreError> {
    let ValueRef::Blob(blob) = column(row, RESPONSE)? else {
        return Err(corrupt(key, "no response blob"));
    };
    let response = StoredResponse::decode(Bytes::copy_from_slice(blob))
        .map_err(|e| corrupt(key, &format!("an unreadable response ({e})")))?;
    // The columns are there for people inspecting the file; they must agree with the
    // blob, or one of them was edited by hand.
    if response.status != status || response.completed_at != completed_at {
        return Err(corrupt(key, "a response that disagrees with its status or completed_at_ms"));
    }
    Ok(response)
}

fn column<'r>(row: &'r Row<'_>, idx: usize) -> Result<ValueRef<'r>, StoreError> {
    row.get_ref(idx).map_err(sqlite_error("sqlite cannot read a column"))
}

/// A text column, or `None` when it is null, of another type, or not UTF-8.
fn text<'r>(row: &'r Row<'_>, idx: usize) -> Result<Option<&'r str>, StoreError> {
    Ok(match column(row, idx)? {
        ValueRef::Text(bytes) => std::str::from_utf8(bytes).ok(),
        _ => None,
    })
}

/// A millisecond column, or `None` when it is null, of another type, or negative.
fn time(row: &Row<'_>, idx: usize) -> Result<Option<Timestamp>, StoreError> {
    Ok(match column(row, idx)? {
        ValueRef::Integer(v) => u64::try_from(v).ok().map(Timestamp::from_millis),
        _ => None,
    })
}
