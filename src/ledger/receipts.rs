//! Receipts and blocks: one transaction per block commits every buffered receipt (COPY
//! into a temporary table, then one INSERT … ON CONFLICT DO NOTHING, so a receipt sent
//! twice is recorded once), numbers the block and stores its Merkle root. Node
//! confirmations mark the receipts both sides agree on as payable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use bytes::Bytes;
use futures_util::SinkExt;

use super::error::LedgerError;
use super::money::Units;
use super::store::Store;
use crate::crypto::merkle::{self, task_root as confirmation_root, Hash};

/// A completed task, checked and priced, ready for the books.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    pub task: u64,
    pub game_id: i64,
    /// The node's address, `0x…` lower case.
    pub node: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub price: Units,
    /// Observed by the server; -1 when the node re-sent the receipt after a crash.
    pub latency_ms: i32,
    pub output_hash: Hash,
    pub receipt_hash: Hash,
    pub signature: Vec<u8>,
    /// The bytes the node signed (`keccak(signed_bytes) == receipt_hash`); empty: none kept.
    pub signed_bytes: Vec<u8>,
    /// The server saw the node finish this task (live, or in its completion log). A receipt
    /// it did not see is only acknowledged when the ledger already holds it, never added.
    pub witnessed: bool,
}

/// For one node and one block: every task of that node the block holds. The node confirms
/// exactly this list (or disputes part of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAck {
    pub node: String,
    pub block: u64,
    pub tasks: Vec<u64>,
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CommitOutcome {
    /// The new block, when any receipt was new.
    pub block: Option<u64>,
    pub root: Hash,
    pub recorded: usize,
    /// Receipts already on the books (sent again): ignored.
    pub duplicates: usize,
    /// Receipts for unknown games: refused.
    pub refused: usize,
    /// Per node and block, the lists to acknowledge (new block and re-sent receipts' blocks).
    pub acks: Vec<BlockAck>,
}

/// How a node's confirmation of a block came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmStatus {
    /// Root and count agree: the agreed receipts are now payable.
    Matched,
    /// Recorded, visible to the operator; nothing became payable.
    Mismatch,
    /// The block holds no task of this node: nothing recorded.
    NothingToConfirm,
}

impl ConfirmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConfirmStatus::Matched => "matched",
            ConfirmStatus::Mismatch => "mismatch",
            ConfirmStatus::NothingToConfirm => "nothing_to_confirm",
        }
    }
}

const CREATE_INCOMING: &str = "CREATE TEMP TABLE IF NOT EXISTS incoming_receipts (
    task_id BIGINT, game_id BIGINT, node_address TEXT, model TEXT, prompt_tokens INTEGER,
    completion_tokens INTEGER, price_units NUMERIC(78, 0), latency_ms INTEGER, output_hash BYTEA,
    receipt_hash BYTEA, node_signature BYTEA, signed_bytes BYTEA, witnessed BOOLEAN) ON COMMIT DELETE ROWS";

const INSERT_NEW: &str = "INSERT INTO receipts (task_id, block, game_id, node_address, model, prompt_tokens,
        completion_tokens, price_units, latency_ms, output_hash, receipt_hash, node_signature, signed_bytes)
    SELECT DISTINCT ON (i.task_id) i.task_id, $1, i.game_id, i.node_address, i.model, i.prompt_tokens,
        i.completion_tokens, i.price_units, i.latency_ms, i.output_hash, i.receipt_hash, i.node_signature,
        i.signed_bytes
    FROM incoming_receipts i
    WHERE i.witnessed AND EXISTS (SELECT 1 FROM games g WHERE g.id = i.game_id)
    ORDER BY i.task_id
    ON CONFLICT (task_id) DO NOTHING
    RETURNING task_id, node_address, receipt_hash";

/// Escapes a text field for COPY's text format.
fn copy_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// A bytea in COPY's text format (`\\x` + hex; the backslash itself escaped).
fn copy_bytes(out: &mut String, b: &[u8]) {
    out.push_str("\\\\x");
    out.push_str(&hex::encode(b));
}

