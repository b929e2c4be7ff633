//! Checks of tokens a node delivered and then failed before its proof
//! (`proof::delivered`): one row per (task, node), apart from the task's proof verdict in
//! [`super::verifications`]. Nothing here is paid. A failure costs the node
//! [`FAILURE_PENALTY_BPS`] of reputation and marks it quarantined, like a failed proof; a
//! pass earns nothing (the node did not finish the task). The checks wait in the check
//! backlog ([`super::check_backlog`]) until their verdict, which takes them out.

use super::error::LedgerError;
use super::store::Store;
use super::verifications::{Outcome, FAILURE_PENALTY_BPS};

impl Store {
    /// Records a check: the first one per task and node counts, but a real verdict
    /// replaces an `unverifiable` one. A real verdict takes the check out of the backlog in
    /// the same commit (an `unverifiable` one leaves it to be claimed again). Returns the
    /// node's reputation (basis points) after it.
    pub async fn record_delivery_check(
        &self,
        task: u64,
        node: &str,
        tokens: usize,
        outcome: Outcome,
        detail: &str,
    ) -> Result<i32, LedgerError> {
        // A verdict's reason may quote what a node sent; Postgres refuses a NUL in text.
        let detail = detail.replace('\0', "\u{fffd}");
        let tokens = i32::try_from(tokens).unwrap_or(i32::MAX);
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let new = tx
            .execute(
                "INSERT INTO delivery_checks (task_id, node_address, tokens, outcome, detail)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (task_id, node_address) DO UPDATE SET tokens = excluded.tokens,
                     outcome = excluded.outcome, detail = excluded.detail, checked_at = now()
                 WHERE delivery_checks.outcome = 'unverifiable' AND excluded.outcome <> 'unverifiable'",
                &[&(task as i64), &node, &tokens, &outcome.as_str(), &detail],
            )
            .await?;
        if outcome != Outcome::Unverifiable {
            tx.execute(
                "DELETE FROM check_backlog WHERE task_id = $1 AND node_address = $2 AND kind = 'delivered'",
                &[&(task as i64), &node],
            )
            .await?;
        }
        tx.execute("INSERT INTO nodes (address) VALUES ($1) ON CONFLICT (address) DO NOTHING", &[&node]).await?;
        let reputation: i32 = if new > 0 && outcome == Outcome::Failed {
            tx.query_one(
                "UPDATE nodes SET reputation = greatest(reputation - $2, 0), status = 'quarantined'
                 WHERE address = $1 RETURNING reputation",
                &[&node, &FAILURE_PENALTY_BPS],
            )
            .await?
            .get(0)
        } else {
            tx.query_one("SELECT reputation FROM nodes WHERE address = $1", &[&node]).await?.get(0)
        };
        tx.commit().await?;
        Ok(reputation)
    }

    /// Whether `node` has delivered tokens recorded unchecked (`unverifiable`) since its
    /// newest verified task: then every task of its is checked until one is verified
    /// (`Policy::check_until_verified`), which a restarted server reads back from here when
    /// the node joins. A later real verdict for those tokens clears it too.
    pub async fn owes_a_verified_task(&self, node: &str) -> Result<bool, LedgerError> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM delivery_checks d
                     WHERE d.node_address = $1 AND d.outcome = 'unverifiable'
                       AND d.checked_at >= coalesce((SELECT max(v.checked_at) FROM verifications v
                           WHERE v.node_address = $1 AND v.outcome = 'verified'), '-infinity'::timestamptz))",
                &[&node],
            )
            .await?;
        Ok(row.get(0))
    }
}
