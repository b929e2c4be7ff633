//! Block anchors: batches of consecutive committed registry blocks whose Merkle roots are
//! posted on chain in one transaction, and the proofs that tie one receipt to the chain.
//!
//! An anchor is planned over the blocks after the last anchored one, in order, stopping
//! at the first block that is missing (still committing on another server) or whose
//! nodes have not all confirmed it yet (unless it is older than the confirmation wait,
//! so one silent node cannot hold the books back). Its root is the Merkle root over
//! `block_leaf(number, block root)`, the same tree `Settlement.anchorBlocks` builds from
//! the roots it is sent. The row then moves `planned → sent → confirmed` exactly as an
//! epoch does (the signed transaction stored before broadcast). One anchor is open at a
//! time, and anchor `id` is the contract's anchor id.
//!
//! A receipt's proof is its signed bytes, its Merkle path to its block's root, and that
//! block's path to its anchor's root: with the contract's `blockAnchored` anyone can
//! check it on chain without trusting the server.

use std::time::Duration;

use super::epochs::parse_status;
use super::error::LedgerError;
use super::store::Store;
pub use crate::books::{AnchorProof, ReceiptProof};
use crate::books::{EpochStatus, SentTx};
use crate::crypto::merkle::{self, Hash};

/// Most blocks one anchor carries (bounds its gas: about 1,300 gas a block).
pub const MAX_BLOCKS_PER_ANCHOR: u64 = 1024;

/// One anchor and its posting state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Anchor {
    pub id: u64,
    pub first_block: u64,
    pub last_block: u64,
    #[serde(serialize_with = "hex_hash")]
    pub root: Hash,
    pub status: EpochStatus,
    pub contract: String,
    pub tx_hash: Option<String>,
    pub chain_block: Option<u64>,
    pub gas_used: Option<u64>,
    /// The block roots it anchors, in block order (what `anchorBlocks` is sent).
    #[serde(skip)]
    pub roots: Vec<Hash>,
    #[serde(skip)]
    pub sent: Option<SentTx>,
}

fn hex_hash<S: serde::Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex0x(h))
}

fn hex0x(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

fn hash32(what: &str, v: Vec<u8>) -> Result<Hash, LedgerError> {
    v.try_into().map_err(|_| LedgerError::Corrupt(format!("{what} is not 32 bytes")))
}

/// How far anchoring has come, for the dashboard and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AnchorProgress {
    /// The last registry block whose anchor is confirmed on chain (0: none).
    pub last_anchored_block: u64,
    /// The newest registry block committed.
    pub last_committed_block: u64,
    /// The transaction of the newest confirmed anchor.
    pub last_anchor_tx: Option<String>,
    pub last_anchor_at_unix: Option<i64>,
}

const ANCHOR_COLUMNS: &str = "id, first_block, last_block, root, status, contract, tx_hash, raw_tx, nonce,
     chain_block, gas_used";

async fn block_roots<C: tokio_postgres::GenericClient>(c: &C, first: u64, last: u64) -> Result<Vec<Hash>, LedgerError> {
    let rows = c
        .query(
            "SELECT number, merkle_root FROM blocks WHERE number BETWEEN $1 AND $2 ORDER BY number",
            &[&(first as i64), &(last as i64)],
        )
        .await?;
    if rows.len() as u64 != last - first + 1 {
        return Err(LedgerError::Corrupt(format!("blocks {first}..={last} are not all committed")));
    }
    rows.into_iter().map(|r| hash32("a block root", r.get(1))).collect()
}

/// The anchor tree's leaves for blocks `first..` with `roots`.
pub fn anchor_leaves(first: u64, roots: &[Hash]) -> Vec<Hash> {
    roots.iter().enumerate().map(|(i, r)| merkle::block_leaf(first + i as u64, r)).collect()
}

