-- Block anchors: the Merkle roots of consecutive registry blocks, posted on chain in one
-- transaction (`Settlement.anchorBlocks`), with the same posting state machine as the
-- epochs (planned -> sent -> confirmed; the signed bytes are stored before broadcast).
-- `id` is the contract's anchor id: anchors are made on chain in this order, each once.
CREATE TABLE anchors (
    id           BIGINT PRIMARY KEY CHECK (id > 0),
    first_block  BIGINT NOT NULL UNIQUE,
    last_block   BIGINT NOT NULL CHECK (last_block >= first_block),
    root         BYTEA NOT NULL,
    contract     TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'planned' CHECK (status IN ('planned', 'sent', 'confirmed')),
    nonce        BIGINT,
    raw_tx       BYTEA,
    tx_hash      TEXT,
    planned_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at      TIMESTAMPTZ,
    confirmed_at TIMESTAMPTZ,
    chain_block  BIGINT,
    gas_used     BIGINT
);
CREATE INDEX anchors_open ON anchors (id) WHERE status <> 'confirmed';

-- The exact bytes each node signed (their keccak is `receipt_hash`), so that anyone can
-- read a receipt back and check it against its block's root and the chain. NULL for
-- receipts recorded before this migration.
ALTER TABLE receipts ADD COLUMN signed_bytes BYTEA;