fn copy_rows(receipts: &[Receipt]) -> String {
    let mut out = String::with_capacity(receipts.len() * 420);
    for r in receipts {
        let _ = write!(out, "{}\t{}\t", r.task as i64, r.game_id);
        copy_text(&mut out, &r.node);
        out.push('\t');
        copy_text(&mut out, &r.model);
        let _ = write!(
            out,
            "\t{}\t{}\t{}\t{}\t",
            r.prompt_tokens.min(i32::MAX as u32),
            r.completion_tokens.min(i32::MAX as u32),
            r.price,
            r.latency_ms
        );
        copy_bytes(&mut out, &r.output_hash);
        out.push('\t');
        copy_bytes(&mut out, &r.receipt_hash);
        out.push('\t');
        copy_bytes(&mut out, &r.signature);
        out.push('\t');
        if r.signed_bytes.is_empty() {
            out.push_str("\\N");
        } else {
            copy_bytes(&mut out, &r.signed_bytes);
        }
        out.push_str(if r.witnessed { "\tt\n" } else { "\tf\n" });
    }
    out
}

fn hash32(v: Vec<u8>) -> Result<Hash, LedgerError> {
    v.try_into().map_err(|_| LedgerError::Corrupt("a stored hash is not 32 bytes".into()))
}

impl Store {
    /// Commits `receipts` as one block (one transaction); `committed_by` names the server.
    pub async fn commit_block(&self, receipts: &[Receipt], committed_by: &str) -> Result<CommitOutcome, LedgerError> {
        if receipts.is_empty() {
            return Ok(CommitOutcome::default());
        }
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // A verdict recorded while this block commits must land on its receipt. SHARE mode
        // waits for verdict transactions in flight (so the copy below sees them) and holds
        // new ones back until this block is visible (so their update finds the receipt).
        // Taken first, and `record_verification` writes `verifications` first, so neither
        // side waits while holding another lock: no deadlock.
        tx.batch_execute("LOCK TABLE verifications IN SHARE MODE").await?;
        tx.batch_execute(CREATE_INCOMING).await?;
        let sink = tx.copy_in::<_, Bytes>("COPY incoming_receipts FROM STDIN").await?;
        let mut sink = Box::pin(sink);
        sink.send(Bytes::from(copy_rows(receipts))).await?;
        sink.as_mut().finish().await?;
        tx.execute(
            "INSERT INTO nodes (address) SELECT DISTINCT node_address FROM incoming_receipts
             ON CONFLICT (address) DO UPDATE SET last_seen = now()",
            &[],
        )
        .await?;
        let block: i64 = tx
            .query_one("UPDATE block_counter SET last_block = last_block + 1 RETURNING last_block", &[])
            .await?
            .get(0);
        let rows = tx.query(INSERT_NEW, &[&block]).await?;
        let mut inserted: Vec<(u64, String, Hash)> = Vec::with_capacity(rows.len());
        for r in &rows {
            inserted.push((r.get::<_, i64>(0) as u64, r.get(1), hash32(r.get(2))?));
        }
        inserted.sort_by_key(|(t, _, _)| *t);
        let new_ids: BTreeSet<u64> = inserted.iter().map(|(t, _, _)| *t).collect();
        let mut outcome = CommitOutcome::default();
        let submitted: HashMap<u64, &str> = receipts.iter().map(|r| (r.task, r.node.as_str())).collect();
        let others: Vec<i64> = submitted.keys().filter(|t| !new_ids.contains(t)).map(|&t| t as i64).collect();
        // Receipts sent again: acknowledge them (to their own node only) with their old block.
        let mut ack_pairs: BTreeSet<(String, u64)> = BTreeSet::new();
        if !others.is_empty() {
            let rows = tx
                .query("SELECT task_id, block, node_address FROM receipts WHERE task_id = ANY($1)", &[&others])
                .await?;
            outcome.duplicates = rows.len();
            outcome.refused = others.len() - rows.len();
            for r in rows {
                let (task, block, node): (i64, i64, String) = (r.get(0), r.get(1), r.get(2));
                if submitted.get(&(task as u64)).is_some_and(|n| *n == node) {
                    ack_pairs.insert((node, block as u64));
                }
            }
        }
        if inserted.is_empty() {
            // Nothing new: no block. Rolling back returns the block number.
            tx.rollback().await?;
        } else {
            let root = merkle::root(&inserted.iter().map(|(_, _, h)| *h).collect::<Vec<_>>());
            // Checks that finished before the receipt arrived.
            tx.execute(
                "UPDATE receipts r SET verification = v.outcome FROM verifications v
                 WHERE v.task_id = r.task_id AND v.node_address = r.node_address AND r.block = $1",
                &[&block],
            )
            .await?;
            tx.execute(
                "INSERT INTO blocks (number, merkle_root, receipt_count, committed_by) VALUES ($1, $2, $3, $4)",
                &[&block, &root.as_slice(), &(inserted.len() as i32), &committed_by],
            )
            .await?;
            let mut per_node: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for (task, node, _) in &inserted {
                per_node.entry(node.clone()).or_default().push(*task);
            }
            for (node, tasks) in per_node {
                outcome.acks.push(BlockAck { node, block: block as u64, tasks });
            }
            tx.commit().await?;
            outcome.block = Some(block as u64);
            outcome.root = root;
            outcome.recorded = inserted.len();
        }
        drop(conn); // block_tasks takes its own connection from the pool
        for (node, block) in ack_pairs {
            if outcome.acks.iter().any(|a| a.node == node && a.block == block) {
                continue;
            }
            let tasks = self.block_tasks(&node, block).await?;
            outcome.acks.push(BlockAck { node, block, tasks });
        }
        Ok(outcome)
    }

