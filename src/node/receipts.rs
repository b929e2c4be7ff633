//! The node's receipt log: every signed receipt is appended to a local file before the
//! node reports the task done, and stays there until the registry has recorded it and
//! stored the node's confirmation. After any reconnect (and for any receipt unanswered
//! for [`RESEND_AFTER`]) the node sends the unconfirmed ones again; the registry is
//! idempotent by task id, so a crash on either side loses nothing and counts nothing twice.
//!
//! The file is JSON lines, append-only: `{"receipt": …}`, `{"recorded": {"block", "tasks"}}`,
//! `{"confirmed": block}`. It is compacted (rewritten atomically with only the open
//! receipts) when confirmed lines pile up.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::protocol::{SignedReceipt, TaskId};

/// A receipt unanswered this long is sent again.
pub const RESEND_AFTER: Duration = Duration::from_secs(20);
/// Closed lines tolerated before the log is compacted.
const COMPACT_AFTER_LINES: usize = 20_000;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Receipt(SignedReceipt),
    Recorded { block: u64, tasks: Vec<TaskId> },
    Confirmed(u64),
}

struct Open {
    receipt: SignedReceipt,
    /// The block the registry put it in, once told.
    block: Option<u64>,
    last_sent: Option<Instant>,
}

/// The receipts `path` still lists as confirmed by the registry, oldest first, read
/// without taking the log (a running node may hold it). Compaction drops confirmed
/// receipts, so this is the recent ones; a missing log is an empty list.
pub fn confirmed_receipts(path: &Path) -> anyhow::Result<Vec<SignedReceipt>> {
    let Ok(file) = File::open(path) else {
        return Ok(Vec::new());
    };
    let mut receipts: BTreeMap<TaskId, (usize, SignedReceipt)> = BTreeMap::new();
    let mut blocks: BTreeMap<TaskId, u64> = BTreeMap::new();
    let mut confirmed: BTreeSet<u64> = BTreeSet::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        match serde_json::from_str::<Line>(&line.map_err(|e| io_err(path, e))?) {
            Ok(Line::Receipt(r)) => {
                receipts.entry(r.ticket.task).or_insert((n, r));
            }
            Ok(Line::Recorded { block, tasks }) => blocks.extend(tasks.into_iter().map(|t| (t, block))),
            Ok(Line::Confirmed(block)) => {
                confirmed.insert(block);
            }
            Err(_) => {} // blank separators and a torn tail
        }
    }
    let mut out: Vec<(usize, SignedReceipt)> = receipts
        .into_iter()
        .filter(|(t, _)| blocks.get(t).is_some_and(|b| confirmed.contains(b)))
        .map(|(_, r)| r)
        .collect();
    out.sort_by_key(|(n, _)| *n);
    Ok(out.into_iter().map(|(_, r)| r).collect())
}

/// The log of receipts not yet confirmed.
pub struct ReceiptLog {
    path: PathBuf,
    file: File,
    /// Held (locked) for as long as the log is open.
    _lock: File,
    open: BTreeMap<TaskId, Open>,
    lines: usize,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("receipt log {}: {e}", path.display())
}

