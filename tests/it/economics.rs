//! The money of a mixed run, end to end (issue "trust and money"): honest nodes (a real
//! `ludus node` process and scripted ones over the real protocol), a rogue whose receipts
//! lie, a rogue that fails mid-task (its tasks fail over), games that hang up mid-stream, and
//! one kill -9 of the server with receipts not yet committed. Then an epoch is settled from
//! the books, and:
//!
//! - every game is charged the price of exactly the tokens it was delivered that a node is
//!   paid for (a failed node's tokens before a failover and an answer whose receipt was
//!   refused cost the game nothing: they are the network's loss, never the operator's gain);
//! - every node is paid its share of the tokens it produced, and the rogues nothing;
//! - Σ charges = Σ payouts + the operator's fee, to the unit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ludus::crypto::identity::{Address, Identity};
use ludus::crypto::merkle;
use ludus::ledger::Units;
use ludus::node::link::{join, Announce, Link};
use ludus::node::LinkError;
use ludus::protocol::receipt::confirmation_message;
use ludus::protocol::{FinishReason, NodeLoad, NodeMessage, ServerMessage, SignedReceipt, TaskSpec, TaskUsage};

use super::cluster::{post_with, Cluster, SseStream};
use super::database::{block_on, numbers};

/// Prices per 1,000 tokens: odd, so that per-receipt rounding shows.
const PROMPT_PER_1K: u128 = 1_000_003;
const COMPLETION_PER_1K: u128 = 2_000_011;
/// Nodes' share of what their tasks were charged, in basis points.
const NODE_SHARE_BPS: u128 = 8_000;
/// The prompt tokens scripted nodes report (the server bounds them; it holds no tokenizer
/// of the scripted model).
const PROMPT_TOKENS: u32 = 5;
/// Tokens a scripted node produces at most, and its pace.
const SCRIPTED_TOKENS: usize = 12;
const TOKEN_PACE: Duration = Duration::from_millis(60);

/// What one task's price is: the ledger's rule (rounded up to a whole unit per receipt).
fn price(prompt: u64, completion: u64) -> u128 {
    (PROMPT_PER_1K * prompt as u128 + COMPLETION_PER_1K * completion as u128).div_ceil(1000)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Honest,
    /// Claims 1,000 more tokens than it sent in every receipt.
    Liar,
    /// Sends two tokens, reports a node failure, and restarts (reconnects under the same
    /// key): a crashing node. Restarting keeps it in rotation: the distributor shuns a
    /// session that failed (its cost rises twenty-fold and falls only as it completes
    /// tasks), so a quitter that stayed connected got tasks only until its first failure
    /// in each server's life, and whether one failed over to an honest node was luck.
    Quitter,
}

/// Tokens one node produced for one task, as the node itself knows them.
#[derive(Debug, Clone)]
struct Produced {
    node: Address,
    task: u64,
    prompt: u64,
    /// Tokens of the answer it was handed (a failover continuation's), then its own.
    prefix: u64,
    own: u64,
    /// Whether the node holds a receipt the server should pay.
    paid: bool,
}

#[derive(Default)]
struct Tally {
    produced: Vec<Produced>,
    /// Hang-ups the server reported: task → tokens delivered to the game.
    cancelled: BTreeMap<u64, usize>,
}

/// A node driven by the test over the real protocol; it reconnects when the server dies and
/// re-sends its unconfirmed receipts, like `ludus node`.
struct Scripted {
    role: Role,
    id: Identity,
    tally: Arc<Mutex<Tally>>,
    unconfirmed: BTreeMap<u64, SignedReceipt>,
    /// Blocks announced and confirmed, not yet acknowledged: block → its tasks.
    announced: HashMap<u64, Vec<u64>>,
    queue: VecDeque<TaskSpec>,
    cancels: HashMap<u64, Option<u32>>,
    last_heartbeat: Instant,
}

