//! Rogue nodes over the real protocol (issue "trust and money"): every number a node sends
//! is bounded before it counts — tokens past `max_tokens`, text no token carries, ids
//! outside the vocabulary — one key holds one session, two processes cannot share a key,
//! a task never returns to the key that failed it, and an honest node streaming the tokens
//! it was asked for is never cut as a flood.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ludus::crypto::identity::Identity;
use ludus::node::link::{join, Announce};
use ludus::protocol::{NodeMessage, ServerMessage, SignedReceipt, TaskSpec, TaskUsage};

use super::cluster::{wait_for, Cluster};
use super::database::numbers;
use super::helpers::smollm2;
use super::registry::{try_chat, try_post_chat, Rogue};

/// The rogue's first task (the game asks in the background), then `lie` with it; returns
/// the reason the server gave when it closed the link, and the game's answer (its task id)
/// if it got one.
fn cut_for(
    cluster: &Cluster,
    model: &'static str,
    lie: impl FnOnce(u64, usize) -> Vec<NodeMessage>,
) -> (String, Option<u64>) {
    cut_for_task(cluster, model, |_, spec| lie(spec.id.0, spec.max_tokens))
}

/// [`cut_for`], with the rogue's key and whole task at hand (to sign a receipt, say).
fn cut_for_task(
    cluster: &Cluster,
    model: &'static str,
    lie: impl FnOnce(&Identity, &TaskSpec) -> Vec<NodeMessage>,
) -> (String, Option<u64>) {
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
        for message in lie(&rogue.id, &spec) {
            if rogue.link.send(&message).await.is_err() {
                break;
            }
        }
        rogue.goodbye().await
    });
    (reason, game.join().unwrap())
}

/// Two blocks later, not a receipt is on the books.
fn assert_nothing_recorded(cluster: &Cluster) {
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(numbers(&cluster.store(), "SELECT count(*) FROM receipts"), vec![0], "nothing recorded");
}

fn token(id: u64, index: usize, token: u32, text: &str) -> NodeMessage {
    NodeMessage::Token { id: ludus::protocol::TaskId(id), index, token, text: text.into(), logprobs: None }
}

#[test]
fn a_node_sending_tokens_past_max_tokens_is_cut_and_nothing_is_recorded() {
    let cluster = Cluster::start("");
    let (reason, answer) =
        cut_for(&cluster, "rogue-model", |id, max_tokens| (0..=max_tokens).map(|i| token(id, i, 7, "x")).collect());
    assert!(reason.contains("past max_tokens (4)"), "{reason:?}");
    // The game asked for a whole answer: the rogue's tokens never reach it (with no other
    // node to produce it again, it gets an error). The rogue, cut before its end of task,
    // has no receipt.
    assert_eq!(answer, None, "the rogue's tokens reached the game");
    assert_nothing_recorded(&cluster);
}

/// A node that answers `Done` without generating a token is cut: nothing to pay, nothing a
/// proof could cover (replaying its proof used to panic a thread of the verifier pool for
/// good, leaving every later task unchecked). Nothing is recorded.
#[test]
fn a_node_done_without_a_token_is_cut() {
    let cluster = Cluster::start("");
    let (reason, answer) = cut_for_task(&cluster, "rogue-model", |id, spec| {
        let receipt = SignedReceipt::sign(id, spec.ticket.clone(), 5, &[]);
        let usage = TaskUsage { prompt_tokens: 5, completion_tokens: 0 };
        let finish_reason = ludus::protocol::FinishReason::Stop;
        vec![NodeMessage::Done { id: spec.id, finish_reason, usage, tail: String::new(), receipt, proof: None }]
    });
    assert!(reason.contains("done without generating a token"), "{reason:?}");
    assert_eq!(answer, None, "the game got an empty answer from a node that did nothing");
    assert_nothing_recorded(&cluster);
}

/// `tokens` tokens of `token` and `Done` with an honest receipt, as a scripted node sends
/// them; ended by the end-of-sequence token `eos` when given.
fn answer(id: &Identity, spec: &TaskSpec, token: u32, tokens: usize, eos: Option<u32>) -> Vec<NodeMessage> {
    let ids: Vec<u32> = std::iter::repeat_n(token, tokens).chain(eos).collect();
    let prompt = spec.ticket.prompt.tokens;
    let receipt = SignedReceipt::sign(id, spec.ticket.clone(), prompt, &ids);
    let usage = TaskUsage { prompt_tokens: prompt as usize, completion_tokens: ids.len() };
    let finish_reason =
        if eos.is_some() { ludus::protocol::FinishReason::Stop } else { ludus::protocol::FinishReason::Length };
    let mut messages: Vec<NodeMessage> =
        ids.iter().enumerate().map(|(i, &t)| self::token(spec.id.0, i, t, "")).collect();
    messages.push(NodeMessage::Done { id: spec.id, finish_reason, usage, tail: String::new(), receipt, proof: None });
    messages
}

