//! Proof-of-inference outcomes: recorded per (task, node), copied onto that node's receipt,
//! and reflected in the node's reputation. A failure costs [`FAILURE_PENALTY_BPS`] and
//! quarantines the node; each verified task earns back [`RECOVERY_BPS`], up to 10,000. A
//! check that could not run is [`Outcome::Unverifiable`]: unpaid, no penalty, and replaced
//! by the first real verdict, which also takes a deferred check out of the
//! [`super::check_backlog`]. Otherwise the first verdict wins.

use super::error::LedgerError;
use super::store::Store;

pub const FAILURE_PENALTY_BPS: i32 = 2_500;
pub const RECOVERY_BPS: i32 = 10;

/// What a proof-of-inference check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The proof matches the reference: the task is payable.
    Verified,
    /// The node's output or proof is wrong: never paid, reputation lost, quarantine.
    Failed,
    /// The check could not run (a verifier error, a reference it cannot load): never paid
    /// and never counted as verified, but no fault of the node.
    Unverifiable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Verified => "verified",
            Outcome::Failed => "failed",
            Outcome::Unverifiable => "unverifiable",
        }
    }
}

impl Store {
    /// Records a verdict; returns the node's reputation (basis points) after it.
    pub async fn record_verification(
        &self,
        task: u64,
        node: &str,
        outcome: Outcome,
        detail: &str,
    ) -> Result<i32, LedgerError> {
        // A node's words can reach `detail` (a format it declared): Postgres refuses a NUL
        // in text, and a verdict refused for good would never land.
        let detail = detail.replace('\0', "\u{fffd}");
        let detail = detail.as_str();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let task_i = task as i64;
        // First statement, so that a block commit's SHARE lock on this table is the only
        // thing it can wait for (see `commit_block`). A verdict for another node's task id
        // changes nothing; an unverifiable one gives way to a real verdict.
        let new = tx
            .execute(
                "INSERT INTO verifications (task_id, node_address, outcome, detail) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (task_id) DO UPDATE SET outcome = excluded.outcome, detail = excluded.detail,
                     checked_at = now()
                 WHERE verifications.outcome = 'unverifiable' AND verifications.node_address = excluded.node_address
                   AND excluded.outcome <> 'unverifiable'",
                &[&task_i, &node, &outcome.as_str(), &detail],
            )
            .await?;
        if new > 0 {
            tx.execute(
                "UPDATE receipts SET verification = $3 WHERE task_id = $1 AND node_address = $2",
                &[&task_i, &node, &outcome.as_str()],
            )
            .await?;
        }
        if new > 0 && outcome != Outcome::Unverifiable {
            // A deferred check got its verdict: it leaves the backlog in the same commit.
            tx.execute(
                "DELETE FROM check_backlog WHERE task_id = $1 AND node_address = $2 AND kind = 'proof'",
                &[&task_i, &node],
            )
            .await?;
        }
        tx.execute("INSERT INTO nodes (address) VALUES ($1) ON CONFLICT (address) DO NOTHING", &[&node]).await?;
        let reputation: i32 = match (new > 0, outcome) {
            (true, Outcome::Verified) => tx
                .query_one(
                    "UPDATE nodes SET reputation = least(reputation + $2, 10000) WHERE address = $1 RETURNING reputation",
                    &[&node, &RECOVERY_BPS],
                )
                .await?
                .get(0),
            (true, Outcome::Failed) => tx
                .query_one(
                    "UPDATE nodes SET reputation = greatest(reputation - $2, 0), status = 'quarantined'
                     WHERE address = $1 RETURNING reputation",
                    &[&node, &FAILURE_PENALTY_BPS],
                )
                .await?
                .get(0),
            _ => tx.query_one("SELECT reputation FROM nodes WHERE address = $1", &[&node]).await?.get(0),
        };
        tx.commit().await?;
        Ok(reputation)
    }
}
