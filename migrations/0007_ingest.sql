-- Registry ingest. `Store::commit_block` is the only writer of receipts: in the same
-- transaction it inserts the block row, upserts the node rows and checks the games. The
-- foreign keys repeated those checks once per receipt (three index probes per row, the
-- block's deferred to commit time), which cost more than writing the rows; the ledger
-- keeps the rule instead, and `ingest::…` tests check it after every kind of commit.
ALTER TABLE receipts
    DROP CONSTRAINT IF EXISTS receipts_block_fkey,
    DROP CONSTRAINT IF EXISTS receipts_game_id_fkey,
    DROP CONSTRAINT IF EXISTS receipts_node_address_fkey;

-- One index serves both "a block's receipts" and "a node's receipts in a block" (the
-- confirmation path), where two did; a node's recorded-task count moves to its row
-- (kept by the same upsert that records its receipts) instead of an index scan.
ALTER TABLE nodes ADD COLUMN tasks BIGINT NOT NULL DEFAULT 0;
UPDATE nodes n SET tasks = (SELECT count(*) FROM receipts r WHERE r.node_address = n.address);
CREATE INDEX receipts_block_node ON receipts (block, node_address);
DROP INDEX receipts_block;
DROP INDEX receipts_node_block;
