//! Proof of inference over the network: real nodes' tasks are checked by the server's
//! verifier pool and marked verified; a node that edits a token (a test double speaking
//! the real protocol, running the real model in-process) is caught, quarantined and not
//! paid, and its rejected proof fails `ludus verify` offline too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ludus::inference::{Engine, EngineConfig, Event, GenerateRequest, Model};
use ludus::node::{run_node, Backend, NodeOptions};
use ludus::proof::commitment::DEFAULT_TOP_K;
use ludus::proof::ProofBuilder;
use ludus::protocol::{FinishReason, NodeMessage, SignedReceipt, TaskInput, TaskUsage};
use tch::Device;

use super::cluster::{wait_for, Cluster};
use super::database::{numbers, texts};
use super::helpers::smollm2;
use super::registry::{post_chat_within, try_chat, Rogue};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

fn verifier_config(path: &std::path::Path) -> String {
    format!("[verifier]\nmodels = {{ \"{MODEL}\" = \"{}\" }}\nsample_rate = 1.0\nquarantine_s = 60\n", path.display())
}

/// No sampled checks at all: every task gets a quality-check re-run instead.
fn quality_checks_only(path: &std::path::Path) -> String {
    verifier_config(path).replace("sample_rate = 1.0", "sample_rate = 0.0\nfirst_tasks = 0\nquality_check_rate = 1.0")
}

#[test]
fn honest_node_tasks_are_verified() {
    honest_node_is_verified("none");
}

/// The verifier checks in f32; a node serving quantized weights must still pass.
#[test]
fn quantized_nodes_tasks_are_verified() {
    honest_node_is_verified("int8");
    honest_node_is_verified("int4");
}

fn honest_node_is_verified(quantize: &str) {
    let Some(path) = smollm2() else { return };
    let mut cluster = Cluster::start(&verifier_config(&path));
    cluster.add_node(&["--model", path.to_str().unwrap(), "--threads", "1", "--quantize", quantize]);
    cluster.wait_nodes(MODEL, 1);
    let bodies = [
        r#"{"model": "M", "max_tokens": 40, "temperature": 0, "messages": [{"role": "user", "content": "Greet the traveller."}]}"#,
        r#"{"model": "M", "max_tokens": 40, "temperature": 0.8, "seed": 7, "messages": [{"role": "user", "content": "Sell me a sword."}]}"#,
        r#"{"model": "M", "max_tokens": 20, "prompt": "The dragon said"}"#,
        // Under a grammar, with log probabilities: both are replayed on the reference.
        r#"{"model": "M", "max_tokens": 30, "temperature": 0.8, "seed": 3, "logprobs": true, "top_logprobs": 3,
            "response_format": {"type": "json_object"}, "messages": [{"role": "user", "content": "Your stats, in JSON."}]}"#,
        // A short answer that ends on the end-of-sequence token, with log probabilities.
        r#"{"model": "M", "max_tokens": 96, "temperature": 0, "logprobs": true, "top_logprobs": 2,
            "messages": [{"role": "user", "content": "Say hello."}]}"#,
    ];
    let (mut ended_on_eos, mut answers) = (0, Vec::new());
    for (i, body) in bodies.iter().enumerate() {
        let path = if i == 2 { "/v1/completions" } else { "/v1/chat/completions" };
        let logprobs = body.contains("logprobs");
        let r = cluster.post(path, &body.replace("\"M\"", &format!("\"{MODEL}\"")));
        assert_eq!(
            r.status,
            200,
            "{}\nnode log:\n{}\nserver log:\n{}",
            r.body,
            cluster.nodes[0].log_text(),
            cluster.server.log_text()
        );
        if logprobs {
            // One entry per billed token, the end of sequence included; the entries' bytes,
            // joined, are the text; the end of sequence adds none (`bytes: null`).
            let v = r.json();
            let content = v["choices"][0]["logprobs"]["content"].as_array().cloned().unwrap_or_default();
            assert_eq!(content.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap(), "{v}");
            let joined: Vec<u8> = content
                .iter()
                .flat_map(|e| e["bytes"].as_array().cloned().unwrap_or_default())
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            let text = v["choices"][0]["message"]["content"].as_str().unwrap();
            answers.push(format!("{}: {text:?}", v["choices"][0]["finish_reason"]));
            assert_eq!(String::from_utf8_lossy(&joined), text, "{v}");
            if v["choices"][0]["finish_reason"] == "stop" {
                let last = content.last().unwrap();
                assert!(last["bytes"].is_null() && !last["token"].as_str().unwrap().is_empty(), "{v}");
                ended_on_eos += 1;
            }
        }
    }
    assert!(ended_on_eos > 0, "{quantize}: no answer with log probabilities ended on the end of sequence: {answers:?}");
    let store = cluster.store();
    let verified = || numbers(&store, "SELECT count(*) FILTER (WHERE verification = 'verified') FROM receipts");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while verified() != vec![5] && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(verified(), vec![5], "{quantize}: server log:\n{}", cluster.server.log_text());
    assert_eq!(numbers(&store, "SELECT count(*) FROM verifications WHERE outcome = 'failed'"), vec![0], "{quantize}");
    assert_eq!(numbers(&store, "SELECT min(reputation)::bigint FROM nodes"), vec![10_000]);
}

#[test]
fn a_node_that_edits_a_token_is_caught_quarantined_and_unpaid() {
    let Some(path) = smollm2() else { return };
    let cluster = Cluster::start(&verifier_config(&path));
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let engine = Engine::start(
        Model::load(&path, Device::Cpu, None).unwrap(),
        EngineConfig { max_batch: 1, ..Default::default() },
    )
    .unwrap();
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    // The game retries until the rogue has joined (503 before that).
    let game = std::thread::spawn(move || {
        (0..100).find_map(|_| {
            try_chat(&addr, &key, MODEL).or_else(|| {
                std::thread::sleep(Duration::from_millis(200));
                None
            })
        })
    });
    let task = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, MODEL).await;
        let spec = rogue.task(&mut []).await;
        let challenge: [u8; 32] =
            hex::decode(spec.challenge.as_deref().expect("a challenge")).unwrap().try_into().unwrap();
        let TaskInput::Chat(messages) = &spec.input else { panic!("a chat task") };
        // Run the real model honestly...
        let request = GenerateRequest {
            prompt: model.chat_prompt(messages).unwrap(),
            params: spec.params.clone(),
            max_tokens: spec.max_tokens,
            collect_hidden: true,
            ..GenerateRequest::default()
        };
        let mut rx = engine.submit(request).unwrap();
        let mut builder = ProofBuilder::new(challenge, DEFAULT_TOP_K);
        let mut completion = Vec::new();
        while let Some(event) = rx.recv().await {
            builder.observe(&event);
            match event {
                Event::Token { id, .. } => completion.push(id),
                Event::Done(_) => break,
                Event::PromptHidden { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        // ...then edit one token and sign everything over the edited output.
        assert!(completion.len() > 3);
        completion[2] = (completion[2] + 4242) % 49_152;
        let proof = builder.finish(&rogue.id, spec.id.0, MODEL, &completion).unwrap();
        for (index, &token) in completion.iter().enumerate() {
            let m = NodeMessage::Token { id: spec.id, index, token, text: "x".into(), logprobs: None };
            rogue.link.send(&m).await.unwrap();
        }
        let receipt = SignedReceipt::sign(&rogue.id, spec.ticket.clone(), spec.ticket.prompt.tokens, &completion);
        let usage = TaskUsage { prompt_tokens: 30, completion_tokens: completion.len() };
        let done = NodeMessage::Done {
            id: spec.id,
            finish_reason: FinishReason::Length,
            usage,
            tail: String::new(),
            receipt,
            proof: Some(Box::new(proof)),
        };
        rogue.link.send(&done).await.unwrap();
        // Stay connected (heartbeats) while the verdict lands and the block commits.
        rogue.idle(&mut [], Duration::from_millis(2500)).await;
        spec.id.0
    });
    assert!(game.join().unwrap().is_some(), "the game got its (edited) answer");
    let store = cluster.store();
    wait_for("the failed verdict on the books", Duration::from_secs(30), || {
        numbers(
            &store,
            &format!("SELECT count(*) FROM receipts WHERE task_id = {} AND verification = 'failed'", task as i64),
        ) == vec![1]
    });
    assert_eq!(numbers(&store, "SELECT reputation::bigint FROM nodes WHERE status = 'quarantined'"), vec![7_500]);
    let log = cluster.server.log_text();
    assert!(log.contains("node quarantined: proof of inference failed"), "{log}");
    assert!(log.contains("not what the seeded sampler picks") || log.contains("hidden states differ"), "{log}");
    // Its rejected proof is kept, and fails offline as well.
    let kept = cluster.dir.path().join(format!("data/proofs/rejected/{}.json", ludus::protocol::TaskId(task)));
    assert!(kept.exists(), "{}", kept.display());
    // It holds the game's prompt: the server's user alone may read it.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&kept), 0o600, "a rejected proof's file mode");
    assert_eq!(mode(kept.parent().unwrap()), 0o700, "the rejected proofs' directory mode");
    let out = crate::cluster::ludus()
        .args(["verify", kept.to_str().unwrap(), "--model", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["verdict"]["accepted"], false);
    assert!(verdict["verdict"]["token_mismatches"].as_u64().unwrap() >= 1, "{verdict}");
    engine.shutdown();
}

/// A request that arrives while the only node serving its model is quarantined waits in
/// the queue, and goes to that node once the quarantine runs out (it used to wait for an
/// unrelated event, or time out).
#[test]
fn queued_work_goes_to_a_node_whose_quarantine_ran_out() {
    let Some(path) = smollm2() else { return };
    let config = verifier_config(&path).replace("quarantine_s = 60", "quarantine_s = 2");
    let cluster = Cluster::start(&config);
    let (model, engine) = liar_model(&path);
    let body = r#"{"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Name a river."}]}"#;
    let post = |cluster: &Cluster| {
        let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
        std::thread::spawn(move || {
            super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes()).status
        })
    };
    let system = actix_rt::System::new();
    let mut rogue = system.block_on(Rogue::join(&cluster.addr, MODEL));
    let _ = system.block_on(rogue.next_task(Duration::from_millis(300))); // registers
    let first = post(&cluster);
    let task = system.block_on(rogue.next_task(Duration::from_secs(20))).expect("the rogue gets the task");
    let mut last = None;
    system.block_on(answer(&mut rogue, &model, &engine, task, Lie::EditToken, &mut last));
    assert_eq!(first.join().unwrap(), 200);
    let started = std::time::Instant::now();
    while !cluster.server.log_text().contains("node quarantined") {
        assert!(started.elapsed() < Duration::from_secs(30), "the rogue was never quarantined");
        system.block_on(rogue.idle(&mut [], Duration::from_millis(100)));
    }
    let _second = post(&cluster);
    let task = system.block_on(rogue.next_task(Duration::from_secs(8)));
    assert!(task.is_some(), "the queued request never reached the node after its quarantine");
    engine.shutdown();
}

