//! Read-only views of the books: a game's usage by day (`GET /v1/usage`), a block with
//! its confirmations and discrepancies, the node table (`/admin/*`), and the counts the
//! dashboard and `/metrics` show. The HTTP handlers call these; they hold no SQL.

use serde::Serialize;

use super::error::LedgerError;
use super::store::Store;
use super::undelivered::NOT_UNDELIVERED;
use crate::books::Units;

fn units(s: Option<String>) -> Result<Units, LedgerError> {
    s.unwrap_or_else(|| "0".into()).parse().map_err(|e| LedgerError::Corrupt(format!("amount: {e}")))
}

/// One UTC day of a game's traffic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageDay {
    pub date: String,
    pub tasks: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Sum of the recorded tasks' prices (base units).
    pub charges: Units,
}

/// One node's part of a block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockNode {
    pub node: String,
    pub tasks: i64,
    pub confirmed: i64,
    pub disputed: i64,
    /// `matched`, `mismatch`, or `unconfirmed` (no confirmation yet).
    pub confirmation: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockReport {
    pub number: i64,
    pub merkle_root: String,
    pub receipt_count: i32,
    pub committed_by: String,
    pub committed_at_unix: i64,
    pub charges: Units,
    pub nodes: Vec<BlockNode>,
    /// Human-readable discrepancies: mismatched or missing confirmations, disputed tasks.
    pub discrepancies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeReport {
    pub address: String,
    pub status: String,
    pub reputation_bps: i32,
    pub tasks: i64,
    pub completion_tokens: i64,
    /// Confirmed and verified (or never picked for a check): what settlement pays the node
    /// for (a `sampled` task waits for its verdict).
    pub payable: Units,
    pub pending_confirmation: i64,
    pub disputed: i64,
    pub mismatched_blocks: i64,
    pub last_seen_unix: i64,
    /// Tokens of its verified tasks, and the near-ties among them that count as evidence of
    /// steering (wide ones, and ends of the answer passed over): its steering record.
    pub checked_tokens: i64,
    pub wide_near_ties: i64,
    pub ends_passed: i64,
    /// Why it was flagged for steering, if it was.
    pub steering_flag: Option<String>,
}

impl Store {
    /// A game's usage over the last `days` days, oldest first.
    pub async fn usage(&self, game_id: i64, days: u32) -> Result<Vec<UsageDay>, LedgerError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!("SELECT to_char(date_trunc('day', created_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD') AS day, count(*),
                        coalesce(sum(prompt_tokens), 0)::bigint, coalesce(sum(completion_tokens), 0)::bigint,
                        sum(price_units)::text
                 FROM receipts r
                 WHERE game_id = $1 AND created_at > now() - make_interval(days => $2) AND verification NOT IN ('failed', 'unverifiable')
                   AND {NOT_UNDELIVERED}
                 GROUP BY day ORDER BY day"),
                &[&game_id, &(days as i32)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageDay {
                    date: r.get(0),
                    tasks: r.get(1),
                    prompt_tokens: r.get(2),
                    completion_tokens: r.get(3),
                    charges: units(r.get(4))?,
                })
            })
            .collect()
    }

    /// A block with each node's part and its discrepancies; `None` if there is no such block.
    pub async fn block_report(&self, number: i64) -> Result<Option<BlockReport>, LedgerError> {
        let conn = self.conn().await?;
        let Some(b) = conn
            .query_opt(
                &format!(
                    "SELECT number, merkle_root, receipt_count, committed_by, extract(epoch FROM committed_at)::bigint,
                        (SELECT sum(price_units)::text FROM receipts r WHERE block = $1 AND {NOT_UNDELIVERED})
                 FROM blocks WHERE number = $1"
                ),
                &[&number],
            )
            .await?
        else {
            return Ok(None);
        };
        let rows = conn
            .query(
                "SELECT r.node_address, count(*),
                        count(*) FILTER (WHERE r.confirmation = 'confirmed'),
                        count(*) FILTER (WHERE r.confirmation = 'disputed'),
                        coalesce(c.status, 'unconfirmed')
                 FROM receipts r
                 LEFT JOIN confirmations c ON c.node_address = r.node_address AND c.block = r.block
                 WHERE r.block = $1
                 GROUP BY r.node_address, c.status ORDER BY r.node_address",
                &[&number],
            )
            .await?;
        let nodes: Vec<BlockNode> = rows
            .iter()
            .map(|r| BlockNode {
                node: r.get(0),
                tasks: r.get(1),
                confirmed: r.get(2),
                disputed: r.get(3),
                confirmation: r.get(4),
            })
            .collect();
        let mut discrepancies = Vec::new();
        for n in &nodes {
            match n.confirmation.as_str() {
                "mismatch" => discrepancies
                    .push(format!("{}: its confirmation does not match the registry's {} task(s)", n.node, n.tasks)),
                "unconfirmed" => {
                    discrepancies.push(format!("{}: has not confirmed its {} task(s) yet", n.node, n.tasks))
                }
                _ => {}
            }
            if n.disputed > 0 {
                discrepancies.push(format!("{}: disputes {} task(s) the registry recorded for it", n.node, n.disputed));
            }
        }
        let root: Vec<u8> = b.get(1);
        Ok(Some(BlockReport {
            number: b.get(0),
            merkle_root: format!("0x{}", hex::encode(root)),
            receipt_count: b.get(2),
            committed_by: b.get(3),
            committed_at_unix: b.get(4),
            charges: units(b.get(5))?,
            nodes,
            discrepancies,
        }))
    }

    /// Every node the registry has seen, with its books.
    pub async fn node_reports(&self) -> Result<Vec<NodeReport>, LedgerError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!("SELECT n.address, n.status, n.reputation,
                        count(r.task_id), coalesce(sum(r.completion_tokens), 0)::bigint,
                        sum(r.price_units) FILTER (WHERE r.confirmation = 'confirmed' AND r.verification IN ('verified', 'unchecked')
                            AND {NOT_UNDELIVERED})::text,
                        count(r.task_id) FILTER (WHERE r.confirmation = 'pending'),
                        count(r.task_id) FILTER (WHERE r.confirmation = 'disputed'),
                        (SELECT count(*) FROM confirmations c WHERE c.node_address = n.address AND c.status = 'mismatch'),
                        extract(epoch FROM n.last_seen)::bigint,
                        n.checked_tokens, n.wide_deviations, n.ends_passed, n.steering_reason
                 FROM nodes n LEFT JOIN receipts r ON r.node_address = n.address
                 GROUP BY n.address ORDER BY n.address"),
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(NodeReport {
                    address: r.get(0),
                    status: r.get(1),
                    reputation_bps: r.get(2),
                    tasks: r.get(3),
                    completion_tokens: r.get(4),
                    payable: units(r.get(5))?,
                    pending_confirmation: r.get(6),
                    disputed: r.get(7),
                    mismatched_blocks: r.get(8),
                    last_seen_unix: r.get(9),
                    checked_tokens: r.get(10),
                    wide_near_ties: r.get(11),
                    ends_passed: r.get(12),
                    steering_flag: r.get(13),
                })
            })
            .collect()
    }
}

