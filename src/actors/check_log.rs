//! The server's write-ahead log of the checks it owes: `data_dir/checks.log`.
//!
//! A task the policy samples is paid only with a verdict. Until that verdict (or the
//! task's place in the Postgres check backlog) is in the ledger, the check lives in this
//! process only: in the verifier pool's queue, the backlog actor's mailbox, or a verdict
//! the Registry could not yet write. A crash there used to lose it, and the node's
//! re-sent receipt then came back `unchecked`, which is payable. So Completion appends the
//! check here (prompt, tokens, proof: the backlog's JSON) before it writes the completion
//! itself ahead, and the Registry marks it settled once the ledger holds a verdict for it;
//! the backlog does the same once the check waits in Postgres. After a crash the checks
//! still owed are replayed into the backlog, and a check owed for [`OVERDUE`] in a live
//! process (a verdict that could not be written, a check dropped with a restarted actor) is
//! handed to the backlog again. Meanwhile its task is not paid: its receipt is recorded
//! `sampled` (the completion log keeps the pick for a re-sent one), and only a `verified`
//! verdict pays it.
//!
//! Tokens a node delivered without a proof ([`super::delivery_check`]) are owed here too,
//! under their own kind: nothing is paid for them, but a node that streamed a game wrong
//! text must not escape its check because the server crashed while the database was down
//! (the only time such a check lives in memory alone). Their check is written here before
//! it goes to the backlog, settled once the backlog holds it in Postgres or the ledger holds
//! its verdict, and replayed like a proof check.
//!
//! Lines: `owe <task> <node> <json>` and `done <task> <node>` for proof checks,
//! `owe-delivered …` and `done-delivered …` for delivered-token checks (a task may owe
//! both, to the same node). The file is forced to disk before each block commits (so a
//! check is on disk before the receipt it guards can be paid) and on the backlog's ticks,
//! and rewritten with the owed checks only when settled ones pile up.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use crate::ledger::check_backlog::CheckKind;

/// The file is rewritten when it is this large and mostly settled checks.
const COMPACT_AFTER_BYTES: u64 = 16 << 20;

/// A check owed this long has been lost somewhere in the process: handed out again.
pub const OVERDUE: std::time::Duration = std::time::Duration::from_secs(600);

/// A check's key: the task, the node whose work it checks, and what it checks.
type Key = (u64, [u8; 20], CheckKind);

/// A check still owed after a restart: the task, its node, what it checks, and the
/// backlog's JSON of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedCheck {
    pub task: u64,
    pub node: [u8; 20],
    pub kind: CheckKind,
    pub check: Vec<u8>,
}

/// What is known in memory of an owed check (its line stays in the file only).
struct Entry {
    /// The length of its line.
    len: u64,
    /// Since when it is owed (or was last handed out again).
    since: std::time::Instant,
}

struct Inner {
    file: File,
    owed: HashMap<Key, Entry>,
    /// Bytes in the file.
    bytes: u64,
    /// Written since the last sync.
    dirty: bool,
    /// A write failed, perhaps half-way: the next line starts on a new line.
    torn: bool,
}

impl Inner {
    /// Appends `line`; a failure is logged (the check itself still runs in memory, and its
    /// task is unpaid until a verdict whatever happens here).
    fn append(&mut self, path: &Path, line: &[u8]) {
        let result = if std::mem::take(&mut self.torn) {
            self.file.write_all(b"\n").and_then(|()| self.file.write_all(line))
        } else {
            self.file.write_all(line)
        };
        if let Err(e) = result {
            tracing::error!(path = %path.display(), error = %e, "cannot write the check log");
            self.torn = true;
        }
        self.bytes += line.len() as u64;
        self.dirty = true;
    }
}

pub struct CheckLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Held for a whole [`CheckLog::sync`], so that flushes take turns without holding
    /// `inner` (and the appends waiting on it) for the disk's time.
    flushing: Mutex<()>,
}

impl std::fmt::Debug for CheckLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckLog").field("path", &self.path).finish_non_exhaustive()
    }
}

enum Line {
    Owe(Key, Vec<u8>),
    Done(Key),
}

fn key(task: &str, node: &str, kind: CheckKind) -> Option<Key> {
    Some((u64::from_str_radix(task, 16).ok()?, hex::decode(node).ok()?.try_into().ok()?, kind))
}