    /// The tasks of `node` in `block`, ascending.
    pub async fn block_tasks(&self, node: &str, block: u64) -> Result<Vec<u64>, LedgerError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT task_id FROM receipts WHERE node_address = $1 AND block = $2 ORDER BY task_id",
                &[&node, &(block as i64)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }

    /// Records a node's (already signature-checked) confirmation of `block`. A matched
    /// confirmation is final: later ones for the same block change nothing.
    pub async fn confirm_block(
        &self,
        node: &str,
        block: u64,
        root: Hash,
        count: u32,
        disputed: &[u64],
        signature: &[u8],
    ) -> Result<ConfirmStatus, LedgerError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let block_i = block as i64;
        let tasks: Vec<u64> = tx
            .query("SELECT task_id FROM receipts WHERE node_address = $1 AND block = $2", &[&node, &block_i])
            .await?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect();
        if tasks.is_empty() {
            return Ok(ConfirmStatus::NothingToConfirm);
        }
        let previous: Option<String> = tx
            .query_opt(
                "SELECT status FROM confirmations WHERE node_address = $1 AND block = $2 FOR UPDATE",
                &[&node, &block_i],
            )
            .await?
            .map(|r| r.get(0));
        if previous.as_deref() == Some("matched") {
            return Ok(ConfirmStatus::Matched);
        }
        let disputed: BTreeSet<u64> = disputed.iter().copied().filter(|t| tasks.contains(t)).collect();
        let agreed: Vec<u64> = tasks.iter().copied().filter(|t| !disputed.contains(t)).collect();
        let matched = confirmation_root(&agreed) == root && agreed.len() == count as usize;
        let status = if matched { ConfirmStatus::Matched } else { ConfirmStatus::Mismatch };
        let disputed_i: Vec<i64> = disputed.iter().map(|&t| t as i64).collect();
        tx.execute(
            "INSERT INTO confirmations (node_address, block, root, task_count, disputed, signature, status)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (node_address, block) DO UPDATE SET root = EXCLUDED.root, task_count = EXCLUDED.task_count,
                 disputed = EXCLUDED.disputed, signature = EXCLUDED.signature, status = EXCLUDED.status,
                 received_at = now()",
            &[&node, &block_i, &root.as_slice(), &(count as i32), &disputed_i, &signature, &status.as_str()],
        )
        .await?;
        if matched {
            tx.execute(
                "UPDATE receipts SET confirmation = CASE WHEN task_id = ANY($3) THEN 'disputed' ELSE 'confirmed' END
                 WHERE node_address = $1 AND block = $2",
                &[&node, &block_i, &disputed_i],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_escape_text_and_encode_bytes() {
        let r = Receipt {
            task: u64::MAX,
            game_id: 7,
            node: "0xab".into(),
            model: "we\tird\\name\n".into(),
            prompt_tokens: 3,
            completion_tokens: 4,
            price: Units(10u128.pow(20)),
            latency_ms: -1,
            output_hash: [1; 32],
            receipt_hash: [2; 32],
            signature: vec![0xff, 0x00],
            signed_bytes: Vec::new(),
            witnessed: true,
        };
        let mut signed = r.clone();
        signed.signed_bytes = vec![0xab];
        let row = copy_rows(&[r]);
        let fields: Vec<&str> = row.trim_end_matches('\n').split('\t').collect();
        assert_eq!(fields.len(), 13, "{row}");
        assert_eq!(fields[12], "t");
        assert_eq!(fields[11], "\\N", "no signed bytes kept: NULL");
        assert_eq!(copy_rows(&[signed]).split('\t').nth(11), Some("\\\\xab"));
        assert_eq!(fields[0], "-1", "u64::MAX is stored bit for bit as -1");
        assert_eq!(fields[3], "we\\tird\\\\name\\n");
        assert_eq!(fields[6], "100000000000000000000");
        assert_eq!(fields[10], "\\\\xff00");
    }
}
