BEGIN;
CREATE SCHEMA IF NOT EXISTS "idemgate";
CREATE TABLE IF NOT EXISTS "idemgate".idemgate_meta (name text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS "idemgate".idemgate_records (
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
    ON "idemgate".idemgate_records (expires_at) WHERE state = 'completed';
CREATE INDEX IF NOT EXISTS idemgate_records_in_flight_lease
    ON "idemgate".idemgate_records (lease_until) WHERE state = 'in_flight';
-- Live logs of streamed responses still running, for duplicates on other gateways.
CREATE TABLE IF NOT EXISTS "idemgate".idemgate_live (
    key         bytea PRIMARY KEY,
    token       uuid NOT NULL,         -- the owner's fencing token
    status      integer NOT NULL,      -- the response head: HTTP status
    headers     bytea NOT NULL,        -- and headers, as StoredResponse::encode
    ended       text CHECK (ended IN ('complete', 'broken')),  -- null while running
    expires_at  timestamptz NOT NULL   -- when sweep may delete it
);
CREATE INDEX IF NOT EXISTS idemgate_live_expiry ON "idemgate".idemgate_live (expires_at);
CREATE TABLE IF NOT EXISTS "idemgate".idemgate_live_chunks (
    key   bytea NOT NULL REFERENCES "idemgate".idemgate_live (key) ON DELETE CASCADE,
    seq   bigint NOT NULL CHECK (seq >= 0),  -- chunk number, from 0
    data  bytea NOT NULL,
    PRIMARY KEY (key, seq)
);
INSERT INTO "idemgate".idemgate_meta (name, value) VALUES ('schema_version', '1')
    ON CONFLICT (name) DO NOTHING;
COMMIT;
