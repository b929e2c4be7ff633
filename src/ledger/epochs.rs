//! Epochs: what settlement owes and collects, and the posting state of each epoch.
//!
//! Planning (one transaction) takes every payable receipt not yet settled — confirmed by
//! its node, not failed by the verifier, in a committed block — and settles it in the new
//! epoch if its game's escrow covers it. A game short of escrow settles its oldest tasks
//! up to what it holds; the rest wait for a later epoch (and the game is suspended, see
//! [`super::escrow`]). So each receipt is settled in exactly one epoch, charges never
//! exceed escrow, and payouts never exceed charges. The epoch row then moves
//! `planned → sent (tx hash, signed bytes, nonce) → confirmed`; the signed transaction is
//! stored before it is broadcast, so after a crash the same transaction is looked up or
//! re-broadcast, never a second one.

use super::error::LedgerError;
use super::store::Store;
use super::undelivered::NOT_UNDELIVERED;
use crate::books::Units;
pub use crate::books::{EpochStatus, PayoutClaim, SentTx};
use crate::crypto::merkle::{self, payout_leaf, Hash};

/// Basis points: 10 000 = 100 %.
pub const BPS: u32 = 10_000;

/// One epoch and what its post carries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Epoch {
    pub number: u64,
    pub first_block: u64,
    pub last_block: u64,
    #[serde(serialize_with = "hex_hash")]
    pub payout_root: Hash,
    pub payout_total: Units,
    pub charge_total: Units,
    pub task_count: u64,
    pub status: EpochStatus,
    /// The settlement contract it is posted to.
    pub contract: String,
    pub tx_hash: Option<String>,
    pub chain_block: Option<u64>,
    pub gas_used: Option<u64>,
    #[serde(skip)]
    pub sent: Option<SentTx>,
    /// (game wallet, charge), in wallet order: the post's `games` and `charges`.
    pub charges: Vec<(String, Units)>,
}

fn hex_hash<S: serde::Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("0x{}", hex::encode(h)))
}

/// A stored posting status, or a corrupt-row error.
pub(super) fn parse_status(s: &str) -> Result<EpochStatus, LedgerError> {
    EpochStatus::parse(s).ok_or_else(|| LedgerError::Corrupt(format!("posting status `{s}`")))
}

fn parse_address(s: &str) -> Result<[u8; 20], LedgerError> {
    let bytes =
        hex::decode(s.trim_start_matches("0x")).map_err(|e| LedgerError::Corrupt(format!("address {s}: {e}")))?;
    bytes.try_into().map_err(|_| LedgerError::Corrupt(format!("address {s} is not 20 bytes")))
}

fn units(s: &str) -> Result<Units, LedgerError> {
    s.parse().map_err(|e| LedgerError::Corrupt(format!("amount `{s}`: {e}")))
}

/// The payout leaves of an epoch, in node address order (the tree's leaf order).
fn leaves(payouts: &[(String, Units)]) -> Result<Vec<Hash>, LedgerError> {
    payouts.iter().map(|(node, amount)| Ok(payout_leaf(&parse_address(node)?, amount.0))).collect()
}

const EPOCH_COLUMNS: &str = "number, first_block, last_block, payout_root, payout_total::text, charge_total::text,
     task_count, status, contract, tx_hash, raw_tx, nonce, chain_block, gas_used";

/// Games one epoch charges at most. Each adds an escrow write and an event to the post
/// (about 8,000 gas, `docs/settlement.md`): 1,000 keep it near 8 million gas, within a
/// rollup block's limit (30 million on OP chains). Past it, the games whose oldest
/// receipt is oldest go first and the next epoch is planned as soon as this one is
/// confirmed.
pub const MAX_GAMES_PER_EPOCH: usize = 1_000;

