//! Receipts and blocks: one transaction per block commits every buffered receipt, numbers
//! the block and stores its Merkle root. The tasks already on the books are looked up
//! first (one index probe each: a receipt sent twice is recorded once), and only the new
//! ones are written, by one binary COPY straight into `receipts`; a task another server
//! records in between makes the COPY fail on the primary key, and the block is tried
//! again from the start. Node confirmations mark the receipts both sides agree on as
//! payable.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use bytes::Bytes;
use futures_util::SinkExt;

use tokio_postgres::types::Type;

use super::copy_binary::CopyRows;
use super::error::LedgerError;
use super::store::Store;
pub use crate::books::ConfirmStatus;
use crate::books::Units;
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
    /// The server picked this task for a proof check: recorded `sampled`, and paid only
    /// once its verdict is `verified` (never on the receipt alone).
    pub sampled: bool,
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

/// The columns `commit_block` COPYs, in [`copy_rows`]' order.
/// A parameter of a `query_typed` call, with its type (no prepare round trip).
type Typed<'a> = (&'a (dyn tokio_postgres::types::ToSql + Sync), Type);

/// Attempts at a block before giving up on a race with other servers for its tasks.
const COMMIT_ATTEMPTS: usize = 8;

const COPY_RECEIPTS: &str = "COPY receipts (task_id, block, game_id, node_address, model, prompt_tokens,
    completion_tokens, price_units, latency_ms, output_hash, receipt_hash, node_signature, signed_bytes,
    verification) FROM STDIN (FORMAT binary)";

/// `receipts` as binary COPY rows of block `block`, in [`COPY_RECEIPTS`]' columns.
fn copy_rows(receipts: &[&Receipt], block: i64) -> Vec<u8> {
    let mut rows = CopyRows::with_capacity(receipts.iter().map(|r| 200 + r.signed_bytes.len()).sum());
    for r in receipts {
        rows.row(14)
            .int8(r.task as i64)
            .int8(block)
            .int8(r.game_id)
            .text(&r.node)
            .text(&r.model)
            .int4(r.prompt_tokens.min(i32::MAX as u32) as i32)
            .int4(r.completion_tokens.min(i32::MAX as u32) as i32)
            .numeric(r.price.0)
            .int4(r.latency_ms)
            .bytea(Some(&r.output_hash))
            .bytea(Some(&r.receipt_hash))
            .bytea(Some(&r.signature))
            .bytea((!r.signed_bytes.is_empty()).then_some(r.signed_bytes.as_slice()))
            .text(if r.sampled { "sampled" } else { "unchecked" });
    }
    rows.finish()
}

impl Store {
    /// Commits `receipts` as one block (one transaction); `committed_by` names the server.
    /// A receipt already on the books (sent again) is acknowledged with its old block, one
    /// for an unknown game or not witnessed by the server is refused, and the rest become
    /// the new block, in task-id order, each task once.
    pub async fn commit_block(&self, receipts: &[Receipt], committed_by: &str) -> Result<CommitOutcome, LedgerError> {
        if receipts.is_empty() {
            return Ok(CommitOutcome::default());
        }
        // One receipt per task: the first the server witnessed, else the first one sent. A
        // receipt it never saw finish (from the node that failed the task, re-sent, say)
        // must not shadow the one of the node that did: both would be lost.
        let mut seen = HashSet::with_capacity(receipts.len());
        let (witnessed, not_witnessed): (Vec<&Receipt>, Vec<&Receipt>) = receipts.iter().partition(|r| r.witnessed);
        let unique: Vec<&Receipt> =
            witnessed.into_iter().chain(not_witnessed).filter(|r| seen.insert(r.task)).collect();
        // Receipts the server saw finish are new but for rare races: write them straight
        // away, and look up what is already recorded only when the COPY says one is (or the
        // batch holds receipts re-sent after a reconnect, which often are).
        let mut look_up = unique.iter().any(|r| r.latency_ms < 0);
        let mut outcome = None;
        for _ in 0..COMMIT_ATTEMPTS {
            outcome = self.try_commit(&unique, committed_by, look_up).await?;
            if outcome.is_some() {
                break;
            }
            // A task was already recorded (or another server recorded it after we looked).
            look_up = true;
        }
        let (mut outcome, ack_pairs) = outcome.ok_or_else(|| {
            LedgerError::Database(format!("block commit lost the race for its tasks {COMMIT_ATTEMPTS} times"))
        })?;
        let old: Vec<(String, u64)> = ack_pairs
            .into_iter()
            .filter(|(node, block)| !outcome.acks.iter().any(|a| a.node == *node && a.block == *block))
            .collect();
        outcome.acks.extend(self.blocks_tasks(&old).await?);
        Ok(outcome)
    }

