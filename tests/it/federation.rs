//! Several `ludus serve` processes as one network (`[cluster]`, issue 24): a real
//! nats-server, HAProxy in front, servers and nodes as real processes on loopback, one
//! Postgres. A model served behind one server is reachable through another; killing a
//! server under load keeps games served and bills every answer once; a game's limits hold
//! across servers; NATS restarted under load is rejoined by itself.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cluster::{post_with, wait_for, Cluster, Proc, SseStream};
use super::database::block_on;
use super::helpers::{required_tool, smollm2};
use super::registry::{assert_all_recorded_once, post_chat_within};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// A port nobody listens on (for a process that needs it on its command line).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tool(name: &str) -> Option<PathBuf> {
    let found = ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists());
    required_tool(name, found.is_some()).then(|| found.unwrap())
}

/// Starts `program` with its output in `log`.
fn spawn_tool(program: &Path, args: &[&str], log: PathBuf) -> Proc {
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(program)
        .args(args)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
    Proc { child, log }
}

fn wait_listening(port: u16, what: &str) {
    wait_for(what, Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}

/// A real nats-server on loopback.
struct Nats {
    program: PathBuf,
    dir: PathBuf,
    port: u16,
    proc: Proc,
    starts: usize,
    /// Each server's NATS password, when every server has its own user.
    passwords: std::collections::HashMap<String, String>,
}

impl Nats {
    fn start(dir: &Path) -> Option<Self> {
        Self::start_with_users(dir, &[])
    }

    /// With one NATS user per server name, holding it to its name
    /// (`ludus cluster nats-user`'s permissions and password hashes); anyone else is refused.
    fn start_with_users(dir: &Path, names: &[&str]) -> Option<Self> {
        let program = tool("nats-server")?;
        let port = free_port();
        let passwords: std::collections::HashMap<_, _> =
            names.iter().map(|n| (n.to_string(), format!("pw-{n}-{}", rand::random::<u32>()))).collect();
        let mut conf = format!("listen: \"127.0.0.1:{port}\"\n");
        if !names.is_empty() {
            let users: Vec<String> = names
                .iter()
                .map(|n| {
                    let hash = ludus::actors::cluster::wire::nats_password_hash(&passwords[*n]);
                    ludus::actors::cluster::wire::Permissions::of(n).nats_user(n, &hash)
                })
                .collect();
            conf.push_str(&format!("authorization {{ users = [\n{}\n] }}\n", users.join(",\n")));
        }
        std::fs::write(dir.join("nats.conf"), conf).unwrap();
        let proc = Self::run(&program, dir, port, 0);
        Some(Self { program, dir: dir.to_path_buf(), port, proc, starts: 1, passwords })
    }

    /// Runs nats-server on `dir`'s config (start number `n`, for its log's name).
    fn run(program: &Path, dir: &Path, port: u16, n: usize) -> Proc {
        let conf = dir.join("nats.conf");
        let proc = spawn_tool(program, &["-c", conf.to_str().unwrap()], dir.join(format!("nats-{n}.log")));
        wait_listening(port, "nats-server listening");
        proc
    }

    /// The URL server `name` connects with (its own user, when there are users).
    fn url_for(&self, name: &str) -> String {
        match self.passwords.get(name) {
            Some(pw) => format!("nats://{name}:{pw}@127.0.0.1:{}", self.port),
            None => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same port.
    fn restart(&mut self) {
        self.proc.kill();
        self.proc = Self::run(&self.program, &self.dir, self.port, self.starts);
        self.starts += 1;
    }
}

/// The peers' timeout of the test networks: a quick verdict on a silent server.
const PEER_TIMEOUT_MS: u64 = 1500;

/// `[cluster]` for server `name`, reaching NATS at `url`: quick adverts, a silent server
/// given up after `peer_timeout_ms`.
fn cluster_table(url: &str, name: &str, peer_timeout_ms: u64) -> String {
    format!(
        "[cluster]\nnats_url = \"{url}\"\nname = \"{name}\"\nadvert_interval_ms = 200\npeer_timeout_ms = {peer_timeout_ms}\n"
    )
}

/// Servers `a` and `b` on one NATS, with the directory they live in (dropped last); none
/// when `nats-server` is missing.
fn two_servers() -> Option<(tempfile::TempDir, Nats, Vec<Cluster>)> {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path())?;
    let servers = start_network(&nats, &["a", "b"], "", dir.path());
    Some((dir, nats, servers))
}

/// Servers `names` on one database and one distributor key, joined by `nats`; `extra`
/// goes into each one's `[distributor]` table (and may open more tables before
/// `[cluster]`). Every server uses the first one's API key (one game).
fn start_network(nats: &Nats, names: &[&str], extra: &str, key_dir: &Path) -> Vec<Cluster> {
    start_network_via(names, extra, key_dir, &|name| nats.url_for(name), PEER_TIMEOUT_MS)
}

/// [`start_network`], each server reaching NATS at `url_for(its name)` and giving up on
/// a silent one after `peer_timeout_ms`.
fn start_network_via(
    names: &[&str],
    extra: &str,
    key_dir: &Path,
    url_for: &dyn Fn(&str) -> String,
    peer_timeout_ms: u64,
) -> Vec<Cluster> {
    let key_file = format!("key_file = \"{}\"\n", key_dir.join("distributor.key").display());
    let table = |name: &str| format!("{extra}{}", cluster_table(&url_for(name), name, peer_timeout_ms));
    let first = Cluster::start_with_server(&key_file, &table(names[0]));
    let mut servers = vec![first];
    for name in &names[1..] {
        let mut server = Cluster::start_joining(&key_file, &table(name), &servers[0].db_url);
        server.key = servers[0].key.clone();
        servers.push(server);
    }
    for server in &servers {
        wait_servers(server, names.len());
    }
    servers
}

/// A TCP relay that can be cut: one server's own link to NATS, lost while the others keep
/// theirs.
struct Relay {
    port: u16,
    down: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, links) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (down2, links2) = (down.clone(), links.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if down2.load(Ordering::SeqCst) {
                    continue; // refused while cut: dropped at once
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream_port)) else { continue };
                links2.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { port, down, links }
    }

    /// Cuts every link and refuses new ones until [`Relay::restore`].
    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            let _ = link.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Servers `a` and `b` on `nats`, B's own link to it through a [`Relay`] that can be cut.
fn b_behind_a_relay(nats: &Nats, dir: &Path) -> (Relay, Vec<Cluster>) {
    let relay = Relay::start(nats.port);
    let via = |name: &str| if name == "b" { format!("nats://127.0.0.1:{}", relay.port) } else { nats.url_for(name) };
    let servers = start_network_via(&["a", "b"], "", dir, &via, PEER_TIMEOUT_MS);
    (relay, servers)
}

/// Waits until `server` sees `n` servers in the network (itself included).
fn wait_servers(server: &Cluster, n: usize) {
    wait_for(&format!("{} to see {n} servers", server.addr), Duration::from_secs(20), || {
        let (status, body) = server.get("/health");
        status == 200 && serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["servers"] == n)
    });
}

fn chat(model: &str, max_tokens: usize, stream: bool) -> String {
    format!(
        r#"{{"model": "{model}", "max_tokens": {max_tokens}, "temperature": 0, "stream": {stream},
            "messages": [{{"role": "user", "content": "Name a colour."}}]}}"#
    )
}

fn content(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("no content: {body}")).to_string()
}

fn task_of(body: &str) -> i64 {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    u64::from_str_radix(v["id"].as_str().unwrap().trim_start_matches("chatcmpl-"), 16).unwrap() as i64
}

/// The tasks on the books.
fn recorded(store: &ludus::ledger::Store) -> std::collections::BTreeSet<u64> {
    block_on(async {
        let conn = store.conn().await.unwrap();
        let rows = conn.query("SELECT task_id FROM receipts", &[]).await.unwrap();
        rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect()
    })
}

/// The game a task's receipt is billed to, once it is on the books.
fn billed_game(cluster: &Cluster, task: i64) -> i64 {
    let store = cluster.store();
    let mut game = None;
    wait_for(&format!("task {task} on the books"), Duration::from_secs(30), || {
        game = block_on(async {
            let conn = store.conn().await.unwrap();
            conn.query_opt("SELECT game_id FROM receipts WHERE task_id = $1", &[&task]).await.unwrap().map(|r| r.get(0))
        });
        game.is_some()
    });
    game.unwrap()
}

