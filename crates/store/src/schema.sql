-- Migration 1: the initial schema. Times are INTEGER nanoseconds since the
-- Unix epoch (UTC). `seq` columns give creation order and stable paging.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE apps (
    client_id   TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    permissions TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE enroll_tokens (
    id         TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    max_uses   INTEGER,
    uses       INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE machines (
    seq                      INTEGER PRIMARY KEY AUTOINCREMENT,
    id                       TEXT NOT NULL UNIQUE,
    public_key               BLOB NOT NULL,
    revoked                  INTEGER NOT NULL DEFAULT 0,
    computer_dns_name        TEXT NOT NULL,
    first_seen               INTEGER NOT NULL,
    last_seen                INTEGER NOT NULL,
    os_platform              TEXT,
    os_version               TEXT,
    os_processor             TEXT,
    os_architecture          TEXT,
    os_build                 INTEGER,
    agent_version            TEXT,
    last_ip_address          TEXT,
    last_external_ip_address TEXT,
    onboarding_status        TEXT NOT NULL DEFAULT 'Onboarded',
    rbac_group_id            INTEGER NOT NULL DEFAULT 0,
    isolation_state          TEXT NOT NULL DEFAULT 'NotIsolated',
    isolation_scope          TEXT
);
CREATE INDEX machines_name ON machines (computer_dns_name);

CREATE TABLE machine_addresses (
    machine_id         TEXT NOT NULL REFERENCES machines (id),
    position           INTEGER NOT NULL,
    ip_address         TEXT NOT NULL,
    mac_address        TEXT,
    interface_type     TEXT,
    operational_status TEXT,
    PRIMARY KEY (machine_id, position)
);

CREATE TABLE machine_tags (
    machine_id TEXT NOT NULL REFERENCES machines (id),
    tag        TEXT NOT NULL,
    PRIMARY KEY (machine_id, tag)
);

CREATE TABLE actions (
    seq                    INTEGER PRIMARY KEY AUTOINCREMENT,
    id                     TEXT NOT NULL UNIQUE,
    action_type            TEXT NOT NULL,
    title                  TEXT,
    requestor              TEXT NOT NULL,
    requestor_comment      TEXT NOT NULL,
    status                 TEXT NOT NULL,
    machine_id             TEXT NOT NULL REFERENCES machines (id),
    computer_dns_name      TEXT,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL,
    cancellation_requestor TEXT,
    cancellation_comment   TEXT,
    cancellation_at        INTEGER,
    error_hresult          INTEGER NOT NULL DEFAULT 0,
    scope                  TEXT,
    external_id            TEXT,
    request_source         TEXT NOT NULL,
    troubleshoot_info      TEXT
);
-- The rule "at most one isolation-family action in flight per machine",
-- enforced by the database itself as a backstop to the check in code.
CREATE UNIQUE INDEX actions_one_in_flight ON actions (machine_id)
    WHERE status IN ('Pending', 'InProgress');
CREATE INDEX actions_machine ON actions (machine_id, seq);
CREATE INDEX actions_status_created ON actions (status, created_at);
