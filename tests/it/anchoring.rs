//! Block roots anchored on chain between settlements (anvil + Postgres + real nodes): a
//! receipt checks out against the chain through `ludus verify-receipt` and every kind of
//! tampering does not; anchors survive a server killed between sent and confirmed,
//! posted in order and exactly once; gas per anchor is flat in the tasks per block.

use std::time::Duration;

use ludus::actors::settler::{Progress, Settler, SettlerConfig};
use ludus::chain::anvil::Anvil;
use ludus::chain::SettlementClient;
use ludus::crypto::identity::Identity;

use super::cluster::wait_for;
use super::database::{block_on, fresh_database, open};
use super::registry::try_chat;
use super::settlement::{
    anchors_match_the_chain, chats, deploy_default, give_wallet, ludus, operator_nonce, record_day, rpc,
    settling_cluster, wait_anchored,
};

fn verify(
    cluster: &super::cluster::Cluster,
    contract: &str,
    task: &str,
    proof: Option<&std::path::Path>,
) -> (bool, String, String) {
    let server = format!("http://{}", cluster.addr);
    let mut args = vec!["verify-receipt", task, "--server", &server, "--contract", contract, "--api-key", &cluster.key];
    let path;
    if let Some(p) = proof {
        path = p.to_str().unwrap().to_string();
        args.extend(["--proof", &path]);
    }
    let out = ludus(cluster, &args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_receipt_checks_out_against_its_anchor_on_chain_and_a_tampered_one_does_not() {
    let anvil = Anvil::start(None).expect("anvil (run scripts/setup)");
    let (mut cluster, d, _keys) = settling_cluster(&anvil, "");
    let contract = format!("{:#x}", d.settlement);
    give_wallet(&cluster, &anvil, &d, &anvil.keys[2].clone(), 10u128.pow(22));
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 2);
    let store = cluster.store();
    let tasks: Vec<u64> = (0..6).map(|_| try_chat(&cluster.addr, &cluster.key, "fake").expect("200")).collect();
    wait_for("the receipts to be confirmed", Duration::from_secs(30), || {
        super::database::numbers(&store, "SELECT count(*) FILTER (WHERE confirmation = 'confirmed') FROM receipts")
            == vec![6]
    });
    wait_anchored(&store);
    let chain = block_on(SettlementClient::connect(&anvil.url, d.settlement, anvil.keys[1].clone())).unwrap();
    assert!(anchors_match_the_chain(&store, &chain) >= 1);

    // Every task checks out, by the id the game was given, through the chain alone.
    for &task in &tasks {
        let id = format!("chatcmpl-{task:016x}");
        let (ok, out, err) = verify(&cluster, &contract, &id, None);
        assert!(ok, "{id}: {err}");
        let checked: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(checked["task"], task, "{checked}");
        assert!(checked["completion_tokens"].as_u64().unwrap() >= 1, "{checked}");
    }
    let proof_path = format!("/v1/receipts/{:016x}/proof", tasks[0]);
    let (status, body) = cluster.get_admin(&proof_path, &cluster.key);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["contract"], contract.as_str());
    // Task ids are sequential: the id alone opens nothing. Another game's key sees no
    // such receipt; the operator's token and the answering node's signature do.
    assert_eq!(cluster.get(&proof_path).0, 401);
    let (_, other_key) = block_on(store.add_game("othergame", 100, 100_000)).unwrap();
    assert_eq!(cluster.get_admin(&proof_path, &other_key).0, 404);
    let admin = std::fs::read_to_string(cluster.dir.path().join("data/admin-token")).unwrap();
    assert_eq!(cluster.get_admin(&proof_path, admin.trim()).0, 200);
    let node_of = answer["proof"]["node"].as_str().unwrap().to_string();
    let (answering, idle) = {
        let key = |i: usize| cluster.dir.path().join(format!("node{i}.key"));
        let is = |i: usize| Identity::load(&key(i)).unwrap().address.to_string().eq_ignore_ascii_case(&node_of);
        if is(0) {
            (key(0), key(1))
        } else {
            (key(1), key(0))
        }
    };
    let by_node = |node_key: &std::path::Path| {
        let server = format!("http://{}", cluster.addr);
        let task = format!("{:016x}", tasks[0]);
        ludus(
            &cluster,
            &[
                "verify-receipt",
                &task,
                "--server",
                &server,
                "--contract",
                &contract,
                "--node-key",
                node_key.to_str().unwrap(),
            ],
        )
    };
    // A node's header with a signature that is not its key's: refused, never read as the node.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let forged = format!(
        "GET {proof_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Ludus-Node: {node_of}\r\n\
         X-Ludus-Time: {now}\r\nX-Ludus-Signature: {}\r\n\r\n",
        "11".repeat(65)
    );
    let refused = super::cluster::raw(&cluster.addr, forged.as_bytes());
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("not X-Ludus-Node's"), "{}", refused.body);
    let out = by_node(&answering);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = by_node(&idle);
    assert!(!out.status.success(), "another node read the receipt");
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"), "{}", String::from_utf8_lossy(&out.stderr));
    // Unknown and malformed ids: clear refusals.
    assert_eq!(cluster.get_admin("/v1/receipts/chatcmpl-0000000000000001/proof", &cluster.key).0, 404);
    let (status, body) = cluster.get_admin("/v1/receipts/not-a-task/proof", &cluster.key);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a task id"), "{body}");

    // Tampered proofs: each fails, naming what does not hold.
    let dir = tempfile::tempdir().unwrap();
    let tampered = |what: &str, edit: &dyn Fn(&mut serde_json::Value), expect: &str| {
        let mut a = answer.clone();
        edit(&mut a["proof"]);
        let path = dir.path().join(format!("{what}.json"));
        std::fs::write(&path, serde_json::to_vec(&a).unwrap()).unwrap();
        let (ok, _, err) = verify(&cluster, &contract, "0", Some(&path));
        assert!(!ok, "{what}: a tampered proof passed");
        assert!(err.contains(expect), "{what}: expected `{expect}` in: {err}");
    };
    let flip = |hex: &str, at: usize| -> String {
        let mut bytes = hex::decode(hex.trim_start_matches("0x")).unwrap();
        bytes[at] ^= 1;
        format!("0x{}", hex::encode(bytes))
    };
    tampered(
        "billed-tokens",
        &|p| p["completion_tokens"] = (p["completion_tokens"].as_u64().unwrap() + 100).into(),
        "the registry recorded completion tokens",
    );
    tampered("game", &|p| p["game_id"] = 999.into(), "the registry recorded game");
    tampered(
        "signed-bytes",
        &|p| {
            let signed = p["signed_bytes"].as_str().unwrap().to_string();
            let len = hex::decode(signed.trim_start_matches("0x")).unwrap().len();
            p["signed_bytes"] = flip(&signed, len - 65).into();
        },
        "do not hash to the receipt hash",
    );
    tampered(
        "signed-bytes-and-hash",
        &|p| {
            let signed = p["signed_bytes"].as_str().unwrap().to_string();
            let len = hex::decode(signed.trim_start_matches("0x")).unwrap().len();
            let edited = flip(&signed, len - 65);
            let bytes = hex::decode(edited.trim_start_matches("0x")).unwrap();
            p["receipt_hash"] = format!("0x{}", hex::encode(ludus::crypto::identity::keccak(&bytes))).into();
            p["signed_bytes"] = edited.into();
        },
        "the signature is not that of",
    );
    tampered(
        "receipt-hash",
        &|p| p["receipt_hash"] = flip(p["receipt_hash"].as_str().unwrap(), 0).into(),
        "do not hash",
    );
    tampered(
        "block-root",
        &|p| {
            // A root that the receipt's path leads to, but that was never anchored.
            let leaf: [u8; 32] =
                hex::decode(p["receipt_hash"].as_str().unwrap().trim_start_matches("0x")).unwrap().try_into().unwrap();
            let sibling = [0x42u8; 32];
            p["receipt_path"] = serde_json::json!([format!("0x{}", hex::encode(sibling))]);
            p["block_root"] = format!("0x{}", hex::encode(ludus::crypto::merkle::root(&[leaf, sibling]))).into();
        },
        "does not hold block",
    );
    tampered(
        "receipt-path",
        &|p| p["receipt_path"] = serde_json::json!([format!("0x{}", "11".repeat(32))]),
        "does not lead to block",
    );
    tampered("anchor-id", &|p| p["anchor"]["id"] = 999.into(), "does not hold block");
    tampered("not-anchored", &|p| p["anchor"] = serde_json::Value::Null, "not anchored on chain yet");
    tampered("no-signed-bytes", &|p| p["signed_bytes"] = serde_json::Value::Null, "no signed bytes");
    // A wrong contract: nothing is anchored there.
    let path = dir.path().join("honest.json");
    std::fs::write(&path, serde_json::to_vec(&answer).unwrap()).unwrap();
    let (ok, _, err) = verify(&cluster, &format!("{:#x}", d.token), "0", Some(&path));
    assert!(!ok && !err.is_empty(), "checked against the token contract: {err}");
    let (ok, _, err) = verify(&cluster, &contract, "0", Some(&path));
    assert!(ok, "the untouched saved proof: {err}");

    // The dashboard shows how far anchoring has come.
    let (status, body) = cluster.get_admin("/admin/dashboard", admin.trim());
    assert_eq!(status, 200, "{body}");
    let data: serde_json::Value = serde_json::from_str(&body).unwrap();
    let committed = block_on(store.anchor_progress()).unwrap().last_committed_block;
    assert_eq!(data["anchoring"]["last_anchored_block"], committed, "{}", data["anchoring"]);
    // And so does /metrics (its registry figures up to 5 s old).
    let anchored = format!("ludus_last_anchored_block {committed}\n");
    super::cluster::wait_for("the anchored block in /metrics", Duration::from_secs(15), || {
        cluster.get_admin("/metrics", admin.trim()).1.contains(&anchored)
    });
}