/// Servers `a` and `b`, with one real node of `model` behind B only; both list it.
fn model_behind_b(nats: &Nats, model: &Path, dir: &Path) -> Vec<Cluster> {
    model_behind_b_with(nats, model, dir, "")
}

/// [`model_behind_b`], with `tables` (e.g. `[verifier]`) in every server's config.
fn model_behind_b_with(nats: &Nats, model: &Path, dir: &Path, tables: &str) -> Vec<Cluster> {
    let files = format!("model_files = {{ \"{MODEL}\" = \"{}\" }}\n{tables}", model.display());
    let mut servers = start_network(nats, &["a", "b"], &files, dir);
    servers[1].add_node(&["--model", model.to_str().unwrap()]);
    servers[1].wait_nodes(MODEL, 1);
    // A has no node; it lists B's.
    servers[0].wait_nodes(MODEL, 1);
    servers
}

#[test]
fn a_model_served_only_behind_one_server_is_reachable_through_another() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let servers = model_behind_b(&nats, &model, dir.path());
    let (a, b) = (&servers[0], &servers[1]);
    let key = a.key.clone();

    let through_a = post_with(&a.addr, "/v1/chat/completions", Some(&key), chat(MODEL, 8, false).as_bytes());
    assert_eq!(through_a.status, 200, "{}", through_a.body);
    let direct = post_with(&b.addr, "/v1/chat/completions", Some(&key), chat(MODEL, 8, false).as_bytes());
    assert_eq!(direct.status, 200, "{}", direct.body);
    assert!(!content(&through_a.body).is_empty());
    assert_eq!(content(&through_a.body), content(&direct.body), "greedy: the same answer either way");
    assert_eq!(through_a.json()["usage"], direct.json()["usage"], "the same count either way");

    // B ran it and billed it, to the game that asked through A, once.
    let task = task_of(&through_a.body);
    assert!(a.server.log_text().contains("job forwarded"), "{}", a.server.log_text());
    wait_for("B to log the forwarded job", Duration::from_secs(10), || {
        b.server.log_text().contains("running a job forwarded by another server")
    });
    assert_eq!(billed_game(a, task), billed_game(a, task_of(&direct.body)));

    // Streamed through A: the same text, chunk by chunk, then [DONE].
    let mut stream = SseStream::open(&a.addr, &key, &chat(MODEL, 8, true));
    assert_eq!(stream.status, 200);
    let mut streamed = String::new();
    let mut done = false;
    while let Some(data) = stream.next_data() {
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert!(v.get("error").is_none(), "{data}");
        streamed.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(done, "the stream ended with [DONE]");
    assert_eq!(streamed, content(&direct.body));
    // The operator sees the jobs that crossed, on both sides.
    let metric = |server: &Cluster, direction: &str| -> u64 {
        let (_, text) = server.get("/metrics");
        let line = format!("ludus_cluster_jobs_total{{direction=\"{direction}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(line.as_str())).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert_eq!((metric(a, "out"), metric(a, "in")), (2, 0), "A forwarded the two requests it could not serve");
    assert_eq!((metric(b, "out"), metric(b, "in")), (0, 2), "B ran them");

    // Bad input forwarded nowhere: a model nobody serves is still a 404 through A, and a
    // request B refuses comes back with B's status and reason.
    let unknown = post_with(&a.addr, "/v1/chat/completions", Some(&key), chat("no-such-model", 4, false).as_bytes());
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    let bias = format!(
        r#"{{"model": "{MODEL}", "max_tokens": 4, "logit_bias": {{"99999999": 5}}, "messages": [{{"role": "user", "content": "x"}}]}}"#
    );
    let refused = post_with(&a.addr, "/v1/chat/completions", Some(&key), bias.as_bytes());
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("logit_bias"), "{}", refused.body);
}

/// When a game's request ended, and its task id or why it failed.
type Outcome = (Instant, Result<u64, String>);

/// The stop switch, the outcomes so far, and the client threads of [`load_through`].
type Load = (Arc<AtomicBool>, Arc<Mutex<Vec<Outcome>>>, Vec<std::thread::JoinHandle<()>>);

/// `clients` games asking through `front` until `stop`, each outcome recorded (a failure
/// is followed by a short pause).
fn load_through(front: &str, key: &str, clients: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Default::default();
    let handles = (0..clients)
        .map(|_| {
            let (front, key, stop, outcomes) = (front.to_string(), key.to_string(), stop.clone(), outcomes.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let outcome = post_chat_within(&front, &key, &chat("fake", 4, false), Duration::from_secs(20));
                    let failed = outcome.is_err();
                    outcomes.lock().unwrap().push((Instant::now(), outcome));
                    if failed {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();
    (stop, outcomes, handles)
}

/// HAProxy in front of `servers`, health-checked on /health; its listening address.
fn start_haproxy(dir: &Path, servers: &[Cluster]) -> Option<(Proc, String)> {
    let program = tool("haproxy")?;
    let port = free_port();
    let backends: String = servers
        .iter()
        .enumerate()
        .map(|(i, s)| format!("    server s{i} {} check inter 200 fall 2 rise 2\n", s.addr))
        .collect();
    let config = dir.join("haproxy.cfg");
    std::fs::write(&config, haproxy_config(port, &backends)).unwrap();
    let proc = spawn_tool(&program, &["-db", "-f", config.to_str().unwrap()], dir.join("haproxy.log"));
    wait_listening(port, "haproxy listening");
    Some((proc, format!("127.0.0.1:{port}")))
}

/// The configuration docs/operations.md shows, on a test port.
fn haproxy_config(port: u16, backends: &str) -> String {
    format!(
        "global\n    maxconn 4096\n\
         defaults\n    mode http\n    timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n\
         \x20   retries 3\n    option redispatch\n    retry-on conn-failure empty-response\n\
         frontend games\n    bind 127.0.0.1:{port}\n    default_backend ludus\n\
         backend ludus\n    balance roundrobin\n    option httpchk GET /health\n{backends}"
    )
}

#[test]
fn killing_one_server_under_load_keeps_games_served_and_bills_every_answer_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    // Long blocks: the kill lands with answers not yet on the books.
    let mut servers = start_network(&nats, &["a", "b", "c"], "[clock]\nblock_time_ms = 1500\n", dir.path());
    // Both nodes join A first and know B as the next server.
    let via = format!("{}/ws/node,ws://{}", servers[0].addr, servers[1].addr);
    servers[0].add_node_via(&via, &["--fake-engine", "4:2", "--capacity", "4"]);
    servers[0].add_node_via(&via, &["--fake-engine", "4:2", "--capacity", "4"]);
    servers[0].wait_nodes("fake", 2);
    servers[2].wait_nodes("fake", 2);
    let Some((_haproxy, front)) = start_haproxy(dir.path(), &servers) else { return };

    let (stop, outcomes, clients) = load_through(&front, &servers[0].key, 4);
    std::thread::sleep(Duration::from_secs(2));
    // The books are read the moment A dies: opening a connection to them first took long
    // enough on a loaded machine for the nodes to re-home and B to commit their re-sent
    // receipts, which left nothing "uncommitted at the kill" for the test to check.
    let books = servers[1].store();
    recorded(&books); // a connection ready in the pool
    let killed_at = Instant::now();
    servers[0].kill_server();
    let on_books_at_kill = recorded(&books);
    // Its nodes move to B; the others stop sending it work.
    wait_for("the nodes to join again", Duration::from_secs(20), || {
        servers[0].nodes.iter().all(|n| n.log_text().matches("joined the distributor;").count() >= 2)
    });
    let rehomed = killed_at.elapsed();
    // On B: C has no node, and A is gone from B's table once silent for its timeout.
    servers[1].wait_nodes("fake", 2);
    std::thread::sleep(Duration::from_secs(2));
    let settled = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let outcomes = outcomes.lock().unwrap();
    let completed: Vec<u64> = outcomes.iter().filter_map(|(_, r)| r.as_ref().ok().copied()).collect();
    let failed: Vec<&String> = outcomes.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let late: Vec<&Outcome> = outcomes.iter().filter(|(at, _)| *at > settled).collect();
    eprintln!(
        "{} answers, {} failures (around the kill); nodes re-homed {rehomed:?} after the kill; {} requests after it settled",
        completed.len(),
        failed.len(),
        late.len()
    );
    assert!(late.len() >= 10, "the load kept running after the kill: {} requests", late.len());
    let late_failures: Vec<_> = late.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(late_failures.is_empty(), "once the nodes re-homed, every request is served: {late_failures:?}");
    assert!(rehomed < Duration::from_secs(10), "re-homed within seconds: {rehomed:?}");
    // Answers A had not committed when it died are on the books all the same: their nodes
    // re-sent the receipts to B, which pays them because A told the network it saw them.
    let uncommitted = outcomes
        .iter()
        .filter(|(at, r)| *at < killed_at && r.as_ref().is_ok_and(|t| !on_books_at_kill.contains(t)))
        .count();
    assert!(uncommitted > 0, "no answer was uncommitted at the kill; the test proves nothing");
    eprintln!("{uncommitted} answers were not on the books when A died");
    // Every answer a game got is on the books once, whichever server it crossed.
    assert_all_recorded_once(&servers[1], &completed);
}

#[test]
fn a_games_rate_limit_holds_across_servers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    // 30 requests a minute for the game, enforced by three servers together.
    let mut servers = start_network(&nats, &["a", "b", "c"], "[games]\nrequests_per_minute = 30\n", dir.path());
    servers[0].add_node(&["--fake-engine", "1:1", "--capacity", "16"]);
    for server in &servers {
        server.wait_nodes("fake", 1);
    }
    let key = servers[0].key.clone();
    let (mut admitted, mut limited) = (0, 0);
    for i in 0..90 {
        let server = &servers[i % 3];
        let r = post_with(&server.addr, "/v1/chat/completions", Some(&key), chat("fake", 1, false).as_bytes());
        match r.status {
            200 => admitted += 1,
            429 => limited += 1,
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    eprintln!("{admitted} admitted, {limited} rate-limited of 90 (limit 30 a minute over 3 servers)");
    // Within 10 %: each server admits its third; alone, each would have admitted 30.
    assert!((27..=33).contains(&admitted), "{admitted} admitted across the network for a limit of 30");
}

/// A game that leaves mid-answer a job forwarded to another server is charged, for the
/// tokens it received, where it was admitted. The running server used to charge its own
/// Gateway, which holds no budget of a key it never admitted: the charge was lost, and a
/// game could read answers past its tokens per minute by leaving each one early. A charge
/// the origin does not await (no such hang-up) is ignored.
#[test]
fn a_game_leaving_a_forwarded_job_is_charged_where_it_was_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    // 60 tokens a minute for the game: each of the two servers admits 30.
    let mut servers = start_network(&nats, &["a", "b"], "[games]\ntokens_per_minute = 60\n", dir.path());
    servers[1].add_node(&["--fake-engine", "400:20", "--capacity", "4"]);
    for server in &servers {
        server.wait_nodes("fake", 1);
    }
    let a = &servers[0];
    let key = a.key.clone();
    // A peer's charge for a hang-up A does not await is ignored: it cannot drain the game.
    let bogus = ludus::actors::cluster::wire::Charge {
        task: ludus::protocol::TaskId(7),
        key_hash: ludus::ledger::hash_key(&key),
        tokens: 1_000_000_000,
    };
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let subject = ludus::actors::cluster::wire::charge_subject("a", "b");
        client.publish(subject, serde_json::to_vec(&bogus).unwrap().into()).await.unwrap();
        client.flush().await.unwrap();
    });
    wait_for("A to ignore the unawaited charge", Duration::from_secs(10), || {
        a.server.log_text().contains("a charge for no hang-up this server awaits from that server ignored")
    });
    // Streamed through A (admitted: the budget is whole), run on B; the game leaves after
    // 40 tokens, more than A's 30.
    let mut stream = SseStream::open(&a.addr, &key, &chat("fake", 400, true));
    assert_eq!(stream.status, 200, "the unawaited charge drained the game's budget");
    for _ in 0..40 {
        assert!(stream.next_data().is_some());
    }
    drop(stream);
    wait_for("A to charge the game for the tokens it received on B", Duration::from_secs(30), || {
        a.server.log_text().contains("a game that left a forwarded job charged for the tokens it received")
    });
    // The budget A admits from is spent: the next request through A is refused for it.
    let r = post_with(&a.addr, "/v1/chat/completions", Some(&key), chat("fake", 4, false).as_bytes());
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("tokens per minute"), "{}", r.body);
}

#[test]
fn nats_restarted_under_load_is_rejoined_and_local_nodes_serve_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut nats) = Nats::start(dir.path()) else { return };
    let mut servers = start_network(&nats, &["a", "b"], "", dir.path());
    servers[0].add_node(&["--fake-engine", "2:1", "--fake-model-name", "near"]);
    servers[1].add_node(&["--fake-engine", "2:1", "--fake-model-name", "far"]);
    servers[0].wait_nodes("near", 1);
    servers[0].wait_nodes("far", 1);
    let a = &servers[0];
    let ask = |model: &str| post_with(&a.addr, "/v1/chat/completions", Some(&a.key), chat(model, 2, false).as_bytes());
    assert_eq!(ask("far").status, 200, "B's model through A");

    nats.kill();
    wait_servers(a, 1);
    // A alone: its own node serves, B's model is "no node right now" (not unknown).
    for _ in 0..5 {
        assert_eq!(ask("near").status, 200);
    }
    let far = ask("far");
    assert_eq!(far.status, 503, "{}\n{}", far.body, a.server.log_text());

    nats.restart();
    wait_servers(a, 2);
    wait_for("B's model through A again", Duration::from_secs(20), || ask("far").status == 200);
    for _ in 0..5 {
        assert_eq!(ask("far").status, 200);
        assert_eq!(ask("near").status, 200);
    }
    assert!(a.server.log_text().contains("lost the cluster's NATS"), "{}", a.server.log_text());
}

