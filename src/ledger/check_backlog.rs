//! The check backlog: checks waiting in Postgres for a verifier, of two kinds.
//!
//! - **Proof checks** of sampled tasks whose check found the verifier pool full (or whose
//!   quality-check re-run disagreed, or that a restart left owed). A deferred task is
//!   recorded `unverifiable` (unpaid, no penalty) with a "deferred" detail; the real verdict
//!   ([`Store::record_verification`]) replaces the unpaid mark and deletes the row in one
//!   transaction. A task has at most one waiting.
//! - **Delivered-token checks** ([`CheckKind::Delivered`]): the tokens a node delivered and
//!   then failed before its proof. They are all written here before they run, so a crash
//!   loses none once written; a node has at most a bound of them waiting. The verdict
//!   ([`Store::record_delivery_check`]) deletes the row in the same transaction.
//!
//! A server holding the model's reference claims a check for a lease. A check whose verdict
//! never lands (a crash mid-check) is claimed again once its lease runs out, up to
//! [`MAX_ATTEMPTS`] times.

use std::time::Duration;

use super::error::LedgerError;
use super::store::Store;

/// Claims of one check before it is given up (the task then stays unpaid).
pub const MAX_ATTEMPTS: i32 = 3;

/// The advisory-lock class ("ludc") under which a node's delivered-token checks are
/// counted and inserted one server at a time (its second key is the node's address hashed).
/// Two-key locks never conflict with the one-key locks of settlement and migrations.
const NODE_CHECKS_LOCK: i32 = 0x6c75_6463;

/// What a waiting check checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// A finished task's proof (its payment waits on the verdict).
    Proof,
    /// Tokens a node delivered and then failed before its proof (nothing is paid for them).
    Delivered,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Proof => "proof",
            CheckKind::Delivered => "delivered",
        }
    }

    fn parse(s: &str) -> Result<Self, LedgerError> {
        match s {
            "proof" => Ok(CheckKind::Proof),
            "delivered" => Ok(CheckKind::Delivered),
            other => Err(LedgerError::Corrupt(format!("check backlog: unknown kind {other:?}"))),
        }
    }
}

/// A claimed check: the task, its node, what it checks, how many claims it has had (this
/// one included) and the check itself (`actors::check_backlog`'s JSON).
#[derive(Debug)]
pub struct ClaimedCheck {
    pub task: u64,
    pub node: String,
    pub kind: CheckKind,
    pub attempts: i32,
    pub check: Vec<u8>,
}

/// A waiting check, as [`Store::drop_checks`] names the ones it drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckKey {
    pub task: u64,
    pub node: String,
    pub kind: CheckKind,
}

/// What deferring a check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferred {
    /// Queued; the task is unpaid until its verdict.
    Queued,
    /// A delivered-token check queued, and its node now has its `hold_at` of them waiting
    /// or more: the node is to get no work until they are checked.
    QueuedAtHold,
    /// The task already has a real verdict: nothing to queue.
    AlreadyChecked,
    /// The backlog holds `max` checks already: nothing written.
    Full,
    /// Another node's verdict holds the task's id (a failover): nothing written.
    OtherNode,
    /// The node has its bound of delivered-token checks waiting already: nothing written.
    NodeFull,
}