impl Scripted {
    async fn run(mut self, addr: String, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Relaxed) {
            let announce = Announce { models: vec!["econ".into()], capacity: 4, device: "cpu".into(), bundles: vec![] };
            let Ok(mut link) = join(&format!("ws://{addr}/ws/node"), &self.id, announce, None).await else {
                actix_rt::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            self.queue.clear();
            self.cancels.clear();
            self.announced.clear();
            let _ = self.serve(&mut link, &stop).await;
        }
    }

    async fn serve(&mut self, link: &mut Link, stop: &AtomicBool) -> Result<(), LinkError> {
        self.heartbeat(link).await?;
        if !self.unconfirmed.is_empty() {
            let receipts = self.unconfirmed.values().cloned().collect();
            link.send(&NodeMessage::Receipts { receipts }).await?;
        }
        while !stop.load(Ordering::Relaxed) {
            match self.queue.pop_front() {
                Some(spec) => self.task(link, spec).await?,
                None => self.pause(link, Duration::from_millis(50)).await?,
            }
        }
        Ok(())
    }

    async fn heartbeat(&mut self, link: &mut Link) -> Result<(), LinkError> {
        self.last_heartbeat = Instant::now();
        link.send(&NodeMessage::Heartbeat(NodeLoad::default())).await
    }