/// The verbs of a kind's lines: proof checks keep the plain ones of older logs.
fn verbs(kind: CheckKind) -> (&'static str, &'static str) {
    match kind {
        CheckKind::Proof => ("owe", "done"),
        CheckKind::Delivered => ("owe-delivered", "done-delivered"),
    }
}

fn parse(line: &[u8]) -> Option<Line> {
    let line = std::str::from_utf8(line).ok()?;
    let (verb, rest) = line.split_once(' ')?;
    let (owe, kind) = match verb {
        "owe" => (true, CheckKind::Proof),
        "done" => (false, CheckKind::Proof),
        "owe-delivered" => (true, CheckKind::Delivered),
        "done-delivered" => (false, CheckKind::Delivered),
        _ => return None,
    };
    if owe {
        let mut fields = rest.splitn(3, ' ');
        let key = key(fields.next()?, fields.next()?, kind)?;
        let check = fields.next()?;
        // A torn line has no closing brace: the JSON object is whole or skipped.
        (check.starts_with('{') && check.ends_with('}')).then(|| Line::Owe(key, check.as_bytes().to_vec()))
    } else {
        let (task, node) = rest.split_once(' ')?;
        key(task, node, kind).map(Line::Done)
    }
}

fn owe_line((task, node, kind): Key, check: &[u8]) -> Vec<u8> {
    let mut line = format!("{} {task:016x} {} ", verbs(kind).0, hex::encode(node)).into_bytes();
    line.extend_from_slice(check);
    line.push(b'\n');
    line
}

/// Calls `f` with every well-formed line of the file at `path`, in order (damaged ones, a
/// torn tail, are skipped); returns the file's length in bytes.
fn each_line(path: &Path, mut f: impl FnMut(Line)) -> std::io::Result<u64> {
    let mut reader = BufReader::new(File::open(path)?);
    let (mut line, mut bytes) = (Vec::new(), 0);
    while reader.read_until(b'\n', &mut line)? > 0 {
        bytes += line.len() as u64;
        if let Some(parsed) = parse(line.strip_suffix(b"\n").unwrap_or(&line)) {
            f(parsed);
        }
        line.clear();
    }
    Ok(bytes)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    std::os::unix::fs::OpenOptionsExt::mode(options.create(true).append(true), 0o600);
    options.open(path)
}

impl CheckLog {
    /// Opens (creating, mode 0600) and replays the log: the checks still owed, in the
    /// order they were written. Damaged lines (a torn tail) are skipped.
    pub fn open(path: &Path) -> std::io::Result<(Self, Vec<OwedCheck>)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut checks: Vec<Option<OwedCheck>> = Vec::new();
        let mut index: HashMap<Key, usize> = HashMap::new();
        let replayed = each_line(path, |line| match line {
            Line::Owe(key, check) => {
                if let Some(old) = index.insert(key, checks.len()) {
                    checks[old] = None;
                }
                checks.push(Some(OwedCheck { task: key.0, node: key.1, kind: key.2, check }));
            }
            Line::Done(key) => {
                if let Some(old) = index.remove(&key) {
                    checks[old] = None;
                }
            }
        });
        let bytes = match replayed {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let mut file = open_append(path)?;
        // Start on a fresh line, in case the last one was torn.
        file.write_all(b"\n")?;
        let owed: Vec<OwedCheck> = checks.into_iter().flatten().collect();
        let now = std::time::Instant::now();
        let entries = owed.iter().map(|c| {
            let len = owe_line((c.task, c.node, c.kind), &c.check).len() as u64;
            ((c.task, c.node, c.kind), Entry { len, since: now })
        });
        let inner = Inner { file, owed: entries.collect(), bytes: bytes + 1, dirty: true, torn: false };
        if !owed.is_empty() {
            tracing::warn!(path = %path.display(), checks = owed.len(), "check log replayed: checks owed from before a restart");
        }
        Ok((Self { path: path.to_path_buf(), inner: Mutex::new(inner), flushing: Mutex::new(()) }, owed))
    }

