//! The operator's dashboard end to end: a server with a real node and the verifier serves
//! traffic, then headless Chromium (Debian's `chromium`) opens `/dashboard` and the test
//! reads the rendered DOM: the node, its model and device, the verification outcomes, the
//! committed blocks, and proof that the page refreshed itself. A screenshot is kept in
//! `artifacts/dashboard.png` (CI keeps it as an artifact).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::cluster::{wait_for, Cluster};
use super::helpers::smollm2;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// The browser: `LUDUS_CHROMIUM`, else `chromium` or `chromium-browser` on the PATH.
/// `None` skips the test, unless `LUDUS_REQUIRE_TOOLS=1` (CI) makes that a failure.
fn chromium() -> Option<PathBuf> {
    let candidates = std::env::var("LUDUS_CHROMIUM")
        .map(|p| vec![p])
        .unwrap_or_else(|_| vec!["chromium".into(), "chromium-browser".into(), "google-chrome".into()]);
    let found =
        candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()));
    super::helpers::required_tool("chromium (scripts/setup --test installs it)", found.is_some());
    found.map(PathBuf::from)
}

fn headless(browser: &PathBuf, extra: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--no-first-run".into(),
        format!("--user-data-dir={}", profile.path().display()),
        // Virtual time runs the page's timers fast: several polls happen before the dump.
        "--virtual-time-budget=6000".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(url.to_string());
    let out = Command::new(browser).args(&args).output().unwrap();
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn the_dashboard_shows_the_live_network_in_a_real_browser() {
    let Some(path) = smollm2() else { return };
    let Some(browser) = chromium() else { return };
    let verifier = format!("[verifier]\nmodels = {{ \"{MODEL}\" = \"{}\" }}\nsample_rate = 1.0\n", path.display());
    let mut cluster = Cluster::start(&verifier);
    cluster.add_node(&["--model", path.to_str().unwrap(), "--threads", "1"]);
    cluster.wait_nodes(MODEL, 1);
    for prompt in ["The blacksmith said", "A dragon appeared and"] {
        let body = format!(r#"{{"model": "{MODEL}", "max_tokens": 12, "temperature": 0, "prompt": "{prompt}"}}"#);
        let r = cluster.post("/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let store = cluster.store();
    wait_for("both tasks verified", Duration::from_secs(60), || {
        super::database::numbers(&store, "SELECT count(*) FROM receipts WHERE verification = 'verified'") == vec![2]
    });
    let token = std::fs::read_to_string(cluster.dir.path().join("data/admin-token")).unwrap();
    let url = format!("http://{}/dashboard#token={}", cluster.addr, token.trim());

    // The page itself carries no data and loads nothing from elsewhere.
    let (status, page) = cluster.get("/dashboard");
    assert_eq!(status, 200);
    assert!(!page.contains("http://") && !page.contains("https://"), "the page must not load external resources");
    // Its data needs the admin token.
    assert_eq!(cluster.get("/admin/dashboard").0, 401);

    let dom = String::from_utf8(headless(&browser, &["--dump-dom"], &url).stdout).unwrap();
    let node_address = {
        let (_, nodes) = cluster.get_admin("/admin/nodes", token.trim());
        let v: serde_json::Value = serde_json::from_str(&nodes).unwrap();
        v["data"][0]["address"].as_str().unwrap().to_string()
    };
    assert!(dom.contains(&format!("data-address=\"{node_address}\"")), "node row missing:\n{dom}");
    // Nothing waits in a queue once both answers are in.
    assert!(dom.contains("id=\"c-queued\">0<"), "the queued-jobs card is missing or wrong:\n{dom}");
    assert!(dom.contains(MODEL), "model missing");
    assert!(
        dom.contains("Cpu/BFloat16/int4"),
        "device, dtype and quantization missing (the CPU default is int4 in bf16)"
    );
    assert!(dom.contains("data-outcome=\"verified\""), "verification outcomes missing");
    assert!(dom.contains("data-block="), "blocks missing");
    assert!(dom.contains(">serving<"), "node state missing");
    let updates: u32 = dom
        .split("data-updates=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|n| n.parse().ok())
        .expect("the status line's update counter");
    assert!(updates >= 2, "the page did not refresh itself ({updates} updates)");
    let status_line = dom.split("id=\"status\"").nth(1).and_then(|s| s.split("</span>").next()).unwrap_or_default();
    assert!(status_line.contains("live · updated"), "the page reported a problem: {status_line}");

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    headless(&browser, &[&format!("--screenshot={}", shot.display()), "--window-size=1400,1100"], &url);
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "screenshot of {} bytes", png.len());
}
