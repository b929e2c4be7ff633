//! Each node's near-tie record (docs/proof-of-inference.md, "Near-tie steering"): the
//! near-ties the verifier forgave it, one row each, and per node the running sums that
//! `proof::steering::judge` weighs. A verified task adds to them once, whatever is re-sent
//! or restarted; a node judged to be steering is flagged, quarantined and loses the
//! reputation of a failed proof, once.

use super::error::LedgerError;
use super::store::Store;
use super::verifications::FAILURE_PENALTY_BPS;

/// One forgiven near-tie.
#[derive(Debug, Clone, PartialEq)]
pub struct ForgivenRow {
    pub token_index: i32,
    pub gap: f32,
    pub rank: i32,
    pub reference_token: i32,
    pub node_token: i32,
    pub passed_end: bool,
    pub took_end: bool,
}

/// What one verified task adds to its node's record.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSteering {
    /// The format the proof declared.
    pub format: String,
    pub tokens: i32,
    pub wide: i32,
    pub ends_passed: i32,
    /// The most an honest node would show of each.
    pub expected_wide: f64,
    pub expected_ends_passed: f64,
    pub tokens_past_end: i32,
    pub forgiven: Vec<ForgivenRow>,
}

/// A node's running sums over its verified tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeSteering {
    pub tasks: i64,
    pub tokens: i64,
    pub wide: i64,
    pub expected_wide: f64,
    pub ends_passed: i64,
    pub expected_ends_passed: f64,
    /// Already flagged.
    pub flagged: bool,
}

/// Which check's near-ties are added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// A finished task's proof (`verifications`).
    Proof,
    /// Tokens the node delivered and then failed before its proof (`delivery_checks`):
    /// without this, a node could steer every answer within the widest format's margin and
    /// fail each task before its proof, unjudged.
    Delivered,
}

impl NodeSteering {
    /// From a row of `nodes`' columns checked_tasks, checked_tokens, wide_deviations,
    /// expected_wide, ends_passed, expected_ends_passed, and whether it is flagged.
    fn of(row: &tokio_postgres::Row) -> Self {
        Self {
            tasks: row.get(0),
            tokens: row.get(1),
            wide: row.get(2),
            expected_wide: row.get(3),
            ends_passed: row.get(4),
            expected_ends_passed: row.get(5),
            flagged: row.get(6),
        }
    }
}

impl Store {
    /// Adds a verified task's near-ties to its node's record, once per task and kind of
    /// check (a task whose verdict is not `verified` for this node, or that was added
    /// before, adds nothing and returns `None`); returns the node's sums after it.
    pub async fn record_steering(
        &self,
        task: u64,
        node: &str,
        t: &TaskSteering,
        checked: Checked,
    ) -> Result<Option<NodeSteering>, LedgerError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let task_i = task as i64;
        let mark = match checked {
            Checked::Proof => {
                "UPDATE verifications SET format = $3, tokens = $4, wide_deviations = $5, ends_passed = $6,
                     tokens_past_end = $7
                 WHERE task_id = $1 AND node_address = $2 AND outcome = 'verified' AND tokens IS NULL"
            }
            Checked::Delivered => {
                "UPDATE delivery_checks SET format = $3, tokens = $4, wide_deviations = $5, ends_passed = $6,
                     tokens_past_end = $7
                 WHERE task_id = $1 AND node_address = $2 AND outcome = 'verified' AND format IS NULL"
            }
        };
        let first = tx
            .execute(mark, &[&task_i, &node, &t.format, &t.tokens, &t.wide, &t.ends_passed, &t.tokens_past_end])
            .await?;
        if first == 0 {
            return Ok(None);
        }
        let column = |f: fn(&ForgivenRow) -> i32| t.forgiven.iter().map(f).collect::<Vec<i32>>();
        let flag = |f: fn(&ForgivenRow) -> bool| t.forgiven.iter().map(f).collect::<Vec<bool>>();
        let gaps: Vec<f32> = t.forgiven.iter().map(|d| d.gap).collect();
        tx.execute(
            "INSERT INTO forgiven_deviations (task_id, node_address, token_index, gap, rank, reference_token,
                 node_token, passed_end, took_end)
             SELECT $1, $2, * FROM unnest($3::int[], $4::real[], $5::int[], $6::int[], $7::int[], $8::bool[], $9::bool[])
             ON CONFLICT DO NOTHING",
            &[
                &task_i,
                &node,
                &column(|d| d.token_index),
                &gaps,
                &column(|d| d.rank),
                &column(|d| d.reference_token),
                &column(|d| d.node_token),
                &flag(|d| d.passed_end),
                &flag(|d| d.took_end),
            ],
        )
        .await?;
        let row = tx
            .query_one(
                "UPDATE nodes SET checked_tasks = checked_tasks + 1, checked_tokens = checked_tokens + $2,
                     wide_deviations = wide_deviations + $3, expected_wide = expected_wide + $4,
                     ends_passed = ends_passed + $5, expected_ends_passed = expected_ends_passed + $6
                 WHERE address = $1
                 RETURNING checked_tasks, checked_tokens, wide_deviations, expected_wide, ends_passed,
                     expected_ends_passed, steering_flagged_at IS NOT NULL",
                &[
                    &node,
                    &(t.tokens as i64),
                    &(t.wide as i64),
                    &t.expected_wide,
                    &(t.ends_passed as i64),
                    &t.expected_ends_passed,
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(Some(NodeSteering::of(&row)))
    }

    /// Flags a node as steering: quarantined, the reputation of a failed proof taken, the
    /// reason kept. Returns its reputation after, or `None` if it was flagged before.
    pub async fn flag_steering(&self, node: &str, reason: &str) -> Result<Option<i32>, LedgerError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "UPDATE nodes SET steering_flagged_at = now(), steering_reason = $2, status = 'quarantined',
                     reputation = greatest(reputation - $3, 0)
                 WHERE address = $1 AND steering_flagged_at IS NULL RETURNING reputation",
                &[&node, &reason, &FAILURE_PENALTY_BPS],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// A node's near-tie record as it stands (`None`: no such node).
    pub async fn node_steering(&self, node: &str) -> Result<Option<NodeSteering>, LedgerError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT checked_tasks, checked_tokens, wide_deviations, expected_wide, ends_passed,
                     expected_ends_passed, steering_flagged_at IS NOT NULL
                 FROM nodes WHERE address = $1",
                &[&node],
            )
            .await?;
        Ok(row.as_ref().map(NodeSteering::of))
    }

    /// Whether a node was flagged as steering, and why.
    pub async fn steering_flag(&self, node: &str) -> Result<Option<String>, LedgerError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT steering_reason FROM nodes WHERE address = $1 AND steering_flagged_at IS NOT NULL",
                &[&node],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}