#[test]
fn anchors_survive_a_server_killed_between_sent_and_confirmed_in_order_and_exactly_once() {
    let anvil = Anvil::start(None).expect("anvil");
    let (mut cluster, d, _keys) = settling_cluster(&anvil, "");
    give_wallet(&cluster, &anvil, &d, &anvil.keys[2].clone(), 10u128.pow(22));
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 1);
    let store = cluster.store();
    let chain = block_on(SettlementClient::connect(&anvil.url, d.settlement, anvil.keys[1].clone())).unwrap();
    let nonce = || operator_nonce(&anvil);
    chats(&cluster, 3, &store, 3);
    wait_anchored(&store);

    // The next anchor is signed and broadcast, then lost with the server.
    rpc(&anvil, "evm_setAutomine", serde_json::json!([false]));
    chats(&cluster, 3, &store, 6);
    let sent =
        || block_on(store.open_anchor()).unwrap().filter(|a| a.status == ludus::ledger::epochs::EpochStatus::Sent);
    wait_for("an anchor to be sent", Duration::from_secs(30), || sent().is_some());
    let lost = sent().unwrap();
    let tx = lost.tx_hash.clone().unwrap();
    let in_mempool = |tx: &str| !rpc(&anvil, "eth_getTransactionByHash", serde_json::json!([tx])).is_null();
    wait_for("the anchor to reach anvil's mempool", Duration::from_secs(10), || in_mempool(&tx));
    cluster.kill_server();
    rpc(&anvil, "anvil_dropAllTransactions", serde_json::json!([]));
    rpc(&anvil, "evm_setAutomine", serde_json::json!([true]));
    assert!(block_on(chain.last_anchored_block()).unwrap() < lost.first_block, "nothing of it on chain yet");
    cluster.restart_server();
    wait_anchored(&store);
    let again = block_on(store.anchor(lost.id)).unwrap().unwrap();
    assert_eq!(again.tx_hash.as_deref(), Some(tx.as_str()), "the stored transaction, not a second one");
    assert_eq!((again.first_block, again.last_block, again.root), (lost.first_block, lost.last_block, lost.root));
    let anchors = anchors_match_the_chain(&store, &chain);
    assert_eq!(nonce(), anchors, "one transaction per anchor, across the crash");
    assert_eq!(
        block_on(chain.last_anchored_block()).unwrap(),
        block_on(store.anchor_progress()).unwrap().last_committed_block
    );
}

