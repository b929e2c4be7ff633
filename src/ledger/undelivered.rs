//! Answers the network failed to deliver: a job forwarded to another server that its
//! origin gave up before the answer came back whole (a lost event the running server
//! could not send again, a running server gone silent or restarted). The game got an
//! error, so the task is neither charged to it nor paid to its node: settlement, the
//! escrow check and the reports leave out every receipt with a row here
//! ([`NOT_UNDELIVERED`]), whether the receipt is recorded before or after it. A write-off
//! that comes after its receipt was settled changes nothing: that receipt was charged and
//! paid, and the books keep saying so.
//!
//! The same rule as an answer the server itself cannot finish (its grammar engine failed):
//! the server's failure is not the game's bill. A node cannot cause it: what is lost is
//! lost between servers.

use super::error::LedgerError;
use super::store::Store;

/// The SQL condition that leaves out a receipt `r` whose answer was not delivered (unless
/// it was settled before the write-off came: then it was charged and paid, and counts).
pub const NOT_UNDELIVERED: &str =
    "(r.epoch IS NOT NULL OR NOT EXISTS (SELECT 1 FROM undelivered u WHERE u.task_id = r.task_id))";

/// What recording a write-off found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOff {
    /// Not recorded before.
    pub new: bool,
    /// The epoch that had already settled its receipt (the write-off came too late).
    pub settled_in: Option<u64>,
}

/// Longest reason kept (the rest is cut, at a character boundary).
const MAX_REASON_BYTES: usize = 500;

impl Store {
    /// Records that `task`'s answer never reached its game whole (`server`: the one that
    /// gave it up, `reason`: why). Says whether it is new (a second record of the same
    /// task changes nothing) and the epoch its receipt was already settled in, if it was
    /// (too late: charged and paid all the same).
    pub async fn record_undelivered(&self, task: u64, server: &str, reason: &str) -> Result<WriteOff, LedgerError> {
        // The reason may quote what another server sent; Postgres refuses a NUL in text.
        let mut reason = reason.replace('\0', "\u{fffd}");
        if reason.len() > MAX_REASON_BYTES {
            let cut = (0..=MAX_REASON_BYTES).rev().find(|&i| reason.is_char_boundary(i)).unwrap_or(0);
            reason.truncate(cut);
        }
        let conn = self.conn().await?;
        let new = conn
            .execute(
                "INSERT INTO undelivered (task_id, recorded_by, reason) VALUES ($1, $2, $3)
                 ON CONFLICT (task_id) DO NOTHING",
                &[&(task as i64), &server, &reason],
            )
            .await?;
        let settled = conn.query_opt("SELECT epoch FROM receipts WHERE task_id = $1", &[&(task as i64)]).await?;
        let settled_in = settled.and_then(|r| r.get::<_, Option<i64>>(0)).map(|e| e as u64);
        Ok(WriteOff { new: new > 0, settled_in })
    }

    /// Why `task`'s answer was not delivered, if it was not.
    pub async fn undelivered(&self, task: u64) -> Result<Option<String>, LedgerError> {
        let conn = self.conn().await?;
        let row = conn.query_opt("SELECT reason FROM undelivered WHERE task_id = $1", &[&(task as i64)]).await?;
        Ok(row.map(|r| r.get(0)))
    }
}
