-- Proof-of-inference outcomes, by task. Written when a check finishes, which may be
-- before or after the task's receipt is committed; the commit copies them onto receipts.
CREATE TABLE verifications (
    task_id      BIGINT PRIMARY KEY,
    node_address TEXT NOT NULL,
    outcome      TEXT NOT NULL CHECK (outcome IN ('verified', 'failed')),
    detail       TEXT,
    checked_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX verifications_node ON verifications (node_address);
