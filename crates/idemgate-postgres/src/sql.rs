//! The statement behind each operation, written once per store for its schema and
//! notification channel, then prepared once per pooled connection.
//!
//! Every time is the server's: `clock.t` is `statement_timestamp()` truncated to the
//! millisecond (the unit of [`idemgate::Timestamp`]), so that what a statement writes
//! reads back equal to what it returned. Every statement that changes a key's state
//! for its waiters ends in `pg_notify`, in the same statement, so the notification
//! is sent exactly when the change commits and never for a change that did not
//! happen — except the writes on a call's own path: a complete, which every miss
//! runs, and the live-log writes of a stream. A transaction that notifies holds a
//! server-wide lock from its commit until that commit is flushed, so notifying
//! writes ran one WAL flush at a time. These commit on their own and `NOTIFY`
//! follows, in a transaction whose commit does not wait for the flush (interleaved
//! A/B on the benchmark VM: 1.1–1.3k → 1.6–1.9k misses/s); should that notification
//! be lost, the waiters find the change when they poll.
//!
//! Under `READ COMMITTED`, an `UPDATE` or `DELETE` that finds its row changed by a
//! concurrent transaction re-checks its `WHERE` against the new row version:
//! that is what makes the conditions below compare-and-swaps.

/// The statements of one store.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) claim: String,
    pub(crate) take_over: String,
    pub(crate) replace_expired: String,
    pub(crate) renew: String,
    pub(crate) complete: String,
    pub(crate) notify: String,
    pub(crate) release: String,
    pub(crate) get: String,
    pub(crate) purge: String,
    pub(crate) sweep_records: String,
    pub(crate) sweep_live: String,
    pub(crate) live_begin: String,
    pub(crate) live_append: String,
    pub(crate) live_end: String,
    pub(crate) live_read: String,
    /// `LISTEN` on the store's channel.
    pub(crate) listen: String,
}

const CLOCK: &str = "clock AS (SELECT date_trunc('milliseconds', statement_timestamp()) AS t)";

/// Inserts a fresh claim, or else reads the record found ($1 key, $2 fingerprint, $3
/// token, $4 lease in ms). Returns one row: `inserted`, the server's `now`, and the
/// record's columns when not inserted (its response only when it will be replayed).
/// When the conflicting row was committed after this statement's snapshot, the read
/// finds nothing and the statement returns no row: the caller runs it again.
const CLAIM: &str = "WITH {clock}, ins AS (
    INSERT INTO {s}idemgate_records AS r (key, fingerprint, state, token, lease_until, created_at)
    SELECT $1, $2, 'in_flight', $3, clock.t + $4::bigint * interval '1 millisecond', clock.t FROM clock
    ON CONFLICT (key) DO NOTHING
    RETURNING r.lease_until
)
SELECT true AS inserted, clock.t AS now, NULL::bytea AS fingerprint, NULL::text AS state, NULL::uuid AS token,
       ins.lease_until, NULL::timestamptz AS completed_at, NULL::timestamptz AS expires_at,
       NULL::integer AS status, NULL::bytea AS response
FROM ins, clock
UNION ALL
SELECT false, clock.t, r.fingerprint, r.state, r.token, r.lease_until, r.completed_at, r.expires_at, r.status,
       CASE WHEN r.state = 'completed' AND r.fingerprint = $2 AND r.expires_at > clock.t THEN r.response END
FROM {s}idemgate_records r, clock
WHERE r.key = $1 AND NOT EXISTS (SELECT 1 FROM ins)";

/// Takes over an expired lease: a compare-and-swap on the stale token ($1 key, $2
/// stale token, $3 new token, $4 lease in ms, $5 fingerprint).
const TAKE_OVER: &str = "WITH {clock}
UPDATE {s}idemgate_records r
SET token = $3, lease_until = clock.t + $4::bigint * interval '1 millisecond', created_at = clock.t
FROM clock
WHERE r.key = $1 AND r.state = 'in_flight' AND r.token = $2 AND r.fingerprint = $5 AND r.lease_until <= clock.t
RETURNING r.lease_until";

