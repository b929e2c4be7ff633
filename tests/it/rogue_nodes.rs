//! Rogue nodes over the real protocol (issue "trust and money"): every number a node sends
//! is bounded before it counts — tokens past `max_tokens`, text no token carries, ids
//! outside the vocabulary — one key holds one session, two processes cannot share a key,
//! and an honest node streaming the tokens it was asked for is never cut as a flood.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ludus::crypto::identity::Identity;
use ludus::protocol::{NodeMessage, ServerMessage};

use super::cluster::{wait_for, Cluster, BIN};
use super::database::numbers;
use super::helpers::smollm2;
use super::registry::{try_chat, try_post_chat, Rogue};

/// The rogue's first task (the game asks in the background), then `lie` with it; returns
/// the reason the server gave when it closed the link.
fn cut_for(cluster: &Cluster, model: &'static str, lie: impl FnOnce(u64, usize) -> Vec<NodeMessage>) -> String {
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let asked = Arc::new(AtomicBool::new(false));
    let game = {
        let asked = asked.clone();
        // The game retries until the rogue has joined (404 before that), then waits for
        // its one answer.
        std::thread::spawn(move || loop {
            if let Some(id) = try_chat(&addr, &key, model) {
                return Some(id);
            }
            if asked.load(Ordering::Relaxed) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        })
    };
    let reason = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, model).await;
        let spec = rogue.task(&mut []).await;
        asked.store(true, Ordering::Relaxed);
        for message in lie(spec.id.0, spec.max_tokens) {
            if rogue.link.send(&message).await.is_err() {
                break;
            }
        }
        let mut reason = String::new();
        while let Ok(m) = rogue.link.recv(Duration::from_secs(2)).await {
            if let ServerMessage::Goodbye { reason: r } = m {
                reason = r;
                break;
            }
        }
        reason
    });
    // The game never gets the rogue's answer (no other node: its request times out).
    assert_eq!(game.join().unwrap(), None, "a rogue's answer reached the game");
    reason
}

fn token(id: u64, index: usize, token: u32, text: &str) -> NodeMessage {
    NodeMessage::Token { id: ludus::protocol::TaskId(id), index, token, text: text.into() }
}

#[test]
fn a_node_sending_tokens_past_max_tokens_is_cut_and_nothing_is_recorded() {
    let cluster = Cluster::start("");
    let reason =
        cut_for(&cluster, "rogue-model", |id, max_tokens| (0..=max_tokens).map(|i| token(id, i, 7, "x")).collect());
    assert!(reason.contains("past max_tokens (4)"), "{reason:?}");
    std::thread::sleep(Duration::from_millis(800)); // two blocks
    assert_eq!(numbers(&cluster.store(), "SELECT count(*) FROM receipts"), vec![0], "nothing billed");
}

#[test]
fn a_node_sending_more_text_than_its_tokens_carry_is_cut() {
    let cluster = Cluster::start("");
    let huge = "spam ".repeat(400);
    let reason = cut_for(&cluster, "rogue-model", move |id, _| vec![token(id, 0, 7, &huge)]);
    assert!(reason.contains("more text than its tokens can carry"), "{reason:?}");
}

#[test]
fn a_token_id_outside_the_vocabulary_is_refused_at_the_link() {
    let Some(path) = smollm2() else { return };
    let config = format!(
        "[verifier]\nmodels = {{ \"SmolLM2-135M-Instruct.Q4_1\" = \"{}\" }}\nsample_rate = 1.0\n",
        path.display()
    );
    let cluster = Cluster::start(&config);
    // Used to reach the verifier, whose error on it was booked as verified.
    let reason = cut_for(&cluster, "SmolLM2-135M-Instruct.Q4_1", |id, _| vec![token(id, 0, 60_000, "x")]);
    assert!(reason.contains("token id 60000 is outside the model's vocabulary of 49152"), "{reason:?}");
}

#[test]
fn one_key_holds_one_session_the_newer_replaces_the_older() {
    let cluster = Cluster::start("");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("shared.key");
    let reason = actix_rt::System::new().block_on(async {
        let mut first = Rogue::join_as(&cluster.addr, "keyed", Identity::load_or_create(&key).unwrap()).await;
        first.idle(&mut [], Duration::from_millis(300)).await; // registered
        let mut second = Rogue::join_as(&cluster.addr, "keyed", Identity::load_or_create(&key).unwrap()).await;
        second.idle(&mut [], Duration::from_millis(300)).await;
        let mut reason = String::new();
        while let Ok(m) = first.link.recv(Duration::from_secs(2)).await {
            if let ServerMessage::Goodbye { reason: r } = m {
                reason = r;
                break;
            }
        }
        // The newer session is the one that works.
        let (addr, game_key) = (cluster.addr.clone(), cluster.key.clone());
        let game = std::thread::spawn(move || try_chat(&addr, &game_key, "keyed"));
        let spec = second.task(&mut []).await;
        second.finish_honestly(&spec).await;
        assert!(game.join().unwrap().is_some(), "the game got the newer session's answer");
        reason
    });
    assert!(reason.contains("a newer session of node"), "{reason:?}");
}

#[test]
fn two_node_processes_cannot_share_a_key() {
    let mut cluster = Cluster::start("");
    cluster.add_node(&["--fake-engine", "3"]);
    cluster.wait_nodes("fake", 1);
    let key = cluster.dir.path().join("node0.key");
    let url = format!("ws://{}/ws/node", cluster.addr);
    let cfg = cluster.config.to_str().unwrap().to_string();
    let mut second = Command::new(BIN)
        .args(["--config", &cfg, "node", "--connect", &url, "--key", key.to_str().unwrap(), "--fake-engine", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_for("the second process to refuse", Duration::from_secs(20), || {
        status = second.try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(second.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("is in use by another `ludus node`"), "{stderr}");
    assert!(try_chat(&cluster.addr, &cluster.key, "fake").is_some(), "the first node still serves");
}

/// Tried as a new user would: `wrk -c8` on 16-token completions cut both nodes for
/// "flooding" within a second, because token frames counted against the limit.
#[test]
fn an_honest_node_streaming_many_tokens_a_second_is_never_cut_as_a_flood() {
    let mut cluster = Cluster::start("max_node_frames_per_s = 30\n");
    cluster.add_node(&["--fake-engine", "16", "--capacity", "64"]);
    cluster.wait_nodes("fake", 1);
    let body = r#"{"model": "fake", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}"#;
    let started = std::time::Instant::now();
    let answered: usize = (0..8)
        .map(|_| {
            let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
            std::thread::spawn(move || (0..40).filter(|_| try_post_chat(&addr, &key, body).is_some()).count())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    let frames_per_s = (answered * 17) as f64 / started.elapsed().as_secs_f64();
    eprintln!("{answered} answers, about {frames_per_s:.0} token frames a second");
    assert_eq!(answered, 320, "every request answered");
    let log = cluster.server.log_text();
    assert!(!log.contains("flooding"), "an honest node was cut: {log}");
}