/// A node that skips its proof, or sends one that is not about the task, is caught on
/// its first task though the policy samples none for the reference replay: the checks
/// that need no model run on every task before it is paid. It used to be paid whenever
/// the sampler looked away. The game never reads a non-streamed answer so proved; a
/// streamed one it has read is not paid for.
#[test]
fn a_node_skipping_or_forging_its_proof_is_caught_without_a_sampled_check() {
    let Some(path) = smollm2() else { return };
    // No replay at all (nor quality re-runs), and no quarantine, so the rogue gets each task.
    let config = verifier_config(&path)
        .replace("sample_rate = 1.0", "sample_rate = 0.0\nfirst_tasks = 0\nquality_check_rate = 0.0")
        .replace("quarantine_s = 60", "quarantine_s = 0");
    let cluster = Cluster::start(&config);
    let (model, engine) = liar_model(&path);
    let ask = |stream: bool| {
        let body = serde_json::json!({
            "model": MODEL, "max_tokens": 40, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": "Name three rivers."}]
        })
        .to_string();
        let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
        std::thread::spawn(move || {
            if stream {
                let mut events = super::cluster::SseStream::open(&addr, &key, &body);
                let mut data = Vec::new();
                while let Some(d) = events.next_data() {
                    data.push(d);
                }
                (events.status, data.join("\n"))
            } else {
                let r = super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes());
                (r.status, r.body)
            }
        })
    };
    let system = actix_rt::System::new();
    let mut rogue = system.block_on(Rogue::join(&cluster.addr, MODEL));
    let _ = system.block_on(rogue.next_task(Duration::from_millis(300))); // registers
    let mut last = None;
    for lie in [Lie::NoProof, Lie::ForeignChallenge, Lie::DroppedChunk] {
        let game = ask(false);
        let task = system.block_on(rogue.next_task(Duration::from_secs(20))).expect("the rogue gets the task");
        system.block_on(answer(&mut rogue, &model, &engine, task, lie, &mut last));
        let (status, body) = game.join().unwrap();
        // Produced again elsewhere: there is no other node.
        assert_eq!(status, 502, "{lie:?}: the game read an answer without a valid proof: {body}");
    }
    // A stream: the game has read every token when the proof arrives.
    let game = ask(true);
    let task = system.block_on(rogue.next_task(Duration::from_secs(20))).expect("the rogue gets the task");
    system.block_on(answer(&mut rogue, &model, &engine, task, Lie::DroppedChunk, &mut last));
    let (status, events) = game.join().unwrap();
    assert_eq!(status, 200, "{events}");
    assert!(events.ends_with("[DONE]") && !events.lines().any(|l| l.starts_with(r#"{"error""#)), "{events}");
    system.block_on(rogue.idle(&mut [], Duration::from_millis(1500)));
    let store = cluster.store();
    wait_for("four failed verdicts", Duration::from_secs(20), || {
        numbers(&store, "SELECT count(*) FROM verifications WHERE outcome = 'failed'") == vec![4]
    });
    assert_eq!(numbers(&store, "SELECT count(*) FROM receipts"), vec![0], "a task without a valid proof was paid");
    assert!(numbers(&store, "SELECT reputation::bigint FROM nodes")[0] < 10_000);
    let log = cluster.server.log_text();
    for why in ["no proof for a task that carried a challenge", "another task or challenge", "chunk commitments for"] {
        assert!(log.contains(why), "{why:?} not in the server log:\n{log}");
    }
    assert!(!log.contains("proof verified"), "the replay ran: {log}");
    engine.shutdown();
}

/// A node whose proof fails the checks that need no model is quarantined before its slot
/// is freed: the job queued behind its task does not reach it. The proxy used to free the
/// slot on `Done`, before Completion judged the proof, so the Distributor handed the queued
/// job to the node it was about to quarantine.
#[test]
fn a_node_caught_without_its_proof_gets_no_queued_job() {
    let Some(path) = smollm2() else { return };
    let config = verifier_config(&path)
        .replace("sample_rate = 1.0", "sample_rate = 0.0\nfirst_tasks = 0\nquality_check_rate = 0.0");
    let cluster = Cluster::start(&config);
    let (model, engine) = liar_model(&path);
    let ask = |n: usize| {
        let body = serde_json::json!({
            "model": MODEL, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": format!("Name {n} rivers.")}]
        })
        .to_string();
        let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
        std::thread::spawn(move || {
            let r = super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes());
            (r.status, r.body)
        })
    };
    let system = actix_rt::System::new();
    let id = ludus::crypto::identity::Identity::generate();
    let mut rogue = system.block_on(Rogue::join_with(&cluster.addr, MODEL, id, 1));
    let _ = system.block_on(rogue.next_task(Duration::from_millis(300))); // registers
    let first = ask(2);
    let task = system.block_on(rogue.next_task(Duration::from_secs(20))).expect("the rogue gets the first task");
    // The second waits in the queue: the rogue's one slot is taken.
    let second = ask(3);
    // The Distributor's block line counts the queue (heartbeats keep the rogue alive).
    let started = std::time::Instant::now();
    while !cluster.server.log_text().contains("queued=1") {
        assert!(started.elapsed() < Duration::from_secs(20), "the second job never queued");
        system.block_on(rogue.idle(&mut [], Duration::from_millis(100)));
    }
    let mut last = None;
    system.block_on(answer(&mut rogue, &model, &engine, task, Lie::NoProof, &mut last));
    let (status, body) = first.join().unwrap();
    assert_eq!(status, 502, "the game read an answer without its proof: {body}");
    let next = system.block_on(rogue.next_task(Duration::from_secs(3)));
    assert!(next.is_none(), "the queued job reached the node caught without its proof: {next:?}");
    let log = cluster.server.log_text();
    assert!(log.contains("node quarantined: proof of inference failed"), "{log}");
    // No other node: the queued job ends with an error, never with the rogue's answer.
    let (status, body) = second.join().unwrap();
    assert_ne!(status, 200, "{body}");
    engine.shutdown();
}

/// How a protocol-level liar cheats.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Lie {
    EditToken,
    EditPrompt,
    Replay,
    /// Honest output, commitments of one value per row (the node used to choose k).
    NarrowTopK,
    /// Honest output, no proof at all.
    NoProof,
    /// Honest output and commitments, signed for another challenge than the task's.
    ForeignChallenge,
    /// Honest output, its last chunk commitment left out (and the proof signed again).
    DroppedChunk,
}

enum NodeKind {
    /// An honest `ludus node` process with these extra flags.
    Binary(&'static [&'static str]),
    /// The real node agent, in-process, serving a cheater model.
    Agent(fn(&std::path::Path) -> Model),
    /// A test double that runs the real model and lies about the output.
    Rogue(Lie),
}

struct NetCase {
    name: &'static str,
    honest: bool,
    node: NodeKind,
}

const ASKS: &[&str] = &[
    "Greet the traveller as a grumpy blacksmith.",
    "What do you sell, merchant?",
    "Tell me a rumour about the old mill.",
    "Why is the bridge closed today?",
    "Give the hero a riddle.",
    "Warn the player about wolves in the forest.",
];

