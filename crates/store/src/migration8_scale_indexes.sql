-- Migration 8: indexes that keep the action and machine queries flat as the
-- store grows to millions of actions (BENCHMARKS.md, "A big store").
--
-- Actions of one status in creation order (`$filter=status eq …`, listed
-- by `seq` like every list): walked in index order, never sorted. Replaces
-- (status, created_at), which no query needs any more: the expiry sweeper
-- reads the actions of two statuses, whichever their times.
DROP INDEX actions_status_created;
CREATE INDEX actions_status_seq ON actions (status, seq);

-- The machines of some groups, by id, read from this index alone: the
-- scope of a group-scoped user's lists. Replaces (rbac_group_id).
DROP INDEX machines_group;
CREATE INDEX machines_group_id ON machines (rbac_group_id, id);

-- A machine by name, without regard to case (GET /api/machines/{name}).
CREATE INDEX machines_name_nocase ON machines (computer_dns_name COLLATE NOCASE, last_seen);

-- The revoked machines, which the server polls to close their sessions.
CREATE INDEX machines_revoked ON machines (id) WHERE revoked = 1;

-- Actions counted by type and status (the server's per-type, per-status
-- gauge, counted once at start): read from this index alone, never from
-- the table, so a restart over millions of actions is not held up by it.
CREATE INDEX actions_type_status ON actions (action_type, status);
