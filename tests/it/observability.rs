//! What operators watch: Prometheus `/metrics` after real traffic, and JSON log lines.

use std::process::Stdio;
use std::time::Duration;

use super::cluster::{post_with, wait_for, Cluster};
use super::registry::try_chat;

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

#[test]
fn metrics_count_requests_tokens_nodes_and_blocks() {
    let mut cluster = Cluster::start("");
    cluster.add_node(&["--fake-engine", "5:1"]);
    cluster.wait_nodes("fake", 1);
    for _ in 0..3 {
        try_chat(&cluster.addr, &cluster.key, "fake").expect("200");
    }
    let body = r#"{"model": "fake", "messages": [{"role": "user", "content": "hi"}]}"#;
    assert_eq!(post_with(&cluster.addr, "/v1/chat/completions", Some("ludus-wrong"), body.as_bytes()).status, 401);
    wait_for("a committed block", Duration::from_secs(20), || {
        metric(&cluster.get("/metrics").1, "ludus_last_block ").is_some_and(|b| b >= 1.0)
    });
    let r = super::cluster::raw(&cluster.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    let text = r.body;
    let chat = "{route=\"/v1/chat/completions\"";
    assert_eq!(metric(&text, &format!("ludus_http_requests_total{chat},status=\"200\"}}")), Some(3.0), "{text}");
    assert_eq!(metric(&text, &format!("ludus_http_requests_total{chat},status=\"401\"}}")), Some(1.0), "{text}");
    assert_eq!(metric(&text, &format!("ludus_http_request_duration_seconds_count{chat}}}")), Some(4.0), "{text}");
    assert_eq!(metric(&text, &format!("ludus_http_request_duration_seconds_bucket{chat},le=\"+Inf\"}}")), Some(4.0));
    // Buckets are cumulative.
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("ludus_http_request_duration_seconds_bucket{chat}")))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(metric(&text, "ludus_tokens_total{kind=\"completion\"}"), Some(12.0), "3 answers of 4 tokens: {text}");
    assert!(metric(&text, "ludus_tokens_total{kind=\"prompt\"}").is_some_and(|p| p > 0.0));
    assert_eq!(metric(&text, "ludus_nodes{model=\"fake\"}"), Some(1.0));
    assert_eq!(metric(&text, "ludus_actor_panics_total"), Some(0.0));
    assert!(metric(&text, "ludus_receipts{outcome=\"unchecked\"}").is_some_and(|n| n >= 1.0), "{text}");
}

/// `/metrics` answers anyone who can reach the server, and its registry figures cost seven
/// queries on the pool that block commits share (one counts every receipt): however fast it
/// is scraped, the registry is read at most once per 5 s (scrapes meanwhile wait for the
/// read under way, then share it).
#[test]
fn scrapes_read_the_registry_at_most_once_per_interval() {
    let cluster = Cluster::start("");
    let started = std::time::Instant::now();
    let scrapers: Vec<_> = (0..8)
        .map(|_| {
            let addr = cluster.addr.clone();
            std::thread::spawn(move || {
                (0..25)
                    .map(|_| {
                        super::cluster::raw(&addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    })
                    .filter(|r| r.status == 200)
                    .count()
            })
        })
        .collect();
    let answered: usize = scrapers.into_iter().map(|t| t.join().unwrap()).sum();
    let text = cluster.get("/metrics").1;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(answered, 200);
    let reads = metric(&text, "ludus_metrics_registry_reads_total ").expect("the read counter");
    assert!(reads >= 1.0 && reads <= 2.0 + elapsed / 5.0, "{reads} reads in {elapsed:.1} s");
    assert!(metric(&text, "ludus_last_block ").is_some(), "the registry's figures are served: {text}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ludus.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[database]\nurl = \"{}\"\n",
            dir.path().join("data").display(),
            super::database::fresh_database()
        ),
    )
    .unwrap();
    let log = dir.path().join("serve.log");
    let mut child = crate::cluster::ludus()
        .args(["--config", config.to_str().unwrap(), "--log-format", "json", "serve"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("the server to listen", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("ludus listening on")
    });
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let objects: Vec<serde_json::Value> = text
        .lines()
        // The two banner lines for people (address to call, address to pin) stay plain.
        .filter(|l| !l.starts_with("ludus listening on") && !l.starts_with("distributor address"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(objects.len() >= 3, "{text}");
    assert!(objects.iter().all(|o| o["level"].is_string() && o["timestamp"].is_string() && o["target"].is_string()));
    assert!(
        objects.iter().any(|o| o["fields"]["message"].as_str().is_some_and(|m| m.contains("distributor identity"))
            && o["fields"]["address"].as_str().is_some_and(|a| a.starts_with("0x"))),
        "{text}"
    );
}