/// A chat request for "hi" with `max_tokens`.
fn hi_body(max_tokens: usize) -> String {
    serde_json::json!({"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

/// A node that ends an answer at no end of sequence, short of `max_tokens`, is cut unless
/// the answer filled the context it reported when it joined. Else it could stop after one
/// decode step and be paid the whole prompt (with a long persona, most of a task's price):
/// the verifier accepts an answer that stops where the reference did, or earlier. At its
/// context, the same stop is the answer's honest length. A context under the minimum is
/// refused when the node joins.
#[test]
fn a_node_stopping_short_of_max_tokens_and_of_its_context_is_cut() {
    let Some((cluster, text, _, hi)) = smollm2_server() else { return };
    // The rogue said its sequences hold 4,096 tokens; the game asked for 4.
    let (reason, answer) = cut_for_task(&cluster, MODEL, |id, spec| self::answer(id, spec, hi, 1, None));
    assert!(reason.contains("ended early"), "{reason:?}");
    assert!(reason.contains("1 of max_tokens 4"), "{reason:?}");
    assert_eq!(answer, None, "the game got an answer a node cut short");
    assert_nothing_recorded(&cluster);

    // A node whose context the answer fills stops there honestly, short of max_tokens.
    let prompt = text.chat_prompt(&[ludus::inference::ChatMessage::new("user", "hi")]).unwrap().len();
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let (game, tiny) = actix_rt::System::new().block_on(async {
        let mut tiny = Rogue::join(&cluster.addr, MODEL).await;
        tiny.load.context = 100;
        tiny.link.send(&NodeMessage::Heartbeat(tiny.load.clone())).await.unwrap();
        let tiny = tiny.goodbye().await;
        let mut full = Rogue::join(&cluster.addr, MODEL).await;
        full.load.context = ludus::protocol::MIN_CONTEXT;
        full.idle(&mut [], Duration::from_millis(300)).await; // registered
        let game = std::thread::spawn(move || try_post_chat(&addr, &key, &hi_body(300)));
        let spec = full.task(&mut []).await;
        assert_eq!(spec.ticket.prompt.tokens as usize, prompt, "the test's prompt count is the server's");
        let fill = ludus::protocol::MIN_CONTEXT as usize - prompt;
        for message in self::answer(&full.id, &spec, hi, fill, None) {
            full.link.send(&message).await.unwrap();
        }
        full.idle(&mut [], Duration::from_millis(1000)).await;
        (game, tiny)
    });
    assert!(tiny.contains("a context of 100 tokens is below the minimum 256"), "{tiny:?}");
    assert!(game.join().unwrap().is_some(), "an answer that filled the node's context was refused");
    let store = cluster.store();
    wait_for("its receipt", Duration::from_secs(20), || numbers(&store, "SELECT count(*) FROM receipts") == vec![1]);
}

/// A job goes to a node whose context holds its whole answer (prompt and `max_tokens`)
/// while one serves the model: a node that says its context is small cannot end answers
/// early at it. With none left that holds it, a smaller one takes the job and stops
/// honestly at its context.
#[test]
fn a_job_goes_to_a_node_whose_context_holds_the_whole_answer() {
    let Some((cluster, text, eos, hi)) = smollm2_server() else { return };
    let prompt = text.chat_prompt(&[ludus::inference::ChatMessage::new("user", "hi")]).unwrap().len();
    let chat = || {
        let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
        std::thread::spawn(move || try_post_chat(&addr, &key, &hi_body(300)))
    };
    actix_rt::System::new().block_on(async {
        // Room for the prompt and part of the 300 tokens the game asks for; and room for all.
        let mut small = Rogue::join(&cluster.addr, MODEL).await;
        small.load.context = ludus::protocol::MIN_CONTEXT;
        let mut large = Rogue::join(&cluster.addr, MODEL).await;
        small.idle(&mut [&mut large], Duration::from_millis(300)).await; // both registered
        for round in 0..5 {
            let game = chat();
            let spec = large.task(&mut [&mut small]).await;
            for message in answer(&large.id, &spec, hi, 3, Some(eos)) {
                large.link.send(&message).await.unwrap();
            }
            large.idle(&mut [&mut small], Duration::from_millis(200)).await;
            assert!(game.join().unwrap().is_some(), "round {round}: no answer");
        }
        drop(large);
        small.idle(&mut [], Duration::from_millis(300)).await;
        let game = chat();
        let spec = small.task(&mut []).await;
        for message in answer(&small.id, &spec, hi, ludus::protocol::MIN_CONTEXT as usize - prompt, None) {
            small.link.send(&message).await.unwrap();
        }
        small.idle(&mut [], Duration::from_millis(500)).await;
        assert!(game.join().unwrap().is_some(), "the smaller node's answer, at its context, was refused");
    });
}

#[test]
fn a_node_sending_more_text_than_its_tokens_carry_is_cut() {
    let cluster = Cluster::start("");
    let huge = "spam ".repeat(400);
    let (reason, answer) = cut_for(&cluster, "rogue-model", move |id, _| vec![token(id, 0, 7, &huge)]);
    assert!(reason.contains("more text than its tokens can carry"), "{reason:?}");
    assert_eq!(answer, None, "the rogue's text never reached the game");
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
    let (reason, answer) = cut_for(&cluster, "SmolLM2-135M-Instruct.Q4_1", |id, _| vec![token(id, 0, 60_000, "x")]);
    assert!(reason.contains("token id 60000 is outside the model's vocabulary of 49152"), "{reason:?}");
    assert_eq!(answer, None);
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
    let mut second = crate::cluster::ludus()
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

/// A streamed answer read to its end (asked again while no node serves its model yet): its
/// text, its finish reason and its usage chunk.
fn read_stream(addr: &str, key: &str, body: &str) -> (String, serde_json::Value, serde_json::Value) {
    let started = std::time::Instant::now();
    let mut stream = loop {
        let stream = super::cluster::SseStream::open(addr, key, body);
        if stream.status == 200 {
            break stream;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "status {}", stream.status);
        std::thread::sleep(Duration::from_millis(100));
    };
    let (mut text, mut finish, mut usage) = (String::new(), serde_json::Value::Null, serde_json::Value::Null);
    while let Some(data) = stream.next_data().filter(|d| d != "[DONE]") {
        let chunk: serde_json::Value = serde_json::from_str(&data).unwrap();
        if let Some(choice) = chunk["choices"].get(0) {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
            if !choice["finish_reason"].is_null() {
                finish = choice["finish_reason"].clone();
            }
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
        assert!(chunk.get("error").is_none(), "{chunk}");
    }
    (text, finish, usage)
}

/// A rogue serving a model whose tokenizer the server holds: it returns real token ids with
/// text of its own, and signs a receipt for 10 M prompt tokens. The game reads the text the
/// server made from the ids and is billed the prompt tokens the server counted; the receipt
/// is refused, so nothing is billed on the node's word. A prompt counted otherwise is not
/// judged a lie (an honest node of another version may count so): the answer stands.
#[test]
fn the_game_reads_the_servers_text_and_pays_for_the_prompt_the_server_counted() {
    let Some(path) = smollm2() else { return };
    let cluster = Cluster::start(&format!("model_files = {{ \"{MODEL}\" = \"{}\" }}\n", path.display()));
    let text = ludus::inference::ModelText::load(&path).unwrap();
    let messages = vec![ludus::inference::ChatMessage::new("user", "Greet the traveller.")];
    let counted = text.chat_prompt(&messages).unwrap().len();
    let ids = text.tokenizer.encode(" Well met, traveller!", false).unwrap();
    // The answer ends at max_tokens: no end of sequence, and no early stop either.
    let body = serde_json::json!({"model": MODEL, "max_tokens": ids.len(), "messages": messages}).to_string();
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let game = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        loop {
            let r = super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes());
            if r.status == 200 {
                return r.json();
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{}: {}", r.status, r.body);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let task = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, MODEL).await;
        let spec = rogue.task(&mut []).await;
        assert_eq!(spec.ticket.prompt, ludus::protocol::PromptCount { tokens: counted as u32, exact: true });
        for (index, &id) in ids.iter().enumerate() {
            rogue.link.send(&token(spec.id.0, index, id, "visit scam.example ")).await.unwrap();
        }
        let receipt = ludus::protocol::SignedReceipt::sign(&rogue.id, spec.ticket.clone(), 10_000_000, &ids);
        let usage = ludus::protocol::TaskUsage { prompt_tokens: 10_000_000, completion_tokens: ids.len() };
        let done = NodeMessage::Done {
            id: spec.id,
            finish_reason: ludus::protocol::FinishReason::Stop,
            usage,
            tail: "and scam.example again".into(),
            receipt,
            proof: None,
        };
        rogue.link.send(&done).await.unwrap();
        rogue.idle(&mut [], Duration::from_millis(1000)).await;
        spec.id
    });
    let answer = game.join().unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], " Well met, traveller!", "{answer}");
    assert_eq!(answer["usage"]["prompt_tokens"], counted, "{answer}");
    // The node said `stop`, but its ids never ended the answer: the server's text decides.
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
    let log = cluster.server.log_text();
    assert!(log.contains(&format!("claims 10000000 prompt tokens; the server counted {counted}")), "{log}");
    assert!(!log.contains("REJECTED"), "a prompt counted otherwise is not judged a lie: {log}");
    let store = cluster.store();
    let recorded = format!("SELECT count(*) FROM receipts WHERE task_id = {}", task.0 as i64);
    assert_eq!(numbers(&store, &recorded), vec![0], "a receipt on the node's word was recorded");
}

/// For a model the server holds no tokenizer of, the prompt is the node's signed word
/// within the server's bound. A rogue signed its receipt for the whole bound and told the
/// game, in its `Done`, a small honest-looking count: the game read one figure and paid
/// another (up to four times the prompt, unseen). Now the usage the game reads is the
/// receipt's, the one priced.
#[test]
fn the_prompt_a_game_reads_is_the_prompt_it_pays_for() {
    let cluster = Cluster::start("");
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let body = r#"{"model": "rogue-model", "max_tokens": 2, "messages": [{"role": "user", "content": "Greet the traveller, please."}]}"#;
    let game = std::thread::spawn(move || loop {
        let r = super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes());
        if r.status == 200 {
            return r.json();
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    let (task, bound) = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, "rogue-model").await;
        let spec = rogue.task(&mut []).await;
        assert!(!spec.ticket.prompt.exact, "no tokenizer here: a bound");
        let bound = spec.ticket.prompt.tokens;
        for index in 0..2 {
            rogue.link.send(&token(spec.id.0, index, 7, " hi")).await.unwrap();
        }
        let receipt = SignedReceipt::sign(&rogue.id, spec.ticket.clone(), bound, &[7, 7]);
        let done = NodeMessage::Done {
            id: spec.id,
            finish_reason: ludus::protocol::FinishReason::Length,
            usage: TaskUsage { prompt_tokens: 1, completion_tokens: 2 },
            tail: String::new(),
            receipt,
            proof: None,
        };
        rogue.link.send(&done).await.unwrap();
        rogue.idle(&mut [], Duration::from_millis(1000)).await;
        (spec.id, bound)
    });
    let answer = game.join().unwrap();
    assert_eq!(answer["usage"]["prompt_tokens"], bound, "the game reads what it is billed: {answer}");
    let store = cluster.store();
    let billed = format!("SELECT prompt_tokens::bigint FROM receipts WHERE task_id = {}", task.0 as i64);
    wait_for("the receipt", Duration::from_secs(20), || !numbers(&store, &billed).is_empty());
    assert_eq!(numbers(&store, &billed), vec![i64::from(bound)]);
}

/// A node that answers `Failed` (a request error: no retry, no penalty) and then re-sends a
/// receipt claiming `max_tokens` used to be paid: the re-sent path only checked the ticket.
/// Now a re-sent receipt counts only for a completion the server saw (its completion log).
#[test]
fn a_receipt_for_a_task_the_node_failed_earns_nothing() {
    let cluster = Cluster::start("");
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let asked = Arc::new(AtomicBool::new(false));
    let game = {
        let asked = asked.clone();
        std::thread::spawn(move || loop {
            let answered = try_chat(&addr, &key, "rogue-model");
            if answered.is_some() || asked.load(Ordering::Relaxed) {
                return answered;
            }
            std::thread::sleep(Duration::from_millis(100));
        })
    };
    let (failed, finished) = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, "rogue-model").await;
        let failed = rogue.task(&mut []).await;
        asked.store(true, Ordering::Relaxed);
        let refusal = NodeMessage::Failed {
            id: failed.id,
            failure: ludus::protocol::TaskFailure::Request("cannot run this".into()),
        };
        rogue.link.send(&refusal).await.unwrap();
        let claim = ludus::protocol::SignedReceipt::sign(&rogue.id, failed.ticket.clone(), 5, &[7, 7, 7, 7]);
        rogue.link.send(&NodeMessage::Receipts { receipts: vec![claim] }).await.unwrap();
        // An honest task of the same node, re-sent afterwards: on the books once.
        let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
        let second = std::thread::spawn(move || try_chat(&addr, &key, "rogue-model"));
        let finished = rogue.task(&mut []).await;
        let honest = rogue.honest_receipt(&finished);
        rogue.finish(&finished, honest.clone()).await;
        assert!(second.join().unwrap().is_some());
        rogue.link.send(&NodeMessage::Receipts { receipts: vec![honest] }).await.unwrap();
        rogue.idle(&mut [], Duration::from_millis(1200)).await;
        (failed.id, finished.id)
    });
    assert_eq!(game.join().unwrap(), None, "the game got an error for the failed task");
    let store = cluster.store();
    let count = |task: ludus::protocol::TaskId| {
        numbers(&store, &format!("SELECT count(*) FROM receipts WHERE task_id = {}", task.0 as i64))
    };
    assert_eq!(count(failed), vec![0], "a receipt for a failed task was recorded");
    assert_eq!(count(finished), vec![1]);
}

