-- Near-tie steering (docs/proof-of-inference.md): the near-ties the verifier forgave a
-- node, one row each, and per node the sums the steering test judges. Written in the
-- transaction that records the task's verdict, once per task.
CREATE TABLE forgiven_deviations (
    task_id         BIGINT NOT NULL,
    node_address    TEXT NOT NULL,
    token_index     INTEGER NOT NULL,            -- generated-token index
    gap             REAL NOT NULL,               -- score gap to the reference's pick
    rank            INTEGER NOT NULL,            -- the node's token among the reference's scores
    reference_token INTEGER NOT NULL,
    node_token      INTEGER NOT NULL,
    passed_end      BOOLEAN NOT NULL,            -- the reference ended the answer here
    took_end        BOOLEAN NOT NULL,            -- the node ended it where the reference went on
    PRIMARY KEY (task_id, token_index)
);
CREATE INDEX forgiven_deviations_node ON forgiven_deviations (node_address);

-- What each verified task added: the format the proof declared, the answer's length past
-- the reference's end.
ALTER TABLE verifications
    ADD COLUMN format TEXT,
    ADD COLUMN tokens INTEGER,
    ADD COLUMN wide_deviations INTEGER,
    ADD COLUMN ends_passed INTEGER,
    ADD COLUMN tokens_past_end INTEGER;

-- Running sums over a node's verified tasks, and the flag once they are improbable for an
-- honest node (a flagged node is quarantined and checked on every task).
ALTER TABLE nodes
    ADD COLUMN checked_tasks BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN checked_tokens BIGINT NOT NULL DEFAULT 0,
    -- each count with the most an honest node in the declared formats would show
    ADD COLUMN wide_deviations BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN expected_wide DOUBLE PRECISION NOT NULL DEFAULT 0,
    ADD COLUMN ends_passed BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN expected_ends_passed DOUBLE PRECISION NOT NULL DEFAULT 0,
    ADD COLUMN steering_flagged_at TIMESTAMPTZ,
    ADD COLUMN steering_reason TEXT;
