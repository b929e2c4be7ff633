//! The registry end to end, on a real Postgres: receipts committed per block with their
//! Merkle root and confirmed by the nodes; nothing lost when the server is killed mid-block
//! or Postgres restarts under load; duplicate and forged submissions never change the books.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ludus::crypto::identity::Identity;
use ludus::crypto::merkle;
use ludus::ledger::Outcome;
use ludus::node::link::{join, Announce, Link};
use ludus::protocol::receipt::confirmation_message;
use ludus::protocol::{NodeLoad, NodeMessage, ServerMessage, SignedReceipt, TaskId, TaskSpec, TaskUsage};

use super::cluster::{wait_for, Cluster};
use super::database::{block_on, numbers};

/// One non-streamed chat request that never panics: the task id of a 200, else None.
pub fn try_chat(addr: &str, key: &str, model: &str) -> Option<u64> {
    let body = format!(r#"{{"model": "{model}", "max_tokens": 4, "messages": [{{"role": "user", "content": "hi"}}]}}"#);
    try_post_chat(addr, key, &body)
}

/// POSTs a chat completion body; the task id of a 200, else None (never panics).
pub fn try_post_chat(addr: &str, key: &str, body: &str) -> Option<u64> {
    post_chat_within(addr, key, body, Duration::from_secs(20)).ok()
}

/// POSTs a chat completion body and waits up to `timeout` for the answer: the task id of a
/// 200, else why not (the status line, or the I/O error), for a test to print.
pub fn post_chat_within(addr: &str, key: &str, body: &str, timeout: Duration) -> Result<u64, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut stream = TcpStream::connect(addr).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io)?;
    let (head, payload) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{}: {payload}", head.lines().next().unwrap_or("no response")));
    }
    let json: serde_json::Value = serde_json::from_str(payload).map_err(|e| format!("{e}: {payload}"))?;
    json["choices"][0]["finish_reason"].as_str().ok_or_else(|| format!("no finish_reason: {payload}"))?;
    json["id"]
        .as_str()
        .and_then(|id| id.strip_prefix("chatcmpl-"))
        .and_then(|id| u64::from_str_radix(id, 16).ok())
        .ok_or_else(|| format!("no task id: {payload}"))
}

