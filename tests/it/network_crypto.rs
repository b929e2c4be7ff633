//! The node link is authenticated and sealed: a tap on a node's socket sees neither the
//! prompt nor the completion; banned nodes and nodes pinned to another distributor never
//! join.

use crate::cluster::{Cluster, Tap};
use crate::helpers::smollm2;

#[test]
fn a_tap_on_the_node_socket_sees_neither_prompt_nor_completion() {
    let mut c = Cluster::start("");
    let tap = Tap::start(&c.addr);
    let (model_args, name, fake);
    match smollm2() {
        Some(path) => {
            model_args = vec!["--model".to_string(), path.to_str().unwrap().to_string()];
            name = "SmolLM2-135M-Instruct.Q4_1";
            fake = false;
        }
        None => {
            model_args = vec!["--fake-engine".into(), "6".into(), "--fake-text".into(), " ZEBRAQUUX".into()];
            name = "fake";
            fake = true;
        }
    }
    let args: Vec<&str> = model_args.iter().map(String::as_str).collect();
    c.add_node_via(&tap.addr, &args);
    c.wait_nodes(name, 1);
    let secret = "PURPLE-ELEPHANT-42";
    let body = format!(
        r#"{{"model":"{name}","messages":[{{"role":"user","content":"{secret}: what is the capital of France?"}}],"max_tokens":24,"temperature":0}}"#
    );
    let r = c.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let completion = r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    if fake {
        assert!(completion.contains("ZEBRAQUUX"));
    } else {
        assert!(completion.contains("Paris"), "{completion}");
    }
    assert!(tap.len() > 1000, "the tap saw the traffic ({} bytes)", tap.len());
    assert!(!tap.contains(secret), "the prompt crossed the node link in clear");
    for word in completion.split_whitespace().filter(|w| w.len() >= 5) {
        assert!(!tap.contains(word), "the completion word {word:?} crossed the node link in clear");
    }
    assert!(tap.contains("\"type\":\"hello\""), "the handshake itself is in clear (sanity check of the tap)");
}

#[test]
fn banned_and_mispinned_nodes_never_join() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("banned.key");
    let out = std::process::Command::new(crate::cluster::BIN)
        .args(["keys", "new", "--out", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let banned = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(banned.starts_with("0x") && banned.len() == 42, "{banned}");
    let mut c = Cluster::start(&format!("banned_nodes = [\"{banned}\"]\n"));
    // The banned node (its key file given explicitly).
    let cfg = c.config.to_str().unwrap().to_string();
    let url = format!("ws://{}/ws/node", c.addr);
    let log = c.dir.path().join("banned-node.log");
    let mut banned_node = crate::cluster::Proc {
        child: std::process::Command::new(crate::cluster::BIN)
            .args(["--config", &cfg, "node", "--connect", &url, "--key", key.to_str().unwrap(), "--fake-engine", "4"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log,
    };
    // A node pinned to some other distributor.
    let mispinned =
        c.add_node(&["--fake-engine", "4", "--distributor-address", "0x0000000000000000000000000000000000000001"]);
    // A node pinned to the right one joins.
    let server_log = c.server.log_text();
    let address = server_log
        .lines()
        .find_map(|l| l.strip_prefix("distributor address ").and_then(|r| r.split_whitespace().next()))
        .expect("the server prints its address")
        .to_string();
    c.add_node(&["--fake-engine", "4", "--distributor-address", &address]);
    c.wait_nodes("fake", 1);
    std::thread::sleep(std::time::Duration::from_millis(800));
    let (_, models) = c.get("/v1/models");
    assert!(models.contains("\"nodes\":1"), "only the well-pinned node joined: {models}");
    assert!(c.server.log_text().contains("is banned"), "{}", c.server.log_text());
    assert!(banned_node.log_text().contains("refused"), "{}", banned_node.log_text());
    assert!(c.nodes[mispinned].log_text().contains("not the pinned"), "{}", c.nodes[mispinned].log_text());
    banned_node.kill();
}