/// Gas per anchor at 10, 1,000 and 100,000 tasks in the interval's blocks: the same, since
/// only the block roots go on chain. Prints the figures for `docs/benchmarks.md`.
#[test]
fn anchor_gas_is_flat_in_the_tasks_per_block() {
    let anvil = Anvil::start(None).expect("anvil");
    let d = deploy_default(&anvil);
    let store = open(&fresh_database());
    let (game, _) = block_on(store.add_game("g", 1000, 1_000_000)).unwrap();
    let nodes: Vec<Identity> = (0..4).map(|_| Identity::generate()).collect();
    let config = SettlerConfig {
        rpc_url: anvil.url.clone(),
        contract: d.settlement,
        node_share_bps: 9_000,
        confirmations: 1,
        epoch_time: Duration::from_secs(86_400),
        anchor_interval: Duration::ZERO,
        anchor_confirm_wait: Duration::ZERO,
        replace_after: Duration::from_secs(600),
    };
    let settler = Settler::new(store.clone(), config, anvil.keys[1].clone());
    let anchor_now = || {
        for _ in 0..20 {
            if block_on(settler.run(false)).unwrap().progress == Progress::Idle {
                let a = block_on(store.recent_anchors(1)).unwrap().remove(0);
                assert_eq!(a.status, ludus::ledger::epochs::EpochStatus::Confirmed);
                return a;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("anchoring did not finish");
    };
    // Five blocks per interval; 10, 1,000 and 100,000 tasks in them. The very first
    // anchor pays for the contract's counters going from zero (about 17,000 gas more).
    let mut gas = Vec::new();
    record_day(&store, &nodes, &[game], 1, 10, 2);
    let warm_up = anchor_now().gas_used.unwrap();
    let mut first = 11;
    for tasks in [10u64, 1_000, 100_000] {
        record_day(&store, &nodes, &[game], first, tasks, tasks / 5);
        first += tasks;
        let a = anchor_now();
        assert_eq!(a.last_block - a.first_block + 1, 5);
        gas.push(a.gas_used.unwrap());
    }
    eprintln!("gas per anchor of 5 blocks at 10 / 1,000 / 100,000 tasks: {gas:?} (the first anchor: {warm_up})");
    for g in &gas[1..] {
        let ratio = *g as f64 / gas[0] as f64;
        assert!((0.99..=1.01).contains(&ratio), "gas grew with tasks: {gas:?}");
    }
    // And with blocks: one per block, a little per root.
    let mut per_blocks = Vec::new();
    for blocks in [1u64, 10, 100] {
        record_day(&store, &nodes, &[game], first, blocks * 2, 2);
        first += blocks * 2;
        let a = anchor_now();
        assert_eq!(a.last_block - a.first_block + 1, blocks);
        per_blocks.push((blocks, a.gas_used.unwrap()));
    }
    eprintln!("gas per anchor by blocks anchored: {per_blocks:?}");
    let (b1, g1) = per_blocks[0];
    let (b100, g100) = per_blocks[2];
    let per_block = (g100 - g1) / (b100 - b1);
    assert!(per_block < 3_000, "{per_block} gas per extra block");
}