#[test]
fn a_node_caught_cheating_on_one_server_gets_no_work_from_another() {
    use super::network_proof::{answer, liar_model, Lie};
    use super::registry::Rogue;
    let Some(path) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let verifier = format!(
        "[verifier]\nmodels = {{ \"{MODEL}\" = \"{}\" }}\nsample_rate = 1.0\nquarantine_s = 60\n",
        path.display()
    );
    let servers = start_network(&nats, &["a", "b"], &verifier, dir.path());
    let (a, b) = (&servers[0], &servers[1]);
    let (model, engine) = liar_model(&path);
    let secret = [7u8; 32];
    let node = ludus::crypto::identity::Identity::from_secret(&secret).unwrap();
    let address = node.address.to_string();
    let system = actix_rt::System::new();

    // The rogue joins B and edits a token of its answer: B's verifier catches it.
    let mut rogue = system.block_on(Rogue::join_as(&b.addr, MODEL, node));
    let _ = system.block_on(rogue.next_task(Duration::from_millis(300))); // registers
    let (addr, key) = (b.addr.clone(), a.key.clone());
    let game = std::thread::spawn(move || {
        post_with(&addr, "/v1/chat/completions", Some(&key), chat(MODEL, 8, false).as_bytes())
    });
    let task = system.block_on(rogue.next_task(Duration::from_secs(30))).expect("the rogue gets the task");
    let mut last = None;
    system.block_on(answer(&mut rogue, &model, &engine, task, Lie::EditToken, &mut last));
    let _ = game.join();
    let started = Instant::now();
    while !a.server.log_text().contains("node quarantined by the cluster") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "A never heard of the quarantine:\n{}",
            b.server.log_text()
        );
        system.block_on(rogue.idle(&mut [], Duration::from_millis(100)));
    }
    assert!(a.server.log_text().contains(&address), "A quarantined the rogue's address");

    // The same node comes to A, as A's only node for the model: A gives it nothing.
    let mut again = system.block_on(Rogue::join_as(
        &a.addr,
        MODEL,
        ludus::crypto::identity::Identity::from_secret(&secret).unwrap(),
    ));
    let _ = system.block_on(again.next_task(Duration::from_millis(300)));
    let (addr, key) = (a.addr.clone(), a.key.clone());
    let _waiting = std::thread::spawn(move || {
        post_with(&addr, "/v1/chat/completions", Some(&key), chat(MODEL, 8, false).as_bytes())
    });
    assert!(system.block_on(again.next_task(Duration::from_secs(3))).is_none(), "a quarantined node got work from A");
    engine.shutdown();
}