impl Store {
    async fn epoch_from_row(&self, r: &tokio_postgres::Row) -> Result<Epoch, LedgerError> {
        let number: i64 = r.get(0);
        let root: Option<Vec<u8>> = r.get(3);
        let status = parse_status(r.get(7))?;
        let tx_hash: Option<String> = r.get(9);
        let raw: Option<Vec<u8>> = r.get(10);
        let nonce: Option<i64> = r.get(11);
        let sent = match (&tx_hash, raw, nonce) {
            (Some(h), Some(raw), Some(nonce)) => {
                let hash = hex::decode(h.trim_start_matches("0x"))
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| LedgerError::Corrupt(format!("epoch {number} tx hash {h}")))?;
                Some(SentTx { hash, raw, nonce: nonce as u64 })
            }
            _ => None,
        };
        let conn = self.conn().await?;
        let charges = conn
            .query("SELECT wallet, amount::text FROM charges WHERE epoch = $1 ORDER BY wallet", &[&number])
            .await?
            .iter()
            .map(|c| Ok((c.get::<_, String>(0), units(c.get(1))?)))
            .collect::<Result<Vec<_>, LedgerError>>()?;
        Ok(Epoch {
            number: number as u64,
            first_block: r.get::<_, i64>(1) as u64,
            last_block: r.get::<_, i64>(2) as u64,
            payout_root: root.and_then(|b| b.try_into().ok()).unwrap_or(merkle::EMPTY_ROOT),
            payout_total: units(r.get(4))?,
            charge_total: units(r.get(5))?,
            task_count: r.get::<_, i64>(6) as u64,
            status,
            contract: r.get(8),
            tx_hash,
            chain_block: r.get::<_, Option<i64>>(12).map(|b| b as u64),
            gas_used: r.get::<_, Option<i64>>(13).map(|g| g as u64),
            sent,
            charges,
        })
    }

    /// The epochs `tail` selects (a WHERE/ORDER/LIMIT clause over `epochs`), loaded whole.
    async fn epochs_where(
        &self,
        tail: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Epoch>, LedgerError> {
        let conn = self.conn().await?;
        let rows = conn.query(&format!("SELECT {EPOCH_COLUMNS} FROM epochs {tail}"), params).await?;
        drop(conn);
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.epoch_from_row(r).await?);
        }
        Ok(out)
    }

    /// The oldest epoch not yet confirmed on chain (planned or sent), if any.
    pub async fn open_epoch(&self) -> Result<Option<Epoch>, LedgerError> {
        Ok(self.epochs_where("WHERE status <> 'confirmed' ORDER BY number LIMIT 1", &[]).await?.pop())
    }

    /// Epoch `number`, any status.
    pub async fn epoch(&self, number: u64) -> Result<Option<Epoch>, LedgerError> {
        Ok(self.epochs_where("WHERE number = $1", &[&(number as i64)]).await?.pop())
    }

    /// The newest epochs, newest first.
    pub async fn recent_epochs(&self, limit: i64) -> Result<Vec<Epoch>, LedgerError> {
        self.epochs_where("ORDER BY number DESC LIMIT $1", &[&limit]).await
    }

    /// When settlement last tried to plan an epoch (since the database was created).
    pub async fn last_settlement_attempt(&self) -> Result<std::time::SystemTime, LedgerError> {
        let conn = self.conn().await?;
        Ok(conn.query_one("SELECT last_attempt FROM settlement_state", &[]).await?.get(0))
    }

    /// Forgets the last planning attempt: the epoch is due again at once.
    pub async fn forget_settlement_attempt(&self) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        conn.execute("UPDATE settlement_state SET last_attempt = to_timestamp(0)", &[]).await?;
        Ok(())
    }

    /// Records a planning attempt now.
    pub async fn record_settlement_attempt(&self) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        conn.execute("UPDATE settlement_state SET last_attempt = now()", &[]).await?;
        Ok(())
    }

    /// Plans the next epoch for `contract` over the blocks up to `up_to_block` (the last
    /// one anchored on chain): settles every payable, unsettled receipt its game's
    /// `budgets` entry covers (oldest first), charges the games (at most
    /// [`MAX_GAMES_PER_EPOCH`]), pays nodes `share_bps` of what their tasks were charged,
    /// and builds the payout tree. `None` when there is nothing to settle (no epoch is
    /// created).
    pub async fn plan_epoch(
        &self,
        contract: &str,
        budgets: &[(i64, Units)],
        share_bps: u32,
        up_to_block: u64,
    ) -> Result<Option<Epoch>, LedgerError> {
        self.plan_epoch_of_at_most(contract, budgets, share_bps, up_to_block, MAX_GAMES_PER_EPOCH).await
    }

    /// [`Self::plan_epoch`], charging at most `max_games` games: those whose oldest
    /// payable receipt is oldest. The others wait for the next epoch.
    pub async fn plan_epoch_of_at_most(
        &self,
        contract: &str,
        budgets: &[(i64, Units)],
        share_bps: u32,
        up_to_block: u64,
        max_games: usize,
    ) -> Result<Option<Epoch>, LedgerError> {
        assert!(share_bps <= BPS, "node share above 100 %");
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let open: i64 = tx.query_one("SELECT count(*) FROM epochs WHERE status <> 'confirmed'", &[]).await?.get(0);
        if open > 0 {
            return Err(LedgerError::Corrupt("an epoch is still open; finish it before planning the next".into()));
        }
        let (number, first_block): (i64, i64) = {
            let r = tx
                .query_one("SELECT coalesce(max(number), 0) + 1, coalesce(max(last_block), 0) + 1 FROM epochs", &[])
                .await?;
            (r.get(0), r.get(1))
        };
        let committed: i64 = tx.query_one("SELECT last_block FROM block_counter", &[]).await?.get(0);
        // Never past what the chain holds, never before the previous epoch's end.
        let up_to = i64::try_from(up_to_block).unwrap_or(i64::MAX);
        let last_block = committed.min(up_to).max(first_block - 1);
        tx.execute(
            "INSERT INTO epochs (number, first_block, last_block, contract) VALUES ($1, $2, $3, $4)",
            &[&number, &first_block, &last_block, &contract],
        )
        .await?;
        let game_ids: Vec<i64> = budgets.iter().map(|(g, _)| *g).collect();
        let available: Vec<String> = budgets.iter().map(|(_, a)| a.to_string()).collect();
        // An answer the network failed to deliver is neither charged nor paid: its receipt
        // never joins an epoch.
        let settled = tx
            .execute(
                &format!(
                    "WITH budget AS (
                     SELECT b.game_id, b.available::numeric AS available
                     FROM unnest($2::bigint[], $3::text[]) AS b(game_id, available)
                 ), payable AS (
                     SELECT r.task_id, r.game_id, r.block, r.price_units,
                            sum(r.price_units) OVER (PARTITION BY r.game_id ORDER BY r.block, r.task_id) AS running
                     FROM receipts r JOIN games g ON g.id = r.game_id AND g.wallet IS NOT NULL
                     WHERE r.epoch IS NULL AND r.block <= $4 AND r.confirmation = 'confirmed'
                       AND r.verification IN ('verified', 'unchecked') AND r.game_id = ANY($2)
                       AND {NOT_UNDELIVERED}
                 ), covered AS (
                     SELECT p.task_id, p.game_id, p.block, p.price_units FROM payable p
                     JOIN budget b ON b.game_id = p.game_id
                     WHERE p.running <= b.available
                 ), chosen AS (
                     -- One post names every game it charges (~8,000 gas each): bounded, so
                     -- that it fits a block whatever the number of games. A game owing
                     -- nothing takes no place.
                     SELECT game_id FROM covered GROUP BY game_id HAVING sum(price_units) > 0
                     ORDER BY min(block), game_id LIMIT $5
                 )
                 UPDATE receipts r SET epoch = $1
                 FROM covered c
                 WHERE r.task_id = c.task_id AND c.game_id IN (SELECT game_id FROM chosen)"
                ),
                &[&number, &game_ids, &available, &last_block, &(max_games.min(i64::MAX as usize) as i64)],
            )
            .await?;
        if settled == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO charges (epoch, game_id, wallet, amount)
             SELECT $1, r.game_id, g.wallet, sum(r.price_units)
             FROM receipts r JOIN games g ON g.id = r.game_id
             WHERE r.epoch = $1 GROUP BY r.game_id, g.wallet",
            &[&number],
        )
        .await?;
        tx.execute(
            "INSERT INTO payouts (epoch, node_address, amount)
             SELECT $1, node_address, div(sum(price_units) * $2::bigint, $3::bigint)
             FROM receipts WHERE epoch = $1 GROUP BY node_address
             HAVING div(sum(price_units) * $2::bigint, $3::bigint) > 0",
            &[&number, &(share_bps as i64), &(BPS as i64)],
        )
        .await?;
        let payouts = payouts_of(&tx, number).await?;
        let root = merkle::root(&leaves(&payouts)?);
        let payout_total = payouts.iter().try_fold(Units::ZERO, |acc, (_, a)| acc.checked_add(*a));
        let payout_total = payout_total.map_err(|e| LedgerError::Corrupt(format!("payout total: {e}")))?;
        tx.execute(
            "UPDATE epochs SET payout_root = $2, payout_total = $3::text::numeric, task_count = $4,
                 charge_total = (SELECT coalesce(sum(amount), 0) FROM charges WHERE epoch = $1)
             WHERE number = $1",
            &[&number, &root.as_slice(), &payout_total.to_string(), &(settled as i64)],
        )
        .await?;
        tx.commit().await?;
        drop(conn);
        self.epoch(number as u64).await
    }

    /// Records the signed transaction that posts `plan`, before it is broadcast: only while
    /// the ledger still holds that very plan. A leader that lost its lock (a database
    /// restart) while another server discarded and planned the epoch again must not store
    /// its transaction, signed for the old plan, over the new one: the chain's root would
    /// then differ from the ledger's payouts, and no claim would pass.
    pub async fn mark_epoch_sent(&self, plan: &Epoch, sent: &SentTx) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE epochs SET status = 'sent', tx_hash = $2, raw_tx = $3, nonce = $4, sent_at = now()
                 WHERE number = $1 AND status = 'planned' AND first_block = $5 AND last_block = $6
                   AND payout_root = $7 AND payout_total = $8::text::numeric AND charge_total = $9::text::numeric",
                &[
                    &(plan.number as i64),
                    &format!("0x{}", hex::encode(sent.hash)),
                    &sent.raw,
                    &(sent.nonce as i64),
                    &(plan.first_block as i64),
                    &(plan.last_block as i64),
                    &plan.payout_root.as_slice(),
                    &plan.payout_total.to_string(),
                    &plan.charge_total.to_string(),
                ],
            )
            .await?;
        if n != 1 {
            return Err(LedgerError::Corrupt(format!(
                "epoch {} was not planned as signed when its transaction was signed (planned again by another server?)",
                plan.number
            )));
        }
        Ok(())
    }

    /// The post of `number` is final on chain.
    pub async fn mark_epoch_confirmed(&self, number: u64, chain_block: u64, gas_used: u64) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        conn.execute(
            "UPDATE epochs SET status = 'confirmed', confirmed_at = now(), chain_block = $2, gas_used = $3
             WHERE number = $1",
            &[&(number as i64), &(chain_block as i64), &(gas_used as i64)],
        )
        .await?;
        Ok(())
    }

    /// The sent transaction is gone for good (reverted, or its nonce used by another):
    /// back to planned, to be signed again.
    pub async fn mark_epoch_unsent(&self, number: u64) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        conn.execute(
            "UPDATE epochs SET status = 'planned', tx_hash = NULL, raw_tx = NULL, nonce = NULL, sent_at = NULL
             WHERE number = $1 AND status = 'sent'",
            &[&(number as i64)],
        )
        .await?;
        Ok(())
    }

    /// Epoch `number`'s post `stuck` is replaced by `by` (same nonce, higher fees), stored
    /// before it is broadcast; only while `stuck` is still the one stored.
    pub async fn replace_epoch_tx(&self, number: u64, stuck: &SentTx, by: &SentTx) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE epochs SET tx_hash = $3, raw_tx = $4, sent_at = now()
                 WHERE number = $1 AND status = 'sent' AND tx_hash = $2 AND nonce = $5",
                &[
                    &(number as i64),
                    &format!("0x{}", hex::encode(stuck.hash)),
                    &format!("0x{}", hex::encode(by.hash)),
                    &by.raw,
                    &(by.nonce as i64),
                ],
            )
            .await?;
        if n != 1 {
            return Err(LedgerError::Corrupt(format!("epoch {number} no longer holds the post being replaced")));
        }
        Ok(())
    }

    /// Drops a plan that can no longer be posted (a game's escrow shrank since): its
    /// receipts go back to unsettled. Only a planned epoch, never a sent one.
    pub async fn discard_planned_epoch(&self, number: u64) -> Result<(), LedgerError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let n = number as i64;
        let status: Option<String> =
            tx.query_opt("SELECT status FROM epochs WHERE number = $1 FOR UPDATE", &[&n]).await?.map(|r| r.get(0));
        if status.as_deref() != Some("planned") {
            return Err(LedgerError::Corrupt(format!("epoch {number} is {status:?}, not planned: not discarded")));
        }
        tx.execute("UPDATE receipts SET epoch = NULL WHERE epoch = $1", &[&n]).await?;
        tx.execute("DELETE FROM payouts WHERE epoch = $1", &[&n]).await?;
        tx.execute("DELETE FROM charges WHERE epoch = $1", &[&n]).await?;
        tx.execute("DELETE FROM epochs WHERE number = $1", &[&n]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every payout of `node` in confirmed epochs, with its proof.
    pub async fn payout_claims(&self, node: &str) -> Result<Vec<PayoutClaim>, LedgerError> {
        let node = super::games::normalize_wallet(node)?;
        let conn = self.conn().await?;
        let epochs: Vec<i64> = conn
            .query(
                "SELECT p.epoch FROM payouts p JOIN epochs e ON e.number = p.epoch
                 WHERE p.node_address = $1 AND e.status = 'confirmed' ORDER BY p.epoch",
                &[&node],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut claims = Vec::with_capacity(epochs.len());
        for epoch in epochs {
            let payouts = payouts_of(&*conn, epoch).await?;
            let leaves = leaves(&payouts)?;
            let index = payouts.iter().position(|(n, _)| *n == node).expect("the node has a payout in this epoch");
            let proof = merkle::proof(&leaves, index).expect("index in range");
            claims.push(PayoutClaim {
                epoch: epoch as u64,
                amount: payouts[index].1,
                proof: proof.iter().map(|h| format!("0x{}", hex::encode(h))).collect(),
            });
        }
        Ok(claims)
    }

    /// The payouts of epoch `number`, in leaf order.
    pub async fn epoch_payouts(&self, number: u64) -> Result<Vec<(String, Units)>, LedgerError> {
        let conn = self.conn().await?;
        payouts_of(&*conn, number as i64).await
    }
}

async fn payouts_of<C: tokio_postgres::GenericClient>(c: &C, epoch: i64) -> Result<Vec<(String, Units)>, LedgerError> {
    c.query(
        "SELECT node_address, amount::text FROM payouts WHERE epoch = $1 ORDER BY node_address COLLATE \"C\"",
        &[&epoch],
    )
    .await?
    .iter()
    .map(|r| Ok((r.get::<_, String>(0), units(r.get(1))?)))
    .collect()
}
