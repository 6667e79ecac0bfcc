-- Migration 10: webhooks and their durable outbox.
--
-- A webhook names a receiver (an HTTPS URL), the event types it wants and
-- the secret its deliveries are signed with (Standard Webhooks). When a
-- change writes an event of one of those types, the same transaction
-- writes one delivery per webhook (events.rs): a committed change always
-- has its deliveries, whatever happens to the process after the commit,
-- and the event log's retention prune never takes a delivery with it (the
-- delivery keeps its own copy of the body).
CREATE TABLE webhooks (
    id          TEXT PRIMARY KEY,
    url         TEXT NOT NULL,
    -- The event types, separated by single spaces.
    events      TEXT NOT NULL,
    -- `whsec_<base64>`: the HMAC key. Kept as is (a signature needs it);
    -- the database is private to the server's user, like the token-signing
    -- key it also holds.
    secret      TEXT NOT NULL,
    -- PEM certificates the receiver's chain must end in (NULL: the
    -- system's roots).
    ca_pem      TEXT,
    description TEXT,
    created_by  TEXT NOT NULL,
    -- Nanoseconds since the Unix epoch.
    created_at  INTEGER NOT NULL
);

CREATE TABLE webhook_deliveries (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The `webhook-id` header: the same on every attempt of a delivery.
    id              TEXT NOT NULL UNIQUE,
    webhook_id      TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    -- The event's id in the log (`GET /api/events`), its type and body.
    event_seq       INTEGER NOT NULL,
    event_type      TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- When the next attempt is due (pending only).
    next_attempt_at INTEGER,
    last_attempt_at INTEGER,
    -- The receiver's last HTTP status (NULL: no answer) and what went wrong.
    last_status     INTEGER,
    last_error      TEXT,
    delivered_at    INTEGER
);

-- The dispatcher's question: a webhook's deliveries due now, oldest first.
CREATE INDEX webhook_deliveries_due
    ON webhook_deliveries (webhook_id, next_attempt_at, seq) WHERE state = 'pending';
-- One webhook's deliveries, newest first (`cordon webhook deliveries
-- --webhook`, `GET /api/webhooks/{id}/deliveries`), and its deletion in
-- batches.
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, seq);
-- The history prune: finished deliveries, oldest first.
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at)
    WHERE state != 'pending';
-- The expiry of deliveries never tried within their window.
CREATE INDEX webhook_deliveries_pending_created ON webhook_deliveries (created_at)
    WHERE state = 'pending';

-- Every attempt of a delivery and its outcome.
CREATE TABLE webhook_attempts (
    delivery_seq INTEGER NOT NULL REFERENCES webhook_deliveries (seq) ON DELETE CASCADE,
    n            INTEGER NOT NULL,
    at           INTEGER NOT NULL,
    status       INTEGER,
    error        TEXT,
    duration_ms  INTEGER NOT NULL,
    PRIMARY KEY (delivery_seq, n)
) WITHOUT ROWID;
