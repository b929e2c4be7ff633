//! The server's write-ahead log of the completions it saw: for every task a node finished
//! live, (task, node, completion tokens, output hash) is appended to
//! `data_dir/completions.log` before the game hears `Done`. After a crash, nodes re-send
//! their unconfirmed receipts; one is recorded only when this log (or the ledger itself)
//! shows the server saw that node finish that task with that output. A receipt for a task
//! the node failed, or never ran, earns nothing — while a kill -9 still loses no earned
//! receipt: the line is in the kernel's page cache before the game is answered, and
//! `sync_data` runs with every block. Lines of committed tasks are dropped as blocks commit;
//! the file is rewritten when they pile up.
//!
//! Each line also says whether the task was picked for a proof check: a re-sent receipt of
//! such a task is recorded `sampled`, paid only once verified, here or on another server.
//!
//! In a network of servers (`cluster`), each one also keeps, in memory, what the others
//! saw ([`CompletionLog::record_peer`], announced over NATS before the game is answered):
//! a node whose server died re-homes to another one and re-sends its receipts there, and
//! they are paid there. Kept [`PEER_WITNESS_TTL`] and at most [`MAX_PEER_WITNESSES`]:
//! nodes re-home within seconds.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Dropped lines tolerated before the file is rewritten with the open ones.
const COMPACT_AFTER_LINES: usize = 50_000;
/// How long the completions other servers saw are remembered.
pub const PEER_WITNESS_TTL: std::time::Duration = std::time::Duration::from_secs(600);
/// Other servers' completions remembered at most (the oldest go first): about 100 MB, ten
/// minutes of a network finishing 1,600 requests/s (docs/benchmarks.md says what to do
/// beyond that).
pub const MAX_PEER_WITNESSES: usize = 1_000_000;

/// What the server saw of one finished task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    node: [u8; 20],
    completion_tokens: u32,
    output_hash: [u8; 32],
    /// Picked for a proof check: paid only with its verdict.
    sampled: bool,
}

impl Seen {
    /// Whether a receipt of `node` with this output is the one seen.
    fn matches(&self, node: [u8; 20], completion_tokens: u32, output_hash: [u8; 32]) -> bool {
        (self.node, self.completion_tokens, self.output_hash) == (node, completion_tokens, output_hash)
    }
}

/// The mark of a picked task at the end of its line.
const SAMPLED: &str = "sampled";

struct Inner {
    file: File,
    open: HashMap<u64, Seen>,
    lines: usize,
}

pub struct CompletionLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// What the other servers of the network saw, with when this one heard of it.
    peers: Mutex<HashMap<u64, (Seen, std::time::Instant)>>,
}

impl std::fmt::Debug for CompletionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionLog").field("path", &self.path).finish_non_exhaustive()
    }
}

fn parse(line: &str) -> Option<(u64, Seen)> {
    let mut fields = line.split(' ');
    let task = u64::from_str_radix(fields.next()?, 16).ok()?;
    let node = hex::decode(fields.next()?).ok()?.try_into().ok()?;
    let completion_tokens = fields.next()?.parse().ok()?;
    let output_hash = hex::decode(fields.next()?).ok()?.try_into().ok()?;
    // Lines written before the mark existed have four fields.
    let sampled = match fields.next() {
        None => false,
        Some(SAMPLED) => true,
        Some(_) => return None,
    };
    fields.next().is_none().then_some((task, Seen { node, completion_tokens, output_hash, sampled }))
}

fn format_line(task: u64, seen: &Seen) -> String {
    let (node, hash) = (hex::encode(seen.node), hex::encode(seen.output_hash));
    let mark = if seen.sampled { format!(" {SAMPLED}") } else { String::new() };
    format!("{task:016x} {node} {} {hash}{mark}\n", seen.completion_tokens)
}

