-- Tokens a node delivered to a game and then failed before its proof (a streamed answer's
-- first part, continued on another node or ended there): checked without a proof against
-- the seeded sampler (`proof::delivered`). Kept per (task, node), apart from
-- `verifications`: the node that finished the task has its own verdict for the same task
-- id. Nothing here is paid; a failure costs the node reputation and quarantines it.
CREATE TABLE delivery_checks (
    task_id      BIGINT NOT NULL,
    node_address TEXT NOT NULL,
    tokens       INTEGER NOT NULL,
    outcome      TEXT NOT NULL CHECK (outcome IN ('verified', 'failed', 'unverifiable')),
    detail       TEXT,
    checked_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, node_address)
);
CREATE INDEX delivery_checks_failed ON delivery_checks (node_address) WHERE outcome = 'failed';