/// A game that hangs up mid-stream used to be billed nothing, and the node paid nothing,
/// for the tokens it had received. Now the server writes the delivered tokens ahead and
/// asks the node for a receipt covering exactly those.
#[test]
fn tokens_delivered_before_a_hang_up_are_billed_and_paid() {
    let mut cluster = Cluster::start("");
    cluster.add_node(&["--fake-engine", "1000:20", "--capacity", "1"]);
    cluster.wait_nodes("fake", 1);
    let body = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":1000,"stream":true}"#;
    let mut stream = super::cluster::SseStream::open(&cluster.addr, &cluster.key, body);
    assert_eq!(stream.status, 200);
    let first: serde_json::Value = serde_json::from_str(&stream.next_data().unwrap()).unwrap();
    let task = u64::from_str_radix(first["id"].as_str().unwrap().strip_prefix("chatcmpl-").unwrap(), 16).unwrap();
    for _ in 0..4 {
        assert!(stream.next_data().is_some());
    }
    drop(stream); // the game goes away
    let store = cluster.store();
    let sql = format!(
        "SELECT completion_tokens::bigint, (price_units > 0)::int::bigint FROM receipts WHERE task_id = {}",
        task as i64
    );
    wait_for("a receipt for the delivered tokens", Duration::from_secs(20), || !numbers(&store, &sql).is_empty());
    let row = numbers(&store, &sql);
    assert!(row[0] >= 5 && row[0] < 1000, "billed {} tokens", row[0]);
    assert_eq!(row[1], 1, "the delivered tokens have a price");
    // The node confirms it like any receipt: payable.
    let confirmed =
        format!("SELECT count(*) FROM receipts WHERE task_id = {} AND confirmation = 'confirmed'", task as i64);
    wait_for("the node's confirmation", Duration::from_secs(20), || numbers(&store, &confirmed) == vec![1]);
}

