-- Sampled tasks the verifier pool had no room for. Such a task is recorded 'unverifiable'
-- (unpaid) with a "deferred" detail and its check waits here, so that load which fills the
-- pool cannot let a sampled task through unchecked. Any server holding the model's
-- reference claims rows (a lease, so a crash mid-check frees them again), and the real
-- verdict replaces 'unverifiable' and deletes the row in one transaction; a later
-- settlement pays a task verified late. `task` is the check's JSON (prompt, completion,
-- proof), read back by `actors::check_backlog`.
CREATE TABLE check_backlog (
    task_id       BIGINT PRIMARY KEY,
    node_address  TEXT NOT NULL,
    model         TEXT NOT NULL,
    task          BYTEA NOT NULL,
    queued_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts      INTEGER NOT NULL DEFAULT 0,
    claimed_until TIMESTAMPTZ
);
CREATE INDEX check_backlog_queue ON check_backlog (model, queued_at);