/// Runs `request` on `engine` to its end, feeding `builder`, and keeps heartbeating
/// meanwhile, like a real node: the completion's token ids.
async fn generate_heartbeating(
    rogue: &mut Rogue,
    engine: &Engine,
    request: GenerateRequest,
    builder: &mut ProofBuilder,
) -> Vec<u32> {
    let mut rx = engine.submit(request).unwrap();
    let mut beat = actix_rt::time::interval(Duration::from_millis(100));
    let mut completion = Vec::new();
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = beat.tick() => {
                let _ = rogue.link.send(&NodeMessage::Heartbeat(Default::default())).await;
                continue;
            }
        };
        let Some(event) = event else { break };
        builder.observe(&event);
        match event {
            Event::Token { id, .. } => completion.push(id),
            Event::Done(_) => break,
            Event::PromptHidden { .. } | Event::PromptCached { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    completion
}

/// A persona long enough that nodes cut the prompt at its end (as they do a game's): the
/// prompt's last rows, which a proof commits to, are computed apart from the persona's.
pub const PERSONA: &str = "You are Brakka, the smith of Emberfall, a village under a sleeping volcano. You speak \
    in short, gruff sentences, hate haggling, and soften only when someone mentions your late brother Torv.";

/// [`PERSONA`], said `LUDUS_PROOF_PERSONA_REPEAT` times over (default once): repeated 6
/// times it is about 300 tokens, so a node prefills it in several chunks of its own
/// while the verifier replays it in one (the calibration of long prompts).
fn persona() -> String {
    let times = std::env::var("LUDUS_PROOF_PERSONA_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    vec![PERSONA; times].join(" ")
}

fn body(i: usize) -> String {
    let sampling = if i.is_multiple_of(2) {
        r#""temperature": 0"#.to_string()
    } else {
        format!(r#""temperature": 0.8, "top_p": 0.95, "seed": {i}"#)
    };
    serde_json::json!({
        "model": MODEL, "max_tokens": 40,
        "messages": [
            {"role": "system", "content": persona()},
            {"role": "user", "content": format!("{} (#{i})", ASKS[i % ASKS.len()])}
        ]
    })
    .to_string()
    .replacen('{', &format!("{{{sampling}, "), 1)
}

/// The real model for a liar: one copy to render prompts, one in an engine.
pub fn liar_model(path: &std::path::Path) -> (Model, Engine) {
    let config = EngineConfig { max_batch: 1, max_context: 512, threads: 2, ..Default::default() };
    (
        Model::load(path, Device::Cpu, None).unwrap(),
        Engine::start(Model::load(path, Device::Cpu, None).unwrap(), config).unwrap(),
    )
}

/// Answers one task as `lie` says: real model, then a lie about the output or its proof.
pub async fn answer(
    rogue: &mut Rogue,
    model: &Model,
    engine: &Engine,
    spec: ludus::protocol::TaskSpec,
    lie: Lie,
    last: &mut Option<ludus::proof::Proof>,
) {
    let challenge: [u8; 32] = hex::decode(spec.challenge.as_deref().expect("a challenge")).unwrap().try_into().unwrap();
    let TaskInput::Chat(messages) = &spec.input else { panic!("a chat task") };
    let mut prompt = model.chat_prompt(messages).unwrap();
    if lie == Lie::EditPrompt {
        // Deterministic per request (not per random task id), so runs repeat.
        let h = prompt.iter().fold(0u64, |a, &t| a.wrapping_mul(31).wrapping_add(t as u64));
        let at = prompt.len() - 12 - (h % 4) as usize;
        prompt[at] = (prompt[at] + 7919 * (1 + (h % 7) as u32)) % 49_152;
    }
    let request = GenerateRequest {
        prompt,
        params: spec.params.clone(),
        max_tokens: spec.max_tokens,
        collect_hidden: true,
        ..GenerateRequest::default()
    };
    let top_k = if lie == Lie::NarrowTopK { 1 } else { DEFAULT_TOP_K };
    let mut builder = ProofBuilder::new(challenge, top_k);
    let mut completion = generate_heartbeating(rogue, engine, request, &mut builder).await;
    if lie == Lie::EditToken && completion.len() > 2 {
        completion[2] = (completion[2] + 4242) % 49_152;
    }
    let mut proof = builder.finish(&rogue.id, spec.id.0, MODEL, &completion).unwrap();
    if lie == Lie::Replay {
        let previous = match last.replace(proof.clone()) {
            Some(previous) => previous,
            // The first task: commitments of another task made up front.
            None => {
                let other = model.completion_prompt("Another task entirely: describe the sea.").unwrap();
                let request = GenerateRequest {
                    prompt: other,
                    max_tokens: spec.max_tokens,
                    collect_hidden: true,
                    ..GenerateRequest::default()
                };
                let mut builder = ProofBuilder::new(rand::random(), DEFAULT_TOP_K);
                // Heartbeating here too: on a loaded machine this answer alone can outlast
                // the server's heartbeat timeout.
                let tokens = generate_heartbeating(rogue, engine, request, &mut builder).await;
                builder.finish(&rogue.id, 0, MODEL, &tokens).unwrap()
            }
        };
        proof.prompt = previous.prompt;
        proof.chunks = previous.chunks;
        proof.chunks.resize(completion.len().div_ceil(32), proof.prompt[0].clone());
        proof.signature = hex::encode(rogue.id.sign(&proof.digest()));
    }
    let resign = |proof: &mut ludus::proof::Proof| proof.signature = hex::encode(rogue.id.sign(&proof.digest()));
    match lie {
        Lie::ForeignChallenge => {
            proof.challenge = hex::encode(rand::random::<[u8; 32]>());
            resign(&mut proof);
        }
        Lie::DroppedChunk => {
            proof.chunks.pop();
            resign(&mut proof);
        }
        _ => {}
    }
    let proof = (lie != Lie::NoProof).then(|| Box::new(proof));
    for (index, &token) in completion.iter().enumerate() {
        rogue
            .link
            .send(&NodeMessage::Token { id: spec.id, index, token, text: "x".into(), logprobs: None })
            .await
            .unwrap();
    }
    let receipt = SignedReceipt::sign(&rogue.id, spec.ticket.clone(), spec.ticket.prompt.tokens, &completion);
    let usage = TaskUsage { prompt_tokens: 30, completion_tokens: completion.len() };
    let done = NodeMessage::Done {
        id: spec.id,
        finish_reason: FinishReason::Length,
        usage,
        tail: String::new(),
        receipt,
        proof,
    };
    rogue.link.send(&done).await.unwrap();
}

/// Starts the case's node; it runs until `stop`.
fn start_node(
    case: &NetCase,
    cluster: &mut Cluster,
    path: &std::path::Path,
    stop: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    let (addr, path) = (cluster.addr.clone(), path.to_path_buf());
    let until_stopped = move |stop: Arc<AtomicBool>| async move {
        while !stop.load(Ordering::Relaxed) {
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
    };
    match case.node {
        NodeKind::Binary(flags) => {
            let mut args = vec!["--model", path.to_str().unwrap()];
            args.extend_from_slice(flags);
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            cluster.add_node(&args.iter().map(String::as_str).collect::<Vec<_>>());
            None
        }
        NodeKind::Agent(make) => {
            let key = cluster.dir.path().join("agent.key");
            Some(std::thread::spawn(move || {
                let config = EngineConfig { max_batch: 8, threads: 2, ..Default::default() };
                let backend = Arc::new(Backend::Engine(Engine::start(make(&path), config).unwrap()));
                let options = NodeOptions {
                    connect: format!("ws://{addr}/ws/node"),
                    key,
                    capacity: 8,
                    distributor_address: None,
                    receipts: None,
                };
                actix_rt::System::new().block_on(async move {
                    tokio::select! {
                        _ = run_node(backend, options) => {}
                        _ = until_stopped(stop) => {}
                    }
                });
            }))
        }
        NodeKind::Rogue(lie) => {
            let (model, engine) = liar_model(&path);
            Some(std::thread::spawn(move || {
                actix_rt::System::new().block_on(async {
                    let mut rogue = Rogue::join(&addr, MODEL).await;
                    let mut last = None;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(spec) = rogue.next_task(Duration::from_millis(300)).await {
                            answer(&mut rogue, &model, &engine, spec, lie, &mut last).await;
                        }
                    }
                });
                engine.shutdown();
            }))
        }
    }
}

/// Honest nodes in every dtype, batch and thread setting, and cheaters of every kind,
/// all over the real protocol, every task checked by the server's verifier pool.
/// `LUDUS_PROOF_TASKS=N` tasks per case (default 3), `LUDUS_PROOF_PERSONA_REPEAT` for
/// long prompts ([`persona`]); the table in
/// docs/proof-of-inference.md is `LUDUS_PROOF_TASKS=100 cargo test --test it
/// network_proof::every -- --nocapture`.
#[test]
fn every_cheater_is_rejected_and_no_honest_node_is() {
    let Some(path) = smollm2() else { return };
    let n: usize = std::env::var("LUDUS_PROOF_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let cases = [
        NetCase {
            name: "honest f32, batch 1",
            honest: true,
            node: NodeKind::Binary(&["--capacity", "1", "--threads", "2", "--quantize", "none"]),
        },
        NetCase {
            name: "honest f32, batch 8, 2 threads",
            honest: true,
            node: NodeKind::Binary(&["--capacity", "8", "--threads", "2", "--quantize", "none"]),
        },
        NetCase {
            name: "honest f32, batch 8, 1 thread",
            honest: true,
            node: NodeKind::Binary(&["--capacity", "8", "--threads", "1", "--quantize", "none"]),
        },
        NetCase {
            name: "honest bf16, batch 8",
            honest: true,
            node: NodeKind::Binary(&["--capacity", "8", "--dtype", "bf16", "--quantize", "none"]),
        },
        NetCase {
            name: "honest f16, batch 8",
            honest: true,
            node: NodeKind::Binary(&["--capacity", "8", "--dtype", "f16", "--quantize", "none"]),
        },
        NetCase {
            name: "honest int8, batch 8",
            honest: true,
            node: NodeKind::Binary(&["--capacity", "8", "--quantize", "int8"]),
        },
        NetCase {
            name: "honest int4 (the default), batch 8",
            honest: true,
            node: NodeKind::Binary(&["--capacity", "8"]),
        },
        NetCase {
            name: "another model, same shapes",
            honest: false,
            node: NodeKind::Agent(super::proof::shifted_layers),
        },
        NetCase {
            name: "same model, requantized (4-bit)",
            honest: false,
            node: NodeKind::Agent(super::proof::requantized),
        },
        NetCase { name: "one layer skipped", honest: false, node: NodeKind::Agent(super::proof::layer_skipped) },
        NetCase { name: "one output token edited", honest: false, node: NodeKind::Rogue(Lie::EditToken) },
        NetCase { name: "prompt edited (one token)", honest: false, node: NodeKind::Rogue(Lie::EditPrompt) },
        NetCase { name: "commitments replayed from another task", honest: false, node: NodeKind::Rogue(Lie::Replay) },
        NetCase { name: "honest output, top-1 commitments", honest: false, node: NodeKind::Rogue(Lie::NarrowTopK) },
    ];
    let mut table = String::from(
        "| node (over the real protocol) | answered tasks | verified | rejected | rejection rate | worst value error of verified tasks: prompt / answer / mean |\n|---|---|---|---|---|---|\n",
    );
    let mut wrong = Vec::new();
    // LUDUS_PROOF_CASES=a|b runs only the cases whose name contains one of those.
    let only = std::env::var("LUDUS_PROOF_CASES").unwrap_or_default();
    for case in cases.iter().filter(|c| only.split('|').any(|o| c.name.contains(o))) {
        // Every task checked; no quarantine, so a cheater keeps getting tasks to be judged on.
        // (Distributor keys first: `extra` continues the [distributor] table.)
        let extra = format!(
            "node_timeout_ms = 5000\n{}",
            verifier_config(&path).replace("quarantine_s = 60", "quarantine_s = 0")
        );
        let mut cluster = Cluster::start(&extra);
        let stop = Arc::new(AtomicBool::new(false));
        let node = start_node(case, &mut cluster, &path, stop.clone());
        cluster.wait_nodes(MODEL, 1);
        // One request at a time for nodes that run one at a time (no queue timeouts).
        let serial = matches!(case.node, NodeKind::Rogue(_)) || case.name.contains("batch 1");
        let clients = if serial { 1 } else { 4 };
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done: Vec<u64> = (0..clients)
            .map(|_| {
                let (addr, key, next, name) = (cluster.addr.clone(), cluster.key.clone(), next.clone(), case.name);
                let refused = refused.clone();
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return ids;
                        }
                        // A doctored model in the test process, next to other tests, can
                        // be slow: wait long enough that slowness is not counted as silence.
                        match post_chat_within(&addr, &key, &body(i), Duration::from_secs(180)) {
                            Ok(id) => ids.push(id),
                            // Judged before the game could read it (`proof::structure`).
                            Err(why) if why.contains("the node's proof failed its checks") => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(why) => eprintln!("{name}: request {i} failed: {why}"),
                        }
                    }
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        // Honest nodes answer every request. A cheater's reliability is not what is measured
        // (a doctored model under load may fail or time out a request): it is judged on the
        // tasks it answered, or whose proof the server refused before the game read them,
        // which must be most of them.
        let answered = done.len() + refused.load(Ordering::Relaxed);
        assert!(answered == n || (!case.honest && answered * 2 >= n), "{}: {answered} of {n} answered", case.name);
        let store = cluster.store();
        // A check the verifier pool had no room for waits in the backlog, recorded
        // `unverifiable` meanwhile: only a verdict counts.
        wait_for("every answered task checked", Duration::from_secs(600), || {
            numbers(&store, "SELECT count(*) FROM verifications WHERE outcome <> 'unverifiable'")
                == vec![answered as i64]
        });
        let verified = numbers(&store, "SELECT count(*) FROM verifications WHERE outcome = 'verified'")[0] as usize;
        let rejected = answered - verified;
        let n = answered;
        // No honest task rejected; at least 99 % of a cheater's tasks rejected.
        let bad = if case.honest { rejected > 0 } else { (rejected as f64 / n as f64) < 0.99 };
        if bad {
            // Why an honest task was refused is what the next person needs to see.
            if case.honest {
                let sql =
                    "SELECT outcome || ': ' || coalesce(detail, '') FROM verifications WHERE outcome <> 'verified'";
                for why in texts(&store, sql) {
                    eprintln!("{}: refused: {why}", case.name);
                }
            }
            wrong.push(format!("{}: {verified} verified, {rejected} rejected", case.name));
        }
        // The worst value errors among verified tasks: of a prompt row, of an answer row,
        // and of the mean over a task's commitments (the verifier's detail names them).
        let mut worst: Option<[f64; 3]> = None;
        for detail in texts(&store, "SELECT detail FROM verifications WHERE outcome = 'verified'") {
            let after = |key: &str| detail.split(key).nth(1)?.split([' ', ')', ',']).next()?.parse::<f64>().ok();
            if let (Some(p), Some(a), Some(m)) = (after("(prompt "), after("answer "), after("mean ")) {
                let w = worst.get_or_insert([0.0; 3]);
                *w = [w[0].max(p), w[1].max(a), w[2].max(m)];
            }
        }
        let worst = worst.map_or("—".to_string(), |[p, a, m]| format!("{p:.4} / {a:.4} / {m:.4}"));
        // Verified only on the second replay, as the node ran the task (its figures above).
        let sql = "SELECT count(*) FROM verifications WHERE detail LIKE '%replayed as the node ran it%'";
        let second = numbers(&store, sql)[0];
        let row = format!(
            "| {} | {n} | {verified} ({second} on the second replay) | {rejected} | {:.1} % | {worst} |\n",
            case.name,
            100.0 * rejected as f64 / n as f64
        );
        eprint!("{row}");
        table.push_str(&row);
        stop.store(true, Ordering::Relaxed);
        if let Some(h) = node {
            h.join().unwrap();
        }
    }
    eprintln!("\n{table}");
    if let Ok(out) = std::env::var("LUDUS_PROOF_NET_TABLE") {
        std::fs::write(out, &table).unwrap();
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn synchronous_mode_never_lets_a_failed_answer_reach_the_game() {
    let Some(path) = smollm2() else { return };
    // The rogue holds its task while the honest node loads (over 60 s on a loaded 2-core
    // machine): the server must not take the task away as stalled meanwhile, or the rogue's
    // answer is never checked and the case tests nothing.
    let stall = "task_stall_timeout_ms = 600000\n";
    let mut cluster = Cluster::start(&format!("{stall}{}synchronous = true\n", verifier_config(&path)));
    let (model, engine) = liar_model(&path);
    let body = r#"{"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 24, "temperature": 0, "messages": [{"role": "user", "content": "Name three fruits."}]}"#;
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let system = actix_rt::System::new();
    let mut rogue = system.block_on(Rogue::join(&cluster.addr, MODEL));
    let spec = system.block_on(async {
        let _ = rogue.next_task(Duration::from_millis(300)).await; // registers with a heartbeat
        std::thread::spawn(move || {
            let r = super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes());
            (r.status, r.body)
        })
    });
    let game = spec;
    let task =
        system.block_on(async { rogue.next_task(Duration::from_secs(20)).await.expect("the rogue gets the task") });
    // An honest node joins before the rogue answers: the re-run goes there.
    cluster.add_node(&["--model", path.to_str().unwrap()]);
    let nodes = |c: &Cluster| {
        let (_, body) = c.get("/v1/models");
        serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["data"][0]["nodes"].as_u64()).unwrap_or(0)
    };
    let joined = std::time::Instant::now();
    while nodes(&cluster) < 2 {
        assert!(joined.elapsed() < Duration::from_secs(180), "the honest node never joined");
        system.block_on(rogue.idle(&mut [], Duration::from_millis(200))); // keep the rogue alive
    }
    let mut last = None;
    system.block_on(answer(&mut rogue, &model, &engine, task, Lie::EditToken, &mut last));
    system.block_on(rogue.idle(&mut [], Duration::from_millis(500)));
    let (status, body) = game.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty() && !text.chars().all(|c| c == 'x'), "the rogue's answer reached the game: {text:?}");
    let store = cluster.store();
    let outcomes = "SELECT count(*) FILTER (WHERE outcome = 'failed'), count(*) FILTER (WHERE outcome = 'verified') FROM verifications";
    let started = std::time::Instant::now();
    while numbers(&store, outcomes) != vec![1, 1] {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "[failed, verified] = {:?}, not [1, 1]; server log:\n{}",
            numbers(&store, outcomes),
            cluster.server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cluster.server.log_text().contains("failed verification"));
    assert!(!cluster.server.log_text().contains("no progress for"), "the rogue's task was taken away as stalled");
    // The answer's id names the receipt the game pays: the re-run's, not the rogue's
    // refused one (a game auditing it with `verify-receipt` used to find that one).
    let id = reply["id"].as_str().unwrap().trim_start_matches("chatcmpl-");
    let billed = u64::from_str_radix(id, 16).unwrap() as i64;
    let receipt = format!(
        "SELECT completion_tokens::bigint, (verification = 'failed')::int::bigint FROM receipts WHERE task_id = {billed}"
    );
    wait_for("the billed receipt", Duration::from_secs(20), || !numbers(&store, &receipt).is_empty());
    let usage = reply["usage"]["completion_tokens"].as_i64().unwrap();
    assert_eq!(numbers(&store, &receipt), vec![usage, 0], "the answer names the receipt billed for it");
    engine.shutdown();
}

/// A quarantine outlives the server that decided it: it is in the ledger, and a server
/// reads it when the node joins (after a restart, or on another server of the network that
/// missed the notice). It used to live in one process's memory: a node caught cheating
/// waited for a restart, or moved to another server, and was given work at once. A ledger
/// that cannot take the quarantine when it is decided gets it once it can (it was written
/// once, and lost to an outage).
#[test]
fn a_quarantine_outlives_a_server_restart() {
    let Some(path) = smollm2() else { return };
    let mut cluster = Cluster::start(&verifier_config(&path));
    let (model, engine) = liar_model(&path);
    let secret = [11u8; 32];
    let identity = || ludus::crypto::identity::Identity::from_secret(&secret).unwrap();
    let body = r#"{"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Name a colour."}]}"#;
    let ask = |addr: String, key: String| {
        std::thread::spawn(move || {
            super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes())
        })
    };
    let system = actix_rt::System::new();
    // The rogue edits a token of its answer: the verifier catches it.
    let mut rogue = system.block_on(Rogue::join_as(&cluster.addr, MODEL, identity()));
    let _ = system.block_on(rogue.next_task(Duration::from_millis(300))); // registers
    let game = ask(cluster.addr.clone(), cluster.key.clone());
    let task = system.block_on(rogue.next_task(Duration::from_secs(30))).expect("the rogue gets the task");
    // The ledger cannot take the quarantine when it is decided (as in a database outage):
    // the server writes it once the ledger can again.
    let store = cluster.store();
    let sql = |statement: &'static str| {
        super::database::block_on(async { store.conn().await.unwrap().batch_execute(statement).await.unwrap() })
    };
    sql("ALTER TABLE nodes RENAME COLUMN quarantined_until TO out_of_reach");
    let mut last = None;
    system.block_on(answer(&mut rogue, &model, &engine, task, Lie::EditToken, &mut last));
    let _ = game.join();
    let refused = "could not write a quarantine to the ledger";
    let started = std::time::Instant::now();
    while !cluster.server.log_text().contains(refused) {
        assert!(started.elapsed() < Duration::from_secs(60), "no refused write:\n{}", cluster.server.log_text());
        system.block_on(rogue.idle(&mut [], Duration::from_millis(100)));
    }
    sql("ALTER TABLE nodes RENAME COLUMN out_of_reach TO quarantined_until");
    let written = "SELECT count(*) FROM nodes WHERE quarantined_until > now() + interval '30 seconds'";
    let started = std::time::Instant::now();
    while numbers(&store, written) != vec![1] {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no quarantine in the ledger:\n{}",
            cluster.server.log_text()
        );
        system.block_on(rogue.idle(&mut [], Duration::from_millis(100)));
    }
    drop(rogue);
    // The server restarts; the rogue comes back as the model's only node: no work.
    cluster.restart_server();
    let mut again = system.block_on(Rogue::join_as(&cluster.addr, MODEL, identity()));
    let _ = system.block_on(again.next_task(Duration::from_millis(300)));
    let _waiting = ask(cluster.addr.clone(), cluster.key.clone());
    assert!(
        system.block_on(again.next_task(Duration::from_secs(3))).is_none(),
        "a quarantined node got work from the restarted server"
    );
    assert!(cluster.server.log_text().contains("a quarantined node joined; kept out of rotation"));
    engine.shutdown();
}

