//! Proof-of-inference outcomes: recorded per task (first verdict wins), copied onto the
//! receipt (a failed one is never payable), and reflected in the node's reputation: a
//! failure costs [`FAILURE_PENALTY_BPS`] and quarantines the node; each verified task
//! earns back [`RECOVERY_BPS`], up to 10,000.

use super::error::LedgerError;
use super::store::Store;

pub const FAILURE_PENALTY_BPS: i32 = 2_500;
pub const RECOVERY_BPS: i32 = 10;

impl Store {
    /// Records a verdict; returns the node's reputation (basis points) after it.
    pub async fn record_verification(
        &self,
        task: u64,
        node: &str,
        verified: bool,
        detail: &str,
    ) -> Result<i32, LedgerError> {
        let outcome = if verified { "verified" } else { "failed" };
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let task_i = task as i64;
        // First statement, so that a block commit's SHARE lock on this table is the only
        // thing it can wait for (see `commit_block`).
        let new = tx
            .execute(
                "INSERT INTO verifications (task_id, node_address, outcome, detail) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (task_id) DO NOTHING",
                &[&task_i, &node, &outcome, &detail],
            )
            .await?;
        tx.execute("UPDATE receipts SET verification = $2 WHERE task_id = $1", &[&task_i, &outcome]).await?;
        tx.execute("INSERT INTO nodes (address) VALUES ($1) ON CONFLICT (address) DO NOTHING", &[&node]).await?;
        let reputation: i32 = if new == 0 {
            tx.query_one("SELECT reputation FROM nodes WHERE address = $1", &[&node]).await?.get(0)
        } else if verified {
            tx.query_one(
                "UPDATE nodes SET reputation = least(reputation + $2, 10000) WHERE address = $1 RETURNING reputation",
                &[&node, &RECOVERY_BPS],
            )
            .await?
            .get(0)
        } else {
            tx.query_one(
                "UPDATE nodes SET reputation = greatest(reputation - $2, 0), status = 'quarantined'
                 WHERE address = $1 RETURNING reputation",
                &[&node, &FAILURE_PENALTY_BPS],
            )
            .await?
            .get(0)
        };
        tx.commit().await?;
        Ok(reputation)
    }
}
