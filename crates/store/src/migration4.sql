-- Migration 4: the audit trail. Append-only: the store only ever inserts
-- rows (and sets the new row's hash in the same transaction). Each row's
-- hash covers the previous row's hash and the row's own fields, so an
-- edited, deleted or reordered row breaks the chain (`Store::verify_audit`).
CREATE TABLE audit_events (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    -- Nanoseconds since the Unix epoch.
    at             INTEGER NOT NULL,
    principal      TEXT NOT NULL,
    source_address TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    method         TEXT NOT NULL,
    -- The request's path.
    target         TEXT NOT NULL,
    action         TEXT NOT NULL,
    -- 'Succeeded', 'Refused' or 'Failed'.
    outcome        TEXT NOT NULL,
    -- The HTTP status of the response.
    status         INTEGER NOT NULL,
    detail         TEXT,
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL
);

CREATE INDEX audit_events_at ON audit_events (at);