#[test]
fn a_server_drained_behind_haproxy_loses_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let mut servers = start_network(&nats, &["a", "b"], "", dir.path());
    let via = format!("{}/ws/node,ws://{}", servers[0].addr, servers[1].addr);
    servers[0].add_node_via(&via, &["--fake-engine", "4:2", "--capacity", "4"]);
    servers[1].add_node(&["--fake-engine", "4:2", "--capacity", "4"]);
    servers[0].wait_nodes("fake", 2);
    servers[1].wait_nodes("fake", 2);
    let Some((_haproxy, front)) = start_haproxy(dir.path(), &servers) else { return };
    let (stop, outcomes, clients) = load_through(&front, &servers[0].key, 3);
    std::thread::sleep(Duration::from_millis(1500));
    let pid = servers[0].server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let signalled = Instant::now();
    wait_for("A to finish draining and exit", Duration::from_secs(20), || {
        servers[0].server.child.try_wait().unwrap().is_some()
    });
    eprintln!("A exited {:?} after SIGTERM", signalled.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let outcomes = outcomes.lock().unwrap();
    let failed: Vec<&String> = outcomes.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let after = outcomes.iter().filter(|(at, _)| *at > signalled).count();
    eprintln!("{} requests, {} after the SIGTERM, {} failed", outcomes.len(), after, failed.len());
    assert!(after >= 10, "the load went on after the SIGTERM: {after}");
    assert!(failed.is_empty(), "a drained server loses no request behind HAProxy: {failed:?}");
    // Its node moved to B.
    servers[1].wait_nodes("fake", 2);
}

/// A server killed and started again under its name faster than the peers' timeout is
/// another process: its adverts kept the one that died "alive". A game whose job the dead
/// runner held waited for ever; a job whose dead origin held the game's connection ran to
/// its end on the runner, billed, unread. Each side now knows the other's process.
#[test]
fn a_server_restarted_under_its_name_is_not_taken_for_the_one_that_died() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    // A timeout far longer than a restart: only the process tells the restart apart.
    let mut servers = start_network_via(&["a", "b"], "", dir.path(), &|name| nats.url_for(name), 60_000);
    servers[1].add_node(&["--fake-engine", "3000:50", "--capacity", "4"]);
    for server in &servers {
        server.wait_nodes("fake", 1);
    }
    let key = servers[0].key.clone();

    // The runner restarts: the game through A hears that its job is lost, at once.
    let mut stream = SseStream::open(&servers[0].addr, &key, &chat("fake", 3000, true));
    assert_eq!(stream.status, 200);
    for _ in 0..5 {
        assert!(stream.next_data().is_some());
    }
    servers[1].restart_server();
    let rest: Vec<String> = std::iter::from_fn(|| stream.next_data()).collect();
    let error = rest
        .iter()
        .find_map(|d| serde_json::from_str::<serde_json::Value>(d).ok().filter(|v| v.get("error").is_some()));
    let error = error.unwrap_or_else(|| panic!("the stream ended without an error: {:?}", rest.last()));
    assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("restarted")), "{error}");

    // The origin restarts: the runner stops the job nobody can read, its node stopping
    // where it was.
    servers[1].wait_nodes("fake", 1);
    servers[0].wait_nodes("fake", 1);
    let mut stream = SseStream::open(&servers[0].addr, &key, &chat("fake", 3000, true));
    assert_eq!(stream.status, 200);
    let task = task_of(&stream.next_data().unwrap());
    for _ in 0..5 {
        assert!(stream.next_data().is_some());
    }
    servers[0].restart_server();
    drop(stream);
    let b = &servers[1];
    wait_for("B to cancel the job of the origin that restarted", Duration::from_secs(20), || {
        b.server.log_text().contains("the server that forwarded a job restarted; cancelling it")
    });
    let store = b.store();
    let made = format!("SELECT completion_tokens::bigint FROM receipts WHERE task_id = {task}");
    wait_for("the cancelled job's receipt", Duration::from_secs(30), || {
        !crate::database::numbers(&store, &made).is_empty()
    });
    let tokens = crate::database::numbers(&store, &made)[0];
    assert!(tokens < 3000, "the job ran to its end, unread: {tokens} tokens made");
    // Nobody read it whole, and the origin that would have written it off is gone: the
    // runner writes it off (B's tokens are neither charged nor paid).
    wait_for("B to write off the job nobody could read", Duration::from_secs(10), || {
        block_on(store.undelivered(task as u64)).unwrap().is_some()
    });
    let reason = block_on(store.undelivered(task as u64)).unwrap().unwrap();
    assert!(reason.contains("server `a`") && reason.contains("restarted"), "{reason}");
    let game = billed_game(b, task);
    let owed = block_on(store.game_balances(0)).unwrap().iter().find(|g| g.game_id == game).map(|g| g.owed.0);
    assert_eq!(owed.unwrap_or(0), 0, "the game owes nothing for answers it never read");
}

/// A forwarded job whose running server falls silent while it still advertises (its
/// final event lost on NATS, here never sent) is given up: the game used to wait until
/// its balancer's timeout, its tokens held from its budget. A server running a job says
/// it still holds it every second; here a fake one takes the job, sends one token, and
/// goes on advertising only. It takes the job as a process the origin had not heard of
/// yet (restarted just before): one that names itself in its keepalive is not taken for
/// a restart after the job was sent.
#[test]
fn a_forwarded_job_that_falls_silent_is_given_up() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let Some((_nats, a, url)) = a_alone(dir.path()) else { return };
    let stop = Arc::new(AtomicBool::new(false));
    let fake_b = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                use ludus::actors::cluster::wire;
                let client = async_nats::connect(url).await.unwrap();
                let mut jobs = client.subscribe(wire::jobs_for("b")).await.unwrap();
                let mut advert: wire::Advert = serde_json::from_slice(&fake_advert("b", "fake")).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    client.publish("ludus.advert.b", serde_json::to_vec(&advert).unwrap().into()).await.unwrap();
                    if let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(200), jobs.next()).await {
                        let job: wire::ForwardedJob = serde_json::from_slice(&message.payload).unwrap();
                        advert.instance = 2;
                        let reply = wire::reply_subject("a", job.task, "b");
                        for event in [
                            wire::RemoteEvent::Alive { instance: 2, sent: None },
                            wire::RemoteEvent::Text(" hello".into()),
                        ] {
                            client.publish(reply.clone(), serde_json::to_vec(&event).unwrap().into()).await.unwrap();
                        }
                    }
                }
            })
        })
    };
    wait_servers(&a, 2);
    a.wait_nodes("fake", 9);
    let mut stream = SseStream::open(&a.addr, &a.key, &chat("fake", 100, true));
    assert_eq!(stream.status, 200);
    let rest: Vec<String> = std::iter::from_fn(|| stream.next_data()).collect();
    stop.store(true, Ordering::Relaxed);
    fake_b.join().unwrap();
    assert!(rest[0].contains("hello"), "{rest:?}");
    let error = rest
        .iter()
        .find_map(|d| serde_json::from_str::<serde_json::Value>(d).ok().filter(|v| v.get("error").is_some()));
    let error = error.unwrap_or_else(|| panic!("the stream ended without an error: {rest:?}"));
    assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("sent nothing for")), "{error}");
    assert!(a.server.log_text().contains("a forwarded job fell silent; given up"));
}

/// NATS delivers at most once: an event of a forwarded job lost on the way used to leave
/// a hole in the text the game read, and a lost `Done` turned an answer billed on the
/// running server into a 502. Events are numbered now; the server holding the game's
/// connection relays them in order and asks for a missing one again. A fake runner B
/// "loses" events on purpose, three jobs in turn:
/// 1. the second token (the third and the `Done` come): asked for again, the game reads
///    the whole text;
/// 2. the `Done`, after two tokens (then silence): asked for once the job falls silent,
///    the game gets its answer;
/// 3. the second token, and B does not answer when asked: the game gets an error, never
///    the text around the hole.
#[test]
fn a_forwarded_jobs_lost_events_are_asked_for_again_and_a_hole_is_never_relayed() {
    use ludus::actors::cluster::wire::RemoteEvent;
    let dir = tempfile::tempdir().unwrap();
    let Some((_nats, a, url)) = a_alone(dir.path()) else { return };
    let done = RemoteEvent::Done {
        finish_reason: ludus::protocol::FinishReason::Stop,
        usage: ludus::protocol::TaskUsage { prompt_tokens: 5, completion_tokens: 3 },
        task: None,
    };
    let whole = vec![RemoteEvent::Text("a".into()), RemoteEvent::Text("b".into()), RemoteEvent::Text("c".into()), done];
    // Job 1 and 3 lose event 1, and job 3 is not sent again; job 2 loses its `Done` (event 3).
    let script = move |n: usize| Script { events: whole.clone(), lost: if n == 1 { 3 } else { 1 }, answers: n != 2 };
    let (stop, asked, fake_b) = fake_runner(url, script);
    wait_servers(&a, 2);
    a.wait_nodes("fake", 9);
    let ask = || post_with(&a.addr, "/v1/chat/completions", Some(&a.key), chat("fake", 100, false).as_bytes());
    // 1. A hole in the middle.
    let r = ask();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(content(&r.body), "abc");
    // 2. The `Done` lost: asked for after the job's silence.
    let r = ask();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(content(&r.body), "abc");
    // 3. A hole nobody fills: an error, not "ac".
    let r = ask();
    stop.store(true, Ordering::Relaxed);
    fake_b.join().unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(!r.body.contains("\"ac\""), "{}", r.body);
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.first(), Some(&(0, 1)), "{asked:?}");
    assert!(asked.contains(&(1, 3)), "{asked:?}");
    assert!(asked.iter().any(|&(n, from)| n == 2 && from == 1), "{asked:?}");
    assert!(a.server.log_text().contains("events of a forwarded job went missing; asked again"));
    // The answer with a hole is written off, not billed; the two delivered are not.
    assert!(r.body.contains("not billed"), "{}", r.body);
    wait_for("A to write off the answer with a hole", Duration::from_secs(10), || {
        a.server.log_text().contains("an answer given up was written off")
    });
    let (_, metrics) = a.get("/metrics");
    assert!(metrics.lines().any(|l| l == "ludus_cluster_undelivered_total 1"), "{metrics}");
}

