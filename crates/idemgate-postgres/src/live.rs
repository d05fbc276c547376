//! Live logs: the head and the chunks of a streamed response while it runs, so that
//! a duplicate on another gateway can follow it.
//!
//! A log is a row in `idemgate_live` (the owner's token, the head, how it ended) and
//! its chunks in `idemgate_live_chunks`, numbered from 0. Opening and appending are
//! fenced by the record (still in flight under the owner's token) and appending also
//! by the log's token; ending is fenced by the log alone, since `complete` or
//! `release` has changed the record by then. An ended log lingers for
//! [`LIVE_LOG_LINGER`] so that slow followers can finish; one that never ends (its
//! owner died) is swept after [`STALE_IN_FLIGHT_GRACE`], like its record.

use bytes::Bytes;
use deadpool_postgres::ClientWrapper;
use idemgate::store::{LIVE_LOG_LINGER, LiveEnd, LiveHead, LiveRead, STALE_IN_FLIGHT_GRACE};
use idemgate::{Lease, StorageKey, StoreError, StoredResponse, Timestamp, Token};
use uuid::Uuid;

use crate::pool::pg_error;
use crate::records::{corrupt, duration_ms, fenced_then_notify, get, prepare, uuid};
use crate::sql::Sql;

/// Opens the log of `lease`, replacing any earlier log of the key.
pub(crate) async fn begin(client: &ClientWrapper, sql: &Sql, lease: &Lease, head: &LiveHead) -> Result<(), StoreError> {
    let stmt = prepare(client, &sql.live_begin).await?;
    // The head is kept in the record encoding (a response with no chunks), which is
    // versioned and already decodes every header value byte for byte.
    let headers = StoredResponse::new(head.status, head.headers.clone(), Vec::new(), Timestamp::default()).encode();
    let changed = client
        .execute(
            &stmt,
            &[
                &&lease.key.as_bytes()[..],
                &uuid(lease.token),
                &i32::from(head.status),
                &headers,
                &duration_ms(STALE_IN_FLIGHT_GRACE),
            ],
        )
        .await
        .map_err(pg_error("postgres cannot open a live log"))?;
    fenced_then_notify(client, sql, &lease.key, changed).await
}

/// Appends `chunks` as numbers `first`, `first + 1`, ...
pub(crate) async fn append(
    client: &ClientWrapper,
    sql: &Sql,
    lease: &Lease,
    first: u64,
    chunks: &[Bytes],
) -> Result<(), StoreError> {
    let stmt = prepare(client, &sql.live_append).await?;
    let first = i64::try_from(first)
        .map_err(|e| StoreError::unavailable("postgres cannot number a live chunk past 2^63", e))?;
    let data: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
    let changed = client
        .execute(&stmt, &[&&lease.key.as_bytes()[..], &uuid(lease.token), &first, &data])
        .await
        .map_err(pg_error("postgres cannot append to a live log"))?;
    fenced_then_notify(client, sql, &lease.key, changed).await
}

/// Ends the log of `lease` as `end`.
pub(crate) async fn end(client: &ClientWrapper, sql: &Sql, lease: &Lease, end: LiveEnd) -> Result<(), StoreError> {
    let stmt = prepare(client, &sql.live_end).await?;
    let changed = client
        .execute(
            &stmt,
            &[&&lease.key.as_bytes()[..], &uuid(lease.token), &end_text(end), &duration_ms(LIVE_LOG_LINGER)],
        )
        .await
        .map_err(pg_error("postgres cannot end a live log"))?;
    fenced_then_notify(client, sql, &lease.key, changed).await
}

/// The log of `key` from chunk number `from` on.
pub(crate) async fn read(
    client: &ClientWrapper,
    sql: &Sql,
    key: &StorageKey,
    from: u64,
) -> Result<Option<LiveRead>, StoreError> {
    let stmt = prepare(client, &sql.live_read).await?;
    let from = i64::try_from(from).unwrap_or(i64::MAX);
    let Some(row) = client
        .query_opt(&stmt, &[&&key.as_bytes()[..], &from])
        .await
        .map_err(pg_error("postgres cannot read a live log"))?
    else {
        return Ok(None);
    };
    let token = Token::from_u128(get::<Uuid>(&row, "token", key)?.as_u128());
    let headers: &[u8] = get(&row, "headers", key)?;
    let head = StoredResponse::decode(Bytes::copy_from_slice(headers))
        .map_err(|e| corrupt(key, &format!("an unreadable live log head ({e})")))?;
    let status: i32 = get(&row, "status", key)?;
    if i32::from(head.status) != status {
        return Err(corrupt(key, "a live log head that disagrees with its status"));
    }
    let end = match get::<Option<&str>>(&row, "ended", key)? {
        None => None,
        Some("complete") => Some(LiveEnd::Complete),
        Some("broken") => Some(LiveEnd::Broken),
        Some(_) => return Err(corrupt(key, "a live log that ended in an unknown way")),
    };
    let seqs: Vec<i64> = get(&row, "seqs", key)?;
    let data: Vec<Vec<u8>> = get(&row, "chunks", key)?;
    // Only the run of chunks that continues from `from`: a reader must never skip
    // over a chunk that has not arrived yet.
    let chunks = seqs
        .iter()
        .zip(data)
        .zip(from..)
        .take_while(|((seq, _), expected)| **seq == *expected)
        .map(|((_, bytes), _)| Bytes::from(bytes))
        .collect();
    Ok(Some(LiveRead { token, head: LiveHead { status: head.status, headers: head.headers }, chunks, end }))
}

const fn end_text(end: LiveEnd) -> &'static str {
    match end {
        LiveEnd::Complete => "complete",
        LiveEnd::Broken => "broken",
    }
}