impl CompletionLog {
    /// Opens (creating, mode 0600) and replays the log; damaged lines (a torn tail) are
    /// skipped.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut open = HashMap::new();
        let mut lines = 0;
        if let Ok(existing) = File::open(path) {
            for line in BufReader::new(existing).lines() {
                lines += 1;
                if let Some((task, seen)) = parse(&line?) {
                    open.insert(task, seen);
                }
            }
        }
        let mut options = OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(options.create(true).append(true), 0o600);
        let mut file = options.open(path)?;
        // Start on a fresh line, in case the last one was torn.
        file.write_all(b"\n")?;
        if !open.is_empty() {
            tracing::info!(path = %path.display(), completions = open.len(), "completion log replayed");
        }
        Ok(Self { path: path.to_path_buf(), inner: Mutex::new(Inner { file, open, lines }), peers: Mutex::default() })
    }

    /// Records a completion the server saw (before the game is told it is done), and
    /// whether it was picked for a proof check.
    pub fn record(&self, task: u64, node: [u8; 20], completion_tokens: u32, output_hash: [u8; 32], sampled: bool) {
        let seen = Seen { node, completion_tokens, output_hash, sampled };
        let mut inner = self.inner.lock().expect("completion log lock");
        if let Err(e) = inner.file.write_all(format_line(task, &seen).as_bytes()) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the completion log");
        }
        inner.lines += 1;
        inner.open.insert(task, seen);
    }

    /// Records a completion another server of the network saw (in memory only).
    pub fn record_peer(&self, task: u64, node: [u8; 20], completion_tokens: u32, output_hash: [u8; 32], sampled: bool) {
        let now = std::time::Instant::now();
        let mut peers = self.peers.lock().expect("completion log lock");
        if peers.len() >= MAX_PEER_WITNESSES {
            peers.retain(|_, (_, at)| now.saturating_duration_since(*at) < PEER_WITNESS_TTL);
            if peers.len() >= MAX_PEER_WITNESSES {
                // Still full of fresh ones: the oldest half goes.
                let mut ages: Vec<std::time::Instant> = peers.values().map(|(_, at)| *at).collect();
                let (_, median, _) = ages.select_nth_unstable(peers.len() / 2);
                let median = *median;
                peers.retain(|_, (_, at)| *at > median);
            }
        }
        peers.insert(task, (Seen { node, completion_tokens, output_hash, sampled }, now));
    }

    /// Whether this server, or lately another one of the network, saw `node` finish
    /// `task` with exactly this output.
    pub fn witnessed(&self, task: u64, node: [u8; 20], completion_tokens: u32, output_hash: [u8; 32]) -> bool {
        self.seen(task, node, completion_tokens, output_hash).is_some()
    }

    /// [`Self::witnessed`], and if so whether the task was picked for a proof check.
    pub fn seen(&self, task: u64, node: [u8; 20], completion_tokens: u32, output_hash: [u8; 32]) -> Option<bool> {
        let own = self.inner.lock().expect("completion log lock").open.get(&task).copied();
        if let Some(seen) = own.filter(|s| s.matches(node, completion_tokens, output_hash)) {
            return Some(seen.sampled);
        }
        let peers = self.peers.lock().expect("completion log lock");
        let fresh = peers
            .get(&task)
            .filter(|(s, at)| s.matches(node, completion_tokens, output_hash) && at.elapsed() < PEER_WITNESS_TTL);
        fresh.map(|(s, _)| s.sampled)
    }

    /// Drops tasks the ledger now holds, forces the file to disk, and rewrites it when
    /// dropped lines pile up.
    pub fn committed(&self, tasks: impl IntoIterator<Item = u64>) {
        let mut inner = self.inner.lock().expect("completion log lock");
        for task in tasks {
            inner.open.remove(&task);
        }
        if let Err(e) = inner.file.sync_data() {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot sync the completion log");
        }
        if inner.lines > COMPACT_AFTER_LINES && inner.lines > 4 * inner.open.len() {
            if let Err(e) = self.compact(&mut inner) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot compact the completion log");
            }
        }
    }

    /// Tasks seen and not yet committed (tests and diagnostics).
    pub fn pending(&self) -> usize {
        self.inner.lock().expect("completion log lock").open.len()
    }

    /// Rewrites the file with the open entries only (temp file, fsync, rename).
    fn compact(&self, inner: &mut Inner) -> std::io::Result<()> {
        let tmp = self.path.with_extension("compacting");
        let mut options = OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(options.create(true).write(true).truncate(true), 0o600);
        let mut out = options.open(&tmp)?;
        for (task, seen) in &inner.open {
            out.write_all(format_line(*task, seen).as_bytes())?;
        }
        out.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        let mut options = OpenOptions::new();
        inner.file = std::os::unix::fs::OpenOptionsExt::mode(options.append(true), 0o600).open(&self.path)?;
        inner.lines = inner.open.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_survive_a_restart_until_committed_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("completions.log");
        let log = CompletionLog::open(&path).unwrap();
        log.record(1, [1; 20], 5, [9; 32], false);
        log.record(2, [2; 20], 7, [8; 32], true);
        drop(log);
        // A crash mid-write leaves a torn line.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"00000000000003 0102").unwrap();
        let log = CompletionLog::open(&path).unwrap();
        assert!(log.witnessed(1, [1; 20], 5, [9; 32]));
        assert!(!log.witnessed(1, [2; 20], 5, [9; 32]), "another node");
        assert!(!log.witnessed(1, [1; 20], 6, [9; 32]), "another count");
        assert!(!log.witnessed(3, [1; 20], 5, [9; 32]), "never seen");
        assert_eq!(log.seen(1, [1; 20], 5, [9; 32]), Some(false));
        assert_eq!(log.seen(2, [2; 20], 7, [8; 32]), Some(true), "the pick survives the restart");
        let old = format!("{:016x} {} 5 {}", 9, hex::encode([1u8; 20]), hex::encode([9u8; 32]));
        assert_eq!(parse(&old).map(|(_, s)| s.sampled), Some(false), "a line from before the mark");
        assert!(parse(&format!("{old} maybe")).is_none());
        log.committed([1]);
        assert!(!log.witnessed(1, [1; 20], 5, [9; 32]));
        assert_eq!(log.pending(), 1);
        log.record(4, [4; 20], 1, [4; 32], false);
        assert!(log.witnessed(4, [4; 20], 1, [4; 32]), "written after the torn line");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn what_other_servers_saw_counts_exactly_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = CompletionLog::open(&dir.path().join("completions.log")).unwrap();
        log.record_peer(7, [7; 20], 3, [1; 32], true);
        assert!(log.witnessed(7, [7; 20], 3, [1; 32]));
        assert_eq!(log.seen(7, [7; 20], 3, [1; 32]), Some(true), "picked by the other server");
        assert!(!log.witnessed(7, [7; 20], 4, [1; 32]), "another count");
        assert!(!log.witnessed(7, [8; 20], 3, [1; 32]), "another node");
        assert_eq!(log.pending(), 0, "not written to this server's file");
        for task in 0..MAX_PEER_WITNESSES as u64 + 10 {
            log.record_peer(1000 + task, [1; 20], 1, [1; 32], false);
        }
        assert!(log.peers.lock().unwrap().len() <= MAX_PEER_WITNESSES);
        assert!(log.witnessed(1000 + MAX_PEER_WITNESSES as u64 + 9, [1; 20], 1, [1; 32]), "the newest is kept");
    }
}