/// A write-off waits on disk (`data_dir/write-offs.log`) until the ledger has it: one left
/// by a server stopped while its database was away reaches the ledger when the server
/// starts again, in a network or not. It used to live in a retry loop only, and a restart
/// lost it (the game billed for the answer it never got). Two written off before this
/// start, and a line torn by the crash.
#[test]
fn write_offs_left_by_a_stopped_server_reach_the_ledger_at_its_next_start() {
    use ludus::actors::cluster::write_offs::WriteOff;
    let lines: Vec<String> = [7_u64, u64::MAX - 1]
        .iter()
        .map(|&task| {
            let w = WriteOff { task, server: "a".into(), reason: format!("server `b` stopped answering ({task})") };
            serde_json::to_string(&w).unwrap()
        })
        .collect();
    let file = format!("{}\n{}\n{{\"task\": 9, \"serv", lines[0], lines[1]);
    let server = Cluster::start_prepared("", |data| std::fs::write(data.join("write-offs.log"), &file).unwrap());
    let store = server.store();
    wait_for("the write-offs in the ledger", Duration::from_secs(20), || {
        block_on(store.undelivered(u64::MAX - 1)).unwrap().is_some()
    });
    assert_eq!(block_on(store.undelivered(7)).unwrap().as_deref(), Some("server `b` stopped answering (7)"));
    assert_eq!(block_on(store.undelivered(9)).unwrap(), None, "a torn line is skipped");
    let path = server.dir.path().join("data").join("write-offs.log");
    wait_for("the file emptied", Duration::from_secs(10), || std::fs::read(&path).unwrap().is_empty());
    assert!(server.server.log_text().contains("write-offs left from before this start"));
}

/// Events that waited behind a lost one reach the game all at once when it comes: they
/// used to count against what a streamed game may leave unread (`stream_unread_kib`), so
/// a game reading normally was cut off as one that fell behind, and billed as one that
/// left. A fake runner B sends a long answer (about 120 KiB, twice A's 64 KiB) with its
/// second event lost, and sends it again when asked: the game reads the whole answer.
#[test]
fn events_released_after_a_lost_one_are_not_taken_for_a_game_falling_behind() {
    use ludus::actors::cluster::wire::RemoteEvent;
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let key_file = format!("key_file = \"{}\"\nstream_unread_kib = 64\n", dir.path().join("distributor.key").display());
    let a = Cluster::start_with_server(&key_file, &cluster_table(&nats.url_for("a"), "a", PEER_TIMEOUT_MS));
    let url = format!("nats://127.0.0.1:{}", nats.port);
    // 120 events of 1 KiB each, then the `Done`; the second one lost.
    let chunk = "y".repeat(1023) + " ";
    let whole: Vec<RemoteEvent> = (0..120)
        .map(|_| RemoteEvent::Text(chunk.clone()))
        .chain([RemoteEvent::Done {
            finish_reason: ludus::protocol::FinishReason::Length,
            usage: ludus::protocol::TaskUsage { prompt_tokens: 5, completion_tokens: 120 },
            task: None,
        }])
        .collect();
    let (stop, _, fake_b) = fake_runner(url, move |_| Script { events: whole.clone(), lost: 1, answers: true });
    wait_servers(&a, 2);
    a.wait_nodes("fake", 9);
    let mut stream = SseStream::open(&a.addr, &a.key, &chat("fake", 200, true));
    assert_eq!(stream.status, 200);
    let data: Vec<String> = std::iter::from_fn(|| stream.next_data()).collect();
    stop.store(true, Ordering::Relaxed);
    fake_b.join().unwrap();
    let error = data.iter().find(|d| d.contains("\"error\""));
    assert!(error.is_none(), "the game was cut off: {error:?}");
    let text: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, chunk.repeat(120), "the whole answer, in order");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(a.server.log_text().contains("events of a forwarded job went missing; asked again"));
}

/// An answer lost between servers is not billed. B's own link to NATS is cut in the
/// middle of a job A forwarded: B's node goes on and B bills what it made, as for any
/// job, while A hears nothing more of it and gives it up. The game read an error; that
/// answer used to be charged to it all the same (and paid to the node). Now A writes it
/// off in the shared ledger and the game is told it is not billed: what the game owes is
/// the answer it did read, delivered whole before the cut.
#[test]
fn an_answer_lost_between_servers_is_written_off_not_billed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let (relay, mut servers) = b_behind_a_relay(&nats, dir.path());
    servers[1].add_node(&["--fake-engine", "40:100", "--capacity", "2"]);
    let a = &servers[0];
    for server in &servers {
        server.wait_nodes("fake", 1);
    }
    let delivered = post_with(&a.addr, "/v1/chat/completions", Some(&a.key), chat("fake", 4, false).as_bytes());
    assert_eq!(delivered.status, 200, "{}", delivered.body);
    let delivered = task_of(&delivered.body);

    let mut stream = SseStream::open(&a.addr, &a.key, &chat("fake", 40, true));
    assert_eq!(stream.status, 200);
    let first = stream.next_data().expect("a first chunk");
    let lost = task_of(&first);
    assert!(stream.next_data().is_some());
    relay.cut();
    let rest: Vec<String> = std::iter::from_fn(|| stream.next_data()).collect();
    let error = rest
        .iter()
        .find_map(|d| serde_json::from_str::<serde_json::Value>(d).ok().filter(|v| v.get("error").is_some()));
    let error = error.unwrap_or_else(|| panic!("the stream ended without an error: {:?}", rest.last()));
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("stopped answering") && message.contains("not billed"), "{error}");

    // B bills what its node made, on the shared books, as it would any job.
    let game = billed_game(a, lost);
    assert_eq!(game, billed_game(a, delivered));
    let store = a.store();
    wait_for("A to write the lost answer off", Duration::from_secs(10), || {
        block_on(store.undelivered(lost as u64)).unwrap().is_some()
    });
    let reason = block_on(store.undelivered(lost as u64)).unwrap().unwrap();
    assert!(reason.contains("server `b`"), "{reason}");
    assert_eq!(block_on(store.undelivered(delivered as u64)).unwrap(), None);
    assert!(a.server.log_text().contains("an answer given up was written off"), "{}", a.server.log_text());
    let price_of = |task: i64| -> i64 {
        let sql = format!("SELECT (price_units / 1000)::bigint FROM receipts WHERE task_id = {task}");
        crate::database::numbers(&store, &sql)[0]
    };
    assert!(price_of(lost) > 0, "B billed the lost answer's tokens");
    let owed = block_on(store.game_balances(0)).unwrap().iter().find(|g| g.game_id == game).map(|g| g.owed.0);
    assert_eq!(owed, Some(price_of(delivered) as u128 * 1000), "the game owes the answer it read, not the lost one");
    let (_, metrics) = a.get("/metrics");
    assert!(metrics.lines().any(|l| l == "ludus_cluster_undelivered_total 1"), "{metrics}");
}