/// Work a node can make the server do is bounded: confirmations only for blocks announced
/// to it (each one a database transaction — they used to be accepted for any block), and
/// re-sent receipts checked (a signature recovery each) at most 1,024 a second per node,
/// the rest left for the node to send again, and a receipt sent again within 10 s is not
/// checked again.
#[test]
fn a_node_cannot_make_the_server_do_unbounded_work() {
    let cluster = Cluster::start("");
    let connected = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, "busy").await;
        rogue.idle(&mut [], Duration::from_millis(300)).await;
        for block in 1..=2_000u64 {
            let root = hex::encode([0u8; 32]);
            let signature =
                hex::encode(rogue.id.sign(&ludus::protocol::receipt::confirmation_message(block, &[0; 32], 0, &[])));
            let confirm = NodeMessage::Confirm { block, root, count: 0, disputed: vec![], signature };
            rogue.link.send(&confirm).await.unwrap();
        }
        // 4,096 receipts at once (forged: tickets of another network).
        let other = Identity::generate();
        let receipt = |task: u64| {
            let ticket = ludus::protocol::TaskTicket::issue(
                &[9; 32],
                ludus::protocol::TaskId(task),
                1,
                "busy",
                (4, Default::default()),
                &rogue.id.address,
            );
            ludus::protocol::SignedReceipt::sign(&other, ticket, 0, &[1])
        };
        for frame in 0..8u64 {
            let receipts = (0..512).map(|i| receipt(frame * 512 + i)).collect();
            rogue.link.send(&NodeMessage::Receipts { receipts }).await.unwrap();
        }
        // One receipt 512 times: checked once.
        let receipts = vec![receipt(1_000_000); 512];
        rogue.link.send(&NodeMessage::Receipts { receipts }).await.unwrap();
        rogue.idle(&mut [], Duration::from_millis(800)).await;
        // Still connected: bounded work is not a reason to cut an honest node's burst.
        rogue.link.send(&NodeMessage::Heartbeat(Default::default())).await.is_ok()
    });
    assert!(connected, "the link stayed up");
    let store = cluster.store();
    assert_eq!(numbers(&store, "SELECT count(*) FROM confirmations"), vec![0]);
    let log = cluster.server.log_text();
    // Of a 4,096-receipt burst, at most 1,024 a second are checked (two windows at most,
    // should a second boundary fall inside the burst); the rest waits for the node.
    let deferred: usize = log
        .lines()
        .filter(|l| l.contains("node re-sent unconfirmed receipts"))
        .filter_map(|l| l.split("deferred=").nth(1)?.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    assert!(deferred >= 2048, "{deferred} deferred: {log}");
    let repeats: Vec<usize> = log
        .lines()
        .filter(|l| l.contains("node re-sent unconfirmed receipts"))
        .filter_map(|l| l.split("repeats=").nth(1)?.split_whitespace().next()?.parse::<usize>().ok())
        .collect();
    assert_eq!(repeats.iter().sum::<usize>(), 511, "one receipt 512 times is checked once: {repeats:?}");
}

