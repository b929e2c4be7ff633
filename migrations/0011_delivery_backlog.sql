-- Checks of tokens a node delivered without a proof (`delivery_checks`) wait in the check
-- backlog too, written there before they run: a crash no longer loses one, a node that
-- fails faster than the verifier keeps up has its checks wait instead of skipped, and any
-- server holding the model's reference may run them. A task can then have two checks
-- waiting: its finisher's proof check and a failed node's delivered-token check, so the key
-- becomes (task, node, kind); a task still has at most one proof check waiting.
ALTER TABLE check_backlog ADD COLUMN kind TEXT NOT NULL DEFAULT 'proof'
    CHECK (kind IN ('proof', 'delivered'));
ALTER TABLE check_backlog DROP CONSTRAINT check_backlog_pkey;
ALTER TABLE check_backlog ADD PRIMARY KEY (task_id, node_address, kind);
CREATE UNIQUE INDEX check_backlog_one_proof ON check_backlog (task_id) WHERE kind = 'proof';
-- A node's waiting delivered-token checks are counted before another is queued.
CREATE INDEX check_backlog_delivered ON check_backlog (node_address) WHERE kind = 'delivered';
-- Each drain loop claims delivered-token checks and proof checks in turn (the oldest of
-- the kind it asks for first), so neither kind starves the other.
CREATE INDEX check_backlog_delivered_queue ON check_backlog (model, queued_at) WHERE kind = 'delivered';