    /// Waits `time`, heartbeating and handling what arrives.
    async fn pause(&mut self, link: &mut Link, time: Duration) -> Result<(), LinkError> {
        let until = Instant::now() + time;
        loop {
            if self.last_heartbeat.elapsed() > Duration::from_millis(150) {
                self.heartbeat(link).await?;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match link.recv(left).await {
                Ok(message) => self.absorb(link, message).await?,
                Err(LinkError::Timeout) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    async fn absorb(&mut self, link: &mut Link, message: ServerMessage) -> Result<(), LinkError> {
        match message {
            ServerMessage::Task(spec) => self.queue.push_back(*spec),
            ServerMessage::Cancel { id, delivered } => {
                self.cancels.insert(id.0, delivered);
            }
            ServerMessage::Recorded { block, tasks } => {
                let tasks: Vec<u64> = tasks.iter().map(|t| t.0).collect();
                let root = merkle::task_root(&tasks);
                let count = tasks.len() as u32;
                let signature = hex::encode(self.id.sign(&confirmation_message(block, &root, count, &[])));
                let confirm =
                    NodeMessage::Confirm { block, root: hex::encode(root), count, disputed: vec![], signature };
                link.send(&confirm).await?;
                self.announced.insert(block, tasks);
            }
            ServerMessage::Confirmed { block, .. } => {
                for task in self.announced.remove(&block).unwrap_or_default() {
                    self.unconfirmed.remove(&task);
                }
            }
            ServerMessage::Goodbye { reason } => return Err(LinkError::Refused(reason)),
            _ => {}
        }
        Ok(())
    }

    fn tally(&self, task: u64, prefix: usize, tokens: usize, paid: bool) {
        let own = (tokens - prefix) as u64;
        let produced =
            Produced { node: self.id.address, task, prompt: PROMPT_TOKENS as u64, prefix: prefix as u64, own, paid };
        self.tally.lock().unwrap().produced.push(produced);
    }

    async fn task(&mut self, link: &mut Link, spec: TaskSpec) -> Result<(), LinkError> {
        let id = spec.id;
        let prefix = spec.prefix.len();
        let mut tokens = spec.prefix.clone();
        let target = spec.max_tokens.min(SCRIPTED_TOKENS);
        let last = if self.role == Role::Quitter { (prefix + 2).min(target) } else { target };
        while tokens.len() < last {
            let index = tokens.len();
            let token = 100 + index as u32;
            link.send(&NodeMessage::Token { id, index, token, text: format!("t{index} "), logprobs: None }).await?;
            tokens.push(token);
            self.pause(link, TOKEN_PACE).await?;
            if let Some(delivered) = self.cancels.remove(&id.0) {
                // The game left. An honest node signs for exactly what the server says it
                // delivered (never more than it produced).
                let delivered = delivered.map(|k| k as usize).filter(|&k| k > prefix && k <= tokens.len());
                if let (Some(k), Role::Honest) = (delivered, self.role) {
                    let receipt = SignedReceipt::sign(&self.id, spec.ticket.clone(), PROMPT_TOKENS, &tokens[..k]);
                    self.tally(id.0, prefix, k, true);
                    self.tally.lock().unwrap().cancelled.insert(id.0, k);
                    self.unconfirmed.insert(id.0, receipt.clone());
                    link.send(&NodeMessage::Receipts { receipts: vec![receipt] }).await?;
                } else {
                    self.tally(id.0, prefix, delivered.unwrap_or(prefix), false);
                }
                return Ok(());
            }
        }
        let usage = TaskUsage { prompt_tokens: PROMPT_TOKENS as usize, completion_tokens: tokens.len() };
        let finish_reason = if tokens.len() == spec.max_tokens { FinishReason::Length } else { FinishReason::Stop };
        let receipt = match self.role {
            Role::Quitter => {
                self.tally(id.0, prefix, tokens.len(), false);
                let failed =
                    NodeMessage::Failed { id, failure: ludus::protocol::TaskFailure::Node("scripted failure".into()) };
                link.send(&failed).await?;
                return Err(LinkError::Closed("the quitter restarts".into()));
            }
            Role::Liar => {
                self.tally(id.0, prefix, tokens.len(), false);
                let claimed: Vec<u32> = tokens.iter().copied().chain(std::iter::repeat_n(7, 1000)).collect();
                SignedReceipt::sign(&self.id, spec.ticket.clone(), PROMPT_TOKENS, &claimed)
            }
            Role::Honest => {
                self.tally(id.0, prefix, tokens.len(), true);
                let receipt = SignedReceipt::sign(&self.id, spec.ticket.clone(), PROMPT_TOKENS, &tokens);
                self.unconfirmed.insert(id.0, receipt.clone());
                receipt
            }
        };
        let done = NodeMessage::Done { id, finish_reason, usage, tail: String::new(), receipt, proof: None };
        link.send(&done).await
    }
}

/// What a game saw of one request.
#[derive(Debug)]
struct Seen {
    game: String,
    task: u64,
    /// The usage of a whole answer; None when the game hung up after `chunks` chunks.
    usage: Option<(u64, u64)>,
    chunks: usize,
}

fn task_of(id: &str) -> u64 {
    u64::from_str_radix(id.strip_prefix("chatcmpl-").expect("a chat completion id"), 16).unwrap()
}

/// One game's requests: whole answers from both models, and streams it leaves after the
/// first chunk.
fn play(addr: &str, game: &str, key: &str, rounds: std::ops::Range<usize>) -> Vec<Seen> {
    let mut seen = Vec::new();
    for round in rounds {
        let (model, max_tokens) = if round % 3 == 2 { ("fake", 4) } else { ("econ", 6) };
        if round % 3 == 1 {
            let body = format!(
                r#"{{"model": "econ", "max_tokens": {SCRIPTED_TOKENS}, "stream": true, "messages": [{{"role": "user", "content": "hang up on me"}}]}}"#
            );
            let mut stream = SseStream::open(addr, key, &body);
            assert_eq!(stream.status, 200, "{game}: a stream was refused");
            let first: serde_json::Value = serde_json::from_str(&stream.next_data().expect("a first chunk")).unwrap();
            seen.push(Seen { game: game.into(), task: task_of(first["id"].as_str().unwrap()), usage: None, chunks: 1 });
            // Dropping the stream hangs up mid-answer.
            continue;
        }
        let body = format!(
            r#"{{"model": "{model}", "max_tokens": {max_tokens}, "messages": [{{"role": "user", "content": "round {round}"}}]}}"#
        );
        let response = post_with(addr, "/v1/chat/completions", Some(key), body.as_bytes());
        assert_eq!(response.status, 200, "{game}: {}", response.body);
        let json = response.json();
        let usage =
            (json["usage"]["prompt_tokens"].as_u64().unwrap(), json["usage"]["completion_tokens"].as_u64().unwrap());
        seen.push(Seen {
            game: game.into(),
            task: task_of(json["id"].as_str().unwrap()),
            usage: Some(usage),
            chunks: 0,
        });
    }
    seen
}

/// Both games play `rounds` each, at once.
fn phase(addr: &str, games: &[(String, String)], rounds: usize) -> Vec<Seen> {
    let players: Vec<_> = games
        .iter()
        .cloned()
        .map(|(game, key)| {
            let addr = addr.to_string();
            std::thread::spawn(move || play(&addr, &game, &key, 0..rounds))
        })
        .collect();
    players.into_iter().flat_map(|p| p.join().unwrap()).collect()
}

fn receipt_count(cluster: &Cluster, filter: &str) -> i64 {
    numbers(&cluster.store(), &format!("SELECT count(*) FROM receipts {filter}"))[0]
}

#[test]
fn a_mixed_run_charges_games_and_pays_nodes_exactly_what_the_server_counted() {
    let prices =
        format!("[prices]\nprompt_per_1k = \"{PROMPT_PER_1K}\"\ncompletion_per_1k = \"{COMPLETION_PER_1K}\"\n");
    // Long blocks: the kill lands with receipts buffered and not committed.
    let mut cluster = Cluster::start(&format!("[clock]\nblock_time_ms = 4000\n{prices}"));
    let cfg = cluster.config.to_str().unwrap().to_string();
    let out = crate::cluster::ludus().args(["--config", &cfg, "games", "add", "second-game"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let games = vec![
        ("testgame".to_string(), cluster.key.clone()),
        ("second-game".to_string(), String::from_utf8(out.stdout).unwrap().trim().to_string()),
    ];
    let store = cluster.store();
    for (i, (game, _)) in games.iter().enumerate() {
        block_on(store.set_game_wallet(game, &format!("0x{:040x}", 0xa11ce + i))).unwrap();
    }

    // A real node process, and four scripted ones on their own model.
    cluster.add_node(&["--fake-engine", "4:5"]);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let roles = [Role::Honest, Role::Honest, Role::Liar, Role::Quitter];
    let identities: Vec<Identity> = roles.iter().map(|_| Identity::generate()).collect();
    let rogues: Vec<Address> = identities[2..].iter().map(|i| i.address).collect();
    let scripted = {
        let (addr, tally, stop) = (cluster.addr.clone(), tally.clone(), stop.clone());
        std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let nodes: Vec<_> = roles
                    .into_iter()
                    .zip(identities)
                    .map(|(role, id)| {
                        let node = Scripted {
                            role,
                            id,
                            tally: tally.clone(),
                            unconfirmed: BTreeMap::new(),
                            announced: HashMap::new(),
                            queue: VecDeque::new(),
                            cancels: HashMap::new(),
                            last_heartbeat: Instant::now(),
                        };
                        actix_rt::spawn(node.run(addr.clone(), stop.clone()))
                    })
                    .collect();
                for node in nodes {
                    let _ = node.await;
                }
            })
        })
    };
    cluster.wait_nodes("fake", 1);
    cluster.wait_nodes("econ", 4);
    let real_node = Identity::load(&cluster.dir.path().join("node0.key")).unwrap().address;

    // Before the kill: the last answers are still in the Registry's buffer when it lands.
    let mut seen = phase(&cluster.addr, &games, 12);
    settle(&tally);
    // The kill lands right after an answer from the real node: its receipt is still in the
    // Registry's buffer (the next block is seconds away).
    seen.extend(play(&cluster.addr, &games[0].0, &games[0].1, 2..3));
    let on_books_at_kill = receipt_count(&cluster, "");
    cluster.kill_server();
    let real_answers_before_kill = seen.iter().filter(|s| s.usage.is_some() && !is_econ(&tally, s.task)).count();
    let paid_before_kill = tally.lock().unwrap().produced.iter().filter(|p| p.paid).count() + real_answers_before_kill;
    assert!(
        (on_books_at_kill as usize) < paid_before_kill,
        "the kill landed after every receipt was committed; it proves nothing ({on_books_at_kill} on the books)"
    );
    cluster.restart_server();
    cluster.wait_nodes("fake", 1);
    cluster.wait_nodes("econ", 4);
    // Scheduling is random: play on until the run holds every case the books must
    // survive (usually at once). A round is about a second, and the loop stops as soon as
    // it may.
    for _ in 0..30 {
        seen.extend(phase(&cluster.addr, &games, 12));
        settle(&tally);
        if every_case_happened(&tally.lock().unwrap(), &rogues) {
            break;
        }
    }

    // Every receipt a node holds is recorded and confirmed (the dead server's included).
    let real_answers: Vec<&Seen> = seen.iter().filter(|s| s.usage.is_some() && !is_econ(&tally, s.task)).collect();
    let paid_receipts = tally.lock().unwrap().produced.iter().filter(|p| p.paid).count() + real_answers.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while receipt_count(&cluster, "WHERE confirmation = 'confirmed'") as usize != paid_receipts {
        if Instant::now() > deadline {
            let books: Vec<(i64, String, String)> = block_on(async {
                let conn = store.conn().await.unwrap();
                let rows = conn.query("SELECT task_id, node_address, confirmation FROM receipts", &[]).await.unwrap();
                rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
            });
            let held: Vec<(u64, String, u64, bool)> =
                tally.lock().unwrap().produced.iter().map(|p| (p.task, p.node.to_string(), p.own, p.paid)).collect();
            panic!("{paid_receipts} paid receipts expected; the books: {books:?}\nthe nodes: {held:?}\nreal answers: {real_answers:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    scripted.join().unwrap();
    assert_eq!(receipt_count(&cluster, "") as usize, paid_receipts, "a receipt nobody earned is on the books");

    let tally = tally.lock().unwrap();
    let produced: Vec<Produced> = tally.produced.clone();
    // The run held every case the books must survive.
    let unpaid_by = |node: Address| produced.iter().filter(|p| p.node == node && p.own > 0).count();
    assert!(unpaid_by(rogues[0]) > 0, "the liar ran no task");
    assert!(unpaid_by(rogues[1]) > 0, "the quitter ran no task");
    let failovers =
        produced.iter().filter(|p| p.paid && produced.iter().any(|q| q.task == p.task && q.node == rogues[1])).count();
    assert!(failovers > 0, "no task failed over from the quitter to an honest node");
    assert!(!tally.cancelled.is_empty(), "no game hung up mid-answer");

    // What the games saw agrees with what the nodes produced.
    for s in &seen {
        let parts: Vec<&Produced> = produced.iter().filter(|p| p.task == s.task).collect();
        if parts.is_empty() {
            continue; // the real node's task: its usage is the game's own view
        }
        let total: u64 = parts.iter().map(|p| p.own).sum();
        match s.usage {
            Some((prompt, completion)) => {
                // A whole answer is the last node's alone: one a node failed was produced
                // again from its start, never continued from the failed node's tokens.
                let last = parts.last().unwrap();
                assert_eq!(prompt, PROMPT_TOKENS as u64, "task {}: prompt tokens", s.task);
                assert_eq!(last.prefix, 0, "task {}: a whole answer carried a failed node's tokens", s.task);
                assert_eq!(completion, last.own, "task {}: the game got what the last node produced", s.task);
            }
            None => assert!(total as usize >= s.chunks, "task {}: the game read more than was produced", s.task),
        }
    }

    // Expected charges per game and payouts per node, from the nodes' and games' own records.
    let game_of: HashMap<u64, &str> = seen.iter().map(|s| (s.task, s.game.as_str())).collect();
    let mut charge: BTreeMap<&str, u128> = BTreeMap::new();
    let mut earned: BTreeMap<Address, u128> = BTreeMap::new();
    for p in produced.iter().filter(|p| p.paid) {
        let amount = price(p.prompt, p.own);
        *charge.entry(game_of[&p.task]).or_default() += amount;
        *earned.entry(p.node).or_default() += amount;
    }
    for s in &real_answers {
        let (prompt, completion) = s.usage.unwrap();
        let amount = price(prompt, completion);
        *charge.entry(s.game.as_str()).or_default() += amount;
        *earned.entry(real_node).or_default() += amount;
    }
    let payout = |e: u128| e * NODE_SHARE_BPS / 10_000;
    let fee: u128 = earned.values().map(|&e| e - payout(e)).sum();

    // Settle from the books.
    let ids: BTreeMap<String, i64> = block_on(async {
        let conn = store.conn().await.unwrap();
        conn.query("SELECT name, id FROM games", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
    });
    let budgets: Vec<(i64, Units)> = games.iter().map(|(g, _)| (ids[g], Units(u128::MAX / 4))).collect();
    let epoch = block_on(store.plan_epoch(
        "0x00000000000000000000000000000000000000e1",
        &budgets,
        NODE_SHARE_BPS as u32,
        u64::MAX,
    ))
    .unwrap()
    .expect("an epoch to settle");
    assert_eq!(epoch.task_count as usize, paid_receipts, "every paid receipt settled");
    let charged: BTreeMap<String, u128> = block_on(async {
        let conn = store.conn().await.unwrap();
        conn.query(
            "SELECT g.name, c.amount::text FROM charges c JOIN games g ON g.id = c.game_id WHERE c.epoch = $1",
            &[&(epoch.number as i64)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get::<_, String>(1).parse().unwrap()))
        .collect()
    });
    for (game, _) in &games {
        assert_eq!(
            charged.get(game),
            charge.get(game.as_str()),
            "{game}: charged the price of the tokens it was delivered"
        );
    }
    let paid: BTreeMap<String, u128> =
        block_on(store.epoch_payouts(epoch.number)).unwrap().into_iter().map(|(n, a)| (n, a.0)).collect();
    for (node, &e) in &earned {
        assert_eq!(paid.get(&node.to_string()), Some(&payout(e)), "node {node}: its share of the tokens it produced");
    }
    for rogue in &rogues {
        assert!(!paid.contains_key(&rogue.to_string()), "rogue {rogue} was paid");
    }
    let charges: u128 = charged.values().sum();
    let payouts: u128 = paid.values().sum();
    assert_eq!(charges, payouts + fee, "Σ charges = Σ payouts + fee");
    assert_eq!((epoch.charge_total.0, epoch.payout_total.0), (charges, payouts));
    eprintln!(
        "{} requests, {} paid receipts, {} hang-ups; charges {charges} = payouts {payouts} + fee {fee}",
        seen.len(),
        paid_receipts,
        tally.cancelled.len()
    );
}

/// Waits until the scripted nodes are done with every task (the last hang-up's partial
/// receipt is signed a few tokens after the game left).
fn settle(tally: &Mutex<Tally>) {
    let mut last = usize::MAX;
    loop {
        std::thread::sleep(SCRIPTED_TOKENS as u32 * TOKEN_PACE);
        let now = tally.lock().unwrap().produced.len();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Whether the liar and the quitter ran tasks, one of the quitter's tasks was finished by an
/// honest node, and a game's hang-up cancelled a task mid-answer.
fn every_case_happened(tally: &Tally, rogues: &[Address]) -> bool {
    let p = &tally.produced;
    let ran = |node: Address| p.iter().any(|q| q.node == node && q.own > 0);
    let failover = p.iter().any(|q| q.paid && p.iter().any(|r| r.task == q.task && r.node == rogues[1]));
    ran(rogues[0]) && ran(rogues[1]) && failover && !tally.cancelled.is_empty()
}

/// Whether `task` ran on a scripted node (model `econ`).
fn is_econ(tally: &Mutex<Tally>, task: u64) -> bool {
    tally.lock().unwrap().produced.iter().any(|p| p.task == task)
}