impl ReceiptLog {
    /// Opens (creating) the log and replays it. A torn last line (crash mid-write) is
    /// skipped with a warning; everything before it is kept.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_err(path, e))?;
        }
        // One process per log: two nodes on one key would answer for each other's tasks
        // (the registry lists a key's tasks) and interleave their lines. The lock is on a
        // file of its own, which compaction never replaces.
        let lock_path = path.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "receipt log {} is in use by another `ludus node`: each node needs its own key \
                 (--key) and receipt log",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, e)),
        }
        let mut open: BTreeMap<TaskId, Open> = BTreeMap::new();
        let mut lines = 0;
        if let Ok(existing) = File::open(path) {
            for (n, line) in BufReader::new(existing).lines().enumerate() {
                let line = line.map_err(|e| io_err(path, e))?;
                lines += 1;
                // Blank lines are the separators written after a torn tail at open.
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line::Receipt(r)) => {
                        open.entry(r.ticket.task).or_insert(Open { receipt: r, block: None, last_sent: None });
                    }
                    Ok(Line::Recorded { block, tasks }) => {
                        for t in tasks {
                            if let Some(o) = open.get_mut(&t) {
                                o.block = Some(block);
                            }
                        }
                    }
                    Ok(Line::Confirmed(block)) => open.retain(|_, o| o.block != Some(block)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), line = n + 1, error = %e, "skipping a damaged receipt-log line")
                    }
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| io_err(path, e))?;
        let mut log = Self { path: path.to_path_buf(), file, _lock: lock, open, lines };
        // Start on a fresh line, in case the last one was torn.
        log.file.write_all(b"\n").map_err(|e| io_err(path, e))?;
        if log.lines > COMPACT_AFTER_LINES {
            log.compact()?;
        }
        Ok(log)
    }

    fn append(&mut self, line: &Line) -> anyhow::Result<()> {
        let mut bytes = serde_json::to_vec(line)?;
        bytes.push(b'\n');
        // One write per line: a crash leaves at worst a torn last line.
        self.file.write_all(&bytes).map_err(|e| io_err(&self.path, e))?;
        self.lines += 1;
        Ok(())
    }

    /// Records a new receipt (before the node reports the task done).
    pub fn add(&mut self, receipt: &SignedReceipt) -> anyhow::Result<()> {
        self.append(&Line::Receipt(receipt.clone()))?;
        self.open.insert(
            receipt.ticket.task,
            Open { receipt: receipt.clone(), block: None, last_sent: Some(Instant::now()) },
        );
        Ok(())
    }

    /// The registry says `block` holds `tasks` of ours. Returns (agreed, disputed): the
    /// listed tasks we hold a receipt for, and those we do not.
    pub fn recorded(&mut self, block: u64, tasks: &[TaskId]) -> anyhow::Result<(Vec<TaskId>, Vec<TaskId>)> {
        let (mut agreed, mut disputed) = (Vec::new(), Vec::new());
        for t in tasks {
            match self.open.get_mut(t) {
                Some(o) => {
                    o.block = Some(block);
                    agreed.push(*t);
                }
                None => disputed.push(*t),
            }
        }
        self.append(&Line::Recorded { block, tasks: agreed.clone() })?;
        Ok((agreed, disputed))
    }

    /// The registry stored our confirmation of `block`: forget its receipts.
    pub fn confirmed(&mut self, block: u64) -> anyhow::Result<()> {
        self.append(&Line::Confirmed(block))?;
        self.open.retain(|_, o| o.block != Some(block));
        if self.lines > COMPACT_AFTER_LINES && self.lines > 4 * self.open.len() {
            self.compact()?;
        }
        Ok(())
    }

    /// Receipts to send again: all open ones after a reconnect (`all`), else those
    /// unanswered for [`RESEND_AFTER`]. Marks them sent.
    pub fn due(&mut self, all: bool) -> Vec<SignedReceipt> {
        let now = Instant::now();
        self.open
            .values_mut()
            .filter(|o| all || o.last_sent.is_none_or(|t| now.duration_since(t) >= RESEND_AFTER))
            .map(|o| {
                o.last_sent = Some(now);
                o.receipt.clone()
            })
            .collect()
    }

    /// Open (unconfirmed) receipts.
    pub fn pending(&self) -> usize {
        self.open.len()
    }

    /// Forces the log to disk (called on shutdown).
    pub fn sync(&self) -> anyhow::Result<()> {
        self.file.sync_data().map_err(|e| io_err(&self.path, e))
    }

    /// Rewrites the log with only the open receipts (temp file, fsync, rename).
    fn compact(&mut self) -> anyhow::Result<()> {
        let tmp = self.path.with_extension("compacting");
        let mut out = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut blocks: BTreeMap<u64, Vec<TaskId>> = BTreeMap::new();
        let mut lines = 0;
        for (task, o) in &self.open {
            out.write_all(&serde_json::to_vec(&Line::Receipt(o.receipt.clone()))?).map_err(|e| io_err(&tmp, e))?;
            out.write_all(b"\n").map_err(|e| io_err(&tmp, e))?;
            lines += 1;
            if let Some(b) = o.block {
                blocks.entry(b).or_default().push(*task);
            }
        }
        for (block, tasks) in blocks {
            out.write_all(&serde_json::to_vec(&Line::Recorded { block, tasks })?).map_err(|e| io_err(&tmp, e))?;
            out.write_all(b"\n").map_err(|e| io_err(&tmp, e))?;
            lines += 1;
        }
        out.sync_all().map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io_err(&self.path, e))?;
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(|e| io_err(&self.path, e))?;
        self.lines = lines;
        Ok(())
    }

    /// Task ids of the open receipts (tests and diagnostics).
    pub fn open_tasks(&self) -> BTreeSet<TaskId> {
        self.open.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::identity::Identity;
    use crate::protocol::TaskTicket;

    fn receipt(node: &Identity, task: u64) -> SignedReceipt {
        let ticket = TaskTicket::issue(
            &[1; 32],
            TaskId(task),
            1,
            "m",
            (8, crate::protocol::PromptCount { tokens: 3, exact: true }),
            &node.address,
        );
        SignedReceipt::sign(node, ticket, 3, &[1, 2])
    }

    #[test]
    fn receipts_survive_reopening_until_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let node = Identity::generate();
        let mut log = ReceiptLog::open(&path).unwrap();
        for t in 1..=4 {
            log.add(&receipt(&node, t)).unwrap();
        }
        let (agreed, disputed) = log.recorded(9, &[TaskId(1), TaskId(2), TaskId(77)]).unwrap();
        assert_eq!((agreed, disputed), (vec![TaskId(1), TaskId(2)], vec![TaskId(77)]));
        drop(log);
        // A torn last line (crash mid-append) is skipped.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"receipt\": {\"tick").unwrap();
        let mut log = ReceiptLog::open(&path).unwrap();
        assert_eq!(log.pending(), 4);
        assert_eq!(log.due(true).len(), 4, "everything open is re-sent after a reconnect");
        assert!(log.due(false).is_empty(), "just sent: nothing due yet");
        log.confirmed(9).unwrap();
        assert_eq!(log.open_tasks(), [TaskId(3), TaskId(4)].into_iter().collect());
        drop(log);
        let mut log = ReceiptLog::open(&path).unwrap();
        assert_eq!(log.open_tasks(), [TaskId(3), TaskId(4)].into_iter().collect());
        log.compact().unwrap();
        drop(log);
        assert_eq!(ReceiptLog::open(&path).unwrap().pending(), 2);
    }

    #[test]
    fn confirmed_receipts_are_read_while_the_node_holds_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        assert!(confirmed_receipts(&path).unwrap().is_empty(), "no log yet: nothing to check");
        let node = Identity::generate();
        let mut log = ReceiptLog::open(&path).unwrap();
        let written: Vec<SignedReceipt> = (1..=5).map(|t| receipt(&node, t)).collect();
        for r in &written {
            log.add(r).unwrap();
        }
        log.recorded(3, &[TaskId(2), TaskId(1)]).unwrap();
        log.recorded(4, &[TaskId(3)]).unwrap();
        log.recorded(5, &[TaskId(4)]).unwrap();
        log.confirmed(3).unwrap();
        log.confirmed(5).unwrap();
        // Read while `log` is open (and locked): confirmed blocks only, in log order, as written.
        let read = confirmed_receipts(&path).unwrap();
        assert_eq!(read, vec![written[0].clone(), written[1].clone(), written[3].clone()]);
    }
}