    /// One attempt at [`Store::commit_block`], looking up the tasks already recorded first
    /// when `look_up`; `None` when a task it took for new was recorded already (nothing
    /// was written).
    async fn try_commit(
        &self,
        unique: &[&Receipt],
        committed_by: &str,
        look_up: bool,
    ) -> Result<Option<(CommitOutcome, BTreeSet<(String, u64)>)>, LedgerError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // A verdict recorded while this block commits must land on its receipt. SHARE mode
        // waits for verdict transactions in flight (so the update below sees them) and holds
        // new ones back until this block is visible (so their update finds the receipt).
        // Taken first, and `record_verification` writes `verifications` first, so neither
        // side waits while holding another lock: no deadlock.
        let ids: Vec<i64> = if look_up { unique.iter().map(|r| r.task as i64).collect() } else { Vec::new() };
        let games: Vec<i64> = unique.iter().map(|r| r.game_id).collect::<BTreeSet<_>>().into_iter().collect();
        // One round trip: the lock, the tasks already recorded (if asked), the games that exist.
        let ids_p: [Typed; 1] = [(&ids, Type::INT8_ARRAY)];
        let games_p: [Typed; 1] = [(&games, Type::INT8_ARRAY)];
        let (_, recorded, known) = tokio::try_join!(
            tx.batch_execute("LOCK TABLE verifications IN SHARE MODE"),
            tx.query_typed("SELECT task_id, block, node_address FROM receipts WHERE task_id = ANY($1)", &ids_p),
            tx.query_typed("SELECT id FROM games WHERE id = ANY($1)", &games_p),
        )?;
        let existing: HashMap<u64, (u64, String)> =
            recorded.iter().map(|r| (r.get::<_, i64>(0) as u64, (r.get::<_, i64>(1) as u64, r.get(2)))).collect();
        let known: HashSet<i64> = known.iter().map(|r| r.get(0)).collect();
        let mut new: Vec<&Receipt> = unique
            .iter()
            .copied()
            .filter(|r| !existing.contains_key(&r.task) && r.witnessed && known.contains(&r.game_id))
            .collect();
        new.sort_unstable_by_key(|r| r.task);
        let mut outcome = CommitOutcome {
            duplicates: existing.len(),
            refused: unique.len() - existing.len() - new.len(),
            ..CommitOutcome::default()
        };
        // Receipts sent again: acknowledge them (to their own node only) with their old block.
        let ack_pairs: BTreeSet<(String, u64)> = unique
            .iter()
            .filter_map(|r| existing.get(&r.task).filter(|(_, node)| *node == r.node).map(|(b, n)| (n.clone(), *b)))
            .collect();
        if new.is_empty() {
            // Nothing new: no block, no block number taken.
            tx.rollback().await?;
            return Ok(Some((outcome, ack_pairs)));
        }
        // Sorted, so two servers upserting the same nodes lock them in the same order.
        let mut per_node: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for r in &new {
            per_node.entry(&r.node).or_default().push(r.task);
        }
        let nodes: Vec<&str> = per_node.keys().copied().collect();
        let counts: Vec<i64> = per_node.values().map(|t| t.len() as i64).collect();
        // One round trip: the nodes (and their task counts), the block number.
        let nodes_p: [Typed; 2] = [(&nodes, Type::TEXT_ARRAY), (&counts, Type::INT8_ARRAY)];
        let (_, counter) = tokio::try_join!(
            tx.query_typed(
                "INSERT INTO nodes (address, tasks) SELECT * FROM unnest($1::text[], $2::bigint[])
                 ON CONFLICT (address) DO UPDATE SET last_seen = now(), tasks = nodes.tasks + excluded.tasks",
                &nodes_p
            ),
            tx.query_typed("UPDATE block_counter SET last_block = last_block + 1 RETURNING last_block", &[]),
        )?;
        let block: i64 = counter.first().ok_or_else(|| LedgerError::Corrupt("no block counter row".into()))?.get(0);
        // The Merkle root is computed on another thread while Postgres takes the rows.
        let hashes: Vec<Hash> = new.iter().map(|r| r.receipt_hash).collect();
        let root = tokio::task::spawn_blocking(move || merkle::root(&hashes));
        let sink = tx.copy_in::<_, Bytes>(COPY_RECEIPTS).await?;
        let mut sink = Box::pin(sink);
        let copied = match sink.send(Bytes::from(copy_rows(&new, block))).await {
            Ok(()) => sink.as_mut().finish().await.map(|_| ()),
            Err(e) => Err(e),
        };
        match copied {
            Ok(()) => {}
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let new_ids: Vec<i64> = new.iter().map(|r| r.task as i64).collect();
        let root = root.await.map_err(|e| LedgerError::Corrupt(format!("the Merkle root's thread: {e}")))?;
        let count = new.len() as i32;
        let root_bytes = root.as_slice();
        let new_p: [Typed; 1] = [(&new_ids, Type::INT8_ARRAY)];
        let block_p: [Typed; 4] =
            [(&block, Type::INT8), (&root_bytes, Type::BYTEA), (&count, Type::INT4), (&committed_by, Type::TEXT)];
        // One round trip: checks that finished before the receipt arrived, the block row.
        tokio::try_join!(
            tx.query_typed(
                "UPDATE receipts r SET verification = v.outcome FROM verifications v
                 WHERE v.task_id = ANY($1) AND r.task_id = v.task_id AND r.node_address = v.node_address",
                &new_p
            ),
            tx.query_typed(
                "INSERT INTO blocks (number, merkle_root, receipt_count, committed_by) VALUES ($1, $2, $3, $4)",
                &block_p
            ),
        )?;
        tx.commit().await?;
        outcome.acks = per_node
            .into_iter()
            .map(|(node, tasks)| BlockAck { node: node.to_string(), block: block as u64, tasks })
            .collect();
        outcome.block = Some(block as u64);
        outcome.root = root;
        outcome.recorded = new.len();
        Ok(Some((outcome, ack_pairs)))
    }

