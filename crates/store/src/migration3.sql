-- Migration 3: isolation exclusion rules (what Selective isolation lets
-- through), the version of the rule set, and the version each machine's
-- agent reports running.
CREATE TABLE exclusion_rules (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    name             TEXT NOT NULL,
    -- The name folded to lower case (Unicode, by the store): names are
    -- unique regardless of case.
    name_key         TEXT NOT NULL UNIQUE,
    description      TEXT,
    executable_path  TEXT,
    systemd_unit     TEXT,
    -- 'Inbound' or 'Outbound'; NULL for both.
    direction        TEXT CHECK (direction IN ('Inbound', 'Outbound')),
    -- Normalized CIDR prefixes joined by ','; NULL for any.
    remote_addresses TEXT,
    -- Normalized ports and ranges ('22,8000-8100'); NULL for any.
    remote_ports     TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    -- The rule-set version this rule's last change produced.
    version          INTEGER NOT NULL
);

-- The rule-set version: one more on every change to exclusion_rules, in
-- the same transaction.
INSERT INTO meta (key, value) VALUES ('exclusion_version', '0')
    ON CONFLICT (key) DO NOTHING;

-- The rule-set version the machine's agent reports applying (NULL: none).
ALTER TABLE machines ADD COLUMN exclusion_version INTEGER;