/// A game that hangs up is charged for what it received against its tokens-per-minute
/// budget too (that charge used to happen only when the HTTP handler saw the end).
#[test]
fn a_game_that_hangs_up_is_charged_to_its_token_budget() {
    let mut cluster = Cluster::start("");
    cluster.add_node(&["--fake-engine", "1000:20", "--capacity", "2"]);
    cluster.wait_nodes("fake", 1);
    let key = cluster.add_game("leaver", &["--tpm", "40"]);
    let body = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":1000,"stream":true}"#;
    let mut stream = super::cluster::SseStream::open(&cluster.addr, &key, body);
    assert_eq!(stream.status, 200);
    for _ in 0..60 {
        assert!(stream.next_data().is_some());
    }
    drop(stream); // the game goes away having received 60 tokens of its 40-token budget
                  // The hang-up is noticed at the next token (20 ms); one request after it (a request is
                  // charged only when it ends, so a second one would have spent the budget itself).
    std::thread::sleep(Duration::from_secs(1));
    let small = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    let next = super::cluster::post_with(&cluster.addr, "/v1/chat/completions", Some(&key), small.as_bytes());
    assert_eq!(next.status, 429, "{}", next.body);
    assert!(next.body.contains("tokens per minute"), "{}", next.body);
}

/// A stream whose node dies after its last token but before its `Done` is finished by
/// the server (the game read every token): it is charged to the game's tokens-per-minute
/// budget like any answer (it used to be free of it), though no node is paid for it.
#[test]
fn a_stream_finished_for_a_node_that_died_is_charged_to_the_token_budget() {
    let cluster = Cluster::start("");
    let cfg = cluster.config.to_str().unwrap().to_string();
    let out =
        crate::cluster::ludus().args(["--config", &cfg, "games", "add", "streamer", "--tpm", "40"]).output().unwrap();
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let body = r#"{"model":"dying","messages":[{"role":"user","content":"hi"}],"max_tokens":60,"stream":true}"#;
    let addr = cluster.addr.clone();
    actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, "dying").await;
        rogue.idle(&mut [], Duration::from_millis(300)).await; // registered
        let (addr, key) = (addr.clone(), key.clone());
        let game = std::thread::spawn(move || {
            let mut stream = super::cluster::SseStream::open(&addr, &key, body);
            assert_eq!(stream.status, 200);
            std::iter::from_fn(|| stream.next_data()).collect::<Vec<_>>()
        });
        let spec = rogue.task(&mut []).await;
        for index in 0..60 {
            let m = NodeMessage::Token { id: spec.id, index, token: 7, text: "x".into(), logprobs: None };
            rogue.link.send(&m).await.unwrap();
        }
        rogue.idle(&mut [], Duration::from_millis(500)).await; // the tokens reach the server
        drop(rogue); // the link closes before the node's Done
        let events = game.join().unwrap();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        let text: String = events
            .iter()
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
            .collect();
        assert_eq!(text, "x".repeat(60), "{events:?}");
    });
    // The game has spent more than its 40 tokens a minute.
    let small = r#"{"model":"dying","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    let next = super::cluster::post_with(&cluster.addr, "/v1/chat/completions", Some(&key), small.as_bytes());
    assert_eq!(next.status, 429, "{}", next.body);
    assert!(next.body.contains("tokens per minute"), "{}", next.body);
    assert_eq!(numbers(&cluster.store(), "SELECT count(*) FROM receipts"), vec![0], "a receipt-less answer was paid");
}

/// Node-chosen model names reach logs, the dashboard and `/metrics`: a name with a newline
/// could write fake metric lines (it was escaped only for `"`). Names are now bounded and
/// printable at the handshake, and label values are escaped as the text format says.
#[test]
fn a_model_name_cannot_inject_metric_lines() {
    let cluster = Cluster::start("");
    let refused = actix_rt::System::new().block_on(async {
        let announce = ludus::node::link::Announce {
            models: vec!["evil\nludus_fake_metric 999".into()],
            capacity: 4,
            device: "cpu".into(),
            bundles: vec![],
        };
        let url = format!("ws://{}/ws/node", cluster.addr);
        ludus::node::link::join(&url, &Identity::generate(), announce, None).await.err()
    });
    let reason = refused.expect("the handshake was refused");
    assert!(
        matches!(&reason, ludus::node::LinkError::Refused(r) if r.contains("without control characters")),
        "{reason}"
    );
    let (status, metrics) = cluster.get("/metrics");
    assert_eq!(status, 200);
    assert!(!metrics.contains("ludus_fake_metric"), "{metrics}");
}

/// A live receipt must name the output the game received: a node that streams one
/// completion and signs another (same length) is refused — the ledger and the block's
/// Merkle root would otherwise commit to tokens nobody received. (Streamed: the game read
/// the tokens; a whole answer would be produced again, see `network_proof`.)
#[test]
fn a_receipt_for_another_output_than_the_one_relayed_is_refused() {
    let cluster = Cluster::start("");
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let task = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, "swapped").await;
        let body =
            r#"{"model": "swapped", "max_tokens": 4, "stream": true, "messages": [{"role": "user", "content": "hi"}]}"#;
        let game = std::thread::spawn(move || read_stream(&addr, &key, body));
        let spec = rogue.task(&mut []).await;
        // Streams [7, 8] (what `finish` sends), signs [7, 9].
        let other = ludus::protocol::SignedReceipt::sign(&rogue.id, spec.ticket.clone(), 5, &[7, 9]);
        rogue.finish(&spec, other).await;
        assert_eq!(game.join().unwrap().0, "xx", "the game read what was streamed");
        rogue.idle(&mut [], Duration::from_millis(900)).await;
        spec.id
    });
    let store = cluster.store();
    let sql = format!("SELECT count(*) FROM receipts WHERE task_id = {}", task.0 as i64);
    assert_eq!(numbers(&store, &sql), vec![0]);
    assert!(cluster.server.log_text().contains("its output hash is not that of the tokens the server relayed"));
}