    /// For each (node, block): every task of that node in that block, ascending; one query.
    async fn blocks_tasks(&self, pairs: &[(String, u64)]) -> Result<Vec<BlockAck>, LedgerError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let nodes: Vec<&str> = pairs.iter().map(|(n, _)| n.as_str()).collect();
        let blocks: Vec<i64> = pairs.iter().map(|(_, b)| *b as i64).collect();
        let params: [Typed; 2] = [(&nodes, Type::TEXT_ARRAY), (&blocks, Type::INT8_ARRAY)];
        let conn = self.conn().await?;
        let rows = conn
            .query_typed(
                "SELECT r.node_address, r.block, r.task_id
                 FROM unnest($1::text[], $2::bigint[]) AS p(node, block)
                 JOIN receipts r ON r.block = p.block AND r.node_address = p.node",
                &params,
            )
            .await?;
        let mut acks: BTreeMap<(String, u64), Vec<u64>> = pairs.iter().map(|p| (p.clone(), Vec::new())).collect();
        for r in rows {
            let key = (r.get::<_, String>(0), r.get::<_, i64>(1) as u64);
            acks.entry(key).or_default().push(r.get::<_, i64>(2) as u64);
        }
        Ok(acks
            .into_iter()
            .map(|((node, block), mut tasks)| {
                tasks.sort_unstable();
                BlockAck { node, block, tasks }
            })
            .collect())
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
        if previous.as_deref() == Some(ConfirmStatus::Matched.as_str()) {
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
    fn copy_rows_hold_fourteen_fields_with_the_block_null_for_missing_signed_bytes_and_the_check_state() {
        let r = Receipt {
            task: u64::MAX,
            game_id: 7,
            node: "0xab".into(),
            model: "we\tird".into(),
            prompt_tokens: 3,
            completion_tokens: 4,
            price: Units(10u128.pow(20)),
            latency_ms: -1,
            output_hash: [1; 32],
            receipt_hash: [2; 32],
            signature: vec![0xff, 0x00],
            signed_bytes: Vec::new(),
            witnessed: true,
            sampled: false,
        };
        let mut signed = r.clone();
        signed.signed_bytes = vec![0xab];
        signed.sampled = true;
        let without = copy_rows(&[&r], 9);
        let with = copy_rows(&[&signed], 9);
        let header = 19;
        assert_eq!(&without[header..header + 2], &14i16.to_be_bytes());
        assert_eq!(&without[header + 2..header + 14], &[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&without[header + 14..header + 26], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 9], "the block");
        // NULL (length -1) for no signed bytes; one byte more (length 1 + the byte) with them;
        // then the check state, and the trailer.
        let tail = |bytes: &[u8], state: &str| {
            [bytes, &(state.len() as i32).to_be_bytes(), state.as_bytes(), &[0xff, 0xff]].concat()
        };
        assert!(without.ends_with(&tail(&[0xff, 0xff, 0xff, 0xff], "unchecked")));
        assert!(with.ends_with(&tail(&[0, 0, 0, 1, 0xab], "sampled")), "a sampled task waits for its verdict");
        assert_eq!(with.len(), without.len() + 1 - 2);
    }
}