impl Store {
    /// Keeps `node` out of rotation for `duration` from now, or longer if it already is.
    pub async fn record_quarantine(&self, node: &str, duration: std::time::Duration) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        let seconds = duration.as_secs_f64();
        conn.execute(
            "INSERT INTO nodes (address, quarantined_until) VALUES ($1, now() + make_interval(secs => $2))
             ON CONFLICT (address) DO UPDATE SET quarantined_until =
                 greatest(coalesce(nodes.quarantined_until, now()), excluded.quarantined_until)",
            &[&node, &seconds],
        )
        .await?;
        Ok(())
    }

    /// How long `node` stays out of rotation from now (`None`: it is not).
    pub async fn quarantine_left(&self, node: &str) -> Result<Option<std::time::Duration>, LedgerError> {
        let conn = self.conn().await?;
        let left: Option<f64> = conn
            .query_opt(
                "SELECT extract(epoch FROM quarantined_until - now())::float8 FROM nodes
                 WHERE address = $1 AND quarantined_until > now()",
                &[&node],
            )
            .await?
            .map(|r| r.get(0));
        Ok(left.and_then(|s| std::time::Duration::try_from_secs_f64(s).ok()))
    }

    /// What the verification policy needs to know of a node after a restart: its recorded
    /// tasks (capped at `up_to`: only "more than the first few" matters) and its
    /// reputation (10,000 for a node the registry has never seen).
    pub async fn node_standing(&self, node: &str, up_to: i64) -> Result<(u64, i32), LedgerError> {
        let conn = self.conn().await?;
        let (tasks, reputation) = conn
            .query_opt("SELECT least(tasks, $2), reputation FROM nodes WHERE address = $1", &[&node, &up_to])
            .await?
            .map_or((0, 10_000), |r| (r.get::<_, i64>(0), r.get::<_, i32>(1)));
        Ok((tasks as u64, reputation))
    }
}

/// A committed block, as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockSummary {
    pub number: i64,
    pub receipts: i32,
    pub merkle_root: String,
    pub committed_at_unix: i64,
}

impl Store {
    /// Recorded tasks by verification outcome (`unchecked`, `verified`, …), by outcome.
    pub async fn verification_counts(&self) -> Result<Vec<(String, i64)>, LedgerError> {
        let conn = self.conn().await?;
        let rows =
            conn.query("SELECT verification, count(*) FROM receipts GROUP BY verification ORDER BY 1", &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The newest `limit` blocks, newest first.
    pub async fn recent_blocks(&self, limit: i64) -> Result<Vec<BlockSummary>, LedgerError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT number, receipt_count, encode(merkle_root, 'hex'), extract(epoch FROM committed_at)::bigint
                 FROM blocks ORDER BY number DESC LIMIT $1",
                &[&limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| BlockSummary {
                number: r.get(0),
                receipts: r.get(1),
                merkle_root: r.get(2),
                committed_at_unix: r.get(3),
            })
            .collect())
    }

    /// The last block number handed out.
    pub async fn last_block(&self) -> Result<u64, LedgerError> {
        let conn = self.conn().await?;
        Ok(conn.query_one("SELECT last_block FROM block_counter", &[]).await?.get::<_, i64>(0) as u64)
    }

    /// Epochs by posting status (`planned`, `sent`, `confirmed`).
    pub async fn epoch_counts(&self) -> Result<Vec<(String, i64)>, LedgerError> {
        let conn = self.conn().await?;
        let rows = conn.query("SELECT status, count(*) FROM epochs GROUP BY status ORDER BY 1", &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