/// A node whose receipt lies (it signs other tokens than it sent) is judged like one whose
/// proof failed: its whole answer, which the game has not read, is produced again on
/// another node. (It used to reach the game, unbilled, from a node known to lie.)
#[test]
fn a_whole_answer_whose_receipt_is_refused_is_produced_again_elsewhere() {
    let mut cluster = Cluster::start("node_timeout_ms = 10000\n");
    let system = actix_rt::System::new();
    let mut rogue = system.block_on(Rogue::join(&cluster.addr, "fake"));
    let _ = system.block_on(rogue.next_task(Duration::from_millis(300))); // registers
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let body = r#"{"model": "fake", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}"#;
    let game = std::thread::spawn(move || {
        super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes())
    });
    let spec = system.block_on(rogue.next_task(Duration::from_secs(20))).expect("the rogue gets the task");
    cluster.add_node(&["--fake-engine", "2"]);
    cluster.wait_nodes("fake", 2);
    // Streams [7, 8] as "xx", signs [7, 9].
    let lie = SignedReceipt::sign(&rogue.id, spec.ticket.clone(), 5, &[7, 9]);
    system.block_on(rogue.finish(&spec, lie));
    let answer = game.join().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["choices"][0]["message"]["content"], " tok tok", "the honest node's answer");
    let log = cluster.server.log_text();
    assert!(log.contains("the node's receipt was refused: its output hash is not that of the tokens"), "{log}");
}

/// The model whose text the server makes itself in these tests.
const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// A node that says its sequences hold any number of tokens (context 0) is sent no more
/// of an answer than the model's own context holds. Past it no proof can be checked (the
/// reference has no positions there): the jobs no honest node holds whole went to the
/// liar alone, a sampled one came back unverifiable, and the rest were paid unchecked. A
/// prompt that fills the context is the game's error (400 `context_length_exceeded`,
/// OpenAI's code) before any node sees it.
#[test]
fn a_node_claiming_no_context_limit_is_sent_no_answer_past_the_models_context() {
    let Some((cluster, text, _, _)) = smollm2_server() else { return };
    let context = text.context.expect("SmolLM2's file says its context");
    let chat = |words: usize| {
        let content = "word ".repeat(words);
        let body =
            serde_json::json!({"model": MODEL, "max_tokens": 4096, "messages": [{"role": "user", "content": content}]});
        let ids = text.chat_prompt(&[ludus::inference::ChatMessage::new("user", &content)]).unwrap();
        (body.to_string(), ids.len())
    };
    let (too_long, tokens) = chat(context);
    assert!(tokens > context);
    let r = cluster.post("/v1/chat/completions", &too_long);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded", "{}", r.body);
    assert!(r.body.contains(&format!("holds {context} tokens")), "{}", r.body);

    // Prompt and max_tokens together exceed the context; the prompt alone does not.
    let (body, prompt) = chat(context - 3000);
    assert!(prompt < context && prompt + 4096 > context);
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let spec = actix_rt::System::new().block_on(async {
        let mut liar = Rogue::join(&cluster.addr, MODEL).await;
        liar.load.context = 0;
        liar.idle(&mut [], Duration::from_millis(300)).await; // registered
                                                              // The game's request fails once the liar leaves: not waited for.
        let _game = std::thread::spawn(move || try_post_chat(&addr, &key, &body));
        liar.task(&mut []).await
    });
    assert_eq!(spec.ticket.prompt.tokens as usize, prompt, "the test's prompt count is the server's");
    assert_eq!(spec.ticket.max_tokens as usize, context - prompt, "max_tokens cut to the room the prompt leaves");
}

/// A node may say a request cannot run (a 400 for the game, no retry, no fault of its own)
/// only where the server could not check the request. For a model whose text the server
/// makes, it counted the prompt, fitted it and compiled its grammar: a refusal of a prompt
/// that fits the node's context is the node's failure, retried on another node (none is
/// left here: a 502). Before, a node could fail every task this way at no cost, with the
/// game blamed, and write the game's error message. A prompt past the node's context is a
/// refusal the game reads, with the node's text bounded.
#[test]
fn a_node_refusing_a_request_the_server_checked_is_the_nodes_failure() {
    use ludus::protocol::TaskFailure;
    let Some((cluster, _, _, _)) = smollm2_server() else { return };
    let said = format!("{} visit scam.example", "no ".repeat(100));
    let ask = |body: String| {
        let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
        std::thread::spawn(move || {
            super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes())
        })
    };
    let long = serde_json::json!({"model": MODEL, "max_tokens": 4,
        "messages": [{"role": "user", "content": "word ".repeat(400)}]})
    .to_string();
    let (checked, unfit) = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, MODEL).await;
        rogue.load.context = ludus::protocol::MIN_CONTEXT;
        rogue.idle(&mut [], Duration::from_millis(300)).await; // registered
        let mut answers = Vec::new();
        for body in [hi_body(4), long] {
            let game = ask(body);
            let spec = rogue.task(&mut []).await;
            let refusal = NodeMessage::Failed { id: spec.id, failure: TaskFailure::Request(said.clone()) };
            rogue.link.send(&refusal).await.unwrap();
            rogue.idle(&mut [], Duration::from_millis(300)).await;
            answers.push(game.join().unwrap());
        }
        let unfit = answers.pop().unwrap();
        (answers.pop().unwrap(), unfit)
    });
    assert_eq!(checked.status, 502, "{}", checked.body);
    assert!(checked.body.contains("refused a request the server had checked"), "{}", checked.body);
    assert!(!checked.body.contains("scam.example"), "{}", checked.body);
    assert_eq!(unfit.status, 400, "{}", unfit.body);
    assert!(unfit.body.contains("a node refused it: no no"), "{}", unfit.body);
    assert!(!unfit.body.contains("scam.example"), "{}", unfit.body);
    assert_nothing_recorded(&cluster);
}

