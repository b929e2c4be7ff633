-- Settlement: game wallets (where escrow is kept on chain), which epoch settled each
-- receipt, and the posting state machine of each epoch (planned -> sent -> confirmed).

ALTER TABLE games ADD COLUMN wallet TEXT UNIQUE CHECK (wallet ~ '^0x[0-9a-f]{40}$');
-- Who suspended a game: the operator (by hand) or settlement (escrow short). Settlement
-- lifts only its own suspensions.
ALTER TABLE games ADD COLUMN suspended_by TEXT CHECK (suspended_by IN ('operator', 'escrow'));
UPDATE games SET suspended_by = 'operator' WHERE status = 'suspended';
-- Internal games (quality checks) are charged to the operator's own escrow.
ALTER TABLE games ADD COLUMN internal BOOLEAN NOT NULL DEFAULT false;
UPDATE games SET internal = true WHERE name = 'ludus-quality-checks';
ALTER TABLE games ADD COLUMN escrow_checked_at TIMESTAMPTZ;

-- NULL: not settled yet. A receipt is settled in exactly one epoch.
ALTER TABLE receipts ADD COLUMN epoch BIGINT REFERENCES epochs (number);
CREATE INDEX receipts_unsettled ON receipts (game_id, block, task_id) WHERE epoch IS NULL;
CREATE INDEX receipts_epoch ON receipts (epoch) WHERE epoch IS NOT NULL;

ALTER TABLE epochs
    ADD COLUMN contract     TEXT NOT NULL DEFAULT '',
    ADD COLUMN task_count   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN payout_total NUMERIC(78, 0) NOT NULL DEFAULT 0,
    ADD COLUMN charge_total NUMERIC(78, 0) NOT NULL DEFAULT 0,
    ADD COLUMN nonce        BIGINT,
    ADD COLUMN raw_tx       BYTEA,
    ADD COLUMN sent_at      TIMESTAMPTZ,
    ADD COLUMN confirmed_at TIMESTAMPTZ,
    ADD COLUMN chain_block  BIGINT,
    ADD COLUMN gas_used     BIGINT;

ALTER TABLE charges ADD COLUMN wallet TEXT NOT NULL DEFAULT '';
ALTER TABLE charges ALTER COLUMN wallet DROP DEFAULT;

-- When settlement last tried to plan an epoch (even with nothing to settle): an epoch is
-- due once an epoch boundary has passed since.
CREATE TABLE settlement_state (
    only_row     BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    last_attempt TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO settlement_state DEFAULT VALUES;