/// The running server's side of [`a_forwarded_jobs_lost_events_are_asked_for_again_and_a_hole_is_never_relayed`]:
/// B numbers the events of a job A forwarded, says in its keepalives how many it sent, and
/// sends them again from any number asked, while A relays each one to the game once. The
/// test listens on the job's reply subject and asks B for everything again mid-answer.
#[test]
fn a_running_server_numbers_its_events_and_sends_them_again_when_asked() {
    use futures_util::StreamExt;
    use ludus::actors::cluster::{sequenced, wire};
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let mut servers = start_network(&nats, &["a", "b"], "", dir.path());
    servers[1].add_node(&["--fake-engine", "20:100", "--capacity", "1"]);
    for server in &servers {
        server.wait_nodes("fake", 1);
    }
    let url = format!("nats://127.0.0.1:{}", nats.port);
    // What came on the reply subject: (a keepalive, its count of events sent | an event, its number).
    type Seen = Vec<(bool, Option<u64>)>;
    let (listening, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Seen::new())));
    let stop = Arc::new(AtomicBool::new(false));
    let listener = {
        let (listening, seen, stop) = (listening.clone(), seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let client = async_nats::connect(url).await.unwrap();
                let mut replies = client.subscribe("ludus.reply.a.*.b").await.unwrap();
                client.flush().await.unwrap();
                listening.store(true, Ordering::Relaxed);
                let mut asked = false;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(200), replies.next()).await
                    else {
                        continue;
                    };
                    let event: wire::RemoteEvent = serde_json::from_slice(&message.payload).unwrap();
                    let seq = sequenced::seq_of(&message);
                    let entry = match event {
                        wire::RemoteEvent::Alive { sent, .. } => (true, sent),
                        _ => (false, seq),
                    };
                    seen.lock().unwrap().push(entry);
                    // Mid-answer, everything again from the start.
                    if !asked && seq == Some(6) {
                        asked = true;
                        let task = message.subject.as_str().split('.').nth(3).unwrap().to_string();
                        client.publish(format!("ludus.resend.b.{task}.a"), "0".into()).await.unwrap();
                    }
                }
            })
        })
    };
    wait_for("the listener", Duration::from_secs(10), || listening.load(Ordering::Relaxed));
    let a = &servers[0];
    let mut stream = SseStream::open(&a.addr, &a.key, &chat("fake", 100, true));
    assert_eq!(stream.status, 200);
    let text: String = std::iter::from_fn(|| stream.next_data())
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    listener.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    let numbered: Vec<u64> = seen.iter().filter(|(alive, _)| !alive).filter_map(|(_, n)| *n).collect();
    // Every event numbered, in order; 0 to 6 at least twice (sent again once asked).
    assert!(seen.iter().all(|(_, n)| n.is_some()), "an event or keepalive without its number: {seen:?}");
    let first_again = numbered.windows(2).position(|w| w[1] <= w[0]).map(|i| i + 1);
    let first_again = first_again.unwrap_or_else(|| panic!("nothing was sent again: {numbered:?}"));
    assert_eq!(numbered[first_again], 0, "{numbered:?}");
    assert!((0..=6).all(|n| numbered.iter().filter(|&&m| m == n).count() >= 2), "{numbered:?}");
    // Keepalives counted what was sent.
    assert!(seen.iter().any(|&(alive, sent)| alive && sent > Some(0)), "no keepalive counted: {seen:?}");
    // The game read each token once.
    assert_eq!(text.matches("tok").count(), 20, "{text:?}");
    assert!(servers[1].server.log_text().contains("events of a forwarded job sent again"));
}

/// Jobs queued on a server go to another one once it has room: they used to wait for
/// their own server's nodes only, and a burst that found the others' room taken until
/// their next advert timed out in the queue (10 s here) while those sat idle. A: one slot,
/// 6 s a job (its third queued job would start after 18 s); B: two slots, 0.1 s a job; six
/// requests at once through A.
#[test]
fn queued_jobs_go_to_a_server_that_has_room_since() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let mut servers = start_network(&nats, &["a", "b"], "", dir.path());
    servers[0].add_node(&["--fake-engine", "100:60", "--capacity", "1"]);
    servers[1].add_node(&["--fake-engine", "10:10", "--capacity", "2"]);
    for server in &servers {
        server.wait_nodes("fake", 2);
    }
    let a = &servers[0];
    let asks: Vec<_> = (0..6)
        .map(|_| {
            let (addr, key) = (a.addr.clone(), a.key.clone());
            std::thread::spawn(move || {
                post_with(&addr, "/v1/chat/completions", Some(&key), chat("fake", 100, false).as_bytes())
            })
        })
        .collect();
    let statuses: Vec<(u16, String)> =
        asks.into_iter().map(|t| t.join().unwrap()).map(|r| (r.status, r.body)).collect();
    assert!(statuses.iter().all(|(status, _)| *status == 200), "{statuses:?}");
    let forwarded = a.server.log_text().matches("job forwarded").count();
    assert!(forwarded >= 3, "A's queue went to B: {forwarded} forwarded");
}

/// A draining server offers no room: the other servers keep a job they cannot start at
/// once in their own queues. It used to advertise its free slots until it exited, and a
/// healthy server's overflow sent there got a 503 "shutting down".
#[test]
fn a_draining_server_is_offered_no_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let mut servers = start_network(&nats, &["a", "b"], "", dir.path());
    servers[0].add_node(&["--fake-engine", "100:20", "--capacity", "1"]);
    servers[1].add_node(&["--fake-engine", "2000:20", "--capacity", "4"]);
    for server in &servers {
        server.wait_nodes("fake", 2);
    }
    let (a, b) = (&servers[0], &servers[1]);
    // B drains while a stream of its own runs (it stays up, its node too, until that ends).
    let mut held = SseStream::open(&b.addr, &b.key, &chat("fake", 2000, true));
    assert_eq!(held.status, 200);
    assert!(held.next_data().is_some());
    let pid = b.server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_for("B to drain", Duration::from_secs(10), || b.server.log_text().contains("draining"));
    std::thread::sleep(Duration::from_millis(600)); // a few adverts
                                                    // A's one slot is busy: the next request through A waits in A's queue for it.
    let mut busy = SseStream::open(&a.addr, &a.key, &chat("fake", 100, true));
    assert_eq!(busy.status, 200);
    assert!(busy.next_data().is_some());
    let r = post_with(&a.addr, "/v1/chat/completions", Some(&a.key), chat("fake", 4, false).as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!a.server.log_text().contains("job forwarded"), "A sent a job to the draining B");
    drop((held, busy));
}

/// Server A alone on NATS, beside a fake server B that the test plays: NATS, A, and the
/// URL of NATS.
fn a_alone(dir: &Path) -> Option<(Nats, Cluster, String)> {
    let nats = Nats::start(dir)?;
    let a = start_network(&nats, &["a"], "", dir).pop()?;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    Some((nats, a, url))
}

/// The models `server` lists, with their node counts.
fn listed(server: &Cluster) -> Vec<(String, u64)> {
    let (_, body) = server.get("/v1/models");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m["id"].as_str().unwrap_or_default().to_string(), m["nodes"].as_u64().unwrap_or(0)))
        .collect()
}

/// One key, one session, in the whole network: a node key that opens a session on B
/// closes its older session on A, and the network counts it once.
#[test]
fn a_node_key_holds_one_session_in_the_whole_network() {
    use super::registry::Rogue;
    use ludus::crypto::identity::Identity;
    let Some((_dir, _nats, servers)) = two_servers() else { return };
    let (a, b) = (&servers[0], &servers[1]);
    let secret = [9u8; 32];
    let system = actix_rt::System::new();
    let counted = |server: &Cluster| listed(server).iter().find(|(m, _)| m == MODEL).map_or(0, |(_, n)| *n);

    let mut first = system.block_on(Rogue::join_as(&a.addr, MODEL, Identity::from_secret(&secret).unwrap()));
    let started = Instant::now();
    while counted(b) != 1 {
        assert!(started.elapsed() < Duration::from_secs(20), "B never heard of A's node");
        system.block_on(first.idle(&mut [], Duration::from_millis(100)));
    }
    // The same key on B: A closes its session, naming B.
    let mut second = system.block_on(Rogue::join_as(&b.addr, MODEL, Identity::from_secret(&secret).unwrap()));
    let reason = system.block_on(first.goodbye());
    assert!(
        reason.contains("a newer session of node") && reason.contains("on server `b`"),
        "A's session must close for B's: {reason:?}\n{}",
        a.server.log_text()
    );
    // Both servers settle on one session of that key, and stay there.
    let started = Instant::now();
    while (counted(a), counted(b)) != (1, 1) {
        assert!(started.elapsed() < Duration::from_secs(20), "counts {:?}", (counted(a), counted(b)));
        system.block_on(second.idle(&mut [], Duration::from_millis(100)));
    }
    for _ in 0..5 {
        system.block_on(second.idle(&mut [], Duration::from_millis(250)));
        assert_eq!((counted(a), counted(b)), (1, 1), "the key counted once on each server");
    }
}

