//! Write-offs on their way to the ledger ([`crate::ledger::undelivered`]), kept in
//! `data_dir/write-offs.log` until the ledger has them: a server stopped or killed while
//! its database is away loses none. Each one is appended (one JSON line) before the
//! ledger is tried, and the file is rewritten without it once the ledger took it. At
//! start, the lines left are written to the ledger again ([`WriteOffs::open`]).
//!
//! Write-offs are rare (an answer lost between servers), so the file stays short and is
//! rewritten whole. Every append is synced before the ledger is tried, and a rewrite is
//! synced before it replaces the file (and the directory after). A line torn by a failed
//! append (a full disk) is skipped, and never swallows the next one: each append starts
//! on a line of its own; at start the file is rewritten with the lines that parse.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ledger::Store;
use crate::protocol::TaskId;

/// After this long without the ledger taking a write-off, each failure is logged as an
/// error (it goes on being tried).
const QUIET_FOR: Duration = Duration::from_secs(600);

/// The longest wait between two tries.
const MAX_WAIT: Duration = Duration::from_secs(60);

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
    /// The file at `path` (none there: empty), rewritten with the lines that parse; an
    /// unreadable one is an error naming it (it holds money: the server does not start
    /// without it).
    fn open(path: &Path) -> std::io::Result<Self> {
        let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let (pending, skipped) = read(path).map_err(named)?;
        if skipped > 0 {
            tracing::warn!(skipped, path = %path.display(), "torn lines in the write-offs file skipped");
        }
        let log = Self { path: path.to_path_buf(), pending: Mutex::new(pending) };
        if path.exists() {
            log.rewrite(&log.pending.lock().expect("write-offs")).map_err(named)?;
        }
        Ok(log)
    }

    /// The write-offs not yet in the ledger.
    fn pending(&self) -> Vec<WriteOff> {
        self.pending.lock().expect("write-offs").values().cloned().collect()
    }

    fn keep(&self, w: &WriteOff) -> std::io::Result<()> {
        let mut pending = self.pending.lock().expect("write-offs");
        pending.insert(w.task, w.clone());
        let mut file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        // On a line of its own, whatever a failed append before it left.
        let mut line = vec![b'\n'];
        line.extend(serde_json::to_vec(w).expect("write-offs serialize"));
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_data()
    }

    /// The ledger took `task`'s write-off: the file is rewritten without it.
    fn done(&self, task: u64) -> std::io::Result<()> {
        let mut pending = self.pending.lock().expect("write-offs");
        pending.remove(&task);
        self.rewrite(&pending)
    }

    /// Replaces the file with `pending`, synced: the new file before it takes the name,
    /// the directory after.
    fn rewrite(&self, pending: &BTreeMap<u64, WriteOff>) -> std::io::Result<()> {
        let mut text = Vec::new();
        for w in pending.values() {
            text.extend(serde_json::to_vec(w).expect("write-offs serialize"));
            text.push(b'\n');
        }
        let fresh = self.path.with_extension("log.new");
        let mut file = std::fs::File::create(&fresh)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&fresh, &self.path)?;
        match self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) => std::fs::File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    }
}

impl WriteOffs {
    /// Tries the ledger until it takes `w` (the file keeps it meanwhile, across restarts).
    async fn write(self: Arc<Self>, w: WriteOff) {
        let (started, mut wait) = (Instant::now(), Duration::from_millis(500));
        loop {
            match self.ledger.record_undelivered(w.task, &w.server, &w.reason).await {
                Ok(recorded) => {
                    match recorded.settled_in {
                        Some(epoch) => tracing::error!(task = %TaskId(w.task), epoch, reason = %w.reason,
                            "an answer given up was written off after its receipt was settled: charged and paid all the same"),
                        None => tracing::warn!(task = %TaskId(w.task), reason = %w.reason,
                            "an answer given up was written off: not billed"),
                    }
                    if let Err(e) = self.log.done(w.task) {
                        tracing::warn!(error = %e, path = %self.log.path.display(), "the write-offs file could not be rewritten");
                    }
                    return;
                }
                Err(e) if started.elapsed() >= QUIET_FOR => {
                    tracing::error!(task = %TaskId(w.task), error = %e, path = %self.log.path.display(),
                        "a write-off still does not reach the ledger (kept on disk); trying again")
                }
                Err(e) => {
                    tracing::warn!(task = %TaskId(w.task), error = %e, "writing off an answer failed; trying again")
                }
            }
            actix_web::rt::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_WAIT);
        }
    }
}

/// The write-offs in the file at `path` (none when it is missing), and how many torn
/// lines were skipped (empty lines are no loss).
fn read(path: &Path) -> std::io::Result<(BTreeMap<u64, WriteOff>, usize)> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((BTreeMap::new(), 0)),
        Err(e) => return Err(e),
    };
    let (mut pending, mut skipped) = (BTreeMap::new(), 0);
    for line in text.split(|&b| b == b'\n').filter(|line| !line.trim_ascii().is_empty()) {
        match serde_json::from_slice::<WriteOff>(line) {
            Ok(w) => {
                pending.insert(w.task, w);
            }
            Err(_) => skipped += 1,
        }
    }
    Ok((pending, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_keeps_whole_lines_and_skips_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("write-offs.log");
        assert_eq!(read(&path).unwrap(), (BTreeMap::new(), 0), "a missing file holds nothing");
        let w = |task| WriteOff { task, server: "a".into(), reason: format!("lost {task}") };
        let mut text = Vec::new();
        for task in [3, u64::MAX] {
            text.extend(serde_json::to_vec(&w(task)).unwrap());
            text.push(b'\n');
        }
        text.extend(b"{\"task\": 9, \"server\": \"a\", \"rea");
        std::fs::write(&path, &text).unwrap();
        let (read, skipped) = read(&path).unwrap();
        assert_eq!((read.into_values().collect::<Vec<_>>(), skipped), (vec![w(3), w(u64::MAX)], 1));
        // Opened, the file keeps the whole lines only; the next append is not glued to a
        // torn one.
        let log = WriteOffLog::open(&path).unwrap();
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"task\": 10, \"se").unwrap();
        log.keep(&w(11)).unwrap();
        assert_eq!(WriteOffLog::open(&path).unwrap().pending(), vec![w(3), w(11), w(u64::MAX)]);
        // Unreadable: an error naming the file.
        let dir_path = dir.path().join("a-directory");
        std::fs::create_dir(&dir_path).unwrap();
        let e = WriteOffLog::open(&dir_path).err().expect("a directory is no write-offs file");
        assert!(e.to_string().contains("a-directory"), "{e}");
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
