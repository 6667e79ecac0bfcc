-- Migration 6 (enroll tokens): tokens can be revoked, and one public key
-- enrolls one machine (looked up by key at enrollment).
ALTER TABLE enroll_tokens ADD COLUMN revoked_at INTEGER;
CREATE INDEX machines_public_key ON machines (public_key);
