-- Answers the network failed to deliver: a job forwarded to another server whose answer
-- never came back whole (a lost event nobody could send again, the running server gone
-- silent or restarted). The game got an error, so the task is neither charged to it nor
-- paid to its node, whichever server records its receipt, before or after this row.
-- Written by the server that held the game's connection; read by settlement, escrow
-- checks and the reports.
CREATE TABLE undelivered (
    task_id     BIGINT PRIMARY KEY,                -- u64 stored bit for bit
    recorded_by TEXT NOT NULL,                     -- the server that gave the job up
    reason      TEXT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