/// A server that makes SmolLM2's text itself, the model's tokenizer, and the ids of its
/// end-of-sequence token and of " Hi" (None when the model is not installed).
fn smollm2_server() -> Option<(Cluster, ludus::inference::ModelText, u32, u32)> {
    let path = smollm2()?;
    let cluster = Cluster::start(&format!("model_files = {{ \"{MODEL}\" = \"{}\" }}\n", path.display()));
    let text = ludus::inference::ModelText::load(&path).unwrap();
    let eos = text.tokenizer.eos.expect("SmolLM2 names its end-of-sequence token");
    let hi = text.tokenizer.encode(" Hi", false).unwrap()[0];
    Some((cluster, text, eos, hi))
}

/// A node that keeps sending tokens after the model's end-of-sequence token (padding its
/// bill, or slipping text past the end the proof covers) is cut at the first one, and the
/// rogue, cut before its `Done`, has no receipt; the game, asking for a whole answer,
/// never reads its tokens.
#[test]
fn a_token_after_the_end_of_sequence_token_cuts_the_node() {
    let Some((cluster, _, eos, hi)) = smollm2_server() else { return };
    let (reason, answer) =
        cut_for(&cluster, MODEL, move |id, _| vec![token(id, 0, hi, ""), token(id, 1, eos, ""), token(id, 2, hi, "")]);
    assert!(reason.contains("a token after the answer's end"), "{reason:?}");
    assert!(answer.is_none(), "the game got an answer from a node cut before its end of task");
    assert_nothing_recorded(&cluster);
}

/// What a node's tokens become when it dies after the end-of-sequence token, before its
/// `Done`. A streamed answer is whole (the game read every token): it ends there. It used
/// to go on to another node as a continuation after its end, whose first token got that
/// honest node cut. A whole answer is produced again from its start on another node: the
/// game never reads tokens no node finished (their proof was never checked).
#[test]
fn a_dead_nodes_tokens_end_a_stream_and_are_produced_again_for_a_whole_answer() {
    let Some((cluster, text, eos, hi)) = smollm2_server() else { return };
    let mut well_met = text.tokenizer.encode(" Well met", false).unwrap();
    well_met.push(eos);
    let body = |stream: bool| {
        format!(
            r#"{{"model": "{MODEL}", "max_tokens": 8, "stream": {stream}, "messages": [{{"role": "user", "content": "hi"}}]}}"#
        )
    };
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let (streamed, again, whole) = actix_rt::System::new().block_on(async {
        let mut spare = Rogue::join(&cluster.addr, MODEL).await;
        let mut outcomes = Vec::new();
        for stream in [true, false] {
            // The dying node has room; the spare is kept busy until it is gone.
            let mut dying = Rogue::join(&cluster.addr, MODEL).await;
            dying.idle(&mut [&mut spare], Duration::from_millis(300)).await; // registered
            let (addr, key, body) = (addr.clone(), key.clone(), body(stream));
            let game = std::thread::spawn(move || {
                if stream {
                    let mut sse = super::cluster::SseStream::open(&addr, &key, &body);
                    let mut events = Vec::new();
                    while let Some(data) = sse.next_data() {
                        events.push(data);
                    }
                    events.join("\n")
                } else {
                    let r = super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes());
                    format!("{} {}", r.status, r.body)
                }
            });
            // Whichever node the task went to plays the dying one.
            let spec = loop {
                if let Some(spec) = dying.next_task(Duration::from_millis(100)).await {
                    break spec;
                }
                if let Some(spec) = spare.next_task(Duration::from_millis(100)).await {
                    std::mem::swap(&mut dying, &mut spare);
                    break spec;
                }
            };
            for (index, id) in [hi, eos].into_iter().enumerate() {
                dying.link.send(&token(spec.id.0, index, id, "")).await.unwrap();
            }
            spare.idle(&mut [&mut dying], Duration::from_millis(200)).await;
            drop(dying);
            let handed = spare.next_task(Duration::from_millis(1500)).await;
            if let Some(again) = &handed {
                assert_eq!(again.id, spec.id, "another task reached the spare");
                for (index, &id) in well_met.iter().enumerate() {
                    spare.link.send(&token(again.id.0, index, id, "")).await.unwrap();
                }
                let prompt = again.ticket.prompt.tokens;
                let receipt = SignedReceipt::sign(&spare.id, again.ticket.clone(), prompt, &well_met);
                let usage = TaskUsage { prompt_tokens: prompt as usize, completion_tokens: well_met.len() };
                let finish_reason = ludus::protocol::FinishReason::Stop;
                let done =
                    NodeMessage::Done { id: again.id, finish_reason, usage, tail: String::new(), receipt, proof: None };
                spare.link.send(&done).await.unwrap();
            }
            outcomes.push((handed.map(|s| s.prefix), game.join().unwrap()));
        }
        let (whole_handed, whole) = outcomes.pop().unwrap();
        let (stream_handed, streamed) = outcomes.pop().unwrap();
        assert_eq!(stream_handed, None, "the ended stream was continued on another node");
        (streamed, whole_handed, whole)
    });
    assert!(streamed.contains("\"finish_reason\":\"stop\"") && streamed.contains("Hi"), "{streamed}");
    assert!(streamed.ends_with("[DONE]") && !streamed.contains("error"), "{streamed}");
    assert_eq!(again, Some(vec![]), "the whole answer was not produced again from its start");
    assert!(whole.starts_with("200 "), "{whole}");
    let v: serde_json::Value = serde_json::from_str(whole.trim_start_matches("200 ")).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], well_met.len(), "{v}");
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap().trim(), "Well met", "{v}");
}

