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

/// Tasks the game has answered at most (the rogue should be flagged well before).
const MAX_TASKS: usize = 14;
/// Requests the game sends at most.
const MAX_ASKS: usize = 60;

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

/// A server checking every task against the reference, and the steering rogue's model.
fn steering_setup() -> Option<(Cluster, Arc<Mutex<Model>>, Steer)> {
    let path = smollm2()?;
    let config = format!(
        "[verifier]\nmodels = {{ \"{MODEL_NAME}\" = \"{}\" }}\nsample_rate = 1.0\nquarantine_s = 600\n",
        path.display()
    );
    let cluster = Cluster::start(&config);
    let model = Model::load_quantized(&path, Device::Cpu, None, Quantization::Int8, None).unwrap();
    let the = model.tokenizer.encode(" the", false).unwrap()[0];
    let steer = Steer { claim: Format::Int8, word: Some(the), skip_end: true };
    Some((cluster, Arc::new(Mutex::new(model)), steer))
}

fn flagged_in(store: &ludus::ledger::Store) -> bool {
    numbers(store, "SELECT count(*) FROM nodes WHERE steering_flagged_at IS NOT NULL") == vec![1]
}

/// A game asking until the node is flagged (then it is quarantined: nobody answers), until
/// [`MAX_TASKS`] answers, or [`MAX_ASKS`] requests (a request fails while the rogue has not
/// joined, and every time when it fails its tasks); answers how many were answered.
fn game_until_flagged(cluster: &Cluster) -> std::thread::JoinHandle<usize> {
    let (addr, key, game_store) = (cluster.addr.clone(), cluster.key.clone(), cluster.store());
    std::thread::spawn(move || {
        let mut answered = 0;
        for i in 0..MAX_ASKS {
            if answered == MAX_TASKS || flagged_in(&game_store) {
                break;
            }
            match try_post_chat(&addr, &key, &body(i)) {
                Some(_) => answered += 1,
                None => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        answered
    })
}

/// The rogue: takes tasks until none comes, and answers each steered; with `fail`, it
/// streams the steered tokens and then fails the task before its proof. Answers the tasks.
fn steering_rogue(cluster: &Cluster, model: Arc<Mutex<Model>>, steer: Steer, fail: bool) -> Vec<u64> {
    let system = actix_rt::System::new();
    system.block_on(async {
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
            if fail {
                for (index, &token) in completion.iter().enumerate() {
                    let m = NodeMessage::Token { id: spec.id, index, token, text: String::new(), logprobs: None };
                    rogue.link.send(&m).await.unwrap();
                }
                let failure = ludus::protocol::TaskFailure::Node("out of memory".into());
                rogue.link.send(&NodeMessage::Failed { id: spec.id, failure }).await.unwrap();
            } else {
                proof.signature = hex::encode(rogue.id.sign(&proof.digest()));
                rogue.deliver(&spec, &completion, proof).await;
            }
            tasks.push(spec.id.0);
        }
        tasks
    })
}

#[test]
fn a_node_that_steers_within_its_margin_is_flagged_across_tasks() {
    let Some((cluster, model, steer)) = steering_setup() else { return };
    let store = cluster.store();
    let flagged = || flagged_in(&store);
    let game = game_until_flagged(&cluster);
    let tasks = steering_rogue(&cluster, model, steer, false);
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

/// The same steering rogue, failing every task after its steered tokens and before its
/// proof: only the tokens' check without a proof judges it, and the near-ties it forgave
/// add to the node's record like a proof's. They used to be forgiven and forgotten, within
/// the widest format's margin (int8's: a node that never finishes declares no format), so
/// a node could steer what games read for ever by failing each task.
#[test]
fn a_node_that_steers_and_fails_before_its_proofs_is_flagged_across_tasks() {
    let Some((cluster, model, steer)) = steering_setup() else { return };
    let store = cluster.store();
    let game = game_until_flagged(&cluster);
    let tasks = steering_rogue(&cluster, model, steer, true);
    let _ = game.join().unwrap();
    assert!(tasks.len() >= 2, "the rogue took {} tasks", tasks.len());
    wait_for("the steering flag", Duration::from_secs(60), || flagged_in(&store));
    let log = cluster.server.log_text();
    // No proof was ever checked: the record is the delivery checks'.
    assert_eq!(numbers(&store, "SELECT count(*) FROM verifications WHERE format IS NOT NULL"), vec![0], "{log}");
    let added =
        numbers(&store, "SELECT count(*) FROM delivery_checks WHERE outcome = 'verified' AND format IS NOT NULL");
    assert!(added[0] >= 1, "{log}");
    let counted = numbers(&store, "SELECT wide_deviations + ends_passed FROM nodes")[0];
    assert!(counted > 0, "{log}");
    assert!(log.contains("node flagged for steering") && log.contains("node quarantined"), "{log}");
}
