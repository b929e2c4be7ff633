//! Test harness for the network: real `ludus serve` and `ludus node` processes on
//! loopback (port 0), a tiny raw HTTP/1.1 client (so malformed input reaches the server
//! as sent), and an SSE reader for streams.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ludus");

/// A `ludus` command with start-up tuning off: what the tests run (formats, threads) must
/// not depend on the machine they run on, so every node gets the untuned defaults (int4,
/// one thread per sequence) unless its flags say otherwise. `tuning.rs` tests tuning itself.
pub fn ludus() -> Command {
    let mut command = Command::new(BIN);
    command.env("LUDUS__ENGINE__TUNE", "false");
    command
}

/// A child process killed on drop, with its stderr in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub addr: String,
    pub key: String,
    /// The test's own registry database.
    pub db_url: String,
    pub server: Proc,
    pub nodes: Vec<Proc>,
    restarts: usize,
    node_restarts: Vec<usize>,
}

fn spawn(args: &[&str], log: PathBuf) -> Proc {
    spawn_with(args, log, &[])
}

/// Like [`spawn`], with more environment variables (they win over the defaults).
fn spawn_with(args: &[&str], log: PathBuf, env: &[(&str, &str)]) -> Proc {
    let file = std::fs::File::create(&log).unwrap();
    let child = crate::cluster::ludus()
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn ludus");
    Proc { child, log }
}

fn listening_addr(server: &Proc) -> String {
    let mut addr = String::new();
    wait_for("the server to listen", Duration::from_secs(30), || {
        let log = server.log_text();
        if let Some(line) = complete_lines(&log).find(|l| l.starts_with("ludus listening on http://")) {
            addr = line.trim_start_matches("ludus listening on http://").trim().to_string();
            return true;
        }
        assert!(!log.contains("Error:"), "the server failed to start:\n{log}");
        false
    });
    addr
}

/// The lines of a log that a process has finished writing: a last line without its
/// newline may still be growing (read "127.0.0.1:" before the port), so it is left out.
pub fn complete_lines(log: &str) -> impl Iterator<Item = &str> {
    let done = log.rfind('\n').map_or("", |end| &log[..end]);
    done.lines()
}

/// A number that differs between calls in one process.
fn rand_suffix() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

impl Cluster {
    /// Starts a server with fast heartbeats; `extra` is appended to its config file.
    pub fn start(extra: &str) -> Self {
        Self::start_prepared(extra, |_| {})
    }

    /// Like [`Cluster::start`], running `prepare` on the data directory before the
    /// server starts (to place model keys, say).
    pub fn start_prepared(extra: &str, prepare: impl FnOnce(&std::path::Path)) -> Self {
        Self::start_full(extra, prepare, None)
    }

    /// Like [`Cluster::start`], on the given database instead of a fresh one.
    pub fn start_with_database(extra: &str, db_url: &str) -> Self {
        Self::start_full(extra, |_| {}, Some(db_url.to_string()))
    }

    /// Like [`Cluster::start`], with `server_extra` added to the `[server]` table.
    pub fn start_with_server(server_extra: &str, extra: &str) -> Self {
        Self::start_full_with(server_extra, extra, |_| {}, None)
    }

    /// Another server on `db_url` (a network of servers on one database), with
    /// `server_extra` added to its `[server]` table.
    pub fn start_joining(server_extra: &str, extra: &str, db_url: &str) -> Self {
        Self::start_full_with(server_extra, extra, |_| {}, Some(db_url.to_string()))
    }

    fn start_full(extra: &str, prepare: impl FnOnce(&std::path::Path), db_url: Option<String>) -> Self {
        Self::start_full_with("", extra, prepare, db_url)
    }