/// Reuses the row of an expired completed record ($1 key, $2 fingerprint, $3 token,
/// $4 lease in ms).
const REPLACE_EXPIRED: &str = "WITH {clock}
UPDATE {s}idemgate_records r
SET fingerprint = $2, state = 'in_flight', token = $3,
    lease_until = clock.t + $4::bigint * interval '1 millisecond', created_at = clock.t,
    completed_at = NULL, expires_at = NULL, status = NULL, response = NULL
FROM clock
WHERE r.key = $1 AND r.state = 'completed' AND r.expires_at <= clock.t
RETURNING r.lease_until";

/// $1 key, $2 token, $3 lease in ms.
const RENEW: &str = "WITH {clock}
UPDATE {s}idemgate_records r SET lease_until = clock.t + $3::bigint * interval '1 millisecond'
FROM clock
WHERE r.key = $1 AND r.state = 'in_flight' AND r.token = $2
RETURNING r.lease_until";

/// $1 key, $2 token, $3 completed_at, $4 expires_at, $5 status, $6 response. Sends no
/// notification: `NOTIFY` follows once it has committed.
const COMPLETE: &str = "UPDATE {s}idemgate_records
    SET state = 'completed', token = NULL, lease_until = NULL,
        completed_at = $3, expires_at = $4, status = $5, response = $6
    WHERE key = $1 AND state = 'in_flight' AND token = $2";

/// Wakes the waiters of $1 (the key; the payload is its hex, as in the statements
/// that notify themselves) after a change that committed without notifying. A
/// statement of its own is a transaction of its own, and `set_config(..., true)` turns
/// `synchronous_commit` off for that transaction alone: its commit (a notification
/// needs a transaction id, so it has one) does not wait for the WAL flush, and holds
/// the notify lock for microseconds.
const NOTIFY: &str = "SELECT set_config('synchronous_commit', 'off', true), pg_notify('{channel}', encode($1, 'hex'))";

/// $1 key, $2 token.
const RELEASE: &str = "WITH gone AS (
    DELETE FROM {s}idemgate_records WHERE key = $1 AND state = 'in_flight' AND token = $2 RETURNING key
)
SELECT pg_notify('{channel}', encode(key, 'hex')) FROM gone";

/// $1 key.
const GET: &str =
    "SELECT fingerprint, state, token, lease_until, created_at, completed_at, expires_at, status, response
FROM {s}idemgate_records WHERE key = $1";

/// $1 key.
const PURGE: &str = "WITH gone AS (DELETE FROM {s}idemgate_records WHERE key = $1 RETURNING key)
SELECT pg_notify('{channel}', encode(key, 'hex')) FROM gone";

/// Up to $1 expired completed records and in-flight records more than $2 ms past
/// their lease. The `DELETE` checks the conditions again: a record picked from this
/// statement's snapshot may have been claimed anew since, and must then stay.
const SWEEP_RECORDS: &str = "WITH {clock}, victims AS (
    (SELECT key FROM {s}idemgate_records, clock
     WHERE state = 'completed' AND expires_at <= clock.t LIMIT $1)
    UNION ALL
    (SELECT key FROM {s}idemgate_records, clock
     WHERE state = 'in_flight' AND lease_until <= clock.t - $2::bigint * interval '1 millisecond' LIMIT $1)
    LIMIT $1
), gone AS (
    DELETE FROM {s}idemgate_records r USING clock
    WHERE r.key IN (SELECT key FROM victims)
      AND ((r.state = 'completed' AND r.expires_at <= clock.t)
        OR (r.state = 'in_flight' AND r.lease_until <= clock.t - $2::bigint * interval '1 millisecond'))
    RETURNING r.key
)
SELECT count(*) FROM gone";

/// Up to $1 live logs past their expiry (their chunks go with them).
const SWEEP_LIVE: &str = "WITH {clock}, victims AS (
    SELECT key FROM {s}idemgate_live, clock WHERE expires_at <= clock.t LIMIT $1
), gone AS (
    DELETE FROM {s}idemgate_live l USING clock
    WHERE l.key IN (SELECT key FROM victims) AND l.expires_at <= clock.t
    RETURNING l.key
)
SELECT count(*) FROM gone";