/// A node that takes a task and then says nothing loses it after the configured stall
/// timeout (`[distributor] task_stall_timeout_ms`), never before: the task goes to another
/// node, and when that one is silent too the game gets a clear error naming the stall.
#[test]
fn a_silent_node_loses_its_task_after_the_stall_timeout() {
    let cluster = Cluster::start("task_stall_timeout_ms = 2000\n");
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let (handed, cancels, game) = actix_rt::System::new().block_on(async {
        let mut a = Rogue::join(&addr, "busy").await;
        let mut b = Rogue::join(&addr, "busy").await;
        a.idle(&mut [&mut b], Duration::from_millis(400)).await; // both registered
        let game = std::thread::spawn(move || {
            let body = r#"{"model":"busy","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
            super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes())
        });
        // (which node, task id, when) for each hand-over; cancellations received.
        let (mut handed, mut cancels) = (Vec::new(), Vec::new());
        let until = std::time::Instant::now() + Duration::from_secs(60);
        // Until the game has its answer and both nodes their Cancel (which may come after).
        while (!game.is_finished() || cancels.len() < 2) && std::time::Instant::now() < until {
            for (i, r) in [&mut a, &mut b].into_iter().enumerate() {
                r.link.send(&NodeMessage::Heartbeat(Default::default())).await.unwrap();
                match r.link.recv(Duration::from_millis(25)).await {
                    Ok(ServerMessage::Task(spec)) => handed.push((i, spec.id, std::time::Instant::now())),
                    Ok(ServerMessage::Cancel { id, .. }) => cancels.push((i, id)),
                    _ => {}
                }
            }
        }
        (handed, cancels, game.join().unwrap())
    });
    assert_eq!(handed.len(), 2, "the task went to each silent node once: {handed:?}");
    let ((first, id, given), (second, again, moved)) = (handed[0], handed[1]);
    assert_ne!(first, second, "the stalled task went to the other node");
    assert_eq!(id, again, "the same task moved");
    assert!(moved - given >= Duration::from_millis(2000), "taken away before the timeout: {:?}", moved - given);
    assert_eq!(cancels, vec![(first, id), (second, id)], "each silent node was told");
    assert_eq!(game.status, 502, "{}", game.body);
    assert!(game.body.contains("no progress for 2 s"), "{}", game.body);
}

/// A node that fails a task and reconnects with the same key used to be a new node to the
/// distributor, and could be handed the same task again (up to `max_attempts` times, until
/// the game got an error). The task now never goes back to the key that failed it: it
/// waits for another node.
#[test]
fn a_task_never_returns_to_the_key_that_failed_it_even_reconnected() {
    let cluster = Cluster::start("");
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("quitter.key");
    let chat = |cluster: &Cluster| {
        let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
        std::thread::spawn(move || try_chat(&addr, &key, "again"))
    };
    let (first, second, moved) = actix_rt::System::new().block_on(async {
        // A node with room for one task, kept busy.
        let id = Identity::generate();
        let announce = Announce { models: vec!["again".into()], capacity: 1, device: "cpu".into(), bundles: vec![] };
        let link = join(&format!("ws://{}/ws/node", cluster.addr), &id, announce, None).await.unwrap();
        let mut busy = Rogue { id, link, load: ludus::protocol::NodeLoad { context: 4096, ..Default::default() } };
        busy.idle(&mut [], Duration::from_millis(300)).await; // registered
        let first = chat(&cluster);
        let held = busy.task(&mut []).await;
        // The quitter takes the second task, fails it, and comes back under the same key.
        let mut quitter = Rogue::join_as(&cluster.addr, "again", Identity::load_or_create(&key_file).unwrap()).await;
        let second = chat(&cluster);
        let failed = quitter.task(&mut [&mut busy]).await;
        let failure = ludus::protocol::TaskFailure::Node("the quitter's engine stopped".into());
        quitter.link.send(&NodeMessage::Failed { id: failed.id, failure }).await.unwrap();
        // Still connected while the distributor finds no other node with room.
        quitter.idle(&mut [&mut busy], Duration::from_millis(300)).await;
        drop(quitter);
        let mut back = Rogue::join_as(&cluster.addr, "again", Identity::load_or_create(&key_file).unwrap()).await;
        let mut handed_back = None;
        let until = std::time::Instant::now() + Duration::from_millis(1500);
        while std::time::Instant::now() < until && handed_back.is_none() {
            busy.link.send(&NodeMessage::Heartbeat(Default::default())).await.unwrap();
            handed_back = back.next_task(Duration::from_millis(100)).await.map(|spec| spec.id);
        }
        assert_eq!(handed_back, None, "the reconnected quitter was handed the task it failed");
        // The busy node finishes and gets the failed task next.
        busy.finish_honestly(&held).await;
        let moved = busy.task(&mut [&mut back]).await;
        assert_eq!(moved.id, failed.id, "another task reached the busy node");
        busy.finish_honestly(&moved).await;
        (first.join().unwrap(), second.join().unwrap(), moved.id)
    });
    assert!(first.is_some(), "the busy node's own task failed");
    assert_eq!(second, Some(moved.0), "the game did not get the failed-over answer");
}

/// A node claiming more room than its failed tasks' checks have (4,096) is given at most
/// `MAX_TASKS_AT_ONCE` tasks at once: held once its failures fill its waiting checks, every
/// task it still had must be checked. With 4,096 in flight it could fail the rest after
/// their games read them, and only the first 256 were checked.
#[test]
fn a_node_is_given_no_more_tasks_at_once_than_its_failures_can_have_checked() {
    let cluster = Cluster::start("");
    let most = ludus::actors::delivery_check::MAX_TASKS_AT_ONCE;
    assert!(
        most as u64 + 2 * ludus::actors::delivery_check::PER_NODE_WAITING
            <= ludus::actors::delivery_check::PER_NODE_QUEUED
    );
    actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join_with(&cluster.addr, "fake", Identity::generate(), 4096).await;
        rogue.idle(&mut [], Duration::from_millis(300)).await; // registered
    });
    let log = cluster.server.log_text();
    assert!(log.contains(&format!("claimed=4096 given={most}")), "{log}");
    let joined = log.lines().find(|l| l.contains("node joined")).unwrap_or_else(|| panic!("no node joined: {log}"));
    assert!(joined.contains(&format!("capacity={most}")), "{joined}");
}