impl Store {
    /// Queues `check` for `task` of `node`, unless the backlog holds `max` checks already
    /// (`None`: however many), and marks the task unpaid (`unverifiable`, `detail`) until
    /// its verdict.
    pub async fn defer_check(
        &self,
        task: u64,
        node: &str,
        model: &str,
        check: &[u8],
        max: Option<u64>,
        detail: &str,
    ) -> Result<Deferred, LedgerError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        if backlog_full(&tx, max).await? {
            return Ok(Deferred::Full);
        }
        let task_i = task as i64;
        // The first statement on a table a block commit locks (as in `record_verification`).
        let new = tx
            .execute(
                "INSERT INTO verifications (task_id, node_address, outcome, detail)
                 VALUES ($1, $2, 'unverifiable', $3) ON CONFLICT (task_id) DO NOTHING",
                &[&task_i, &node, &detail],
            )
            .await?;
        if new == 0 {
            let held: Option<(String, String)> = tx
                .query_opt("SELECT outcome, node_address FROM verifications WHERE task_id = $1", &[&task_i])
                .await?
                .map(|row| (row.get(0), row.get(1)));
            match held {
                Some((_, holder)) if holder != node => return Ok(Deferred::OtherNode),
                Some((outcome, _)) if outcome != "unverifiable" => return Ok(Deferred::AlreadyChecked),
                _ => {}
            }
        }
        tx.execute(
            "INSERT INTO check_backlog (task_id, node_address, model, task) VALUES ($1, $2, $3, $4)
             ON CONFLICT (task_id) WHERE kind = 'proof' DO NOTHING",
            &[&task_i, &node, &model, &check],
        )
        .await?;
        tx.execute(
            "UPDATE receipts SET verification = 'unverifiable'
             WHERE task_id = $1 AND node_address = $2 AND verification IN ('unchecked', 'sampled') AND epoch IS NULL",
            &[&task_i, &node],
        )
        .await?;
        tx.commit().await?;
        Ok(Deferred::Queued)
    }

    /// Queues the check of tokens `node` delivered for `task` and then failed before its
    /// proof, unless the backlog holds `max` checks already (or `max / 2` of these), `node` has `per_node` of these
    /// waiting, or the task already has a real verdict on them; [`Deferred::QueuedAtHold`]
    /// once the node has `hold_at` waiting. Nothing is marked: nothing was to be paid.
    #[allow(clippy::too_many_arguments)]
    pub async fn defer_delivered(
        &self,
        task: u64,
        node: &str,
        model: &str,
        check: &[u8],
        max: u64,
        per_node: u64,
        hold_at: u64,
    ) -> Result<Deferred, LedgerError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // Servers deferring checks of one node take turns, so that none counts the node's
        // waiting checks while another inserts one (READ COMMITTED would let both pass).
        // A turn held too long (a server cut off mid-transaction) is an error to retry, not a
        // wait without end.
        tx.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
        tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&NODE_CHECKS_LOCK, &node]).await?;
        if backlog_full(&tx, Some(max)).await? || delivered_full(&tx, max).await? {
            return Ok(Deferred::Full);
        }
        let task_i = task as i64;
        let checked = tx
            .query_opt(
                "SELECT 1 FROM delivery_checks WHERE task_id = $1 AND node_address = $2 AND outcome <> 'unverifiable'",
                &[&task_i, &node],
            )
            .await?;
        if checked.is_some() {
            return Ok(Deferred::AlreadyChecked);
        }
        let limit = per_node.min(i64::MAX as u64) as i64;
        let waiting: i64 = tx
            .query_one(
                "SELECT count(*) FROM (SELECT 1 FROM check_backlog
                     WHERE node_address = $1 AND kind = 'delivered' AND task_id <> $2 LIMIT $3) AS waiting",
                &[&node, &task_i, &limit],
            )
            .await?
            .get(0);
        if waiting as u64 >= per_node {
            return Ok(Deferred::NodeFull);
        }
        tx.execute(
            "INSERT INTO check_backlog (task_id, node_address, model, task, kind)
             VALUES ($1, $2, $3, $4, 'delivered') ON CONFLICT (task_id, node_address, kind) DO NOTHING",
            &[&task_i, &node, &model, &check],
        )
        .await?;
        tx.commit().await?;
        Ok(if waiting as u64 + 1 >= hold_at { Deferred::QueuedAtHold } else { Deferred::Queued })
    }

    /// Claims the oldest waiting check of one of `models` for `lease` (none waiting: `None`):
    /// the oldest of kind `first`, else the oldest of any. A drain loop alternates `first`,
    /// so that neither kind starves the other: delivered-token checks stop a node feeding
    /// games wrong text now, and proof checks hold honest payments. Servers claim
    /// concurrently without taking the same check twice.
    pub async fn claim_check(
        &self,
        models: &[String],
        lease: Duration,
        first: CheckKind,
    ) -> Result<Option<ClaimedCheck>, LedgerError> {
        let conn = self.conn().await?;
        // The kind is spelled out (not a parameter) so that the query can use the partial
        // index of delivered checks.
        let preferred = match first {
            CheckKind::Delivered => "AND kind = 'delivered'",
            CheckKind::Proof => "AND kind = 'proof'",
        };
        for kind in [preferred, ""] {
            let claim = format!(
                "UPDATE check_backlog SET attempts = attempts + 1, claimed_until = now() + make_interval(secs => $2)
                 WHERE (task_id, node_address, kind) = (
                     SELECT task_id, node_address, kind FROM check_backlog
                     WHERE model = ANY($1) AND attempts < $3 AND (claimed_until IS NULL OR claimed_until < now()) {kind}
                     ORDER BY queued_at, task_id LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING task_id, node_address, attempts, task, kind"
            );
            let row = conn.query_opt(&claim, &[&models, &lease.as_secs_f64(), &MAX_ATTEMPTS]).await?;
            if let Some(row) = row {
                return Ok(Some(ClaimedCheck {
                    task: row.get::<_, i64>(0) as u64,
                    node: row.get(1),
                    kind: CheckKind::parse(row.get(4))?,
                    attempts: row.get(2),
                    check: row.get(3),
                }));
            }
        }
        Ok(None)
    }

    /// Deletes checks claimed [`MAX_ATTEMPTS`] times whose last lease ran out without a
    /// verdict, and one that cannot be read (`only`); returns the checks dropped. Their
    /// tasks stay unpaid.
    pub async fn drop_checks(&self, only: Option<&CheckKey>) -> Result<Vec<CheckKey>, LedgerError> {
        let conn = self.conn().await?;
        let rows = match only {
            Some(key) => {
                conn.query(
                    "DELETE FROM check_backlog WHERE task_id = $1 AND node_address = $2 AND kind = $3
                     RETURNING task_id, node_address, kind",
                    &[&(key.task as i64), &key.node, &key.kind.as_str()],
                )
                .await?
            }
            None => {
                conn.query(
                    "DELETE FROM check_backlog WHERE attempts >= $1 AND claimed_until < now()
                     RETURNING task_id, node_address, kind",
                    &[&MAX_ATTEMPTS],
                )
                .await?
            }
        };
        rows.iter()
            .map(|row| {
                Ok(CheckKey {
                    task: row.get::<_, i64>(0) as u64,
                    node: row.get(1),
                    kind: CheckKind::parse(row.get(2))?,
                })
            })
            .collect()
    }

    /// Checks waiting in the backlog (claimed or not).
    pub async fn backlog_len(&self) -> Result<u64, LedgerError> {
        let conn = self.conn().await?;
        Ok(conn.query_one("SELECT count(*) FROM check_backlog", &[]).await?.get::<_, i64>(0) as u64)
    }

    /// Delivered-token checks of `node` waiting (claimed or not).
    pub async fn delivered_waiting(&self, node: &str) -> Result<u64, LedgerError> {
        let conn = self.conn().await?;
        let row = conn
            .query_one("SELECT count(*) FROM check_backlog WHERE node_address = $1 AND kind = 'delivered'", &[&node])
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// How long the oldest unsettled `sampled` receipt (a picked task, unpaid until its
    /// verdict) has waited, in whole seconds; 0 when none waits. One probe of a partial
    /// index.
    pub async fn oldest_sampled_age(&self) -> Result<u64, LedgerError> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(
                "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::bigint FROM receipts
                 WHERE verification = 'sampled' AND epoch IS NULL",
                &[],
            )
            .await?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }
}

/// Whether delivered-token checks fill their share of a backlog of `max`: half. Failures
/// are in strangers' hands (and fresh keys are free); the proof checks that hold honest
/// nodes' pay keep the other half.
async fn delivered_full(tx: &tokio_postgres::Transaction<'_>, max: u64) -> Result<bool, LedgerError> {
    let share = (max / 2).max(1);
    let limit = share.min(i64::MAX as u64) as i64;
    let queued: i64 = tx
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM check_backlog WHERE kind = 'delivered' LIMIT $1) AS d",
            &[&limit],
        )
        .await?
        .get(0);
    Ok(queued as u64 >= share)
}

/// Whether the backlog holds `max` checks (`None`: never full).
async fn backlog_full(tx: &tokio_postgres::Transaction<'_>, max: Option<u64>) -> Result<bool, LedgerError> {
    let Some(max) = max else { return Ok(false) };
    let limit = max.min(i64::MAX as u64) as i64;
    let queued: i64 =
        tx.query_one("SELECT count(*) FROM (SELECT 1 FROM check_backlog LIMIT $1) AS waiting", &[&limit]).await?.get(0);
    Ok(queued as u64 >= max)
}