/// Opens (or replaces) the live log, fenced by the record ($1 key, $2 token, $3
/// status, $4 encoded headers, $5 ms until an unended log may be swept). The record
/// row stays share-locked until the statement commits, so no takeover slips between
/// the check and the write. `NOTIFY` follows once it has committed.
const LIVE_BEGIN: &str = "WITH {clock}, fence AS (
    SELECT key FROM {s}idemgate_records WHERE key = $1 AND state = 'in_flight' AND token = $2 FOR SHARE
), old_chunks AS (
    DELETE FROM {s}idemgate_live_chunks WHERE key IN (SELECT key FROM fence)
), log AS (
    INSERT INTO {s}idemgate_live (key, token, status, headers, ended, expires_at)
    SELECT fence.key, $2, $3, $4, NULL, clock.t + $5::bigint * interval '1 millisecond' FROM fence, clock
    ON CONFLICT (key) DO UPDATE
    SET token = excluded.token, status = excluded.status, headers = excluded.headers, ended = NULL,
        expires_at = excluded.expires_at
    RETURNING key
)
SELECT key FROM log";

/// Appends chunks $4 numbered from $3, fenced by the record and the log ($1 key, $2
/// token); chunk numbers already present are left as they are. `NOTIFY` follows once
/// it has committed.
const LIVE_APPEND: &str = "WITH fence AS (
    SELECT l.key FROM {s}idemgate_live l JOIN {s}idemgate_records r ON r.key = l.key
    WHERE l.key = $1 AND l.token = $2 AND l.ended IS NULL AND r.state = 'in_flight' AND r.token = $2
    FOR SHARE
), added AS (
    INSERT INTO {s}idemgate_live_chunks (key, seq, data)
    SELECT fence.key, $3::bigint + c.ord - 1, c.data FROM fence, unnest($4::bytea[]) WITH ORDINALITY AS c(data, ord)
    ON CONFLICT (key, seq) DO NOTHING
)
SELECT key FROM fence";

/// Ends the live log, fenced by its own token only ($1 key, $2 token, $3 how, $4
/// linger in ms). Ending it again the same way is a no-op that succeeds. `NOTIFY`
/// follows once it has committed.
const LIVE_END: &str = "WITH {clock}, ended AS (
    UPDATE {s}idemgate_live l SET ended = $3, expires_at = clock.t + $4::bigint * interval '1 millisecond'
    FROM clock
    WHERE l.key = $1 AND l.token = $2 AND (l.ended IS NULL OR l.ended = $3)
    RETURNING l.key
)
SELECT key FROM ended";

/// The live log of $1 with its chunks from number $2 on, unless it has expired. One
/// statement, so the head, the chunks and the end are one consistent snapshot.
const LIVE_READ: &str = "SELECT l.token, l.status, l.headers, l.ended,
    ARRAY(SELECT c.seq FROM {s}idemgate_live_chunks c WHERE c.key = l.key AND c.seq >= $2 ORDER BY c.seq) AS seqs,
    ARRAY(SELECT c.data FROM {s}idemgate_live_chunks c WHERE c.key = l.key AND c.seq >= $2 ORDER BY c.seq) AS chunks
FROM {s}idemgate_live l
WHERE l.key = $1 AND l.expires_at > statement_timestamp()";

impl Sql {
    /// The statements for tables under `prefix` (`"schema".` or empty) and
    /// notifications on `channel`; both were validated as plain identifiers.
    pub(crate) fn new(prefix: &str, channel: &str) -> Self {
        let fill = |sql: &str| sql.replace("{clock}", CLOCK).replace("{s}", prefix).replace("{channel}", channel);
        Self {
            claim: fill(CLAIM),
            take_over: fill(TAKE_OVER),
            replace_expired: fill(REPLACE_EXPIRED),
            renew: fill(RENEW),
            complete: fill(COMPLETE),
            notify: fill(NOTIFY),
            release: fill(RELEASE),
            get: fill(GET),
            purge: fill(PURGE),
            sweep_records: fill(SWEEP_RECORDS),
            sweep_live: fill(SWEEP_LIVE),
            live_begin: fill(LIVE_BEGIN),
            live_append: fill(LIVE_APPEND),
            live_end: fill(LIVE_END),
            live_read: fill(LIVE_READ),
            listen: format!("LISTEN \"{channel}\""),
        }
    }
}
