-- Migration 9: the event log, which `GET /api/events` replays and
-- webhooks will deliver from.
--
-- One row per change worth telling: an action created or changed status,
-- a machine's isolation state or scope moved, an exclusion rule created,
-- changed or deleted, an audit record appended. Each row is written in the
-- transaction of its change (the writer connection captures the changes
-- with temporary triggers, see events.rs), so a committed change always
-- has its row and a row never exists without its change. Rows are only
-- appended, and removed only by the retention prune, oldest first.
CREATE TABLE events (
    -- The durable event id: AUTOINCREMENT, so never reused, even once
    -- every row was pruned.
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    -- `machineAction.created`, `machine.isolationChanged`, ...
    type       TEXT NOT NULL,
    -- Nanoseconds since the Unix epoch.
    at         INTEGER NOT NULL,
    -- The machine the event concerns and its group at that moment (NULL
    -- for exclusion rule and audit events).
    machine_id TEXT,
    group_id   INTEGER,
    -- Who may see it: 'machine' (callers reaching group_id), 'settings'
    -- or 'audit'.
    audience   TEXT NOT NULL CHECK (audience IN ('machine', 'settings', 'audit')),
    -- The event as sent: the Standard Webhooks payload
    -- {"type","timestamp","data"}, rendered once, when written.
    body       TEXT NOT NULL
);

-- The retention prune: the rows older than a time, oldest first.
CREATE INDEX events_at ON events (at);
