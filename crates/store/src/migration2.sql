-- Migration 2: tamper reports from agents (someone removed or changed
-- Cordon's table and the agent restored it).
ALTER TABLE machines ADD COLUMN tamper_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE machines ADD COLUMN last_tamper_at INTEGER;
ALTER TABLE machines ADD COLUMN last_tamper_detail TEXT;