/// A quality-check re-run waits in the queue for a second node; on a one-node network it
/// must not hold up the requests that come after it (they used to wait for the queue
/// timeout and get 503).
#[test]
fn a_rerun_waiting_for_a_second_node_does_not_hold_up_new_requests() {
    let Some(path) = smollm2() else { return };
    let config = quality_checks_only(&path);
    let mut cluster = Cluster::start(&config);
    cluster.add_node(&["--model", path.to_str().unwrap(), "--threads", "1"]);
    cluster.wait_nodes(MODEL, 1);
    for prompt in ["The dragon said", "The blacksmith said", "The innkeeper said"] {
        let body = format!(r#"{{"model": "{MODEL}", "max_tokens": 8, "temperature": 0, "prompt": "{prompt}"}}"#);
        let r = cluster.post("/v1/completions", &body);
        assert_eq!(r.status, 200, "{prompt}: {}\nserver log:\n{}", r.body, cluster.server.log_text());
    }
    // A model the verifiers do not hold gets no re-run: its disagreement could be judged by
    // nothing (it used to be re-run, and paid for, all the same).
    cluster.add_node(&["--fake-engine", "4:1"]);
    cluster.wait_nodes("fake", 1);
    let r = cluster.post("/v1/completions", r#"{"model": "fake", "max_tokens": 4, "prompt": "Once"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    // Each answer queued a re-run that no node may take (only the original's node exists).
    let log = cluster.server.log_text();
    assert_eq!(log.matches("quality check: re-running on another node").count(), 3, "{log}");
}

/// A quality-check re-run that disagrees leaves the original unpaid at once: the check of
/// the original goes through the backlog, whose write marks its receipt `unverifiable` in
/// the same transaction. It used to stay `unchecked` (payable) until the verdict landed.
/// Here no server claims from the backlog until a restart (a 10-minute poll), so the task
/// waits unpaid, deterministically; the restarted server then condemns the rogue.
#[test]
fn a_quality_check_rerun_catches_a_cheater_the_sampler_skipped() {
    let Some(path) = smollm2() else { return };
    // Only the quality-check re-run can catch the rogue.
    let config = quality_checks_only(&path) + "backlog_poll_ms = 600000\n";
    let mut cluster = Cluster::start(&config);
    let (model, engine) = liar_model(&path);
    let body = r#"{"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 24, "temperature": 0, "messages": [{"role": "user", "content": "Name three rivers."}]}"#;
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let system = actix_rt::System::new();
    let mut rogue = system.block_on(Rogue::join(&cluster.addr, MODEL));
    let _ = system.block_on(rogue.next_task(Duration::from_millis(300))); // registers
    let game = std::thread::spawn(move || {
        super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes()).status
    });
    let task = system.block_on(rogue.next_task(Duration::from_secs(20))).expect("the rogue gets the task");
    let original = task.id.0 as i64;
    let mut last = None;
    system.block_on(answer(&mut rogue, &model, &engine, task, Lie::EditToken, &mut last));
    assert_eq!(game.join().unwrap(), 200, "not synchronous: the game got the rogue's answer");
    // The re-run needs a second node; the rogue stays connected meanwhile.
    cluster.add_node(&["--model", path.to_str().unwrap()]);
    let store = cluster.store();
    let state = || receipt_verification(&store, original);
    // The limit guards against a hang, not a speed claim: the second node loads and
    // quantizes the model while the rest of the suite runs beside it (90 s was not enough
    // on a 2-core Xeon).
    heartbeat_until(&system, &mut rogue, &cluster, original, "unverifiable", Duration::from_secs(400));
    let log = cluster.server.log_text();
    assert!(log.contains("quality check disagreed"), "{log}");
    // Why it waits, written with the mark (the log line of it may come a moment later).
    let why = format!("SELECT count(*) FROM verifications WHERE task_id = {original} AND detail LIKE '%a quality-check re-run disagreed%'");
    assert_eq!(numbers(&store, &why), vec![1], "{log}");
    // The re-run is billed to the operator's internal game, never to the player's.
    wait_for("the re-run's receipt", Duration::from_secs(30), || {
        numbers(
            &store,
            "SELECT count(*) FROM receipts r JOIN games g ON g.id = r.game_id WHERE g.name = 'ludus-quality-checks'",
        ) == vec![1]
    });
    system.block_on(rogue.idle(&mut [], Duration::from_millis(1500)));
    assert_eq!(state().as_deref(), Some("unverifiable"), "unpaid while its check waits");
    // The waiting check is in Postgres: the restarted server claims it and condemns.
    cluster.restart_server();
    wait_for("the rogue's verdict", Duration::from_secs(120), || state().as_deref() == Some("failed"));
    let detail = format!("SELECT count(*) FROM verifications WHERE task_id = {original} AND outcome = 'failed'");
    assert_eq!(numbers(&store, &detail), vec![1]);
    engine.shutdown();
}

/// A quality-check re-run is checked itself, whatever the sampler says: a rogue that draws
/// the re-run of an honest node's task and answers with a lie is judged (a second identity
/// of a cheater could as well agree with its lie). It used to go unchecked unless
/// sampled, while the disagreement had the honest original checked.
#[test]
fn a_rogue_taking_a_quality_check_rerun_is_checked_itself() {
    let Some(path) = smollm2() else { return };
    let mut cluster = Cluster::start(&quality_checks_only(&path));
    cluster.add_node(&["--model", path.to_str().unwrap()]);
    cluster.wait_nodes(MODEL, 1);
    let (model, engine) = liar_model(&path);
    let body = r#"{"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 24, "temperature": 0, "messages": [{"role": "user", "content": "Name three rivers."}]}"#;
    let r = cluster.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.body);
    // The re-run may not go to the honest node that made the original: it waits for the rogue.
    let system = actix_rt::System::new();
    let mut rogue = system.block_on(Rogue::join(&cluster.addr, MODEL));
    let task = system.block_on(rogue.next_task(Duration::from_secs(30))).expect("the rogue gets the re-run");
    let rerun = task.id.0 as i64;
    let mut last = None;
    system.block_on(answer(&mut rogue, &model, &engine, task, Lie::EditToken, &mut last));
    heartbeat_until(&system, &mut rogue, &cluster, rerun, "failed", Duration::from_secs(120));
    engine.shutdown();
}

/// The verification state of `task`'s receipt (`None` until it is recorded).
fn receipt_verification(store: &ludus::ledger::Store, task: i64) -> Option<String> {
    let sql = format!("SELECT verification FROM receipts WHERE task_id = {task}");
    super::database::block_on(async { store.conn().await.unwrap().query_opt(&sql, &[]).await.unwrap() })
        .map(|row| row.get(0))
}

/// Heartbeats `rogue` (so that it stays joined) until `task`'s receipt reads `want`; fails
/// after `limit`, a guard against a hang, with the server's log.
fn heartbeat_until(
    system: &actix_rt::SystemRunner,
    rogue: &mut Rogue,
    cluster: &Cluster,
    task: i64,
    want: &str,
    limit: Duration,
) {
    let store = cluster.store();
    let started = std::time::Instant::now();
    while receipt_verification(&store, task).as_deref() != Some(want) {
        assert!(
            started.elapsed() < limit,
            "task {task}'s receipt never became {want} ({:?}); server log:\n{}",
            receipt_verification(&store, task),
            cluster.server.log_text()
        );
        system.block_on(rogue.idle(&mut [], Duration::from_millis(300)));
    }
}