    /// Records that `node`'s work on `task` must be checked (`check`: the backlog's JSON of
    /// it, on one line). A proof check is written before the completion itself is written
    /// ahead; a delivered-token check before it goes to the backlog.
    pub fn owe(&self, kind: CheckKind, task: u64, node: [u8; 20], check: &[u8]) {
        let line = owe_line((task, node, kind), check);
        let mut inner = self.inner.lock().expect("check log lock");
        inner.append(&self.path, &line);
        inner.owed.insert((task, node, kind), Entry { len: line.len() as u64, since: std::time::Instant::now() });
    }

    /// The ledger now holds what pays or refuses `node`'s work on `task` (or, for a
    /// delivered-token check, the check itself or its verdict): no longer owed.
    pub fn settle(&self, kind: CheckKind, task: u64, node: [u8; 20]) {
        let mut inner = self.inner.lock().expect("check log lock");
        if inner.owed.remove(&(task, node, kind)).is_none() {
            return;
        }
        let line = format!("{} {task:016x} {}\n", verbs(kind).1, hex::encode(node));
        inner.append(&self.path, line.as_bytes());
    }

    /// The checks owed for longer than `age` (read back from the file), owed from now on
    /// again: whatever was to settle them was lost in this process.
    pub fn overdue(&self, age: std::time::Duration) -> Vec<OwedCheck> {
        let mut inner = self.inner.lock().expect("check log lock");
        let now = std::time::Instant::now();
        if !inner.owed.values().any(|e| now.saturating_duration_since(e.since) >= age) {
            return Vec::new();
        }
        // Each is handed out once per `age`, found in the file or not.
        let mut due: std::collections::HashSet<Key> = std::collections::HashSet::new();
        for (key, entry) in inner.owed.iter_mut() {
            if now.saturating_duration_since(entry.since) >= age {
                entry.since = now;
                due.insert(*key);
            }
        }
        let mut found: HashMap<Key, Vec<u8>> = HashMap::new();
        let read = self.each_owe_line(|key, check| {
            if due.contains(&key) {
                found.insert(key, check);
            }
        });
        if let Err(e) = read {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot read the check log");
            return Vec::new();
        }
        let missing = due.len() - found.len();
        if missing > 0 {
            // Their line could not be written: the task stays unpaid, nothing to check.
            tracing::error!(path = %self.path.display(), missing, "owed checks without their line in the check log");
        }
        found.into_iter().map(|((task, node, kind), check)| OwedCheck { task, node, kind, check }).collect()
    }

    /// Calls `f` with every well-formed `owe` line of the file, in order.
    fn each_owe_line(&self, mut f: impl FnMut(Key, Vec<u8>)) -> std::io::Result<()> {
        each_line(&self.path, |line| {
            if let Line::Owe(key, check) = line {
                f(key, check);
            }
        })
        .map(|_| ())
    }

    /// Forces what was written to disk (before a block commits), and rewrites the file
    /// when settled checks make up most of it.
    ///
    /// The flush itself runs on a duplicate of the file's handle, outside the lock: a node
    /// proxy owing a check (an append to the page cache) does not wait for the disk behind
    /// another thread's flush (only behind a compaction, once per 16 MiB of lines). Whatever was appended before the flush starts is on disk
    /// when it returns; a line appended meanwhile marks the log dirty for the next one.
    /// Flushes take turns, so a caller never returns while an earlier flush of its lines
    /// is still under way on another thread.
    pub fn sync(&self) {
        let _turn = self.flushing.lock().expect("check log flush lock");
        let file = {
            let mut inner = self.inner.lock().expect("check log lock");
            if !std::mem::take(&mut inner.dirty) {
                return;
            }
            inner.file.try_clone()
        };
        let flushed = file.and_then(|file| file.sync_data());
        let mut inner = self.inner.lock().expect("check log lock");
        if let Err(e) = flushed {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot sync the check log");
            inner.dirty = true;
            return;
        }
        let owed_bytes: u64 = inner.owed.values().map(|e| e.len).sum();
        if inner.bytes > COMPACT_AFTER_BYTES && inner.bytes > 4 * owed_bytes {
            // The rewritten file is synced whole, lines appended during the flush included.
            match self.compact(&mut inner) {
                Ok(()) => inner.dirty = false,
                Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot compact the check log"),
            }
        }
    }

    /// Checks owed now (tests, metrics and diagnostics).
    pub fn owed(&self) -> usize {
        self.inner.lock().expect("check log lock").owed.len()
    }