impl Store {
    async fn anchor_from_row(&self, r: &tokio_postgres::Row) -> Result<Anchor, LedgerError> {
        let id: i64 = r.get(0);
        let (first, last) = (r.get::<_, i64>(1) as u64, r.get::<_, i64>(2) as u64);
        let tx_hash: Option<String> = r.get(6);
        let sent = match (&tx_hash, r.get::<_, Option<Vec<u8>>>(7), r.get::<_, Option<i64>>(8)) {
            (Some(h), Some(raw), Some(nonce)) => {
                let hash = hex::decode(h.trim_start_matches("0x")).unwrap_or_default();
                Some(SentTx { hash: hash32(&format!("anchor {id}'s tx hash"), hash)?, raw, nonce: nonce as u64 })
            }
            _ => None,
        };
        let conn = self.conn().await?;
        let roots = block_roots(&*conn, first, last).await?;
        Ok(Anchor {
            id: id as u64,
            first_block: first,
            last_block: last,
            root: hash32("an anchor root", r.get(3))?,
            status: parse_status(r.get(4))?,
            contract: r.get(5),
            tx_hash,
            chain_block: r.get::<_, Option<i64>>(9).map(|b| b as u64),
            gas_used: r.get::<_, Option<i64>>(10).map(|g| g as u64),
            roots,
            sent,
        })
    }

