-- Migration 5: people, roles and machine groups.
--
-- Built-in roles (Viewer, Responder, Administrator) are not stored; custom
-- roles are. Names are unique without regard to case.
CREATE TABLE roles (
    name        TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
    -- Permission names, one per line.
    permissions TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE users (
    -- The object id (`oid` of the user's tokens), a GUID.
    id            TEXT NOT NULL PRIMARY KEY,
    upn           TEXT NOT NULL UNIQUE COLLATE NOCASE,
    display_name  TEXT NOT NULL,
    -- Slow salted hash of the password.
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL,
    -- User-group names, one per line.
    user_groups   TEXT NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
);

-- Machine groups. Rank 1 is the highest; a machine belongs to the
-- highest-ranked group whose rules (all that are set) it matches, else to
-- the default group, id 0, which has no row. `machines.rbac_group_id` holds
-- the result, kept current whenever a machine or a group changes.
CREATE TABLE machine_groups (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    name              TEXT NOT NULL UNIQUE COLLATE NOCASE,
    rank              INTEGER NOT NULL,
    match_tag         TEXT,
    match_name_prefix TEXT,
    match_os          TEXT,
    -- User-group names, one per line; none: open to every user.
    user_groups       TEXT NOT NULL,
    created_at        INTEGER NOT NULL
);
CREATE INDEX machines_group ON machines (rbac_group_id);