    /// Rewrites the file with the owed checks only (read back from it): a temp file, synced,
    /// renamed over the log, the directory synced; appends then go to the new file.
    fn compact(&self, inner: &mut Inner) -> std::io::Result<()> {
        let mut kept: HashMap<Key, Vec<u8>> = HashMap::new();
        self.each_owe_line(|key, check| {
            if inner.owed.contains_key(&key) {
                // Owed twice: the later line wins, as on replay.
                kept.insert(key, owe_line(key, &check));
            }
        })?;
        let tmp = self.path.with_extension("compacting");
        let _ = std::fs::remove_file(&tmp);
        let mut file = open_append(&tmp)?;
        let mut bytes = 0;
        for line in kept.values() {
            file.write_all(line)?;
            bytes += line.len() as u64;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        // The renamed temp file is the log now; its handle appends to it.
        inner.file = file;
        inner.bytes = bytes;
        inner.torn = false;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot sync the check log's directory");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: CheckKind = CheckKind::Proof;
    const D: CheckKind = CheckKind::Delivered;

    fn check(n: u8) -> Vec<u8> {
        format!(r#"{{"task":{n},"text":"a b\nc"}}"#).into_bytes()
    }

    #[test]
    fn owed_checks_survive_a_restart_until_settled_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checks.log");
        let (log, owed) = CheckLog::open(&path).unwrap();
        assert!(owed.is_empty());
        log.owe(P, 1, [1; 20], &check(1));
        log.owe(P, 2, [2; 20], &check(2));
        log.owe(P, 3, [3; 20], &check(3));
        log.settle(P, 2, [2; 20]);
        log.settle(P, 3, [9; 20]); // another node's: not this check
        log.sync();
        drop(log);
        // A crash mid-write leaves a torn line.
        let torn = owe_line((4, [4; 20], P), &check(4));
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&torn[..torn.len() - 5]).unwrap();
        let (log, owed) = CheckLog::open(&path).unwrap();
        let tasks: Vec<(u64, [u8; 20])> = owed.iter().map(|c| (c.task, c.node)).collect();
        assert_eq!(tasks, vec![(1, [1; 20]), (3, [3; 20])], "in order, the settled and the torn one left out");
        assert_eq!(owed[0].check, check(1));
        assert_eq!(log.owed(), 2);
        log.settle(P, 1, [1; 20]);
        log.owe(P, 5, [5; 20], &check(5));
        drop(log);
        let (log, owed) = CheckLog::open(&path).unwrap();
        let tasks: Vec<u64> = owed.iter().map(|c| c.task).collect();
        assert_eq!(tasks, vec![3, 5], "written after the torn line");
        // Owed for too long: handed out again, read back from the file, and then not again
        // until it is overdue once more.
        assert!(log.overdue(std::time::Duration::from_secs(3600)).is_empty(), "nothing is an hour old");
        let mut again = log.overdue(std::time::Duration::ZERO);
        again.sort_by_key(|c| c.task);
        assert_eq!(again, owed);
        log.settle(P, 5, [5; 20]);
        assert!(log.overdue(std::time::Duration::from_millis(50)).is_empty(), "just handed out");
        std::thread::sleep(std::time::Duration::from_millis(60));
        let again: Vec<u64> = log.overdue(std::time::Duration::from_millis(50)).iter().map(|c| c.task).collect();
        assert_eq!(again, vec![3], "a settled check is not owed");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn checks_owed_and_settled_while_other_threads_flush_and_compact_are_all_kept() {
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checks.log");
        let (log, _) = CheckLog::open(&path).unwrap();
        let log = std::sync::Arc::new(log);
        // Lines large enough that the flushing threads also compact, mid-way.
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(32 << 10)).into_bytes();
        let per_thread = 2 * COMPACT_AFTER_BYTES / big.len() as u64;
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let flushers: Vec<_> = (0..2)
            .map(|_| {
                let (log, done) = (log.clone(), done.clone());
                std::thread::spawn(move || {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        log.sync();
                    }
                })
            })
            .collect();
        // Seen by a writer: the file shrank under it (a compaction while it wrote).
        let shrank = std::sync::Arc::new(AtomicBool::new(false));
        let owers: Vec<_> = (0..3u8)
            .map(|t| {
                let (log, big, path, shrank) = (log.clone(), big.clone(), path.clone(), shrank.clone());
                std::thread::spawn(move || {
                    let mut largest = 0;
                    for task in 0..per_thread {
                        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                        if len < largest {
                            shrank.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        largest = largest.max(len);
                        log.owe(P, task, [t; 20], &big);
                        if task % 8 != 1 {
                            log.settle(P, task, [t; 20]);
                        }
                    }
                })
            })
            .collect();
        owers.into_iter().for_each(|o| o.join().unwrap());
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        flushers.into_iter().for_each(|f| f.join().unwrap());
        assert!(shrank.load(std::sync::atomic::Ordering::Relaxed), "no compaction while the writers wrote");
        log.sync();
        drop(log);
        let (_, owed) = CheckLog::open(&path).unwrap();
        let mut got: Vec<(u64, [u8; 20])> = owed.iter().map(|c| (c.task, c.node)).collect();
        got.sort();
        let mut expected: Vec<(u64, [u8; 20])> =
            (0..3u8).flat_map(|t| (0..per_thread).filter(|k| k % 8 == 1).map(move |k| (k, [t; 20]))).collect();
        expected.sort();
        assert_eq!(got, expected, "every owed check, and no settled one");
        assert!(owed.iter().all(|c| c.check == big));
    }

    #[test]
    fn compaction_keeps_exactly_the_owed_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checks.log");
        let (log, _) = CheckLog::open(&path).unwrap();
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(64 << 10)).into_bytes();
        let total = COMPACT_AFTER_BYTES / big.len() as u64 + 2;
        for task in 0..total {
            log.owe(P, task, [7; 20], &big);
            if task != 5 {
                log.settle(P, task, [7; 20]);
            }
        }
        log.owe(P, 5, [7; 20], &check(5)); // owed again: the later line wins
        log.sync();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 1024, "rewritten to the one owed check: {size} bytes");
        log.owe(P, 99, [9; 20], &check(99));
        drop(log);
        let (_, owed) = CheckLog::open(&path).unwrap();
        assert_eq!(
            owed,
            vec![
                OwedCheck { task: 5, node: [7; 20], kind: P, check: check(5) },
                OwedCheck { task: 99, node: [9; 20], kind: P, check: check(99) }
            ]
        );
    }

    /// A task may owe a proof check and a delivered-token check to the same node (a hang-up
    /// whose receipt was refused): each is settled on its own and replays with its kind, and
    /// a log written before delivered checks existed reads as proof checks.
    #[test]
    fn proof_and_delivered_checks_of_one_task_are_owed_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checks.log");
        // An older log: plain verbs only.
        std::fs::write(&path, format!("owe {:016x} {} {}\n", 8, hex::encode([8; 20]), "{\"old\":1}")).unwrap();
        let (log, owed) = CheckLog::open(&path).unwrap();
        assert_eq!(owed, vec![OwedCheck { task: 8, node: [8; 20], kind: P, check: b"{\"old\":1}".to_vec() }]);
        log.settle(D, 8, [8; 20]); // the other kind: still owed
        assert_eq!(log.owed(), 1);
        log.owe(P, 9, [1; 20], &check(1));
        log.owe(D, 9, [1; 20], &check(2));
        log.settle(P, 9, [1; 20]);
        log.owe(D, 10, [2; 20], &check(3));
        log.settle(D, 10, [2; 20]);
        drop(log);
        let (log, owed) = CheckLog::open(&path).unwrap();
        assert_eq!(
            owed,
            vec![
                OwedCheck { task: 8, node: [8; 20], kind: P, check: b"{\"old\":1}".to_vec() },
                OwedCheck { task: 9, node: [1; 20], kind: D, check: check(2) },
            ]
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("owe-delivered {:016x} {} ", 9, hex::encode([1; 20]))), "{text}");
        assert!(text.contains(&format!("done-delivered {:016x} {}\n", 10, hex::encode([2; 20]))), "{text}");
        // Handed out again with its kind when overdue.
        let mut again = log.overdue(std::time::Duration::ZERO);
        again.sort_by_key(|c| c.task);
        assert_eq!(again, owed);
        log.settle(D, 9, [1; 20]);
        log.settle(P, 8, [8; 20]);
        assert_eq!(log.owed(), 0);
        drop(log);
        assert!(CheckLog::open(&path).unwrap().1.is_empty());
    }
}