    fn start_full_with(
        server_extra: &str,
        extra: &str,
        prepare: impl FnOnce(&std::path::Path),
        db_url: Option<String>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ludus.toml");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        prepare(&data);
        let shared = db_url.is_some();
        let db_url = db_url.unwrap_or_else(super::database::fresh_database);
        std::fs::write(
            &config,
            format!(
                "[server]\nbind = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nworkers = 2\nshutdown_grace_s = 5\n{server_extra}\
                 [database]\nurl = \"{db_url}\"\npool_size = 4\n{}\
                 [distributor]\nheartbeat_interval_ms = 200\n{}{}{extra}",
                data.display(),
                // A test may set its own block time.
                if extra.contains("[clock]") { "" } else { "[clock]\nblock_time_ms = 300\n" },
                // A test may allow nodes more time (long runs on a loaded machine).
                if extra.contains("node_timeout_ms") { "" } else { "node_timeout_ms = 800\n" },
                // Or jobs more patience in the queue.
                if extra.contains("queue_timeout_ms") { "" } else { "queue_timeout_ms = 10000\n" },
            ),
        )
        .unwrap();
        let cfg = config.to_str().unwrap().to_string();
        // A second cluster on a shared database gets a game of its own.
        let game = if shared { format!("testgame-{}", std::process::id() ^ rand_suffix()) } else { "testgame".into() };
        let out = crate::cluster::ludus().args(["--config", &cfg, "games", "add", &game]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let server = spawn(&["--config", &cfg, "serve"], dir.path().join("serve.log"));
        let addr = listening_addr(&server);
        Self { dir, config, addr, key, db_url, server, nodes: Vec::new(), restarts: 0, node_restarts: Vec::new() }
    }

    /// Adds a game (`ludus games add NAME ARGS…`) and returns its API key.
    pub fn add_game(&self, name: &str, args: &[&str]) -> String {
        let out = ludus().arg("--config").arg(&self.config).args(["games", "add", name]).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Kills the server with SIGKILL (no graceful anything).
    pub fn kill_server(&mut self) {
        self.server.kill();
    }

    /// Starts the server again on the same address (same data dir and database).
    pub fn restart_server(&mut self) {
        self.server.kill();
        self.restarts += 1;
        let cfg = self.config.to_str().unwrap().to_string();
        let log = self.dir.path().join(format!("serve-{}.log", self.restarts));
        let file = std::fs::File::create(&log).unwrap();
        let child = crate::cluster::ludus()
            .args(["--config", &cfg, "serve"])
            .env("RUST_LOG", "info")
            .env("LUDUS__SERVER__BIND", &self.addr)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn ludus");
        self.server = Proc { child, log };
        assert_eq!(listening_addr(&self.server), self.addr);
    }

    /// The registry database of this cluster.
    pub fn store(&self) -> ludus::ledger::Store {
        super::database::open(&self.db_url)
    }

    /// Starts `ludus node` with extra arguments; returns its index.
    pub fn add_node(&mut self, args: &[&str]) -> usize {
        let addr = self.addr.clone();
        self.add_node_via(&addr, args)
    }

    /// Starts `ludus node` connecting through `via` (e.g. a [`Tap`]).
    pub fn add_node_via(&mut self, via: &str, args: &[&str]) -> usize {
        self.add_node_with_env(via, args, &[])
    }

    /// Starts `ludus node` through `via` with more environment variables.
    pub fn add_node_with_env(&mut self, via: &str, args: &[&str], env: &[(&str, &str)]) -> usize {
        let i = self.nodes.len();
        let url = format!("ws://{via}/ws/node");
        let key = self.dir.path().join(format!("node{i}.key"));
        let cfg = self.config.to_str().unwrap().to_string();
        let mut all = vec!["--config", &cfg, "node", "--connect", &url, "--key", key.to_str().unwrap()];
        all.extend_from_slice(args);
        let log = self.dir.path().join(format!("node{i}.log"));
        self.nodes.push(spawn_with(&all, log, env));
        i
    }

    /// Kills node `i` (SIGKILL) and starts it again with the same key, receipt log and
    /// arguments: a node leaving and rejoining.
    pub fn restart_node(&mut self, i: usize, args: &[&str]) {
        self.nodes[i].kill();
        let url = format!("ws://{}/ws/node", self.addr);
        let key = self.dir.path().join(format!("node{i}.key"));
        let cfg = self.config.to_str().unwrap().to_string();
        let mut all = vec!["--config", &cfg, "node", "--connect", &url, "--key", key.to_str().unwrap()];
        all.extend_from_slice(args);
        let restart = self.restarts_of(i);
        let log = self.dir.path().join(format!("node{i}-{restart}.log"));
        self.nodes[i] = spawn(&all, log);
    }

    fn restarts_of(&mut self, i: usize) -> usize {
        self.node_restarts.resize(self.nodes.len(), 0);
        self.node_restarts[i] += 1;
        self.node_restarts[i]
    }

    /// Resident memory of the server process, in KiB.
    pub fn server_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.server.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until `model` is served by `n` live nodes.
    pub fn wait_nodes(&self, model: &str, n: u64) {
        wait_for(&format!("{n} node(s) serving {model}"), Duration::from_secs(180), || {
            let (status, body) = self.get("/v1/models");
            status == 200
                && serde_json::from_str::<serde_json::Value>(&body).ok().is_some_and(|v| {
                    v["data"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|m| m["id"] == model && m["nodes"].as_u64() == Some(n))
                })
        });
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let r = raw(&self.addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes());
        (r.status, r.body)
    }

    /// GETs with the admin token.
    pub fn get_admin(&self, path: &str, token: &str) -> (u16, String) {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
        let r = raw(&self.addr, request.as_bytes());
        (r.status, r.body)
    }

    /// POSTs JSON with the cluster's key.
    pub fn post(&self, path: &str, body: &str) -> Response {
        post_with(&self.addr, path, Some(&self.key), body.as_bytes())
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

pub fn post_with(addr: &str, path: &str, key: Option<&str>, body: &[u8]) -> Response {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    raw(addr, &request)
}

/// Sends raw bytes, reads the whole response (de-chunked).
pub fn raw(addr: &str, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // The server may answer (413) before reading a huge body: ignore write errors.
    let _ = stream.write_all(request);
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(chunk) = read_chunk(&mut reader) {
            body.extend_from_slice(&chunk);
        }
    } else {
        let _ = reader.read_to_end(&mut body);
    }
    Response { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

fn read_chunk(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut size_line = String::new();
    if reader.read_line(&mut size_line).ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(size_line.trim(), 16).ok()?;
    if size == 0 {
        return None;
    }
    let mut chunk = vec![0u8; size + 2];
    reader.read_exact(&mut chunk).ok()?;
    chunk.truncate(size);
    Some(chunk)
}

/// An open SSE stream: yields each `data:` payload as it arrives.
pub struct SseStream {
    reader: BufReader<TcpStream>,
    pending: String,
    pub status: u16,
}

impl SseStream {
    pub fn open(addr: &str, key: &str, body: &str) -> Self {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let (status, _) = read_head(&mut reader);
        Self { reader, pending: String::new(), status }
    }

    /// The next `data:` payload, or None at the end of the stream.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let event: String = self.pending.drain(..end + 2).collect();
                if let Some(data) = event.trim().strip_prefix("data: ") {
                    return Some(data.to_string());
                }
                continue;
            }
            let chunk = read_chunk(&mut self.reader)?;
            self.pending.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// A TCP relay in front of the server that records every byte both ways (a tap on a
/// node's socket), and can hold what the server sends (a slow link one way).
pub struct Tap {
    pub addr: String,
    /// Bytes the node sent (websocket frames, masked as RFC 6455 requires of clients).
    pub to_server: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Bytes the server sent.
    pub to_node: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// While set, what the server sends waits in the relay (in order) instead of reaching
    /// the node.
    pub hold_to_node: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Tap {
    pub fn start(upstream: &str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let to_server: std::sync::Arc<std::sync::Mutex<Vec<u8>>> = Default::default();
        let to_node: std::sync::Arc<std::sync::Mutex<Vec<u8>>> = Default::default();
        let hold_to_node: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let (up_record, down_record, upstream) = (to_server.clone(), to_node.clone(), upstream.to_string());
        let (never, hold) = (std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)), hold_to_node.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else { return };
                for (mut from, mut to, record, held) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap(), up_record.clone(), never.clone()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap(), down_record.clone(), hold.clone()),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            while held.load(std::sync::atomic::Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            record.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { addr, to_server, to_node, hold_to_node }
    }

    /// Everything an eavesdropper can read: the server's bytes as sent, and the node's
    /// websocket payloads with the client masking removed.
    pub fn readable(&self) -> Vec<u8> {
        let mut out = self.to_node.lock().unwrap().clone();
        let up = self.to_server.lock().unwrap().clone();
        let Some(start) = up.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else { return out };
        out.extend_from_slice(&up[..start]);
        let mut i = start;
        while i + 2 <= up.len() {
            let masked = up[i + 1] & 0x80 != 0;
            let mut len = (up[i + 1] & 0x7f) as usize;
            i += 2;
            if len == 126 && i + 2 <= up.len() {
                len = u16::from_be_bytes([up[i], up[i + 1]]) as usize;
                i += 2;
            } else if len == 127 && i + 8 <= up.len() {
                len = u64::from_be_bytes(up[i..i + 8].try_into().unwrap()) as usize;
                i += 8;
            }
            let mask = if masked && i + 4 <= up.len() { [up[i], up[i + 1], up[i + 2], up[i + 3]] } else { [0; 4] };
            if masked {
                i += 4;
            }
            let end = (i + len).min(up.len());
            out.extend(up[i..end].iter().enumerate().map(|(k, b)| b ^ mask[k % 4]));
            i = end;
        }
        out
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.readable().windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    pub fn len(&self) -> usize {
        self.to_server.lock().unwrap().len() + self.to_node.lock().unwrap().len()
    }
}