/// What a fake runner does with one job it takes.
struct Script {
    /// The job's events, numbered from 0.
    events: Vec<ludus::actors::cluster::wire::RemoteEvent>,
    /// The number of the one it "loses" (never published the first time).
    lost: usize,
    /// Whether it sends events again when asked.
    answers: bool,
}

/// Requests for events again a fake runner heard: (its job, from which number).
type Asked = Arc<Mutex<Vec<(usize, u64)>>>;

/// A fake runner B on NATS at `url`, advertising nodes of model `fake` to origin A: the
/// n-th job it takes gets `script(n)`'s events, numbered, all but the lost one, and
/// events again when asked and the script answers. Runs until the switch it returns is
/// set; every request for events again is recorded.
fn fake_runner(
    url: String,
    script: impl Fn(usize) -> Script + Send + 'static,
) -> (Arc<AtomicBool>, Asked, std::thread::JoinHandle<()>) {
    use futures_util::StreamExt;
    use ludus::actors::cluster::{sequenced, wire};
    let (stop, asked) = (Arc::new(AtomicBool::new(false)), Asked::default());
    let (stop2, asked2) = (stop.clone(), asked.clone());
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let client = async_nats::connect(url).await.unwrap();
            let mut jobs = client.subscribe(wire::jobs_for("b")).await.unwrap();
            let mut resends = client.subscribe("ludus.resend.b.*.*").await.unwrap();
            let publish = |subject: String, seq: usize, event: &wire::RemoteEvent| {
                let client = client.clone();
                let payload = serde_json::to_vec(event).unwrap();
                async move {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(sequenced::SEQ_HEADER, seq.to_string().as_str());
                    client.publish_with_headers(subject, headers, payload.into()).await.unwrap();
                }
            };
            // Each job's script, and its reply subject.
            let mut taken: Vec<(Script, String)> = Vec::new();
            let mut advert = tokio::time::interval(Duration::from_millis(200));
            while !stop2.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = advert.tick() => {
                        client.publish("ludus.advert.b", fake_advert("b", "fake").into()).await.unwrap();
                    }
                    Some(message) = jobs.next() => {
                        let job: wire::ForwardedJob = serde_json::from_slice(&message.payload).unwrap();
                        let (reply, script) = (wire::reply_subject("a", job.task, "b"), script(taken.len()));
                        for (seq, event) in script.events.iter().enumerate().filter(|&(seq, _)| seq != script.lost) {
                            publish(reply.clone(), seq, event).await;
                        }
                        taken.push((script, reply));
                    }
                    Some(request) = resends.next() => {
                        let (from, to) = sequenced::parse_request(&request.payload).expect("a request");
                        // `ludus.resend.b.<task>.a` for `ludus.reply.a.<task>.b`.
                        let task = request.subject.as_str().split('.').nth(3);
                        let n = taken.iter().position(|(_, reply)| reply.split('.').nth(3) == task)
                            .expect("a request for a job taken");
                        asked2.lock().unwrap().push((n, from));
                        let (script, reply) = &taken[n];
                        if !script.answers {
                            continue;
                        }
                        let to = to.map_or(script.events.len(), |to| to as usize);
                        for (seq, event) in script.events.iter().enumerate().take(to).skip(from as usize) {
                            publish(reply.clone(), seq, event).await;
                        }
                    }
                }
            }
        })
    });
    (stop, asked, thread)
}

/// A fake advert for `model`, in the wire form, naming `server`.
fn fake_advert(server: &str, model: &str) -> Vec<u8> {
    let advert = ludus::actors::cluster::wire::Advert {
        server: server.into(),
        instance: 1,
        keepalive: true,
        models: vec![ludus::actors::cluster::wire::ModelRoom { model: model.into(), nodes: 9, free: 9 }],
    };
    serde_json::to_vec(&advert).unwrap()
}

/// Each server has its own NATS user (`ludus cluster nats-user`'s permissions): the network
/// works as before, and a server whose credentials leak cannot speak for another, nor read
/// the jobs meant for another.
#[test]
fn servers_with_their_own_nats_users_cannot_speak_for_each_other() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start_with_users(dir.path(), &["a", "b"]) else { return };
    let servers = model_behind_b(&nats, &model, dir.path());
    let (a, b) = (&servers[0], &servers[1]);

    // Whoever holds A's credentials: speaks as B, speaks for B under A's name, and listens
    // for B's jobs, over and over while the network runs.
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let url_a = nats.url_for("a");
    let stop = Arc::new(AtomicBool::new(false));
    let (refusals, overheard) = (Arc::new(Mutex::new(Vec::<String>::new())), Arc::new(AtomicBool::new(false)));
    let impostor = {
        let (stop, refusals, overheard) = (stop.clone(), refusals.clone(), overheard.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                use futures_util::StreamExt;
                let password = url_a.split(':').nth(2).unwrap().split('@').next().unwrap().to_string();
                let client = async_nats::ConnectOptions::with_user_and_password("a".into(), password)
                    .event_callback(move |event| {
                        let refusals = refusals.clone();
                        async move { refusals.lock().unwrap().push(event.to_string()) }
                    })
                    .connect(url)
                    .await
                    .unwrap();
                let mut jobs = client.subscribe("ludus.job.b.*").await.unwrap();
                while !stop.load(Ordering::Relaxed) {
                    client.publish("ludus.advert.b", fake_advert("b", "ghost-b").into()).await.unwrap();
                    client.publish("ludus.advert.a", fake_advert("b", "ghost-a").into()).await.unwrap();
                    let _ = client.flush().await;
                    if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), jobs.next()).await {
                        overheard.store(true, Ordering::Relaxed);
                    }
                }
            })
        })
    };

    // The network still works under the permissions: A forwards to B, B answers.
    for _ in 0..3 {
        let through_a = post_with(&a.addr, "/v1/chat/completions", Some(&a.key), chat(MODEL, 4, false).as_bytes());
        assert_eq!(through_a.status, 200, "{}", through_a.body);
        assert!(!content(&through_a.body).is_empty());
        for server in [a, b] {
            let ghosts: Vec<_> = listed(server).into_iter().filter(|(m, _)| m.starts_with("ghost")).collect();
            assert!(ghosts.is_empty(), "{} lists a model nobody serves: {ghosts:?}", server.addr);
        }
    }
    wait_for("B to run the forwarded jobs", Duration::from_secs(10), || {
        b.server.log_text().contains("running a job forwarded by another server")
    });
    stop.store(true, Ordering::Relaxed);
    impostor.join().unwrap();
    assert!(!overheard.load(Ordering::Relaxed), "A's credentials read a job meant for B");
    let refusals = refusals.lock().unwrap().join("\n");
    assert!(refusals.contains("ludus.advert.b"), "NATS refuses A's credentials B's subjects: {refusals}");
    assert!(refusals.contains("ludus.job.b"), "NATS refuses A's credentials B's jobs: {refusals}");
    // What NATS lets through under A's name but names B is dropped by the servers.
    assert!(b.server.log_text().contains("advert naming another server than its publisher ignored"));
    // nats-server's config holds bcrypt hashes, which it took as such, not the passwords.
    let conf = std::fs::read_to_string(dir.path().join("nats.conf")).unwrap();
    assert!(nats.passwords.values().all(|pw| !conf.contains(pw.as_str())), "{conf}");
    let log = std::fs::read_to_string(dir.path().join("nats-0.log")).unwrap();
    assert!(!log.contains("Plaintext passwords detected"), "{log}");
}

