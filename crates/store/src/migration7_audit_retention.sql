-- Migration 7: the audit trail's folding and retention.
--
-- `count`: how many calls one record stands for. Repeated refusals of one
-- kind from one source within a minute are folded into one record, written
-- when the minute ends; every other record stands for one call.
ALTER TABLE audit_events ADD COLUMN count INTEGER NOT NULL DEFAULT 1;

-- Where the chain starts after `cordon audit prune` removed its oldest
-- records: the last removed record's seq, hash and time, signed with the
-- server's token-signing key. The first record kept chains to `hash`, so
-- the chain still verifies from there. Only the latest checkpoint is kept.
CREATE TABLE audit_checkpoints (
    seq       INTEGER PRIMARY KEY,
    hash      TEXT NOT NULL,
    at        INTEGER NOT NULL,
    pruned_at INTEGER NOT NULL,
    -- Base64url RS256 signature of `AuditCheckpoint::signed_text`.
    signature TEXT NOT NULL
);