/// Requests from `threads` clients until `stop`; the ids of the answers that reached the game.
fn load(addr: &str, key: &str, threads: usize, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<Vec<u64>>> {
    (0..threads)
        .map(|_| {
            let (addr, key, stop) = (addr.to_string(), key.to_string(), stop.clone());
            std::thread::spawn(move || {
                let mut done = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match try_chat(&addr, &key, "fake") {
                        Some(id) => done.push(id),
                        None => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                done
            })
        })
        .collect()
}

fn recorded_tasks(cluster: &Cluster) -> Vec<u64> {
    let store = cluster.store();
    block_on(async {
        let conn = store.conn().await.unwrap();
        conn.query("SELECT task_id FROM receipts", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect()
    })
}

/// Waits until every id in `completed` is on the books; asserts nothing is there twice.
pub fn assert_all_recorded_once(cluster: &Cluster, completed: &[u64]) {
    let wanted: BTreeSet<u64> = completed.iter().copied().collect();
    assert_eq!(wanted.len(), completed.len(), "task ids are unique");
    let mut missing = wanted.len();
    wait_for("every completed task on the books", Duration::from_secs(60), || {
        let recorded = recorded_tasks(cluster);
        let set: BTreeSet<u64> = recorded.iter().copied().collect();
        assert_eq!(set.len(), recorded.len(), "a task recorded twice");
        missing = wanted.difference(&set).count();
        missing == 0
    });
}

#[test]
fn receipts_are_committed_confirmed_and_reported() {
    let mut cluster = Cluster::start("");
    cluster.add_node(&["--fake-engine", "5:1"]);
    cluster.add_node(&["--fake-engine", "5:1"]);
    cluster.wait_nodes("fake", 2);
    let ids: Vec<u64> = (0..12).map(|_| try_chat(&cluster.addr, &cluster.key, "fake").expect("200")).collect();
    assert_all_recorded_once(&cluster, &ids);
    let store = cluster.store();
    wait_for("both nodes to confirm", Duration::from_secs(30), || {
        numbers(&store, "SELECT count(*) FILTER (WHERE confirmation = 'confirmed') FROM receipts") == vec![12]
    });
    // Each block's root is the Merkle root of its receipt hashes in task order.
    let blocks: Vec<(i64, Vec<u8>, Vec<Vec<u8>>)> = block_on(async {
        let conn = store.conn().await.unwrap();
        let mut out = Vec::new();
        for b in conn.query("SELECT number, merkle_root FROM blocks ORDER BY number", &[]).await.unwrap() {
            let n: i64 = b.get(0);
            let hashes = conn
                .query("SELECT receipt_hash FROM receipts WHERE block = $1 ORDER BY task_id", &[&n])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, Vec<u8>>(0))
                .collect();
            out.push((n, b.get(1), hashes));
        }
        out
    });
    assert!(!blocks.is_empty());
    for (n, root, hashes) in &blocks {
        let leaves: Vec<[u8; 32]> = hashes.iter().map(|h| h.as_slice().try_into().unwrap()).collect();
        assert_eq!(merkle::root(&leaves).as_slice(), root.as_slice(), "block {n}");
    }
    // The game sees its usage; charges are the default prices: ceil((p*1e13 + c*2e13)/1000).
    let r = super::cluster::raw(
        &cluster.addr,
        format!(
            "GET /v1/usage HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
            cluster.key
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let usage: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let day = &usage["data"][0];
    assert_eq!(day["tasks"], 12);
    assert_eq!(day["completion_tokens"], 12 * 4, "max_tokens 4 caps the fake node's 5 tokens");
    let prompt = day["prompt_tokens"].as_u64().unwrap() as u128;
    let expected = (prompt * 10_000_000_000_000 + 48 * 20_000_000_000_000).div_ceil(1000);
    // Per task rounding can only add: the sum of ceilings is at least the ceiling of the sum.
    let charged: u128 = day["charges"].as_str().unwrap().parse().unwrap();
    assert!(charged >= expected && charged < expected + 12, "{charged} vs {expected}");
    // Admin views need the admin token.
    let token = std::fs::read_to_string(cluster.dir.path().join("data/admin-token")).unwrap();
    let admin = |path: &str, token: &str| {
        super::cluster::raw(
            &cluster.addr,
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
                token.trim()
            )
            .as_bytes(),
        )
    };
    assert_eq!(admin("/admin/nodes", &cluster.key).status, 401, "a game key is not an admin token");
    let nodes = admin("/admin/nodes", &token);
    assert_eq!(nodes.status, 200);
    let nodes: serde_json::Value = serde_json::from_str(&nodes.body).unwrap();
    let tasks: i64 = nodes["data"].as_array().unwrap().iter().map(|n| n["tasks"].as_i64().unwrap()).sum();
    assert_eq!(tasks, 12);
    let payable: u128 =
        nodes["data"].as_array().unwrap().iter().map(|n| n["payable"].as_str().unwrap().parse::<u128>().unwrap()).sum();
    assert_eq!(payable, charged, "every confirmed task is payable");
    let first = admin(&format!("/admin/blocks/{}", blocks[0].0), &token);
    assert_eq!(first.status, 200);
    let report: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!(report["merkle_root"], format!("0x{}", hex::encode(&blocks[0].1)));
    assert!(report["discrepancies"].as_array().unwrap().is_empty(), "{report}");
    assert_eq!(admin("/admin/blocks/999999", &token).status, 404);
}

#[test]
fn killing_the_server_mid_block_loses_no_receipt() {
    // Long blocks: a kill almost always lands with receipts buffered and not committed.
    let mut cluster = Cluster::start("[clock]\nblock_time_ms = 1500\n");
    cluster.add_node(&["--fake-engine", "4:2"]);
    cluster.add_node(&["--fake-engine", "4:2"]);
    cluster.wait_nodes("fake", 2);
    let mut completed = Vec::new();
    let mut caught_uncommitted = 0;
    for round in 0..10 {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = load(&cluster.addr, &cluster.key, 4, stop.clone());
        std::thread::sleep(Duration::from_millis(400 + 70 * round));
        cluster.kill_server();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            completed.extend(c.join().unwrap());
        }
        let on_books: BTreeSet<u64> = recorded_tasks(&cluster).into_iter().collect();
        caught_uncommitted += completed.iter().filter(|t| !on_books.contains(t)).count();
        cluster.restart_server();
        cluster.wait_nodes("fake", 2);
    }
    assert!(completed.len() > 50, "the load ran: {} tasks", completed.len());
    assert!(caught_uncommitted > 0, "no kill landed mid-block; the test proves nothing");
    // The nodes re-send what the dead server never committed.
    assert_all_recorded_once(&cluster, &completed);
    eprintln!("{} tasks over 10 kills; {caught_uncommitted} were uncommitted at a kill", completed.len());
}

#[test]
fn postgres_restarted_under_load_loses_no_receipt() {
    // Its own Postgres: the shared one serves other tests.
    let pg = ludus::ledger::cluster::PrivateCluster::throwaway().unwrap();
    let mut cluster = Cluster::start_with_database("", &pg.url("postgres"));
    cluster.add_node(&["--fake-engine", "4:2"]);
    cluster.wait_nodes("fake", 1);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&cluster.addr, &cluster.key, 3, stop.clone());
    std::thread::sleep(Duration::from_millis(800));
    pg.stop().unwrap();
    // Keys are cached: the game keeps being served while the database is away.
    std::thread::sleep(Duration::from_millis(3000));
    pg.restart_on_same_port().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    let completed: Vec<u64> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    assert!(completed.len() > 20, "{}", completed.len());
    assert_all_recorded_once(&cluster, &completed);
    let log = cluster.server.log_text();
    assert!(log.contains("block commit failed"), "the outage was seen");
    assert!(log.contains("registry commits resumed"), "commits resumed by themselves");
}

/// The books as a tuple that any change would alter.
fn books(cluster: &Cluster) -> (i64, String, i64, i64) {
    let store = cluster.store();
    block_on(async {
        let conn = store.conn().await.unwrap();
        let r = conn
            .query_one(
                "SELECT count(*), coalesce(sum(price_units), 0)::text,
                        count(*) FILTER (WHERE confirmation = 'confirmed'),
                        (SELECT count(*) FROM confirmations)
                 FROM receipts",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    })
}

/// A node speaking the real protocol, driven by the test.
pub struct Rogue {
    pub id: Identity,
    pub link: Link,
    /// What its heartbeats say; the first one fixes its context for the session.
    pub load: NodeLoad,
}

impl Rogue {
    pub async fn join(addr: &str, model: &str) -> Self {
        Self::join_as(addr, model, Identity::generate()).await
    }

    /// Joins with a given key (two sessions of one node, say).
    pub async fn join_as(addr: &str, model: &str, id: Identity) -> Self {
        Self::join_with(addr, model, id, 4).await
    }

    /// Joins with a given key, announcing room for `capacity` tasks at once.
    pub async fn join_with(addr: &str, model: &str, id: Identity, capacity: usize) -> Self {
        let announce = Announce { models: vec![model.into()], capacity, device: "cpu".into(), bundles: vec![] };
        let link = join(&format!("ws://{addr}/ws/node"), &id, announce, None).await.unwrap();
        Self { id, link, load: NodeLoad { context: 4096, ..NodeLoad::default() } }
    }

    /// Heartbeats until a message matching `want` arrives (others are dropped).
    pub async fn wait(&mut self, others: &mut [&mut Rogue], want: impl Fn(&ServerMessage) -> bool) -> ServerMessage {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no matching message from the server");
            for r in std::iter::once(&mut *self).chain(others.iter_mut().map(|r| &mut **r)) {
                r.link.send(&NodeMessage::Heartbeat(r.load.clone())).await.unwrap();
            }
            match self.link.recv(Duration::from_millis(50)).await {
                Ok(m) if want(&m) => return m,
                Ok(_) => {}
                Err(ludus::node::LinkError::Timeout) => {}
                Err(e) => panic!("link failed: {e}"),
            }
        }
    }

    /// Heartbeats (and drops whatever arrives) for `time`.
    pub async fn idle(&mut self, others: &mut [&mut Rogue], time: Duration) {
        let until = Instant::now() + time;
        while Instant::now() < until {
            for r in std::iter::once(&mut *self).chain(others.iter_mut().map(|r| &mut **r)) {
                r.link.send(&NodeMessage::Heartbeat(r.load.clone())).await.unwrap();
            }
            let _ = self.link.recv(Duration::from_millis(50)).await;
        }
    }

    /// The next task within `limit` (heartbeating meanwhile), if one comes.
    pub async fn next_task(&mut self, limit: Duration) -> Option<TaskSpec> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            self.link.send(&NodeMessage::Heartbeat(self.load.clone())).await.ok()?;
            match self.link.recv(Duration::from_millis(50)).await {
                Ok(ServerMessage::Task(spec)) => return Some(*spec),
                Ok(_) => {}
                Err(ludus::node::LinkError::Timeout) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// The reason the server gives when it closes the link (empty if it does not within
    /// two seconds of silence).
    pub async fn goodbye(&mut self) -> String {
        while let Ok(m) = self.link.recv(Duration::from_secs(2)).await {
            if let ServerMessage::Goodbye { reason } = m {
                return reason;
            }
        }
        String::new()
    }

    pub async fn task(&mut self, others: &mut [&mut Rogue]) -> TaskSpec {
        match self.wait(others, |m| matches!(m, ServerMessage::Task(_))).await {
            ServerMessage::Task(spec) => *spec,
            _ => unreachable!(),
        }
    }

    /// Streams two tokens and reports done with `receipt`.
    pub async fn finish(&mut self, spec: &TaskSpec, receipt: SignedReceipt) {
        for (index, token) in [7u32, 8].into_iter().enumerate() {
            let m = NodeMessage::Token { id: spec.id, index, token, text: "x".into(), logprobs: None };
            self.link.send(&m).await.unwrap();
        }
        let usage = TaskUsage { prompt_tokens: 5, completion_tokens: 2 };
        let done = NodeMessage::Done {
            id: spec.id,
            finish_reason: ludus::protocol::FinishReason::Stop,
            usage,
            tail: String::new(),
            receipt,
            proof: None,
        };
        self.link.send(&done).await.unwrap();
    }

    /// Streams `completion` and reports done with an honest receipt for it and `proof`.
    pub async fn deliver(&mut self, spec: &TaskSpec, completion: &[u32], proof: ludus::proof::Proof) {
        for (index, &token) in completion.iter().enumerate() {
            let m = NodeMessage::Token { id: spec.id, index, token, text: String::new(), logprobs: None };
            self.link.send(&m).await.unwrap();
        }
        let receipt = SignedReceipt::sign(&self.id, spec.ticket.clone(), spec.ticket.prompt.tokens, completion);
        let usage =
            TaskUsage { prompt_tokens: spec.ticket.prompt.tokens as usize, completion_tokens: completion.len() };
        let done = NodeMessage::Done {
            id: spec.id,
            finish_reason: ludus::protocol::FinishReason::Length,
            usage,
            tail: String::new(),
            receipt,
            proof: Some(Box::new(proof)),
        };
        self.link.send(&done).await.unwrap();
    }

    /// Streams two tokens and reports done with an honest receipt.
    pub async fn finish_honestly(&mut self, spec: &TaskSpec) {
        let receipt = self.honest_receipt(spec);
        self.finish(spec, receipt).await;
    }

    pub fn honest_receipt(&self, spec: &TaskSpec) -> SignedReceipt {
        SignedReceipt::sign(&self.id, spec.ticket.clone(), 5, &[7, 8])
    }

    fn confirm(&self, signer: &Identity, block: u64, tasks: &[u64]) -> NodeMessage {
        let root = merkle::task_root(tasks);
        let count = tasks.len() as u32;
        let signature = hex::encode(signer.sign(&confirmation_message(block, &root, count, &[])));
        NodeMessage::Confirm { block, root: hex::encode(root), count, disputed: vec![], signature }
    }

    async fn recorded(&mut self, others: &mut [&mut Rogue]) -> (u64, Vec<TaskId>) {
        match self.wait(others, |m| matches!(m, ServerMessage::Recorded { .. })).await {
            ServerMessage::Recorded { block, tasks } => (block, tasks),
            _ => unreachable!(),
        }
    }
}

#[test]
fn duplicate_and_forged_submissions_never_change_the_books() {
    let cluster = Cluster::start("");
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let request = |model: &'static str| {
        let (addr, key) = (addr.clone(), key.clone());
        std::thread::spawn(move || try_chat(&addr, &key, model))
    };
    actix_rt::System::new().block_on(async {
        let mut a = Rogue::join(&cluster.addr, "model-a").await;
        let mut b = Rogue::join(&cluster.addr, "model-b").await;
        // An honest task on each node, recorded and confirmed.
        let game = request("model-a");
        let spec_a = a.task(&mut [&mut b]).await;
        let receipt_a = a.honest_receipt(&spec_a);
        a.finish(&spec_a, receipt_a.clone()).await;
        let (block_a, tasks) = a.recorded(&mut [&mut b]).await;
        assert_eq!(tasks, vec![spec_a.id]);
        a.link.send(&a.confirm(&a.id, block_a, &[spec_a.id.0])).await.unwrap();
        a.wait(
            &mut [&mut b],
            |m| matches!(m, ServerMessage::Confirmed { status, .. } if *status == ludus::books::ConfirmStatus::Matched),
        )
        .await;
        assert!(game.join().unwrap().is_some());
        let game = request("model-b");
        let spec_b = b.task(&mut [&mut a]).await;
        let receipt_b = b.honest_receipt(&spec_b);
        b.finish(&spec_b, receipt_b.clone()).await;
        let (block_b, _) = b.recorded(&mut [&mut a]).await;
        b.link.send(&b.confirm(&b.id, block_b, &[spec_b.id.0])).await.unwrap();
        b.wait(&mut [&mut a], |m| matches!(m, ServerMessage::Confirmed { .. })).await;
        assert!(game.join().unwrap().is_some());
        let honest = books(&cluster);
        assert_eq!((honest.0, honest.2, honest.3), (2, 2, 2), "{honest:?}");

        // 1. A receipt sent again: acknowledged with its old block, recorded once.
        a.link.send(&NodeMessage::Receipts { receipts: vec![receipt_a.clone(), receipt_a.clone()] }).await.unwrap();
        assert_eq!(a.recorded(&mut [&mut b]).await, (block_a, vec![spec_a.id]));
        assert_eq!(books(&cluster), honest, "a re-sent receipt");

        // 2. A task whose receipt is signed by another node's key: nothing is recorded, and
        //    the node is judged like one whose proof failed (its whole answer is produced
        //    again elsewhere: here, nowhere, so the game's request waits out the queue).
        let _game = request("model-a");
        let spec = a.task(&mut [&mut b]).await;
        let forged = SignedReceipt::sign(&b.id, spec.ticket.clone(), 5, &[7, 8]);
        a.finish(&spec, forged).await;
        // 3. Node a presents node b's receipt as its own.
        a.link.send(&NodeMessage::Receipts { receipts: vec![receipt_b.clone()] }).await.unwrap();
        // 4. Node a confirms node b's task in b's block, and sends a confirmation signed by b.
        a.link.send(&a.confirm(&a.id, block_b, &[spec_b.id.0])).await.unwrap();
        a.link.send(&a.confirm(&b.id, block_b, &[spec_b.id.0])).await.unwrap();
        // Let a few blocks pass so anything accepted would have been committed.
        a.idle(&mut [&mut b], Duration::from_millis(1500)).await;
        assert_eq!(books(&cluster), honest, "forged submissions");
        assert!(!recorded_tasks(&cluster).contains(&spec.id.0), "the task with a forged receipt is not on the books");
        let log = cluster.server.log_text();
        assert!(log.contains("the node's receipt was refused: "), "{log}");
        assert!(log.contains("receipt refused"), "{log}");
        // Node a was never told about block b: its confirmations of it are not even checked.
        assert!(log.contains("confirmation of a block not announced to the node"), "{log}");
    });
}

/// Runs `ludus --config <the cluster's> ARGS`: (success, stdout, stderr).
fn cli(cluster: &Cluster, args: &[&str]) -> (bool, String, String) {
    let cfg = cluster.config.to_str().unwrap();
    let out = std::process::Command::new(super::cluster::BIN).args(["--config", cfg]).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn games_are_managed_from_the_cli_with_clear_errors() {
    let mut cluster = Cluster::start("");
    cluster.add_node(&["--fake-engine", "2"]);
    cluster.wait_nodes("fake", 1);
    let ludus = |args: &[&str]| cli(&cluster, args);
    let (ok, _, err) = ludus(&["games", "add", "testgame"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = ludus(&["games", "add", "no spaces!"]);
    assert!(!ok && err.contains("invalid game name"), "{err}");
    let (ok, _, err) = ludus(&["games", "suspend", "ghost"]);
    assert!(!ok && err.contains("no game named `ghost`"), "{err}");
    let (ok, list, _) = ludus(&["games", "list"]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["name"], "testgame");
    assert_eq!(list[0]["status"], "active");
    // Suspension reaches the gateway within its cache time, with the reason; resume undoes it.
    let (ok, _, err) = ludus(&["games", "suspend", "testgame", "--reason", "escrow empty"]);
    assert!(ok, "{err}");
    let body = r#"{"model": "fake", "messages": [{"role": "user", "content": "hi"}]}"#;
    wait_for("the suspension to apply", Duration::from_secs(10), || {
        cluster.post("/v1/chat/completions", body).status == 403
    });
    let r = cluster.post("/v1/chat/completions", body);
    assert_eq!(r.json()["error"]["code"], "game_suspended");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("escrow empty"), "{}", r.body);
    assert!(ludus(&["games", "resume", "testgame"]).0);
    wait_for("the game to be served again", Duration::from_secs(10), || {
        cluster.post("/v1/chat/completions", body).status == 200
    });
    // A key of a new game works at once (no restart); a bad usage window is a 400.
    let (ok, key, _) = ludus(&["games", "add", "second"]);
    assert!(ok);
    assert_eq!(
        super::cluster::post_with(&cluster.addr, "/v1/chat/completions", Some(key.trim()), body.as_bytes()).status,
        200
    );
    let r = super::cluster::raw(
        &cluster.addr,
        format!(
            "GET /v1/usage?days=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
            cluster.key
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    cluster.nodes.clear();
}

/// A game's key is rotated and a leaked one revoked from the command line, without a
/// restart: a second key works at once, the revoked one is refused within the servers' key
/// cache time while the other keeps working, and the listing names keys by id, never shows
/// one. Bad names of a key are refused with the reason, and a key is revoked only within
/// its own game.
#[test]
fn a_games_key_is_rotated_and_a_leaked_one_revoked_from_the_cli() {
    let mut cluster = Cluster::start("");
    cluster.add_node(&["--fake-engine", "2"]);
    cluster.wait_nodes("fake", 1);
    let ludus = |args: &[&str]| {
        let (ok, out, err) = cli(&cluster, args);
        (ok, out.trim().to_string(), err)
    };
    let body = r#"{"model": "fake", "messages": [{"role": "user", "content": "hi"}]}"#;
    let ask = |key: &str| super::cluster::post_with(&cluster.addr, "/v1/chat/completions", Some(key), body.as_bytes());
    let old = cluster.key.clone();
    let old_id = ludus::ledger::hash_key(&old)[..16].to_string();

    let (ok, new, err) = ludus(&["games", "add-key", "testgame", "--rpm", "120"]);
    assert!(ok && new.starts_with("ludus-"), "{err}");
    assert_eq!(ask(&new).status, 200, "a new key works at once");
    let (ok, listed, err) = ludus(&["games", "keys", "testgame"]);
    assert!(ok, "{err}");
    assert!(!listed.contains(&old) && !listed.contains(&new), "a listing never shows a key: {listed}");
    let keys: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(keys[0]["id"], old_id.as_str());
    assert_eq!(keys[1]["requests_per_minute"], 120);
    assert!(keys[0]["revoked_at"].is_null() && keys[1]["revoked_at"].is_null(), "{listed}");

    // Bad names, another game's key and unknown games are refused, and revoke nothing.
    let (ok, _, err) = ludus(&["games", "revoke-key", "testgame", "abc"]);
    assert!(!ok && err.contains("names no key"), "{err}");
    let (ok, _, err) = ludus(&["games", "revoke-key", "testgame", "0000000000"]);
    assert!(!ok && err.contains("has no key with id 0000000000"), "{err}");
    let (ok, other, err) = ludus(&["games", "add", "othergame"]);
    assert!(ok, "{err}");
    let (ok, _, err) = ludus(&["games", "revoke-key", "testgame", &other]);
    assert!(!ok && err.contains("has no key with id"), "only within its game: {err}");
    let (ok, _, err) = ludus(&["games", "add-key", "ghost"]);
    assert!(!ok && err.contains("no game named `ghost`"), "{err}");
    let (ok, _, err) = ludus(&["games", "add-key", "ludus-quality-checks"]);
    assert!(!ok && err.contains("internal game"), "{err}");
    assert_eq!(ask(&other).status, 200);

    // The leaked key, revoked by 8 digits of its id: refused within seconds; the new one
    // serves on.
    let (ok, _, err) = ludus(&["games", "revoke-key", "testgame", &old_id[..8]]);
    assert!(ok && err.contains(&format!("revoked key {old_id}")) && err.contains("1 active key(s) left"), "{err}");
    wait_for("the revoked key to be refused", Duration::from_secs(10), || ask(&old).status == 401);
    assert_eq!(ask(&new).status, 200);
    let (ok, _, err) = ludus(&["games", "revoke-key", "testgame", &old]);
    assert!(!ok && err.contains("revoked already"), "{err}");
    let keys: serde_json::Value = serde_json::from_str(&ludus(&["games", "keys", "testgame"]).1).unwrap();
    assert!(keys[0]["revoked_at"].as_str().is_some_and(|at| at.ends_with('Z')), "{keys}");
    // The last key revoked (by the key itself): the game has none, and is told so.
    let (ok, _, err) = ludus(&["games", "revoke-key", "testgame", &new]);
    assert!(ok && err.contains("no key left"), "{err}");
    wait_for("the last key to be refused", Duration::from_secs(10), || ask(&new).status == 401);
    let list: serde_json::Value = serde_json::from_str(&ludus(&["games", "list"]).1).unwrap();
    assert_eq!(list[0]["keys"], 0, "{list}");
    cluster.nodes.clear();
}

/// A verdict and its receipt's block are written by different transactions; when both are
/// in flight at once, neither may miss the other (the verdict must land on the receipt:
/// a failed one makes it unpayable).
#[test]
fn a_verdict_racing_its_receipts_block_still_lands_on_the_receipt() {
    let store = super::database::open(&super::database::fresh_database());
    let (game, _) = block_on(store.add_game("racer", 1000, 1_000_000)).unwrap();
    let node = Identity::generate().address.to_string();
    const TASKS: u64 = 200;
    block_on(async {
        let runtime = tokio::runtime::Handle::current();
        let mut writers = Vec::new();
        for task in 1..=TASKS {
            let receipt = super::database::small_receipt(task, game, &node);
            let (s1, s2, n) = (store.clone(), store.clone(), node.clone());
            writers.push(runtime.spawn(async move { s1.commit_block(&[receipt], "0xee").await.map(|_| ()) }));
            writers.push(runtime.spawn(async move {
                let outcome = if task % 2 == 0 { Outcome::Verified } else { Outcome::Failed };
                s2.record_verification(task, &n, outcome, "").await.map(|_| ())
            }));
        }
        for w in writers {
            w.await.unwrap().unwrap();
        }
    });
    let unmarked = numbers(&store, "SELECT count(*) FROM receipts WHERE verification = 'unchecked'");
    let failed = numbers(&store, "SELECT count(*) FROM receipts WHERE verification = 'failed'");
    assert_eq!(unmarked, vec![0], "verdicts lost in the race");
    assert_eq!(failed, vec![TASKS as i64 / 2]);
}

/// A check that could not run (a verifier error, a reference it cannot load) used to be
/// booked as verified. Now it is never paid, costs the node nothing, and gives way to the
/// first real verdict; a verdict for another node's task changes nothing.
#[test]
fn a_check_that_could_not_run_is_never_paid_and_gives_way_to_a_real_verdict() {
    let store = super::database::open(&super::database::fresh_database());
    let (game, _) = block_on(store.add_game("unverifiable", 1000, 1_000_000)).unwrap();
    let node = Identity::generate().address.to_string();
    let other = Identity::generate().address.to_string();
    let receipts: Vec<_> = (1..=3).map(|t| super::database::small_receipt(t, game, &node)).collect();
    block_on(store.commit_block(&receipts, "0xee")).unwrap();
    let reputation = block_on(async {
        store.record_verification(1, &node, Outcome::Unverifiable, "verifier error").await.unwrap();
        store.record_verification(2, &node, Outcome::Verified, "").await.unwrap();
        store.record_verification(2, &node, Outcome::Failed, "a second verdict").await.unwrap();
        store.record_verification(3, &node, Outcome::Unverifiable, "verifier error").await.unwrap();
        store.record_verification(3, &other, Outcome::Failed, "another node's verdict").await.unwrap();
        store.record_verification(3, &node, Outcome::Verified, "checked later").await.unwrap()
    });
    let state = |t: u64| {
        block_on(async {
            let conn = store.conn().await.unwrap();
            conn.query_one("SELECT verification FROM receipts WHERE task_id = $1", &[&(t as i64)])
                .await
                .unwrap()
                .get::<_, String>(0)
        })
    };
    assert_eq!((state(1), state(2), state(3)), ("unverifiable".into(), "verified".into(), "verified".into()));
    // Two verified tasks at 5 units each are owed; the unverifiable one is not.
    let balances = block_on(store.game_balances(0)).unwrap();
    let owed = balances.iter().find(|b| b.game_id == game).map(|b| b.owed.0);
    assert_eq!(owed, Some(10));
    assert_eq!(reputation, 10_000, "no penalty for a check that could not run");
}

/// A task the server picked for a proof check is paid only with its `verified` verdict,
/// whether that lands before or after its block; on its receipt alone (its verdict lost in
/// a crash, or refused by the database) it never is. An unpicked task is paid as before.
#[test]
fn a_sampled_receipt_is_paid_only_once_verified() {
    let store = super::database::open(&super::database::fresh_database());
    let (game, _) = block_on(store.add_game("sampled", 1000, 1_000_000)).unwrap();
    block_on(store.set_game_wallet("sampled", &format!("0x{:040x}", 0x5a))).unwrap();
    let node = Identity::generate().address.to_string();
    let receipt = |task: u64, sampled: bool| ludus::ledger::Receipt {
        sampled,
        ..super::database::small_receipt(task, game, &node)
    };
    block_on(async {
        // Task 4's verdict lands before its receipt's block.
        store.record_verification(4, &node, Outcome::Verified, "").await.unwrap();
        let receipts = [receipt(1, true), receipt(2, true), receipt(3, false), receipt(4, true), receipt(5, true)];
        store.commit_block(&receipts, "0xee").await.unwrap();
        store.record_verification(2, &node, Outcome::Verified, "").await.unwrap();
        store.record_verification(5, &node, Outcome::Failed, "a wrong token").await.unwrap();
        store.conn().await.unwrap().batch_execute("UPDATE receipts SET confirmation = 'confirmed'").await.unwrap();
    });
    let states: Vec<String> = block_on(async {
        let conn = store.conn().await.unwrap();
        let rows = conn.query("SELECT verification FROM receipts ORDER BY task_id", &[]).await.unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    });
    assert_eq!(states, ["sampled", "verified", "unchecked", "verified", "failed"]);
    let budgets = [(game, ludus::ledger::Units(u128::MAX / 4))];
    let epoch = block_on(store.plan_epoch("0x00000000000000000000000000000000000000e1", &budgets, 9_000, u64::MAX))
        .unwrap()
        .expect("an epoch");
    assert_eq!(epoch.task_count, 3);
    let paid: Vec<i64> = block_on(async {
        let conn = store.conn().await.unwrap();
        let rows =
            conn.query("SELECT task_id FROM receipts WHERE epoch IS NOT NULL ORDER BY task_id", &[]).await.unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    });
    assert_eq!(paid, [2, 3, 4], "the sampled task without a verdict waits; the failed one never pays");
}

/// A settlement leader that lost its lock (a database restart) while another server
/// discarded and planned the epoch again cannot store its transaction, signed for the old
/// plan, over the new one (the chain's root would differ from the ledger's payouts). A
/// free (zero-priced) task of a game without a wallet never enters a plan: its charge row
/// (a NULL wallet) made every later plan fail.
#[test]
fn a_post_signed_for_a_replaced_plan_is_not_stored_and_free_tasks_need_a_wallet() {
    let store = super::database::open(&super::database::fresh_database());
    let (game, _) = block_on(store.add_game("payer", 1000, 1_000_000)).unwrap();
    block_on(store.set_game_wallet("payer", &format!("0x{:040x}", 0x5b))).unwrap();
    let (walletless, _) = block_on(store.add_game("walletless", 1000, 1_000_000)).unwrap();
    let node = Identity::generate().address.to_string();
    let free = ludus::ledger::Receipt {
        price: ludus::ledger::Units(0),
        ..super::database::small_receipt(3, walletless, &node)
    };
    block_on(async {
        let receipts = [super::database::small_receipt(1, game, &node), free];
        store.commit_block(&receipts, "0xee").await.unwrap();
        store.conn().await.unwrap().batch_execute("UPDATE receipts SET confirmation = 'confirmed'").await.unwrap();
    });
    let contract = "0x00000000000000000000000000000000000000e1";
    let budgets = [(game, ludus::ledger::Units(1_000)), (walletless, ludus::ledger::Units(0))];
    let old = block_on(store.plan_epoch(contract, &budgets, 9_000, u64::MAX)).unwrap().expect("an epoch");
    assert_eq!(old.task_count, 1, "the free task of the game without a wallet waits");
    // Another server discards the plan (it would revert) and plans again over one more task.
    block_on(async {
        store.discard_planned_epoch(old.number).await.unwrap();
        store.commit_block(&[super::database::small_receipt(2, game, &node)], "0xef").await.unwrap();
        store.conn().await.unwrap().batch_execute("UPDATE receipts SET confirmation = 'confirmed'").await.unwrap();
    });
    let new = block_on(store.plan_epoch(contract, &budgets, 9_000, u64::MAX)).unwrap().expect("an epoch");
    assert_eq!((new.number, new.task_count), (old.number, 2));
    assert_ne!(new.payout_root, old.payout_root);
    let sent = ludus::books::SentTx { hash: [7; 32], raw: vec![1, 2, 3], nonce: 0 };
    let stale = block_on(store.mark_epoch_sent(&old, &sent));
    assert!(stale.is_err(), "a transaction signed for the replaced plan was stored");
    block_on(store.mark_epoch_sent(&new, &sent)).expect("the transaction of the plan the ledger holds");
}

/// A verified task adds its near-ties to its node's steering record once, whatever is
/// re-sent, and so do tokens it delivered before failing a task, once verified; a failed or
/// another node's task adds nothing; a flag is given once.
#[test]
fn a_nodes_near_tie_record_grows_once_per_verified_task_and_is_flagged_once() {
    use ludus::ledger::steering::{Checked, ForgivenRow, TaskSteering};
    let store = super::database::open(&super::database::fresh_database());
    let node = Identity::generate().address.to_string();
    let other = Identity::generate().address.to_string();
    let row = |i: i32, passed_end: bool| ForgivenRow {
        token_index: i,
        gap: 1.5,
        rank: 1,
        reference_token: 2,
        node_token: 3,
        passed_end,
        took_end: false,
    };
    let task = TaskSteering {
        format: "int8".into(),
        tokens: 40,
        wide: 2,
        ends_passed: 1,
        expected_wide: 0.3,
        expected_ends_passed: 0.1,
        tokens_past_end: 12,
        forgiven: vec![row(3, false), row(9, true)],
    };
    let (sums, delivered) = block_on(async {
        store.record_verification(1, &node, Outcome::Verified, "").await.unwrap();
        store.record_verification(2, &node, Outcome::Failed, "a mismatch").await.unwrap();
        let first = store.record_steering(1, &node, &task, Checked::Proof).await.unwrap();
        assert_eq!(store.record_steering(1, &node, &task, Checked::Proof).await.unwrap(), None, "the same task again");
        assert_eq!(store.record_steering(2, &node, &task, Checked::Proof).await.unwrap(), None, "a failed task");
        assert_eq!(store.record_steering(1, &other, &task, Checked::Proof).await.unwrap(), None, "another node's task");
        // Tokens delivered before a failure, verified without a proof: added once too.
        store.record_delivery_check(5, &node, 40, Outcome::Verified, "").await.unwrap();
        store.record_delivery_check(6, &node, 40, Outcome::Failed, "no format explains them").await.unwrap();
        assert_eq!(store.record_steering(5, &node, &task, Checked::Proof).await.unwrap(), None, "no proof verdict");
        let delivered = store.record_steering(5, &node, &task, Checked::Delivered).await.unwrap();
        assert_eq!(store.record_steering(5, &node, &task, Checked::Delivered).await.unwrap(), None, "again");
        assert_eq!(store.record_steering(6, &node, &task, Checked::Delivered).await.unwrap(), None, "a failed check");
        (first.unwrap(), delivered.expect("a verified delivery check adds"))
    });
    assert_eq!((sums.tasks, sums.tokens, sums.wide, sums.ends_passed), (1, 40, 2, 1));
    assert_eq!((delivered.tasks, delivered.tokens, delivered.wide, delivered.ends_passed), (2, 80, 4, 2));
    // The record as it stands, for a verdict written again (judged again, flagged once).
    assert_eq!(block_on(store.node_steering(&node)).unwrap(), Some(delivered));
    assert_eq!(block_on(store.node_steering("0x0000000000000000000000000000000000000001")).unwrap(), None);
    assert!((sums.expected_wide - 0.3).abs() < 1e-9 && (sums.expected_ends_passed - 0.1).abs() < 1e-9);
    assert!(!sums.flagged);
    let rows = block_on(async {
        let conn = store.conn().await.unwrap();
        conn.query(
            "SELECT token_index, passed_end FROM forgiven_deviations WHERE node_address = $1 AND task_id = 1 ORDER BY 1",
            &[&node],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, bool>(1)))
        .collect::<Vec<_>>()
    });
    assert_eq!(rows, vec![(3, false), (9, true)]);
    // Flagged once: quarantined, a failure's reputation taken (on top of the failed task's
    // and the failed delivery check's).
    let first = block_on(store.flag_steering(&node, "steering: test")).unwrap();
    assert_eq!(first, Some(10_000 - 3 * ludus::ledger::verifications::FAILURE_PENALTY_BPS));
    assert_eq!(block_on(store.flag_steering(&node, "steering: again")).unwrap(), None);
    assert_eq!(block_on(store.steering_flag(&node)).unwrap().as_deref(), Some("steering: test"));
    assert_eq!(block_on(store.steering_flag(&other)).unwrap(), None);
}

/// A checkout waits for a free connection only so long: with every connection held (a
/// stalled database), callers get a clear error to retry instead of waiting without end;
/// one freed is taken again.
#[test]
fn a_checkout_with_every_connection_held_fails_clearly_after_its_wait() {
    use ludus::ledger::pool::Pool;
    let url = super::database::fresh_database();
    let pool = Pool::waiting_at_most(&url, 1, Duration::from_millis(300));
    block_on(async {
        let held = pool.get().await.expect("the one connection");
        let started = std::time::Instant::now();
        let refused = pool.get().await.err().expect("no connection is free").to_string();
        assert!(started.elapsed() >= Duration::from_millis(300), "it waited its time");
        assert!(
            refused.contains("no database connection free within") && refused.contains("all 1 are held"),
            "{refused}"
        );
        drop(held);
        let again = pool.get().await.expect("the freed connection");
        again.simple_query("SELECT 1").await.unwrap();
    });
}

/// A statement that runs past its bound (a lock a stalled session holds, a runaway query)
/// fails with Postgres' own reason and frees its connection: it used to hold it, and its
/// caller, without end. A migration on the same pool is not bounded, and the bound comes
/// back after it.
#[test]
fn a_statement_past_its_bound_fails_clearly_and_frees_its_connection() {
    use ludus::ledger::pool::Pool;
    let url = super::database::fresh_database();
    let pool = Pool::bounded(&url, 1, Duration::from_secs(5), Duration::from_millis(300));
    block_on(async {
        let mut conn = pool.get().await.unwrap();
        ludus::ledger::migrate::migrate(&mut conn).await.expect("migrations run unbounded");
        let started = std::time::Instant::now();
        let e = conn.simple_query("SELECT pg_sleep(10)").await.expect_err("cancelled at its bound");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let e = ludus::ledger::LedgerError::from(e).to_string();
        assert!(e.contains("statement timeout"), "{e}");
        drop(conn);
        let mut conn = pool.get().await.expect("the connection is free again");
        conn.simple_query("SELECT 1").await.unwrap();
        // A migration that fails before its work (its lock not taken in time, here) gives
        // its connection back bounded all the same.
        let holder = Pool::bounded(&url, 1, Duration::from_secs(5), Duration::from_secs(60));
        let held = holder.get().await.unwrap();
        held.execute("SELECT pg_advisory_lock($1)", &[&ludus::ledger::migrate::MIGRATION_LOCK]).await.unwrap();
        conn.batch_execute("SET lock_timeout = 200").await.unwrap();
        ludus::ledger::migrate::migrate(&mut conn).await.expect_err("the lock is held elsewhere");
        let started = std::time::Instant::now();
        conn.simple_query("SELECT pg_sleep(10)").await.expect_err("bounded again");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "unbounded after a failed migration: {:?}",
            started.elapsed()
        );
    });
}
