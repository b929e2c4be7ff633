-- The registry: games and their keys, nodes, receipts committed block by block, node
-- confirmations, and the tables settlement fills per epoch. Money is NUMERIC(78,0) in
-- base units (1e-18 of the settlement token): integers only, wide enough for uint256.

CREATE TABLE server_secrets (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE games (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'removed')),
    status_reason TEXT,
    escrow_units NUMERIC(78, 0) NOT NULL DEFAULT 0 CHECK (escrow_units >= 0),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    hash                TEXT PRIMARY KEY,            -- SHA-256 of the key, hex; never the key
    game_id             BIGINT NOT NULL REFERENCES games (id),
    requests_per_minute INTEGER NOT NULL CHECK (requests_per_minute >= 0),
    tokens_per_minute   INTEGER NOT NULL CHECK (tokens_per_minute >= 0),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at          TIMESTAMPTZ
);

CREATE TABLE nodes (
    address     TEXT PRIMARY KEY,                    -- 0x-prefixed, lower case
    reputation  INTEGER NOT NULL DEFAULT 10000,      -- basis points
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'quarantined', 'banned')),
    first_seen  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Block numbers are handed out by this one row, inside the committing transaction, so
-- they are dense and unique even with several servers on one database.
CREATE TABLE block_counter (
    only_row   BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    last_block BIGINT NOT NULL
);
INSERT INTO block_counter (last_block) VALUES (0);

CREATE TABLE blocks (
    number        BIGINT PRIMARY KEY,
    merkle_root   BYTEA NOT NULL,                    -- over receipt hashes, in task id order
    receipt_count INTEGER NOT NULL,
    committed_by  TEXT NOT NULL,                     -- the committing server's address
    committed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE receipts (
    task_id           BIGINT PRIMARY KEY,            -- u64 stored bit for bit
    block             BIGINT NOT NULL REFERENCES blocks (number) DEFERRABLE INITIALLY DEFERRED,
    game_id           BIGINT NOT NULL REFERENCES games (id),
    node_address      TEXT NOT NULL REFERENCES nodes (address),
    model             TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
    price_units       NUMERIC(78, 0) NOT NULL CHECK (price_units >= 0),
    latency_ms        INTEGER NOT NULL,              -- -1: re-sent by the node, not observed
    output_hash       BYTEA NOT NULL,
    receipt_hash      BYTEA NOT NULL,
    node_signature    BYTEA NOT NULL,
    verification      TEXT NOT NULL DEFAULT 'unchecked' CHECK (verification IN ('unchecked', 'verified', 'failed')),
    confirmation      TEXT NOT NULL DEFAULT 'pending' CHECK (confirmation IN ('pending', 'confirmed', 'disputed')),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX receipts_node_block ON receipts (node_address, block);
CREATE INDEX receipts_game_time ON receipts (game_id, created_at);
CREATE INDEX receipts_block ON receipts (block);

CREATE TABLE confirmations (
    node_address TEXT NOT NULL REFERENCES nodes (address),
    block        BIGINT NOT NULL REFERENCES blocks (number),
    root         BYTEA NOT NULL,
    task_count   INTEGER NOT NULL,
    disputed     BIGINT[] NOT NULL DEFAULT '{}',
    signature    BYTEA NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('matched', 'mismatch')),
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (node_address, block)
);

-- Filled by settlement, one row per epoch, per game charged and per node paid.
CREATE TABLE epochs (
    number      BIGINT PRIMARY KEY,
    first_block BIGINT NOT NULL,
    last_block  BIGINT NOT NULL,
    payout_root BYTEA,
    status      TEXT NOT NULL DEFAULT 'planned' CHECK (status IN ('planned', 'sent', 'confirmed')),
    tx_hash     TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE charges (
    epoch   BIGINT NOT NULL REFERENCES epochs (number),
    game_id BIGINT NOT NULL REFERENCES games (id),
    amount  NUMERIC(78, 0) NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (epoch, game_id)
);

CREATE TABLE payouts (
    epoch        BIGINT NOT NULL REFERENCES epochs (number),
    node_address TEXT NOT NULL REFERENCES nodes (address),
    amount       NUMERIC(78, 0) NOT NULL CHECK (amount >= 0),
    claimed      BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (epoch, node_address)
);
