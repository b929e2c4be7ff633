//! Write-offs on their way to the ledger ([`crate::ledger::undelivered`]), kept in
//! `data_dir/write-offs.log` until the ledger has them: a server stopped or killed while
//! its database is away loses none. Each one is appended (one JSON line) before the
//! ledger is tried, and the file is rewritten without it once the ledger took it. At
//! start, the lines left are written to the ledger again ([`WriteOffs::open`]).
//!
//! Write-offs are rare (an answer lost between servers), so the file stays short and is
//! rewritten whole; a line torn by a crash mid-append is skipped (its answer was not yet
//! given up when the process died: the game's connection died with it).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ledger::Store;
use crate::protocol::TaskId;

/// How long a write-off is tried again while the database does not take it; then it waits
/// in the file for the next start.
const RETRIES_FOR: Duration = Duration::from_secs(600);

/// One answer written off: its task, the server that gave it up, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteOff {
    pub task: u64,
    pub server: String,
    pub reason: String,
}

/// The write-offs of this server not yet in the ledger.
pub struct WriteOffs {
    ledger: Store,
    log: WriteOffLog,
}

impl std::fmt::Debug for WriteOffs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteOffs").field("path", &self.log.path).finish_non_exhaustive()
    }
}

impl WriteOffs {
    /// Opens the file at `path` (created when missing) and writes what it holds to the
    /// ledger again, in the background (call within the actix system).
    pub fn open(ledger: Store, path: &Path) -> std::io::Result<Arc<Self>> {
        let this = Arc::new(Self { ledger, log: WriteOffLog::open(path)? });
        let waiting = this.log.pending();
        if !waiting.is_empty() {
            tracing::warn!(left = waiting.len(), path = %path.display(),
                "write-offs left from before this start; written to the ledger now");
            for w in waiting {
                actix::spawn(this.clone().write(w));
            }
        }
        Ok(this)
    }

    /// Writes off `task` (`server`: the one that gives it up, `reason`: why): kept in the
    /// file first, then in the ledger, in the background.
    pub fn record(self: &Arc<Self>, task: TaskId, server: &str, reason: &str) {
        let w = WriteOff { task: task.0, server: server.to_string(), reason: reason.to_string() };
        if let Err(e) = self.log.keep(&w) {
            tracing::error!(task = %task, error = %e, path = %self.log.path.display(),
                "a write-off could not be kept on disk; it goes to the ledger unkept");
        }
        actix::spawn(self.clone().write(w));
    }
}

/// The file of write-offs not yet in the ledger, and its lines in memory.
struct WriteOffLog {
    path: PathBuf,
    /// Pending write-offs by task.
    pending: Mutex<BTreeMap<u64, WriteOff>>,
}

impl WriteOffLog {
    fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self { path: path.to_path_buf(), pending: Mutex::new(read(path)?) })
    }

    /// The write-offs not yet in the ledger.
    fn pending(&self) -> Vec<WriteOff> {
        self.pending.lock().expect("write-offs").values().cloned().collect()
    }

    fn keep(&self, w: &WriteOff) -> std::io::Result<()> {
        let mut pending = self.pending.lock().expect("write-offs");
        pending.insert(w.task, w.clone());
        let mut file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        let mut line = serde_json::to_vec(w).expect("write-offs serialize");
        line.push(b'\n');
        file.write_all(&line)
    }

    /// The ledger took `task`'s write-off: the file is rewritten without it.
    fn done(&self, task: u64) -> std::io::Result<()> {
        let mut pending = self.pending.lock().expect("write-offs");
        pending.remove(&task);
        let mut text = Vec::new();
        for w in pending.values() {
            text.extend(serde_json::to_vec(w).expect("write-offs serialize"));
            text.push(b'\n');
        }
        let fresh = self.path.with_extension("log.new");
        std::fs::write(&fresh, &text)?;
        std::fs::rename(&fresh, &self.path)
    }
}

impl WriteOffs {
    /// Tries the ledger until it takes `w` (for [`RETRIES_FOR`]; then the file keeps it
    /// for the next start).
    async fn write(self: Arc<Self>, w: WriteOff) {
        let (started, mut wait) = (Instant::now(), Duration::from_millis(500));
        loop {
            match self.ledger.record_undelivered(w.task, &w.server, &w.reason).await {
                Ok(_) => {
                    tracing::warn!(task = %TaskId(w.task), reason = %w.reason, "an answer given up was written off: not billed");
                    if let Err(e) = self.log.done(w.task) {
                        tracing::warn!(error = %e, path = %self.log.path.display(), "the write-offs file could not be rewritten");
                    }
                    return;
                }
                Err(e) if started.elapsed() >= RETRIES_FOR => {
                    return tracing::error!(task = %TaskId(w.task), error = %e, path = %self.log.path.display(),
                        "a write-off did not reach the ledger; kept on disk for the next start");
                }
                Err(e) => {
                    tracing::warn!(task = %TaskId(w.task), error = %e, "writing off an answer failed; trying again")
                }
            }
            actix_web::rt::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }
}

/// The write-offs in the file at `path` (none when it is missing); a torn line is skipped.
fn read(path: &Path) -> std::io::Result<BTreeMap<u64, WriteOff>> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice::<WriteOff>(line).ok())
        .map(|w| (w.task, w))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_keeps_whole_lines_and_skips_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("write-offs.log");
        assert!(read(&path).unwrap().is_empty(), "a missing file holds nothing");
        let w = |task| WriteOff { task, server: "a".into(), reason: format!("lost {task}") };
        let mut text = Vec::new();
        for task in [3, u64::MAX] {
            text.extend(serde_json::to_vec(&w(task)).unwrap());
            text.push(b'\n');
        }
        text.extend(b"{\"task\": 9, \"server\": \"a\", \"rea");
        std::fs::write(&path, &text).unwrap();
        let read = read(&path).unwrap();
        assert_eq!(read.into_values().collect::<Vec<_>>(), vec![w(3), w(u64::MAX)]);
    }

    #[test]
    fn a_write_off_stays_in_the_file_until_the_ledger_took_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("write-offs.log");
        let w = |task| WriteOff { task, server: "a".into(), reason: "lost\nacross a line".into() };
        let log = WriteOffLog::open(&path).unwrap();
        log.keep(&w(1)).unwrap();
        log.keep(&w(2)).unwrap();
        log.keep(&w(2)).unwrap();
        // Killed here: a new process finds both, once each.
        assert_eq!(WriteOffLog::open(&path).unwrap().pending(), vec![w(1), w(2)]);
        log.done(1).unwrap();
        assert_eq!(WriteOffLog::open(&path).unwrap().pending(), vec![w(2)]);
        log.done(2).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"", "nothing left to write");
        assert!(WriteOffLog::open(&path).unwrap().pending().is_empty());
    }
}