    async fn anchors_where(
        &self,
        tail: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Anchor>, LedgerError> {
        let conn = self.conn().await?;
        let rows = conn.query(&format!("SELECT {ANCHOR_COLUMNS} FROM anchors {tail}"), params).await?;
        drop(conn);
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.anchor_from_row(r).await?);
        }
        Ok(out)
    }

    /// The anchor not yet confirmed on chain, if any (at most one is open).
    pub async fn open_anchor(&self) -> Result<Option<Anchor>, LedgerError> {
        Ok(self.anchors_where("WHERE status <> 'confirmed' ORDER BY id LIMIT 1", &[]).await?.pop())
    }

    /// Anchor `id`, any status.
    pub async fn anchor(&self, id: u64) -> Result<Option<Anchor>, LedgerError> {
        Ok(self.anchors_where("WHERE id = $1", &[&(id as i64)]).await?.pop())
    }

    /// The newest anchors, newest first.
    pub async fn recent_anchors(&self, limit: i64) -> Result<Vec<Anchor>, LedgerError> {
        self.anchors_where("ORDER BY id DESC LIMIT $1", &[&limit]).await
    }

    /// Plans the next anchor for `contract`: the blocks after the last anchored one that
    /// are committed in an unbroken run and confirmed by all their nodes (or committed
    /// more than `confirm_wait` ago), at most `max_blocks`. `None` when no block is ready.
    pub async fn plan_anchor(
        &self,
        contract: &str,
        max_blocks: u64,
        confirm_wait: Duration,
    ) -> Result<Option<Anchor>, LedgerError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // One planner at a time (the settlement lock already makes it so; this keeps the
        // ledger right on its own).
        tx.batch_execute("LOCK TABLE anchors IN SHARE ROW EXCLUSIVE MODE").await?;
        let open: i64 = tx.query_one("SELECT count(*) FROM anchors WHERE status <> 'confirmed'", &[]).await?.get(0);
        if open > 0 {
            return Err(LedgerError::Corrupt("an anchor is still open; finish it before planning the next".into()));
        }
        let (id, after): (i64, i64) = {
            let r =
                tx.query_one("SELECT coalesce(max(id), 0) + 1, coalesce(max(last_block), 0) FROM anchors", &[]).await?;
            (r.get(0), r.get(1))
        };
        let rows = tx
            .query(
                "SELECT b.number, b.merkle_root,
                        b.committed_at < now() - make_interval(secs => $3)
                        OR NOT EXISTS (
                            SELECT 1 FROM (SELECT DISTINCT node_address FROM receipts WHERE block = b.number) n
                            WHERE NOT EXISTS (SELECT 1 FROM confirmations c
                                              WHERE c.block = b.number AND c.node_address = n.node_address))
                 FROM blocks b WHERE b.number > $1 ORDER BY b.number LIMIT $2",
                &[&after, &(max_blocks.clamp(1, MAX_BLOCKS_PER_ANCHOR) as i64), &confirm_wait.as_secs_f64()],
            )
            .await?;
        let mut roots = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let (number, ready): (i64, bool) = (r.get(0), r.get(2));
            if number != after + 1 + i as i64 || !ready {
                break;
            }
            roots.push(hash32("a block root", r.get(1))?);
        }
        if roots.is_empty() {
            tx.rollback().await?;
            return Ok(None);
        }
        let first = after as u64 + 1;
        let last = first + roots.len() as u64 - 1;
        let root = merkle::root(&anchor_leaves(first, &roots));
        tx.execute(
            "INSERT INTO anchors (id, first_block, last_block, root, contract) VALUES ($1, $2, $3, $4, $5)",
            &[&id, &(first as i64), &(last as i64), &root.as_slice(), &contract],
        )
        .await?;
        tx.commit().await?;
        drop(conn);
        self.anchor(id as u64).await
    }

    /// Records the signed transaction that posts anchor `id`, before it is broadcast.
    pub async fn mark_anchor_sent(&self, id: u64, sent: &SentTx) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE anchors SET status = 'sent', tx_hash = $2, raw_tx = $3, nonce = $4, sent_at = now()
                 WHERE id = $1 AND status = 'planned'",
                &[&(id as i64), &hex0x(&sent.hash), &sent.raw, &(sent.nonce as i64)],
            )
            .await?;
        if n != 1 {
            return Err(LedgerError::Corrupt(format!("anchor {id} was not planned when its transaction was signed")));
        }
        Ok(())
    }

    /// Anchor `id` is final on chain.
    pub async fn mark_anchor_confirmed(&self, id: u64, chain_block: u64, gas_used: u64) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        conn.execute(
            "UPDATE anchors SET status = 'confirmed', confirmed_at = now(), chain_block = $2, gas_used = $3
             WHERE id = $1",
            &[&(id as i64), &(chain_block as i64), &(gas_used as i64)],
        )
        .await?;
        Ok(())
    }

    /// Anchor `id`'s transaction `stuck` is replaced by `by` (same nonce, higher fees),
    /// stored before it is broadcast; only while `stuck` is still the one stored.
    pub async fn replace_anchor_tx(&self, id: u64, stuck: &SentTx, by: &SentTx) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE anchors SET tx_hash = $3, raw_tx = $4, sent_at = now()
                 WHERE id = $1 AND status = 'sent' AND tx_hash = $2 AND nonce = $5",
                &[&(id as i64), &hex0x(&stuck.hash), &hex0x(&by.hash), &by.raw, &(by.nonce as i64)],
            )
            .await?;
        if n != 1 {
            return Err(LedgerError::Corrupt(format!("anchor {id} no longer holds the transaction being replaced")));
        }
        Ok(())
    }

    /// The sent transaction can never be mined (reverted, or its nonce used by another):
    /// back to planned, to be signed again.
    pub async fn mark_anchor_unsent(&self, id: u64) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        conn.execute(
            "UPDATE anchors SET status = 'planned', tx_hash = NULL, raw_tx = NULL, nonce = NULL, sent_at = NULL
             WHERE id = $1 AND status = 'sent'",
            &[&(id as i64)],
        )
        .await?;
        Ok(())
    }

    /// The last registry block whose anchor is confirmed on chain (0: none). Epochs settle
    /// only up to here, so the contract never sees an unanchored block in a post.
    pub async fn last_anchored_block(&self) -> Result<u64, LedgerError> {
        let conn = self.conn().await?;
        let last: i64 = conn
            .query_one("SELECT coalesce(max(last_block), 0) FROM anchors WHERE status = 'confirmed'", &[])
            .await?
            .get(0);
        Ok(last as u64)
    }

    /// How far anchoring has come.
    pub async fn anchor_progress(&self) -> Result<AnchorProgress, LedgerError> {
        let conn = self.conn().await?;
        let committed: i64 = conn.query_one("SELECT coalesce(max(number), 0) FROM blocks", &[]).await?.get(0);
        let last = conn
            .query_opt(
                "SELECT last_block, tx_hash, extract(epoch FROM confirmed_at)::bigint FROM anchors
                 WHERE status = 'confirmed' ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await?;
        Ok(AnchorProgress {
            last_anchored_block: last.as_ref().map_or(0, |r| r.get::<_, i64>(0) as u64),
            last_committed_block: committed as u64,
            last_anchor_tx: last.as_ref().and_then(|r| r.get(1)),
            last_anchor_at_unix: last.as_ref().and_then(|r| r.get(2)),
        })
    }

    /// Who receipt `task` belongs to: its game and node (None when not recorded). Cheap:
    /// checked before the proof, which reads the whole block.
    pub async fn receipt_owner(&self, task: u64) -> Result<Option<(i64, String)>, LedgerError> {
        let conn = self.conn().await?;
        let row =
            conn.query_opt("SELECT game_id, node_address FROM receipts WHERE task_id = $1", &[&(task as i64)]).await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// The proof that ties receipt `task` to its block and (once anchored) the chain.
    pub async fn receipt_proof(&self, task: u64) -> Result<Option<ReceiptProof>, LedgerError> {
        let conn = self.conn().await?;
        let Some(r) = conn
            .query_opt(
                "SELECT r.block, r.game_id, r.node_address, r.model, r.prompt_tokens, r.completion_tokens,
                        r.price_units::text, r.signed_bytes, r.node_signature, r.receipt_hash, b.merkle_root,
                        CASE WHEN r.epoch IS NULL THEN u.reason END
                 FROM receipts r JOIN blocks b ON b.number = r.block
                 LEFT JOIN undelivered u ON u.task_id = r.task_id
                 WHERE r.task_id = $1",
                &[&(task as i64)],
            )
            .await?
        else {
            return Ok(None);
        };
        let block = r.get::<_, i64>(0) as u64;
        let receipt_hash = hash32("a receipt hash", r.get(9))?;
        let block_root = hash32("a block root", r.get(10))?;
        // The block's leaves in the order it was committed: task ids as u64, ascending.
        let mut leaves: Vec<(u64, Hash)> = Vec::new();
        for row in conn.query("SELECT task_id, receipt_hash FROM receipts WHERE block = $1", &[&(block as i64)]).await?
        {
            leaves.push((row.get::<_, i64>(0) as u64, hash32("a receipt hash", row.get(1))?));
        }
        leaves.sort_unstable_by_key(|(t, _)| *t);
        let hashes: Vec<Hash> = leaves.iter().map(|(_, h)| *h).collect();
        let index = leaves.iter().position(|(t, _)| *t == task).expect("the receipt is in its block");
        let receipt_path = merkle::proof(&hashes, index).expect("index in range");
        if merkle::root(&hashes) != block_root {
            return Err(LedgerError::Corrupt(format!("block {block}'s receipts do not hash to its stored root")));
        }
        let anchor_row = conn
            .query_opt("SELECT id FROM anchors WHERE first_block <= $1 AND last_block >= $1", &[&(block as i64)])
            .await?;
        drop(conn);
        let anchor = match anchor_row {
            Some(row) => {
                let a = self
                    .anchor(row.get::<_, i64>(0) as u64)
                    .await?
                    .ok_or_else(|| LedgerError::Corrupt("an anchor vanished".into()))?;
                let leaves = anchor_leaves(a.first_block, &a.roots);
                let path = merkle::proof(&leaves, (block - a.first_block) as usize).expect("block in range");
                Some(AnchorProof {
                    id: a.id,
                    first_block: a.first_block,
                    last_block: a.last_block,
                    root: hex0x(&a.root),
                    block_path: path.iter().map(|h| hex0x(h)).collect(),
                    status: a.status,
                    contract: a.contract,
                    tx_hash: a.tx_hash,
                    chain_block: a.chain_block,
                })
            }
            None => None,
        };
        Ok(Some(ReceiptProof {
            task,
            game_id: r.get(1),
            node: r.get(2),
            model: r.get(3),
            prompt_tokens: r.get::<_, i32>(4) as u32,
            completion_tokens: r.get::<_, i32>(5) as u32,
            price_units: r.get(6),
            block,
            signed_bytes: r.get::<_, Option<Vec<u8>>>(7).map(|b| hex0x(&b)),
            signature: hex0x(&r.get::<_, Vec<u8>>(8)),
            receipt_hash: hex0x(&receipt_hash),
            receipt_path: receipt_path.iter().map(|h| hex0x(h)).collect(),
            block_root: hex0x(&block_root),
            anchor,
            written_off: r.get(11),
        }))
    }
}
