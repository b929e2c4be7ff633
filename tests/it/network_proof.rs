//! Proof of inference over the network: real nodes' tasks are checked by the server's
//! verifier pool and marked verified; a node that edits a token (a test double speaking
//! the real protocol, running the real model in-process) is caught, quarantined and not
//! paid, and its rejected proof fails `ludus verify` offline too.

use std::time::Duration;

use ludus::inference::{Engine, EngineConfig, Event, GenerateRequest, Model};
use ludus::proof::commitment::DEFAULT_TOP_K;
use ludus::proof::ProofBuilder;
use ludus::protocol::{FinishReason, NodeMessage, SignedReceipt, TaskInput, TaskUsage};
use tch::Device;

use super::cluster::{wait_for, Cluster, BIN};
use super::database::numbers;
use super::helpers::smollm2;
use super::registry::{try_chat, Rogue};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

fn verifier_config(path: &std::path::Path) -> String {
    format!("[verifier]\nmodels = {{ \"{MODEL}\" = \"{}\" }}\nsample_rate = 1.0\nquarantine_s = 60\n", path.display())
}

#[test]
fn honest_node_tasks_are_verified() {
    let Some(path) = smollm2() else { return };
    let mut cluster = Cluster::start(&verifier_config(&path));
    cluster.add_node(&["--model", path.to_str().unwrap(), "--threads", "1"]);
    cluster.wait_nodes(MODEL, 1);
    let bodies = [
        r#"{"model": "M", "max_tokens": 40, "temperature": 0, "messages": [{"role": "user", "content": "Greet the traveller."}]}"#,
        r#"{"model": "M", "max_tokens": 40, "temperature": 0.8, "seed": 7, "messages": [{"role": "user", "content": "Sell me a sword."}]}"#,
        r#"{"model": "M", "max_tokens": 20, "prompt": "The dragon said"}"#,
    ];
    for (i, body) in bodies.iter().enumerate() {
        let path = if i == 2 { "/v1/completions" } else { "/v1/chat/completions" };
        let r = cluster.post(path, &body.replace("\"M\"", &format!("\"{MODEL}\"")));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let store = cluster.store();
    wait_for("three verified receipts", Duration::from_secs(60), || {
        numbers(&store, "SELECT count(*) FILTER (WHERE verification = 'verified') FROM receipts") == vec![3]
    });
    assert_eq!(numbers(&store, "SELECT count(*) FROM verifications WHERE outcome = 'failed'"), vec![0]);
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
            let m = NodeMessage::Token { id: spec.id, index, token, text: "x".into() };
            rogue.link.send(&m).await.unwrap();
        }
        let receipt = SignedReceipt::sign(&rogue.id, spec.ticket.clone(), 30, &completion);
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
    let out = std::process::Command::new(BIN)
        .args(["verify", kept.to_str().unwrap(), "--model", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["verdict"]["accepted"], false);
    assert!(verdict["verdict"]["token_mismatches"].as_u64().unwrap() >= 1, "{verdict}");
    engine.shutdown();
}
