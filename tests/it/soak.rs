//! Soak: sustained load while nodes leave and rejoin every few seconds. Every answered
//! task must end up on the books exactly once, and the server's memory must stay flat.
//! `LUDUS_SOAK_S` sets the duration (CI: 20 s; the documented run: 600 s).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cluster::Cluster;
use super::registry::{assert_all_recorded_once, try_chat};

const NODE_ARGS: &[&str] = &["--fake-engine", "8:2"];

#[test]
fn load_with_node_churn_loses_no_receipt_and_keeps_memory_flat() {
    let seconds: u64 = std::env::var("LUDUS_SOAK_S").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let mut cluster = Cluster::start("");
    for _ in 0..3 {
        cluster.add_node(NODE_ARGS);
    }
    cluster.wait_nodes("fake", 3);
    // A game whose limits are not what is under test.
    let out = std::process::Command::new(super::cluster::BIN)
        .arg("--config")
        .arg(&cluster.config)
        .args(["games", "add", "soak", "--rpm", "100000000", "--tpm", "1000000000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    cluster.key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // Warm up, then take the baseline.
    for _ in 0..50 {
        try_chat(&cluster.addr, &cluster.key, "fake");
    }
    let rss_start = cluster.server_rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, key, stop) = (cluster.addr.clone(), cluster.key.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut answered, mut failed) = (Vec::new(), 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match try_chat(&addr, &key, "fake") {
                        Some(id) => answered.push(id),
                        None => {
                            failed += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                (answered, failed)
            })
        })
        .collect();
    // Churn: every 3 s one node is killed and rejoins a second later with the same key.
    let started = Instant::now();
    let mut churns = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(2));
        let i = churns % 3;
        cluster.nodes[i].kill();
        std::thread::sleep(Duration::from_secs(1));
        cluster.restart_node(i, NODE_ARGS);
        churns += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut answered, mut failed) = (Vec::new(), 0);
    for c in clients {
        let (a, f) = c.join().unwrap();
        answered.extend(a);
        failed += f;
    }
    cluster.wait_nodes("fake", 3);
    let rss_end = cluster.server_rss_kib();
    eprintln!(
        "SOAK: {seconds} s, {churns} node churns, {} answered, {failed} refused or failed, server RSS {rss_start} KiB -> {rss_end} KiB",
        answered.len()
    );
    assert!(answered.len() as u64 > seconds * 10, "the network kept serving under churn");
    // Nodes that were killed re-send their unconfirmed receipts when they rejoin.
    assert_all_recorded_once(&cluster, &answered);
    assert!(rss_end < rss_start * 2 + 64 * 1024, "server memory grew: {rss_start} KiB -> {rss_end} KiB");
}