/// The verification policy's state lives in Postgres: a node past its first tasks is not
/// checked on every task again after the server restarts (the counts used to live in one
/// process's memory, so every restart made every node "new" — and, the other way, forgot
/// which nodes were suspects).
#[test]
fn the_verification_policy_remembers_a_node_across_a_server_restart() {
    let Some(path) = smollm2() else { return };
    let config = verifier_config(&path).replace("sample_rate = 1.0", "sample_rate = 0.0\nfirst_tasks = 2");
    let mut cluster = Cluster::start(&config);
    cluster.add_node(&["--model", path.to_str().unwrap(), "--threads", "1", "--capacity", "1"]);
    cluster.wait_nodes(MODEL, 1);
    let body = |i: usize| {
        format!(r#"{{"model": "{MODEL}", "max_tokens": 6, "temperature": 0, "prompt": "Village rumour number {i}:"}}"#)
    };
    let store = cluster.store();
    let count = |sql: &str| numbers(&store, sql)[0];
    for i in 0..3 {
        assert_eq!(cluster.post("/v1/completions", &body(i)).status, 200);
    }
    wait_for("three receipts", Duration::from_secs(30), || count("SELECT count(*) FROM receipts") == 3);
    wait_for("its first two tasks checked", Duration::from_secs(60), || {
        count("SELECT count(*) FROM verifications") == 2
    });
    cluster.restart_server();
    cluster.wait_nodes(MODEL, 1);
    for i in 3..5 {
        assert_eq!(cluster.post("/v1/completions", &body(i)).status, 200);
    }
    wait_for("five receipts", Duration::from_secs(30), || count("SELECT count(*) FROM receipts") == 5);
    std::thread::sleep(Duration::from_secs(2)); // a check, had one been sampled, lands
    assert_eq!(count("SELECT count(*) FROM verifications"), 2, "the restarted server treated the node as new");
}

/// A sampled task the verifier pool has no room for is not let through: it waits in the
/// check backlog, unpaid, survives a server crash there, and is checked from it once the
/// server can; one the full backlog cannot take stays unpaid.
#[test]
fn a_sampled_task_the_busy_verifier_cannot_take_waits_unpaid_in_the_backlog() {
    let Some(path) = smollm2() else { return };
    // `queue = 0`: every sampled task finds the pool busy. The backlog takes two, and is
    // drained at start-up only (the next poll is an hour away).
    let config = verifier_config(&path) + "queue = 0\nbacklog_max = 2\nbacklog_poll_ms = 3600000\n";
    let mut cluster = Cluster::start(&config);
    cluster.add_node(&["--model", path.to_str().unwrap(), "--threads", "1", "--capacity", "1"]);
    cluster.wait_nodes(MODEL, 1);
    let store = cluster.store();
    let count = |sql: &str| numbers(&store, sql)[0];
    for i in 0..3 {
        let body =
            format!(r#"{{"model": "{MODEL}", "max_tokens": 6, "temperature": 0, "prompt": "Tavern tale {i}:"}}"#);
        let r = cluster.post("/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    wait_for("three receipts, none of them payable yet", Duration::from_secs(30), || {
        count("SELECT count(*) FROM receipts WHERE verification = 'unverifiable'") == 3
    });
    assert_eq!(count("SELECT count(*) FROM check_backlog"), 2);
    assert_eq!(count("SELECT count(*) FROM verifications WHERE detail LIKE 'deferred:%'"), 2);
    assert_eq!(
        count("SELECT count(*) FROM verifications WHERE detail LIKE 'not checked: the verifier pool and its backlog%'"),
        1,
        "{}",
        cluster.server.log_text()
    );
    assert_eq!(count("SELECT count(*) FROM verifications WHERE outcome <> 'unverifiable'"), 0, "nothing was checked");
    // (The registry's figures in /metrics are up to 5 s old.)
    wait_for("the backlog in /metrics", Duration::from_secs(15), || {
        cluster.get("/metrics").1.contains("\nludus_check_backlog 2\n")
    });
    // A crash keeps the waiting checks; the restarted server runs them.
    cluster.kill_server();
    cluster.restart_server();
    wait_for("the deferred checks run after the restart", Duration::from_secs(120), || {
        count("SELECT count(*) FROM receipts WHERE verification = 'verified'") == 2
    });
    wait_for("the backlog emptied", Duration::from_secs(10), || count("SELECT count(*) FROM check_backlog") == 0);
    assert_eq!(count("SELECT count(*) FROM verifications WHERE outcome = 'failed'"), 0);
    assert_eq!(
        count("SELECT count(*) FROM receipts WHERE verification = 'unverifiable'"),
        1,
        "the task the full backlog could not take stays unpaid"
    );
    wait_for("the drain's report", Duration::from_secs(10), || {
        cluster.server.log_text().contains("deferred checks handed to the verifier")
    });
}

/// A sampled task's check outlives what used to lose it, and its task is never paid
/// without its verdict. The database refuses the verdict (a constraint stands in for an
/// outage): the task waits `sampled` (unpaid; it used to be `unchecked`, payable, and the
/// verdict was dropped), and the Registry writes the verdict once it can. Refused again,
/// and the server killed before the verdict lands: the restarted server finds the check
/// owed in its check log, queues it in the backlog and has it checked.
#[test]
fn a_sampled_tasks_check_outlives_a_refused_verdict_and_a_crash() {
    let Some(path) = smollm2() else { return };
    let mut cluster = Cluster::start(&verifier_config(&path));
    cluster.add_node(&["--model", path.to_str().unwrap(), "--threads", "1", "--capacity", "1"]);
    cluster.wait_nodes(MODEL, 1);
    let store = cluster.store();
    let count = |sql: &str| numbers(&store, sql)[0];
    let refuse_verdicts = |on: bool| {
        let sql = if on {
            "ALTER TABLE verifications ADD CONSTRAINT test_refuses_verdicts CHECK (false) NOT VALID"
        } else {
            "ALTER TABLE verifications DROP CONSTRAINT test_refuses_verdicts"
        };
        super::database::block_on(async { store.conn().await.unwrap().batch_execute(sql).await.unwrap() });
    };
    let ask = |i: usize| {
        let body =
            format!(r#"{{"model": "{MODEL}", "max_tokens": 6, "temperature": 0, "prompt": "Harbour song {i}:"}}"#);
        let r = cluster.post("/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
    };
    let refusals = |log: &str| log.matches("could not record a verification; retrying").count();
    let waiting = "SELECT count(*) FROM receipts WHERE verification = 'sampled'";

    refuse_verdicts(true);
    ask(0);
    wait_for("the refused verdict, retried, its task unpaid", Duration::from_secs(60), || {
        refusals(&cluster.server.log_text()) >= 2 && count(waiting) == 1
    });
    // (The registry's figures in /metrics are up to 5 s old.)
    wait_for("the waiting task in /metrics", Duration::from_secs(15), || {
        let metrics = cluster.get("/metrics").1;
        metrics.contains("\nludus_receipts{outcome=\"sampled\"} 1\n")
            && metrics.contains("\nludus_oldest_sampled_seconds ")
    });
    let (_, metrics) = cluster.get("/metrics");
    assert!(metrics.contains("\nludus_checks_owed 1\n"), "{metrics}");
    refuse_verdicts(false);
    // The check is settled in the log just after its verdict's transaction commits: wait
    // for both, the row alone can be seen a moment before.
    wait_for("the verdict written on a later try, its check settled", Duration::from_secs(90), || {
        count("SELECT count(*) FROM receipts WHERE verification = 'verified'") == 1
            && cluster.get("/metrics").1.contains("\nludus_checks_owed 0\n")
    });
    wait_for("nothing waiting in /metrics", Duration::from_secs(15), || {
        cluster.get("/metrics").1.contains("\nludus_oldest_sampled_seconds 0\n")
    });

    refuse_verdicts(true);
    let before = refusals(&cluster.server.log_text());
    ask(1);
    wait_for("the second verdict, refused", Duration::from_secs(60), || {
        refusals(&cluster.server.log_text()) > before && count(waiting) == 1
    });
    // The verdict now lives only in the dying process; its check, in the check log.
    cluster.kill_server();
    refuse_verdicts(false);
    cluster.restart_server();
    wait_for("the owed check, replayed and verified", Duration::from_secs(120), || {
        count("SELECT count(*) FROM receipts WHERE verification = 'verified'") == 2
    });
    let log = cluster.server.log_text();
    assert!(log.contains("check log replayed"), "{log}");
    assert!(log.contains("the server restarted before its check"), "{log}");
    assert_eq!(count("SELECT count(*) FROM receipts WHERE verification <> 'verified'"), 0);
    assert_eq!(count("SELECT count(*) FROM check_backlog"), 0);
}

/// A game's stream of a long story of at most `max_tokens`, sampled, with its first data
/// event and `more` after it read: the stream and its task id.
fn story_stream(cluster: &Cluster, max_tokens: u32, more: usize) -> (super::cluster::SseStream, u64) {
    let body = serde_json::json!({
        "model": MODEL, "max_tokens": max_tokens, "temperature": 0.8, "seed": 5, "stream": true,
        "messages": [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}]
    })
    .to_string();
    let mut stream = super::cluster::SseStream::open(&cluster.addr, &cluster.key, &body);
    assert_eq!(stream.status, 200);
    let first: serde_json::Value = serde_json::from_str(&stream.next_data().unwrap()).unwrap();
    let task = u64::from_str_radix(first["id"].as_str().unwrap().strip_prefix("chatcmpl-").unwrap(), 16).unwrap();
    for _ in 0..more {
        assert!(stream.next_data().is_some());
    }
    (stream, task)
}

/// The billed completion tokens of `task` and whether its proof was verified (1 or 0).
fn receipt_sql(task: u64) -> String {
    format!(
        "SELECT completion_tokens::bigint, (verification = 'verified')::int::bigint FROM receipts WHERE task_id = {}",
        task as i64
    )
}

/// A game that hangs up mid-stream: the node's receipt for the tokens it received comes
/// with the proof of exactly those (`Cancelled`), checked like any task's (every task
/// here): verified, and paid for the delivered tokens only.
#[test]
fn a_hang_up_is_paid_with_the_proof_of_what_the_game_received() {
    let Some(path) = smollm2() else { return };
    let mut cluster = Cluster::start(&verifier_config(&path));
    cluster.add_node(&["--model", path.to_str().unwrap(), "--threads", "1"]);
    cluster.wait_nodes(MODEL, 1);
    let (stream, task) = story_stream(&cluster, 200, 8);
    drop(stream); // the game goes away
    let store = cluster.store();
    let sql = receipt_sql(task);
    wait_for("the hang-up's receipt, checked", Duration::from_secs(60), || numbers(&store, &sql).get(1) == Some(&1));
    let row = numbers(&store, &sql);
    assert!(row[0] >= 8 && row[0] < 200, "billed {} tokens", row[0]);
    let log = cluster.server.log_text();
    assert!(!log.contains("REJECTED"), "{log}");
}

/// A game that leaves just before the end of its answer reaches it: the server's cancel
/// crosses the node's `Done` on the wire (held in a relay here until the node has
/// finished). The server drops that `Done`; the node still answers the cancel with the
/// receipt and proof of the tokens the game received, which are checked and paid. It used
/// to have forgotten the finished task, and earned nothing for it.
#[test]
fn a_cancel_that_crosses_the_end_of_the_answer_is_still_paid() {
    let Some(path) = smollm2() else { return };
    let mut cluster = Cluster::start(&verifier_config(&path));
    let tap = super::cluster::Tap::start(&cluster.addr);
    cluster.add_node_via(&tap.addr, &["--model", path.to_str().unwrap(), "--threads", "1"]);
    cluster.wait_nodes(MODEL, 1);
    let (stream, task) = story_stream(&cluster, 48, 2);
    tap.hold_to_node.store(true, Ordering::SeqCst); // the cancel will wait on the wire
    drop(stream); // the game goes away
    let node = &cluster.nodes[0];
    wait_for("the node to finish the answer", Duration::from_secs(60), || node.log_text().contains("task done"));
    let store = cluster.store();
    let sql = receipt_sql(task);
    assert!(numbers(&store, &sql).is_empty(), "the dropped Done paid nothing");
    tap.hold_to_node.store(false, Ordering::SeqCst);
    wait_for("the crossing cancel's receipt, checked", Duration::from_secs(60), || {
        numbers(&store, &sql).get(1) == Some(&1)
    });
    let row = numbers(&store, &sql);
    // The node's own count of the answer it finished ("task done … tokens=N").
    let log = node.log_text();
    let done = log.lines().find(|l| l.contains("task done")).expect("the node logged its end");
    let generated: i64 = done.split("tokens=").nth(1).and_then(|t| t.split_whitespace().next()?.parse().ok()).unwrap();
    assert!(
        row[0] >= 2 && row[0] < generated,
        "billed {} of {generated} tokens: those the game received, not the whole answer",
        row[0]
    );
    assert!(!cluster.server.log_text().contains("REJECTED"));
}

/// A node whose game hung up used to be paid for the tokens delivered on its receipt
/// alone: it could stream anything to games that leave, unchecked. A task with a
/// challenge is now paid only with the proof of what the game received: a receipt alone,
/// re-sent or as the answer to the cancel, earns nothing. The tokens the game read are
/// checked without a proof.
#[test]
fn a_hang_up_without_its_proof_is_not_paid() {
    let Some(path) = smollm2() else { return };
    let cluster = Cluster::start(&verifier_config(&path));
    let hi = hi_token(&path);
    let (task, delivered, node) = actix_rt::System::new().block_on(async {
        let (mut rogue, spec, delivered) = rogue_whose_game_leaves(&cluster, hi).await;
        let tokens = vec![hi; delivered];
        let receipt = SignedReceipt::sign(&rogue.id, spec.ticket.clone(), spec.ticket.prompt.tokens, &tokens);
        let resent = NodeMessage::Receipts { receipts: vec![receipt.clone()] };
        rogue.link.send(&resent).await.unwrap();
        rogue.link.send(&NodeMessage::Cancelled { id: spec.id, receipt, proof: None }).await.unwrap();
        rogue.idle(&mut [], Duration::from_millis(1500)).await;
        (spec.id.0 as i64, delivered, rogue.id.address.to_string())
    });
    assert_eq!(
        numbers(&cluster.store(), "SELECT count(*) FROM receipts"),
        vec![0],
        "a receipt without its proof was paid"
    );
    let log = cluster.server.log_text();
    assert!(log.contains("without the proof its challenge asks for"), "{log}");
    // The game read those tokens: they are checked without a proof all the same.
    let row = format!(
        "SELECT count(*) FROM delivery_checks WHERE task_id = {task} AND node_address = '{node}' \
         AND tokens = {delivered} AND outcome IN ('verified', 'failed')"
    );
    wait_for("the hang-up's tokens checked", Duration::from_secs(180), || numbers(&cluster.store(), &row) == vec![1]);
}

/// A hang-up's receipt that lies (it claims more tokens than the game received, with a
/// proof of the right shape for those it did receive) has its node judged, as a finished
/// task's lying receipt has: a failed verdict, which lowers its reputation and quarantines
/// it, and nothing paid. It used to be only refused, so lying cost the node nothing.
#[test]
fn a_hang_up_whose_receipt_lies_has_its_node_judged() {
    let Some(path) = smollm2() else { return };
    let cluster = Cluster::start(&verifier_config(&path));
    let hi = hi_token(&path);
    let (task, delivered, node) = actix_rt::System::new().block_on(async {
        let (mut rogue, spec, delivered) = rogue_whose_game_leaves(&cluster, hi).await;
        // Made-up hidden states of the model's width: the proof's structure holds, so the
        // receipt is what is judged.
        let challenge: [u8; 32] = hex::decode(spec.challenge.as_deref().unwrap()).unwrap().try_into().unwrap();
        let row = |i: usize| (0..576).map(|j| ((i * 7 + j * 13) % 31) as f32 - 15.0).collect::<Vec<f32>>();
        let prompt = spec.ticket.prompt.tokens as usize;
        let mut builder = ProofBuilder::new(challenge, DEFAULT_TOP_K);
        builder.prompt_rows(prompt, &(0..prompt).flat_map(row).collect::<Vec<f32>>());
        for i in 0..delivered {
            builder.token_row(&row(prompt + i));
        }
        let proof = builder.finish(&rogue.id, spec.id.0, MODEL, &vec![hi; delivered]).unwrap();
        // The receipt claims 20 tokens more than the game received.
        let padded = vec![hi; delivered + 20];
        let receipt = SignedReceipt::sign(&rogue.id, spec.ticket.clone(), spec.ticket.prompt.tokens, &padded);
        let cancelled = NodeMessage::Cancelled { id: spec.id, receipt, proof: Some(Box::new(proof)) };
        rogue.link.send(&cancelled).await.unwrap();
        rogue.idle(&mut [], Duration::from_millis(1500)).await;
        (spec.id.0 as i64, delivered, rogue.id.address.to_string())
    });
    let store = cluster.store();
    assert_eq!(numbers(&store, "SELECT count(*) FROM receipts"), vec![0], "a lying receipt was paid");
    let verdict = format!(
        "SELECT count(*) FROM verifications WHERE task_id = {task} AND node_address = '{node}' AND outcome = 'failed'"
    );
    wait_for("the node judged", Duration::from_secs(20), || numbers(&store, &verdict) == vec![1]);
    let log = cluster.server.log_text();
    let claim = format!("it claims {} completion tokens; {delivered} arrived", delivered + 20);
    assert!(log.contains("receipt REJECTED") && log.contains(&claim), "{log}");
}

/// The id of " Hi" in SmolLM2's vocabulary: a token a rogue streams.
fn hi_token(path: &std::path::Path) -> u32 {
    let text = ludus::inference::ModelText::load(path).unwrap();
    text.tokenizer.encode(" Hi", false).unwrap()[0]
}

/// A rogue joins and streams `token` to a game that reads three events and leaves, until
/// the server's cancel: the rogue, the task, and how many tokens the cancel asks a
/// receipt for.
async fn rogue_whose_game_leaves(cluster: &Cluster, token: u32) -> (Rogue, ludus::protocol::TaskSpec, usize) {
    let mut rogue = Rogue::join(&cluster.addr, MODEL).await;
    rogue.idle(&mut [], Duration::from_millis(300)).await; // registered
    let body = serde_json::json!({
        "model": MODEL, "max_tokens": 200, "stream": true, "messages": [{"role": "user", "content": "hi"}]
    })
    .to_string();
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let game = std::thread::spawn(move || {
        let mut stream = super::cluster::SseStream::open(&addr, &key, &body);
        for _ in 0..3 {
            assert!(stream.next_data().is_some());
        }
    });
    let spec = rogue.task(&mut []).await;
    assert!(spec.challenge.is_some(), "the task carries a challenge");
    let mut index = 0;
    let delivered = loop {
        let m = NodeMessage::Token { id: spec.id, index, token, text: String::new(), logprobs: None };
        rogue.link.send(&m).await.unwrap();
        index += 1;
        assert!(index < 200, "the server never noticed the game left");
        match rogue.link.recv(Duration::from_millis(50)).await {
            Ok(ludus::protocol::ServerMessage::Cancel { id, delivered }) if id == spec.id => break delivered,
            _ => {}
        }
    };
    game.join().unwrap();
    let delivered = delivered.expect("the server asks for a receipt of the delivered tokens") as usize;
    assert!(delivered >= 3 && delivered <= index, "{delivered} of {index}");
    (rogue, spec, delivered)
}

/// The first `n` tokens the real model generates for a task (after `prefix`, which
/// counts as generated), with the task's seeded sampling.
async fn honest_tokens(
    rogue: &mut Rogue,
    model: &Model,
    engine: &Engine,
    spec: &ludus::protocol::TaskSpec,
    n: usize,
) -> Vec<u32> {
    honest_answer(rogue, model, engine, spec, n).await.0
}

/// [`honest_tokens`] and their log probabilities (when the task asks for them).
async fn honest_answer(
    rogue: &mut Rogue,
    model: &Model,
    engine: &Engine,
    spec: &ludus::protocol::TaskSpec,
    n: usize,
) -> (Vec<u32>, Vec<Option<ludus::task::TokenLogprobs>>) {
    let TaskInput::Chat(messages) = &spec.input else { panic!("a chat task") };
    let request = GenerateRequest {
        prompt: model.chat_prompt(messages).unwrap(),
        prefix: spec.prefix.clone(),
        params: spec.params.clone(),
        max_tokens: spec.prefix.len() + n,
        ..GenerateRequest::default()
    };
    let mut rx = engine.submit(request).unwrap();
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    // The rogue heartbeats while the model runs: on a loaded machine a first request can
    // outlast the tests' heartbeat timeout (800 ms), and the server would take the task
    // away before a token was sent.
    loop {
        match rx.try_recv() {
            Ok(Event::Token { id, logprobs: lp, .. }) => {
                tokens.push(id);
                logprobs.push(lp);
            }
            Ok(Event::Done(_)) | Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
            Ok(_) => {}
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => rogue.idle(&mut [], Duration::from_millis(50)).await,
        }
    }
    tokens.truncate(n);
    logprobs.truncate(n);
    assert_eq!(tokens.len(), n, "the model ended its answer early: {tokens:?}");
    (tokens, logprobs)
}

/// A game streaming request `i` ([`body`]) on a thread of its own: every `data:` payload.
fn streaming_game(cluster: &Cluster, i: usize) -> std::thread::JoinHandle<String> {
    streaming_game_with(cluster, i, "")
}

/// [`streaming_game`] with more request fields (`"name": value, ` each).
fn streaming_game_with(cluster: &Cluster, i: usize, fields: &str) -> std::thread::JoinHandle<String> {
    let body = body(i).replacen('{', &format!(r#"{{"stream": true, {fields}"#), 1);
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    std::thread::spawn(move || {
        let mut sse = super::cluster::SseStream::open(&addr, &key, &body);
        let data = std::iter::from_fn(|| sse.next_data()).collect::<Vec<_>>().join("\n");
        // A stream with no event at all says what the server answered instead.
        if data.is_empty() {
            format!("(HTTP {}, no event)", sse.status)
        } else {
            data
        }
    })
}

/// Whether a streamed answer ended in an error: an error event after its tokens, or a 502
/// before any (the server holds the headers until the first event, and the node's tokens
/// may still wait for a word boundary when its failure comes).
fn ended_in_error(streamed: &str) -> bool {
    streamed.contains("error") || streamed == "(HTTP 502, no event)"
}

/// Sends `tokens` as a task's, numbered after its prefix.
async fn stream(rogue: &mut Rogue, spec: &ludus::protocol::TaskSpec, tokens: &[u32]) {
    for (i, &token) in tokens.iter().enumerate() {
        let index = spec.prefix.len() + i;
        let m = NodeMessage::Token { id: spec.id, index, token, text: String::new(), logprobs: None };
        rogue.link.send(&m).await.unwrap();
    }
}

/// Streams `tokens` as `rogue`'s and says the task failed; the game, which only that node
/// served, gets an error.
async fn stream_and_fail(
    rogue: &mut Rogue,
    spec: &ludus::protocol::TaskSpec,
    tokens: &[u32],
    game: std::thread::JoinHandle<String>,
) {
    stream(rogue, spec, tokens).await;
    let failure = ludus::protocol::TaskFailure::Node("out of memory".into());
    rogue.link.send(&NodeMessage::Failed { id: spec.id, failure }).await.unwrap();
    let streamed = game.join().unwrap();
    assert!(ended_in_error(&streamed), "the only node failed it: {streamed}");
}

/// A node that streams tokens and then fails before its `Done` has no proof of them, yet
/// the game read them: the server checks them without one (`proof::delivered`). An
/// honest node's tokens (seeded sampling; and a continuation's, after another node's
/// prefix, ended with a `Failed`) pass, and it keeps its standing; a node that streamed an
/// edited word fails, and is quarantined and loses reputation like a node whose proof
/// failed. Each check is kept per (task, node) in `delivery_checks`.
#[test]
fn tokens_a_node_streamed_before_failing_are_checked_and_a_liar_quarantined() {
    let Some(path) = smollm2() else { return };
    let cluster = Cluster::start(&verifier_config(&path));
    let (model, engine) = liar_model(&path);
    let store = cluster.store();
    let checked = |task: i64, node: &str, tokens: usize, outcome: &str| {
        let row = format!(
            "SELECT count(*) FROM delivery_checks WHERE task_id = {task} AND node_address = '{node}' \
             AND tokens = {tokens} AND outcome = '{outcome}'"
        );
        let started = std::time::Instant::now();
        while numbers(&store, &row) != vec![1] {
            if started.elapsed() > Duration::from_secs(180) {
                let log = cluster.server.log_text();
                let task = format!("task={}", ludus::protocol::TaskId(task as u64));
                let seen: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("delivered") || l.contains("quarantined") || l.contains(&task))
                    .collect();
                panic!("no {outcome} check of {tokens} tokens of {node} for {task}; the log says {seen:#?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut nodes = Vec::new();
    // The honest node's request samples (seeded); the liar's is greedy.
    for (honest, request) in [(true, 1), (false, 0)] {
        let (node, task) = actix_rt::System::new().block_on(async {
            let mut rogue = Rogue::join(&cluster.addr, MODEL).await;
            rogue.idle(&mut [], Duration::from_millis(300)).await; // registered
            let game = streaming_game(&cluster, request);
            let spec = rogue.task(&mut []).await;
            let mut tokens = honest_tokens(&mut rogue, &model, &engine, &spec, 4).await;
            if !honest {
                tokens[1] = (tokens[1] + 4242) % 49_152;
            }
            stream(&mut rogue, &spec, &tokens).await;
            // Every token relayed, then the node is gone without its `Done`.
            rogue.idle(&mut [], Duration::from_millis(300)).await;
            let node = rogue.id.address.to_string();
            drop(rogue);
            let streamed = game.join().unwrap();
            if !ended_in_error(&streamed) {
                let log = cluster.server.log_text();
                let task = format!("task={}", spec.id);
                let lines: Vec<&str> = log.lines().filter(|l| l.contains(&task)).collect();
                panic!("the only node left, the stream ends with an error: {streamed}; the log says {lines:#?}");
            }
            (node, spec.id.0 as i64)
        });
        checked(task, &node, 4, if honest { "verified" } else { "failed" });
        if honest {
            // Its near-ties joined its steering record, within an honest node's bounds.
            let added = format!(
                "SELECT count(*) FROM delivery_checks WHERE task_id = {task} AND format IS NOT NULL \
                 AND wide_deviations = 0 AND ends_passed = 0"
            );
            wait_for("the check's near-ties in the record", Duration::from_secs(10), || numbers(&store, &added) == [1]);
        }
        nodes.push(node);
    }
    // A continuation: the first node streams two tokens and dies, the second continues
    // after them, streams two of its own and says it failed.
    let (first, second, task) = actix_rt::System::new().block_on(async {
        let mut first = Rogue::join(&cluster.addr, MODEL).await;
        first.idle(&mut [], Duration::from_millis(300)).await; // registered
        let game = streaming_game(&cluster, 3);
        let spec = first.task(&mut []).await;
        let tokens = honest_tokens(&mut first, &model, &engine, &spec, 2).await;
        stream(&mut first, &spec, &tokens).await;
        let mut second = Rogue::join(&cluster.addr, MODEL).await;
        second.idle(&mut [&mut first], Duration::from_millis(300)).await; // registered
        let first_node = first.id.address.to_string();
        drop(first);
        let again = second.task(&mut []).await;
        assert_eq!((again.id, again.prefix.len()), (spec.id, 2), "the continuation carries the first node's tokens");
        let tokens = honest_tokens(&mut second, &model, &engine, &again, 2).await;
        stream(&mut second, &again, &tokens).await;
        let failure = ludus::protocol::TaskFailure::Node("out of memory".into());
        second.link.send(&NodeMessage::Failed { id: again.id, failure }).await.unwrap();
        let streamed = game.join().unwrap();
        assert!(ended_in_error(&streamed), "no node left, the stream ends with an error: {streamed}");
        (first_node, second.id.address.to_string(), spec.id.0 as i64)
    });
    checked(task, &first, 2, "verified");
    checked(task, &second, 2, "verified");
    nodes.extend([first, second]);

    let standing = |node: &str| {
        numbers(&store, &format!("SELECT reputation::bigint FROM nodes WHERE address = '{node}'"))
            .into_iter()
            .chain(numbers(
                &store,
                &format!("SELECT count(*) FROM nodes WHERE address = '{node}' AND status = 'quarantined'"),
            ))
            .collect::<Vec<_>>()
    };
    for honest in [&nodes[0], &nodes[2], &nodes[3]] {
        assert_eq!(standing(honest), vec![10_000, 0], "an honest node lost standing");
    }
    assert_eq!(standing(&nodes[1]), vec![7_500, 1], "the liar kept its standing");
    // The Distributor logs the quarantine as the Registry writes the row: wait for both.
    wait_for("the liar's quarantine", Duration::from_secs(60), || {
        cluster.server.log_text().contains("node quarantined: proof of inference failed")
    });
    let log = cluster.server.log_text();
    assert!(log.contains("delivered tokens REJECTED") && log.contains("not what the seeded sampler picks"), "{log}");
    assert_eq!(numbers(&store, "SELECT count(*) FROM verifications"), vec![0], "a delivery check is no proof verdict");
    engine.shutdown();
}

/// A node that fails task after task has the tokens of every one checked: they all wait in
/// the check backlog (a bound of them per node) rather than being skipped past an
/// allowance per minute (it was 16, and this test failed then). The node streams two
/// honest greedy tokens and says it failed, 17 times in a row, then streams an edited
/// word on the 18th: that one fails its check, and the node is quarantined.
#[test]
fn a_node_that_fails_task_after_task_has_every_delivered_token_checked() {
    const TASKS: usize = 18;
    let Some(path) = smollm2() else { return };
    let cluster = Cluster::start(&verifier_config(&path));
    let (model, engine) = liar_model(&path);
    let store = cluster.store();
    let (node, tasks) = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, MODEL).await;
        rogue.idle(&mut [], Duration::from_millis(300)).await; // registered
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            let game = streaming_game(&cluster, 2 * i); // greedy
            let spec = rogue.task(&mut []).await;
            let mut tokens = honest_tokens(&mut rogue, &model, &engine, &spec, 2).await;
            if i == TASKS - 1 {
                tokens[1] = (tokens[1] + 4242) % 49_152;
            }
            stream_and_fail(&mut rogue, &spec, &tokens, game).await;
            tasks.push(spec.id.0 as i64);
        }
        (rogue.id.address.to_string(), tasks)
    });
    let (liar_task, honest) = tasks.split_last().unwrap();
    let honest = honest.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let checks = format!(
        "SELECT (SELECT count(*) FROM delivery_checks WHERE node_address = '{node}' AND tokens = 2
                    AND outcome = 'verified' AND task_id IN ({honest})),
                (SELECT count(*) FROM delivery_checks WHERE node_address = '{node}' AND task_id = {liar_task}
                    AND outcome = 'failed'),
                (SELECT count(*) FROM delivery_checks WHERE outcome = 'unverifiable'),
                (SELECT count(*) FROM check_backlog)"
    );
    let want = vec![TASKS as i64 - 1, 1, 0, 0];
    let started = std::time::Instant::now();
    while numbers(&store, &checks) != want {
        if started.elapsed() > Duration::from_secs(300) {
            let log = cluster.server.log_text();
            let seen: Vec<&str> = log.lines().filter(|l| l.contains("delivered")).collect();
            panic!("checks {:?}, want {want:?}; the log says {seen:#?}", numbers(&store, &checks));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let standing =
        format!("SELECT reputation::bigint, (status = 'quarantined')::int::bigint FROM nodes WHERE address = '{node}'");
    assert_eq!(numbers(&store, &standing), vec![7_500, 1], "the liar kept its standing");
    engine.shutdown();
}

/// The log probabilities a failed node streamed with its tokens reached the game too, so
/// its delivered-token check holds them to the format's tie margin, as a proved task's
/// are: they used to be checked for their shape only. A node that streams honest tokens
/// with every value lowered by 8 (orderings intact; past the widest margin, int8's 4.5,
/// which a node that declared no format is held to) and fails is judged `failed`.
#[test]
fn log_probabilities_a_node_streamed_before_failing_are_checked() {
    let Some(path) = smollm2() else { return };
    let cluster = Cluster::start(&verifier_config(&path));
    let (model, engine) = liar_model(&path);
    let store = cluster.store();
    let (node, task) = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, MODEL).await;
        rogue.idle(&mut [], Duration::from_millis(300)).await; // registered
        let game = streaming_game_with(&cluster, 0, r#""logprobs": true, "top_logprobs": 2, "#);
        let spec = rogue.task(&mut []).await;
        let (tokens, logprobs) = honest_answer(&mut rogue, &model, &engine, &spec, 3).await;
        for (i, (token, lp)) in tokens.into_iter().zip(logprobs).enumerate() {
            let mut lp = lp.expect("the task asks for log probabilities");
            lp.logprob -= 8.0;
            lp.top.iter_mut().for_each(|(_, v)| *v -= 8.0);
            let m = NodeMessage::Token { id: spec.id, index: i, token, text: String::new(), logprobs: Some(lp) };
            rogue.link.send(&m).await.unwrap();
        }
        let failure = ludus::protocol::TaskFailure::Node("out of memory".into());
        rogue.link.send(&NodeMessage::Failed { id: spec.id, failure }).await.unwrap();
        let streamed = game.join().unwrap();
        assert!(ended_in_error(&streamed), "the only node failed it: {streamed}");
        (rogue.id.address.to_string(), spec.id.0 as i64)
    });
    let judged = format!(
        "SELECT count(*) FROM delivery_checks WHERE task_id = {task} AND node_address = '{node}' \
         AND outcome = 'failed' AND detail LIKE '%log probabilities are off by%'"
    );
    let started = std::time::Instant::now();
    while numbers(&store, &judged) != vec![1] {
        if started.elapsed() > Duration::from_secs(120) {
            let log = cluster.server.log_text();
            let seen: Vec<&str> = log.lines().filter(|l| l.contains("delivered")).collect();
            panic!("the shaded log probabilities were not judged; the log says {seen:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    engine.shutdown();
}

/// A node may have only so many failed tasks' delivered tokens waiting for their check
/// (`PER_NODE_QUEUED`, across servers); the next one past that goes unchecked. That cap
/// was a switch the node controlled: with its slots full of honest failures, it streamed
/// wrong text on the next tasks and failed them, unchecked, never finishing one for
/// "checked on every task until verified" to catch. Now a node whose failures fill its
/// `PER_NODE_WAITING` gets no work until the hold (the quarantine's length) runs out,
/// and that last check, like those of the tasks it still had, is queued all the same.
#[test]
fn a_node_whose_failed_tasks_wait_for_too_many_checks_gets_no_work() {
    use ludus::actors::delivery_check::PER_NODE_WAITING;
    use ludus::ledger::check_backlog::Deferred;
    let Some(path) = smollm2() else { return };
    let cluster = Cluster::start(&verifier_config(&path));
    let store = cluster.store();
    let (model, engine) = liar_model(&path);
    let id = ludus::crypto::identity::Identity::generate();
    let node = id.address.to_string();
    // All but one of its slots are full: checks of a model no server here holds wait.
    for task in 1..PER_NODE_WAITING {
        let waiting = super::database::block_on(store.defer_delivered(
            1_000_000 + task,
            &node,
            "elsewhere",
            b"{}",
            1_000_000,
            PER_NODE_WAITING,
            u64::MAX,
        ));
        assert_eq!(waiting.unwrap(), Deferred::Queued);
    }
    let (task, next) = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join_as(&cluster.addr, MODEL, id).await;
        rogue.idle(&mut [], Duration::from_millis(300)).await; // registered
        let game = streaming_game(&cluster, 0);
        let spec = rogue.task(&mut []).await;
        // Honest tokens: nothing but the hold keeps work from it.
        let tokens = honest_tokens(&mut rogue, &model, &engine, &spec, 2).await;
        stream_and_fail(&mut rogue, &spec, &tokens, game).await;
        rogue.idle(&mut [], Duration::from_millis(300)).await;
        // The next game's request waits for another node rather than going to it.
        let _game = streaming_game(&cluster, 1);
        (spec.id.0 as i64, rogue.next_task(Duration::from_secs(3)).await)
    });
    assert!(next.is_none(), "a node whose failures wait for too many checks got another task");
    // Queued and checked, not recorded unchecked.
    let verified = format!(
        "SELECT count(*) FROM delivery_checks WHERE task_id = {task} AND node_address = '{node}' \
         AND outcome = 'verified'"
    );
    wait_for("the held node's last check", Duration::from_secs(60), || numbers(&store, &verified) == vec![1]);
    assert!(cluster.server.log_text().contains("no work for it for a while"));
    engine.shutdown();
}

/// A rogue node streams a greedy answer with its second token edited and fails before its
/// proof, with `pg` stopped once the game's key is checked and cached: its address, the
/// task, and the liar's engine (to shut down).
fn lie_with_the_database_down(
    cluster: &Cluster,
    pg: &ludus::ledger::cluster::PrivateCluster,
    path: &std::path::Path,
) -> (String, i64, Engine) {
    let (model, engine) = liar_model(path);
    let (node, task) = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, MODEL).await;
        rogue.idle(&mut [], Duration::from_millis(300)).await; // registered
        let game = streaming_game(cluster, 0); // greedy
        let spec = rogue.task(&mut []).await;
        // The game's key is checked and cached; from here on the database is away.
        pg.stop().unwrap();
        let mut tokens = honest_tokens(&mut rogue, &model, &engine, &spec, 3).await;
        tokens[1] = (tokens[1] + 4242) % 49_152;
        stream_and_fail(&mut rogue, &spec, &tokens, game).await;
        (rogue.id.address.to_string(), spec.id.0 as i64)
    });
    (node, task, engine)
}

/// A node that streams an edited word and fails while the database is down is still
/// checked and quarantined at once: the check runs from memory (it used to wait unrun
/// until the database came back, and this test failed). Once Postgres is back, the verdict
/// and the held check are written, nothing is left waiting, and the penalty counts once.
#[test]
fn a_liar_is_quarantined_while_the_database_is_down() {
    let Some(path) = smollm2() else { return };
    // Its own Postgres: the shared one serves other tests.
    let pg = ludus::ledger::cluster::PrivateCluster::throwaway().unwrap();
    let cluster = Cluster::start_with_database(&verifier_config(&path), &pg.url("postgres"));
    let (node, task, engine) = lie_with_the_database_down(&cluster, &pg, &path);
    wait_for("the liar quarantined with the database down", Duration::from_secs(120), || {
        cluster.server.log_text().contains("node quarantined: proof of inference failed")
    });
    let log = cluster.server.log_text();
    assert!(log.contains("the check backlog could not take a check; retrying"), "the refusal was seen: {log}");
    assert!(log.contains("running it from memory"), "{log}");
    assert!(log.contains("delivered tokens REJECTED"), "{log}");

    pg.restart_on_same_port().unwrap();
    let store = cluster.store();
    let verdict = format!(
        "SELECT (SELECT count(*) FROM delivery_checks WHERE node_address = '{node}' AND task_id = {task}
                    AND outcome = 'failed' AND tokens = 3),
                (SELECT count(*) FROM delivery_checks),
                coalesce((SELECT reputation::bigint FROM nodes WHERE address = '{node}'), -1),
                coalesce((SELECT (status = 'quarantined')::int::bigint FROM nodes WHERE address = '{node}'), -1),
                (SELECT count(*) FROM check_backlog)"
    );
    // The held check, written back, finds its verdict or runs once more; either way it
    // counts once and leaves nothing waiting.
    let want = vec![1, 1, 7_500, 1, 0];
    let started = std::time::Instant::now();
    while numbers(&store, &verdict) != want {
        if started.elapsed() > Duration::from_secs(180) {
            let log = cluster.server.log_text();
            let seen: Vec<&str> = log.lines().filter(|l| l.contains("delivered") || l.contains("backlog")).collect();
            panic!("verdict {:?}, want {want:?}; the log says {seen:#?}", numbers(&store, &verdict));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    engine.shutdown();
}

/// A liar's delivered-token check survives a crash during a database outage: the node
/// streams an edited word and fails while Postgres is down, so its check lives in the
/// server's memory alone (it ran from there, or waits to), and the server is killed before
/// the database is back. The restarted server finds the check owed in its check log, runs
/// it and records the failure: the liar does not escape by the crash (it used to: nothing
/// was written anywhere, and this test found no verdict).
#[test]
fn a_liar_streamed_while_the_database_is_down_is_judged_after_a_crash() {
    let Some(path) = smollm2() else { return };
    let pg = ludus::ledger::cluster::PrivateCluster::throwaway().unwrap();
    let mut cluster = Cluster::start_with_database(&verifier_config(&path), &pg.url("postgres"));
    let (node, task, engine) = lie_with_the_database_down(&cluster, &pg, &path);
    wait_for("the check refused by the database", Duration::from_secs(120), || {
        cluster.server.log_text().contains("the check backlog could not take a check; retrying")
    });
    cluster.kill_server();
    pg.restart_on_same_port().unwrap();
    cluster.restart_server();
    let store = cluster.store();
    let verdict = format!(
        "SELECT (SELECT count(*) FROM delivery_checks WHERE node_address = '{node}' AND task_id = {task}
                    AND outcome = 'failed' AND tokens = 3),
                coalesce((SELECT reputation::bigint FROM nodes WHERE address = '{node}'), -1),
                coalesce((SELECT (status = 'quarantined')::int::bigint FROM nodes WHERE address = '{node}'), -1),
                (SELECT count(*) FROM check_backlog)"
    );
    let want = vec![1, 7_500, 1, 0];
    let started = std::time::Instant::now();
    while numbers(&store, &verdict) != want {
        if started.elapsed() > Duration::from_secs(180) {
            let log = cluster.server.log_text();
            let seen: Vec<&str> = log.lines().filter(|l| l.contains("delivered") || l.contains("check")).collect();
            panic!("verdict {:?}, want {want:?}; the log says {seen:#?}", numbers(&store, &verdict));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = cluster.server.log_text();
    assert!(log.contains("check log replayed"), "{log}");
    // Settled once recorded: the check is not owed any more.
    wait_for("the check settled in the check log", Duration::from_secs(30), || {
        cluster.get("/metrics").1.contains("\nludus_checks_owed 0\n")
    });
    engine.shutdown();
}

/// A node whose delivered tokens were left unchecked is checked on every task until one is
/// verified, even by a server that started since (the mark used to live in one process's
/// memory): the server reads it back from the ledger when the node joins. Here the policy
/// samples nothing and the ledger holds such a row from before this server started; the
/// node's edited word on its next task is replayed and caught. Without the read-back it
/// was paid unchecked.
#[test]
fn a_node_owing_a_verified_task_is_checked_by_a_server_that_restarted() {
    let Some(path) = smollm2() else { return };
    let config = verifier_config(&path)
        .replace("sample_rate = 1.0", "sample_rate = 0.0\nfirst_tasks = 0\nquality_check_rate = 0.0");
    let cluster = Cluster::start(&config);
    let store = cluster.store();
    let id = ludus::crypto::identity::Identity::generate();
    let node = id.address.to_string();
    let unchecked =
        store.record_delivery_check(77, &node, 2, ludus::ledger::Outcome::Unverifiable, "not checked: full");
    super::database::block_on(unchecked).unwrap();
    let (model, engine) = liar_model(&path);
    let task = actix_rt::System::new().block_on(async {
        let mut rogue = Rogue::join_as(&cluster.addr, MODEL, id).await;
        rogue.idle(&mut [], Duration::from_millis(300)).await; // registered
        let game = streaming_game(&cluster, 0);
        let spec = rogue.next_task(Duration::from_secs(20)).await.expect("the rogue gets the task");
        let task = spec.id.0 as i64;
        answer(&mut rogue, &model, &engine, spec, Lie::EditToken, &mut None).await;
        rogue.idle(&mut [], Duration::from_millis(500)).await;
        let streamed = game.join().unwrap();
        assert!(streamed.ends_with("[DONE]"), "{streamed}");
        task
    });
    let failed = format!("SELECT count(*) FROM verifications WHERE task_id = {task} AND outcome = 'failed'");
    wait_for("the lie replayed and failed", Duration::from_secs(60), || numbers(&store, &failed) == vec![1]);
    engine.shutdown();
}

/// Live nodes serving `model`, as `/v1/models` counts them.
fn nodes_serving(cluster: &Cluster, model: &str) -> u64 {
    let (_, body) = cluster.get("/v1/models");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"].as_array().into_iter().flatten().find(|m| m["id"] == model).and_then(|m| m["nodes"].as_u64()).unwrap_or(0)
}

/// Keeps `rogue` heartbeating (it holds a task) until `n` nodes serve [`MODEL`]: real
/// ones take seconds to load.
async fn heartbeat_until_serving(cluster: &Cluster, rogue: &mut Rogue, n: u64) {
    for _ in 0..360 {
        if nodes_serving(cluster, MODEL) == n {
            return;
        }
        rogue.idle(&mut [], Duration::from_millis(500)).await;
    }
    panic!("{n} nodes never served {MODEL}");
}

/// A failover continuation gets quality-check re-runs too (it used to be exempt), and the
/// re-run continues after the same prefix: the finishing node answers for its own tokens
/// only. A node streams two tokens of a greedy answer and dies; of two real nodes, one
/// continues it and the other re-runs that continuation, and the two agree.
#[test]
fn a_failover_continuation_is_rerun_after_the_same_prefix() {
    let Some(path) = smollm2() else { return };
    let mut cluster = Cluster::start(&quality_checks_only(&path));
    let (model, engine) = liar_model(&path);
    let task = actix_rt::System::new().block_on(async {
        let mut first = Rogue::join(&cluster.addr, MODEL).await;
        first.idle(&mut [], Duration::from_millis(300)).await; // registered
        let game = streaming_game(&cluster, 0);
        let spec = first.task(&mut []).await;
        let tokens = honest_tokens(&mut first, &model, &engine, &spec, 2).await;
        stream(&mut first, &spec, &tokens).await;
        // Two real nodes join while the first one holds the task (heartbeating).
        for _ in 0..2 {
            cluster.add_node(&["--model", path.to_str().unwrap(), "--quantize", "none", "--threads", "1"]);
        }
        heartbeat_until_serving(&cluster, &mut first, 3).await;
        drop(first);
        let streamed = game.join().unwrap();
        assert!(streamed.ends_with("[DONE]") && !streamed.contains("error"), "{streamed}");
        spec.id
    });
    let rerun = format!("task={task}");
    wait_for("the continuation's quality check", Duration::from_secs(120), || {
        let log = cluster.server.log_text();
        log.lines().any(|l| l.contains(&rerun) && (l.contains("quality check agreed") || l.contains("disagreed")))
    });
    let log = cluster.server.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&rerun)).collect();
    assert!(lines.iter().any(|l| l.contains("quality check: re-running on another node")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("quality check agreed")), "{lines:#?}");
    engine.shutdown();
}

/// A continuation's quality re-run never goes to a node that failed the original: the
/// node that made the prefix could vouch for its partner. Here it is the only node left
/// besides the finisher, back under the same key once the re-run waits: it is never
/// handed the re-run (it was, before, as any node but the finisher).
#[test]
fn a_continuations_rerun_never_goes_to_the_node_that_made_its_prefix() {
    let Some(path) = smollm2() else { return };
    let mut cluster = Cluster::start(&quality_checks_only(&path));
    let (model, engine) = liar_model(&path);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("prefix.key");
    let key = || ludus::crypto::identity::Identity::load_or_create(&key_file).unwrap();
    let handed = actix_rt::System::new().block_on(async {
        let mut first = Rogue::join_as(&cluster.addr, MODEL, key()).await;
        first.idle(&mut [], Duration::from_millis(300)).await; // registered
        let game = streaming_game(&cluster, 0);
        let spec = first.task(&mut []).await;
        let tokens = honest_tokens(&mut first, &model, &engine, &spec, 2).await;
        stream(&mut first, &spec, &tokens).await;
        cluster.add_node(&["--model", path.to_str().unwrap(), "--quantize", "none", "--threads", "1"]);
        heartbeat_until_serving(&cluster, &mut first, 2).await;
        drop(first);
        let streamed = game.join().unwrap();
        assert!(streamed.ends_with("[DONE]") && !streamed.contains("error"), "{streamed}");
        // The re-run waits for a node: neither the finisher nor the first one may take it.
        let rerun = format!("task={}", spec.id);
        wait_for("the continuation's re-run", Duration::from_secs(60), || {
            let log = cluster.server.log_text();
            log.lines().any(|l| l.contains(&rerun) && l.contains("quality check: re-running on another node"))
        });
        let mut back = Rogue::join_as(&cluster.addr, MODEL, key()).await;
        let until = std::time::Instant::now() + Duration::from_secs(5);
        let mut handed = None;
        while std::time::Instant::now() < until && handed.is_none() {
            handed = back.next_task(Duration::from_millis(200)).await.map(|t| t.prefix.len());
        }
        handed
    });
    assert_eq!(handed, None, "the node that made the prefix was handed the re-run of its continuation");
    engine.shutdown();
}
