//! Scheduling over real node processes: the fastest node gets most traffic, a killed node
//! leaves the table at once and no request fails because of it, and a node killed in the
//! middle of a greedy stream is replaced without the game noticing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{wait_for, Cluster, SseStream};
use crate::helpers::smollm2;

fn node_counts(c: &Cluster) -> u64 {
    let (_, body) = c.get("/v1/models");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"].as_array().into_iter().flatten().filter(|m| m["id"] == "fake").map(|m| m["nodes"].as_u64().unwrap()).sum()
}

#[test]
fn fastest_node_gets_most_traffic_and_killed_nodes_lose_none() {
    let mut c = Cluster::start("");
    for (pace, tag) in [("8:2", " A"), ("8:12", " B"), ("8:40", " C")] {
        c.add_node(&["--fake-engine", pace, "--fake-text", tag]);
    }
    c.wait_nodes("fake", 3);
    let body = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;
    let counts: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let failures = Arc::new(AtomicUsize::new(0));
    let run = |requests: usize, c: &Cluster| {
        std::thread::scope(|s| {
            for _ in 0..6 {
                let (counts, failures) = (counts.clone(), failures.clone());
                let addr = c.addr.clone();
                let key = c.key.clone();
                s.spawn(move || {
                    for _ in 0..requests {
                        let r = crate::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes());
                        if r.status != 200 {
                            failures.fetch_add(1, Ordering::Relaxed);
                            eprintln!("failed: {} {}", r.status, r.body);
                            continue;
                        }
                        let text = r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
                        // Failover may mix tags within one answer; count the first.
                        let first = text.split_whitespace().next().unwrap_or("");
                        let i = ["A", "B", "C"]
                            .iter()
                            .position(|t| *t == first)
                            .unwrap_or_else(|| panic!("untagged text {text:?}"));
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        })
    };
    run(25, &c);
    let seen: Vec<usize> = counts.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    eprintln!("traffic by node (fast, medium, slow): {seen:?}");
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(seen[0] > seen[1] && seen[0] > seen[2], "the fastest node must get the most traffic: {seen:?}");

    // Kill the fastest node (SIGKILL) while requests are running.
    let mut victim = c.nodes.remove(0);
    std::thread::scope(|s| {
        s.spawn(|| run(15, &c));
        std::thread::sleep(Duration::from_millis(300));
        let killed_at = Instant::now();
        victim.kill();
        while node_counts(&c) != 2 {
            assert!(
                killed_at.elapsed() < Duration::from_millis(800 + 400),
                "a killed node must leave within one heartbeat timeout"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no request may fail because its node died");
    // After the kill, nothing new is tagged A.
    let a_before = counts[0].load(Ordering::Relaxed);
    run(5, &c);
    assert_eq!(counts[0].load(Ordering::Relaxed), a_before);
}

/// A node killed halfway through a greedy stream: the game receives exactly the text an
/// undisturbed run produces (the replacement prefills prompt + tokens already sent).
#[test]
fn mid_stream_failover_is_invisible_to_the_game() {
    let Some(model) = smollm2() else { return };
    let model = model.to_str().unwrap().to_string();
    // Every task checked, the continuation included (it used to carry no challenge).
    let verifier = format!(
        "[verifier]\nmodels = {{ \"SmolLM2-135M-Instruct.Q4_1\" = \"{model}\" }}\nsample_rate = 1.0\nquality_check_rate = 0.0\n"
    );
    let mut c = Cluster::start(&verifier);
    // Exact continuation needs deterministic full-precision nodes: quantized activations
    // round differently in the second node's prefill than in the first node's decode.
    c.add_node(&["--model", &model, "--threads", "1", "--quantize", "none"]);
    c.add_node(&["--model", &model, "--threads", "1", "--quantize", "none"]);
    let name = "SmolLM2-135M-Instruct.Q4_1";
    c.wait_nodes(name, 2);
    let body = format!(
        r#"{{"model":"{name}","messages":[{{"role":"user","content":"Describe a medieval market town in detail."}}],"max_tokens":64,"temperature":0,"seed":11,"stream":true}}"#
    );
    type OnChunk<'a> = Box<dyn FnMut(usize, &serde_json::Value) + 'a>;
    let collect = |stream: &mut SseStream, mut on_chunk: OnChunk<'_>| {
        let mut text = String::new();
        let mut n = 0;
        while let Some(data) = stream.next_data() {
            if data == "[DONE]" {
                break;
            }
            let v: serde_json::Value = serde_json::from_str(&data).unwrap();
            assert!(v.get("error").is_none(), "stream error: {data}");
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
                n += 1;
                on_chunk(n, &v);
            }
        }
        text
    };
    let mut reference = SseStream::open(&c.addr, &c.key, &body);
    assert_eq!(reference.status, 200);
    let undisturbed = collect(&mut reference, Box::new(|_, _| {}));
    assert!(undisturbed.len() > 100, "{undisturbed:?}");

    let mut stream = SseStream::open(&c.addr, &c.key, &body);
    let mut killed = None;
    let mut failed_over = String::new();
    let nodes = &mut c.nodes;
    let text = collect(
        &mut stream,
        Box::new(|n, chunk| {
            if n == 12 && killed.is_none() {
                let task = chunk["id"].as_str().unwrap().trim_start_matches("chatcmpl-").to_string();
                let i = nodes.iter().position(|p| p.log_text().contains(&task)).expect("a node logged the task");
                nodes[i].kill();
                killed = Some(i);
                failed_over = task;
            }
        }),
    );
    assert!(killed.is_some(), "the stream ended before the kill");
    assert_eq!(text, undisturbed);
    // The node that took over is paid for its own tokens only: the killed node's 12+ tokens
    // are not paid twice (it has no receipt; the one that continued used to be paid for them).
    let store = c.store();
    let task = u64::from_str_radix(&failed_over, 16).unwrap() as i64;
    wait_for("both receipts", Duration::from_secs(20), || {
        super::database::numbers(&store, "SELECT count(*) FROM receipts") == vec![2]
    });
    let tokens = |cmp: &str| {
        let sql = format!("SELECT completion_tokens::bigint FROM receipts WHERE task_id {cmp} {task}");
        super::database::numbers(&store, &sql)[0]
    };
    let (whole, continued) = (tokens("<>"), tokens("="));
    assert!(continued > 0 && continued <= whole - 12, "paid for {continued} of {whole} tokens");
    // The continuation's proof covers prompt + prefix as its prompt, and passes.
    let checked = format!("SELECT count(*) FROM verifications WHERE task_id = {task} AND outcome = 'verified'");
    wait_for("the continuation verified", Duration::from_secs(60), || {
        super::database::numbers(&store, &checked) == vec![1]
    });
}