/// Synchronous verification in a network: an answer waits for its verdict and for its
/// witness to reach the other servers, whichever comes last, then arrives, asked of B
/// directly or through A.
#[test]
fn synchronous_verification_in_a_network_answers_once_verdict_and_witness_are_in() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let verifier = format!(
        "[verifier]\nmodels = {{ \"{MODEL}\" = \"{}\" }}\nsample_rate = 1.0\nsynchronous = true\n",
        model.display()
    );
    let servers = model_behind_b_with(&nats, &model, dir.path(), &verifier);
    let (a, b) = (&servers[0], &servers[1]);
    let direct = post_with(&b.addr, "/v1/chat/completions", Some(&a.key), chat(MODEL, 6, false).as_bytes());
    assert_eq!(direct.status, 200, "{}", direct.body);
    let through_a = post_with(&a.addr, "/v1/chat/completions", Some(&a.key), chat(MODEL, 6, false).as_bytes());
    assert_eq!(through_a.status, 200, "{}", through_a.body);
    assert!(!content(&direct.body).is_empty());
    assert_eq!(content(&through_a.body), content(&direct.body), "greedy: the same verified answer");
    let log = b.server.log_text();
    for bad in ["proof REJECTED", "could not be checked", "not confirmed to the cluster in time"] {
        assert!(!log.contains(bad), "B logged {bad:?}:\n{log}");
    }
}

/// A task A picked for a check, whose receipt A had not committed when it died: the node
/// re-homes to B and re-sends it, and B records it `sampled` (A's witness carries the
/// pick), not `unchecked` and payable on the receipt alone. A, back, has it checked from
/// its check log, and the task is paid as any verified one.
#[test]
fn a_picked_task_re_sent_to_another_server_waits_for_its_verdict() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let tables = format!(
        "model_files = {{ \"{MODEL}\" = \"{0}\" }}\n[verifier]\nmodels = {{ \"{MODEL}\" = \"{0}\" }}\nsample_rate = 1.0\n",
        model.display()
    );
    let mut servers = start_network(&nats, &["a", "b"], &tables, dir.path());
    let via = format!("{}/ws/node,ws://{}", servers[0].addr, servers[1].addr);
    servers[0].add_node_via(&via, &["--model", model.to_str().unwrap(), "--threads", "1"]);
    servers[0].wait_nodes(MODEL, 1);
    let books = servers[1].store();
    let count = |sql: &str| super::database::numbers(&books, sql)[0];
    // A can neither commit the receipt nor write the verdict (constraints stand in for an
    // outage of its own): both live only in A when it dies.
    let refuse = |on: bool| {
        let sql = if on {
            "ALTER TABLE receipts ADD CONSTRAINT test_refuses_receipts CHECK (false) NOT VALID;
             ALTER TABLE verifications ADD CONSTRAINT test_refuses_verdicts CHECK (false) NOT VALID"
        } else {
            "ALTER TABLE receipts DROP CONSTRAINT test_refuses_receipts;
             ALTER TABLE verifications DROP CONSTRAINT test_refuses_verdicts"
        };
        block_on(async { books.conn().await.unwrap().batch_execute(sql).await.unwrap() });
    };
    refuse(true);
    let r =
        post_with(&servers[0].addr, "/v1/chat/completions", Some(&servers[0].key), chat(MODEL, 6, false).as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    let task = task_of(&r.body);
    wait_for("A unable to write the verdict", Duration::from_secs(60), || {
        servers[0].server.log_text().contains("could not record a verification; retrying")
    });
    servers[0].kill_server();
    refuse(false);
    let state = format!("SELECT count(*) FILTER (WHERE verification = 'sampled') FROM receipts WHERE task_id = {task}");
    let recorded = format!("SELECT count(*) FROM receipts WHERE task_id = {task}");
    wait_for("the node's receipt, re-sent to B", Duration::from_secs(60), || count(&recorded) == 1);
    assert_eq!(count(&state), 1, "B waits for the verdict of a task A picked");
    servers[0].restart_server();
    wait_for("A's owed check, verified", Duration::from_secs(120), || {
        count(&format!("SELECT count(*) FROM receipts WHERE task_id = {task} AND verification = 'verified'")) == 1
    });
}

/// A key that opened a session on A while B was cut off from NATS (B never heard the
/// claim) is back to one session once B's link returns: B claims its sessions again, A's
/// is the newer, and B's closes.
#[test]
fn a_key_with_a_session_on_each_side_of_a_nats_split_keeps_one_when_it_heals() {
    use super::registry::Rogue;
    use ludus::crypto::identity::Identity;
    use ludus::protocol::{NodeLoad, NodeMessage, ServerMessage};
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()) else { return };
    let (relay, servers) = b_behind_a_relay(&nats, dir.path());
    let (a, b) = (&servers[0], &servers[1]);
    let id = || Identity::from_secret(&[11u8; 32]).unwrap();
    let system = actix_rt::System::new();
    // The key's session on B is claimed while everyone hears it (A holds none: nothing
    // to settle).
    let mut older = system.block_on(Rogue::join_as(&b.addr, MODEL, id()));
    system.block_on(older.idle(&mut [], Duration::from_millis(500)));
    // B alone loses NATS; the same key opens on A, whose claim B cannot hear.
    relay.cut();
    wait_for("B to lose NATS", Duration::from_secs(10), || b.server.log_text().contains("lost the cluster's NATS"));
    let mut newer = system.block_on(Rogue::join_as(&a.addr, MODEL, id()));
    system.block_on(newer.idle(&mut [&mut older], Duration::from_millis(500)));

    relay.restore();
    let (started, mut reason) = (Instant::now(), None);
    while reason.is_none() && started.elapsed() < Duration::from_secs(20) {
        system.block_on(async {
            for r in [&mut older, &mut newer] {
                let _ = r.link.send(&NodeMessage::Heartbeat(NodeLoad::default())).await;
            }
            let _ = newer.link.recv(Duration::from_millis(5)).await;
            match older.link.recv(Duration::from_millis(50)).await {
                Ok(ServerMessage::Goodbye { reason: r }) => reason = Some(r),
                Err(ludus::node::LinkError::Timeout) | Ok(_) => {}
                Err(e) => reason = Some(format!("closed without a reason: {e}")),
            }
        });
    }
    let reason = reason.expect("B never closed the older session once NATS was back");
    assert!(reason.contains("on server `a`"), "{reason}");
    // The newer session on A lives on.
    assert!(system.block_on(newer.link.send(&NodeMessage::Heartbeat(NodeLoad::default()))).is_ok());
}

/// A receipt a server refused (it claims 64 tokens; the node sent 2) was still told to the
/// other servers as a completion seen, with the node's count. The node then re-sent it to
/// another server, which found it witnessed and billed the game for 64 tokens. Now only a
/// receipt the server recorded is told, with the server's own count, and the node that
/// signed the lie is judged as one whose proof failed.
#[test]
fn a_receipt_one_server_refused_is_not_paid_by_another() {
    use super::registry::Rogue;
    use ludus::crypto::identity::Identity;
    use ludus::protocol::{NodeMessage, SignedReceipt};
    let Some((_dir, _nats, servers)) = two_servers() else { return };
    let (a, b) = (&servers[0], &servers[1]);
    let secret = [9u8; 32];
    let system = actix_rt::System::new();
    let mut rogue = system.block_on(Rogue::join_as(&a.addr, "lying", Identity::from_secret(&secret).unwrap()));
    let _ = system.block_on(rogue.next_task(Duration::from_millis(300))); // registers
    let (addr, key) = (a.addr.clone(), a.key.clone());
    let game = std::thread::spawn(move || {
        post_with(&addr, "/v1/chat/completions", Some(&key), chat("lying", 64, true).as_bytes())
    });
    let spec = system.block_on(rogue.next_task(Duration::from_secs(30))).expect("the rogue gets the task");
    let mut receipt = SignedReceipt::sign(&rogue.id, spec.ticket.clone(), spec.ticket.prompt.tokens, &[7, 8]);
    receipt.completion_tokens = 64;
    receipt.signature = hex::encode(rogue.id.sign(&receipt.hash()));
    system.block_on(rogue.finish(&spec, receipt.clone()));
    let answer = game.join().unwrap();
    assert_eq!(answer.status, 200, "the game read the two tokens streamed: {}", answer.body);
    assert!(a.server.log_text().contains("it claims 64 completion tokens; 2 arrived"), "{}", a.server.log_text());
    // The node goes to B and sends its receipt again, as after a reconnect.
    let mut moved = system.block_on(Rogue::join_as(&b.addr, "lying", Identity::from_secret(&secret).unwrap()));
    system.block_on(moved.link.send(&NodeMessage::Receipts { receipts: vec![receipt] })).unwrap();
    system.block_on(moved.idle(&mut [], Duration::from_secs(4))); // two blocks
    let billed = super::database::numbers(
        &a.store(),
        &format!(
            "SELECT count(*), coalesce(sum(completion_tokens), 0)::bigint FROM receipts WHERE task_id = {}",
            spec.id.0 as i64
        ),
    );
    assert_eq!(billed, vec![0, 0], "(receipts, tokens) billed for the refused receipt");
}
