//! Near-tie steering over the real protocol: a node that runs the real model and steers
//! every answer within its tie margin (a test double speaking the protocol) passes each
//! proof, and is flagged by the server from the near-ties its verdicts forgave, summed in
//! Postgres: quarantined, its reputation cut, every near-tie on record.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ludus::crypto::identity::Identity;
use ludus::inference::{Model, Quantization};
use ludus::proof::Format;
use ludus::protocol::{NodeMessage, TaskInput};
use tch::Device;

use super::cluster::{wait_for, Cluster};
use super::database::numbers;
use super::helpers::smollm2;
use super::registry::{try_post_chat, Rogue};
use super::steering::{rogue_generate, Steer, Task, MODEL_NAME};

/// Tasks the game sends at most (the rogue should be flagged well before).
const MAX_TASKS: usize = 14;

fn body(i: usize) -> String {
    let asks = [
        "Answer in one word: is the forest safe at night?",
        "Tell me a rumour about the old mill.",
        "Reply with yes or no: will you join my party?",
        "Warn the player about wolves in the forest.",
    ];
    serde_json::json!({
        "model": MODEL_NAME, "max_tokens": 64, "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are an NPC in a fantasy village."},
            {"role": "user", "content": format!("{} (#{i})", asks[i % asks.len()])}
        ]
    })
    .to_string()
}

#[test]
fn a_node_that_steers_within_its_margin_is_flagged_across_tasks() {
    let Some(path) = smollm2() else { return };
    let config = format!(
        "[verifier]\nmodels = {{ \"{MODEL_NAME}\" = \"{}\" }}\nsample_rate = 1.0\nquarantine_s = 600\n",
        path.display()
    );
    let cluster = Cluster::start(&config);
    let model = Model::load_quantized(&path, Device::Cpu, None, Quantization::Int8, None).unwrap();
    let the = model.tokenizer.encode(" the", false).unwrap()[0];
    let model = Arc::new(Mutex::new(model));
    let steer = Steer { claim: Format::Int8, word: Some(the), skip_end: true };
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let store = cluster.store();
    let flagged_in = |store: &ludus::ledger::Store| {
        numbers(store, "SELECT count(*) FROM nodes WHERE steering_flagged_at IS NOT NULL") == vec![1]
    };
    let flagged = || flagged_in(&store);
    let game_store = cluster.store();
    let game = std::thread::spawn(move || {
        let mut answered = 0;
        // Requests until the node is flagged (then it is quarantined: nobody answers).
        for i in (0..MAX_TASKS).take_while(|_| !flagged_in(&game_store)) {
            // Retried until the rogue has joined (503 before that), or quarantined (then over).
            answered += (0..50)
                .find_map(|_| {
                    try_post_chat(&addr, &key, &body(i)).or_else(|| {
                        std::thread::sleep(Duration::from_millis(200));
                        None
                    })
                })
                .is_some() as usize;
        }
        answered
    });
    let system = actix_rt::System::new();
    let tasks = system.block_on(async {
        let mut rogue = Rogue::join(&cluster.addr, MODEL_NAME).await;
        let mut tasks = Vec::new();
        while let Some(spec) = rogue.next_task(Duration::from_secs(15)).await {
            let challenge = hex::decode(spec.challenge.as_deref().expect("a challenge")).unwrap().try_into().unwrap();
            let TaskInput::Chat(messages) = &spec.input else { panic!("a chat task") };
            let prompt = model.lock().unwrap().chat_prompt(messages).unwrap();
            let task = Task { prompt, params: spec.params.clone(), challenge };
            // Generated on another thread while this one keeps heartbeating, like a real node;
            // signed here with the node's key.
            let (m, id, max_tokens) = (model.clone(), spec.id.0 as usize, spec.max_tokens);
            let mut job = actix_rt::task::spawn_blocking(move || {
                rogue_generate(&m.lock().unwrap(), steer, &Identity::generate(), &[(id, task)], max_tokens).remove(0)
            });
            let mut beat = actix_rt::time::interval(Duration::from_millis(100));
            let (completion, mut proof) = loop {
                tokio::select! {
                    done = &mut job => break done.unwrap(),
                    _ = beat.tick() => {
                        let _ = rogue.link.send(&NodeMessage::Heartbeat(Default::default())).await;
                    }
                }
            };
            proof.signature = hex::encode(rogue.id.sign(&proof.digest()));
            rogue.deliver(&spec, &completion, proof).await;
            tasks.push(spec.id.0);
        }
        tasks
    });
    let answered = game.join().unwrap();
    // The judge needs a few tasks' worth of checked tokens; how many requests that is
    // depends on how fast the verdicts come back, so only the minimum is asserted.
    assert!(answered >= 2 && !tasks.is_empty(), "the rogue answered {answered} requests");
    wait_for("the steering flag", Duration::from_secs(30), flagged);
    // Its answers passed their own checks (a later one may stray past even int8's margin):
    // the steering shows across tasks.
    let log = cluster.server.log_text();
    let verified = numbers(&store, "SELECT count(*) FROM verifications WHERE outcome = 'verified' AND format = 'int8'");
    assert!(verified[0] >= 1, "{log}");
    // The flag came with a task that passed its own check (verdicts of concurrent tasks
    // arrive in any order, so the log's order proves nothing).
    let flag = log.find("node flagged for steering").map(|at| &log[at..]).expect("the flag is logged");
    let task = flag.split("task=").nth(1).and_then(|t| t.get(..16)).expect("the flag names its task");
    let task = u64::from_str_radix(task, 16).unwrap() as i64;
    let outcome =
        numbers(&store, &format!("SELECT count(*) FROM verifications WHERE task_id = {task} AND outcome = 'verified'"));
    assert_eq!(outcome, vec![1], "the flagging task {task:x} was not verified: {log}");
    // Its near-ties are on record, with their gaps, ranks and passed ends.
    let forgiven = numbers(&store, "SELECT count(*) FROM forgiven_deviations")[0];
    let counted = numbers(&store, "SELECT wide_deviations + ends_passed FROM nodes")[0];
    assert!(forgiven >= counted && counted > 0, "{forgiven} forgiven, {counted} wide or past the end");
    // The penalty (10,000 − 2,500), plus the recovery of verdicts on its concurrent tasks
    // that landed after the flag (they were verified: each adds its few points).
    let reputation = numbers(&store, "SELECT reputation::bigint FROM nodes WHERE status = 'quarantined'");
    let verified = numbers(&store, "SELECT count(*) FROM verifications WHERE outcome = 'verified'")[0];
    let most = i64::from(10_000 - ludus::ledger::verifications::FAILURE_PENALTY_BPS)
        + verified * i64::from(ludus::ledger::verifications::RECOVERY_BPS);
    assert!(reputation.len() == 1 && reputation[0] <= most, "{reputation:?}, at most {most}");
    assert!(log.contains("node quarantined"), "{log}");
    // A flag is given once: later verdicts add to the record without a second penalty.
    assert_eq!(numbers(&store, "SELECT count(*) FROM nodes WHERE steering_reason LIKE 'steering: %'"), vec![1]);
}
