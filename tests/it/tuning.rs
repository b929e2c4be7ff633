//! Start-up tuning for real, on the default model: `ludus model tune` measures the formats
//! open to the choice at every thread count and remembers the choice; a node starting later
//! reads it without measuring and runs what was chosen; one-off commands never tune; a
//! node's heartbeat carries the choice to the operator's dashboard. What is chosen depends on the CPU, so the
//! tests check that a choice was made from real measurements, never which one.

use std::time::Duration;

use super::cluster::{ludus, wait_for, Cluster};
use super::helpers::smollm2;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

#[test]
fn a_node_measures_once_remembers_and_reports_what_it_chose() {
    let Some(path) = smollm2() else { return };
    let model = path.to_str().unwrap();
    // Both formats open to the choice (int4 alone by default), where this CPU runs int8.
    let formats: &[&str] = if ludus::inference::fbgemm::available() { &["int4", "int8"] } else { &["int4"] };
    let mut cluster = Cluster::start(&format!(
        "model_files = {{ \"{MODEL}\" = \"{model}\" }}\n[engine]\ntune_formats = {formats:?}\n"
    ));
    let config = cluster.config.to_str().unwrap().to_string();
    let tune_dir = cluster.dir.path().join("tune");
    let env = [
        ("LUDUS__ENGINE__TUNE", "true"),
        ("LUDUS__ENGINE__TUNE_DIR", tune_dir.to_str().unwrap()),
        ("RUST_LOG", "info"),
    ];
    let run = |args: &[&str]| {
        let out = ludus().envs(env).arg("--config").arg(&config).args(args).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), stdout.to_string(), stderr.to_string())
    };

    // Measured: each format open to the choice at 1 and 2 threads alone (and at batch 8
    // when there are formats to compare).
    let (ok, stdout, stderr) = run(&["model", "tune", model, "--threads", "2"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let tuning = &report["tuning"];
    let chosen = tuning["quantization"].as_str().unwrap().to_string();
    assert!(formats.contains(&chosen.as_str()), "{tuning}");
    let measured: Vec<&str> =
        tuning["rates"].as_array().unwrap().iter().map(|r| r["quantization"].as_str().unwrap()).collect();
    assert_eq!(measured, formats, "{tuning}");
    for rates in tuning["rates"].as_array().unwrap() {
        let threads: Vec<u64> = rates["batch1"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
        assert_eq!(threads, [1, 2], "{rates}");
        for p in rates["batch1"].as_array().unwrap() {
            assert!(p[1].as_f64().unwrap() > 0.0, "{rates}");
        }
        assert_eq!(rates["batch8"].as_f64().unwrap() > 0.0, formats.len() > 1, "{rates}");
    }
    let single = tuning["single_sequence_threads"].as_u64().unwrap();
    assert!([1, 2].contains(&single), "{tuning}");
    let reason = tuning["reason"].as_str().unwrap().to_string();
    assert!(reason.starts_with(&chosen), "{reason}");
    let stored: Vec<_> = std::fs::read_dir(&tune_dir).unwrap().filter_map(|e| e.ok()).collect();
    assert!(stored.iter().any(|e| e.file_name().to_string_lossy().ends_with(".json")), "nothing remembered");

    // Shown by `model inspect`.
    let (ok, stdout, stderr) = run(&["model", "inspect", model]);
    assert!(ok, "{stderr}");
    let inspected: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let shown = &inspected["tunings"][0];
    assert_eq!(
        (shown["quantization"].as_str(), shown["reason"].as_str()),
        (Some(chosen.as_str()), Some(reason.as_str()))
    );

    // A one-off command runs the untuned defaults (or its flags), never a remembered choice.
    let generate =
        ["generate", "--model", model, "--threads", "2", "--prompt", "Once upon a time", "--max-tokens", "3"];
    let (ok, _, stderr) = run(&generate);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("tuning"), "{stderr}");
    assert!(stderr.contains("quantization=int4"), "{stderr}");
    let (ok, _, stderr) = run(&[&generate[..], &["--single-sequence-threads", "many"]].concat());
    assert!(!ok && stderr.contains("neither a count nor auto"), "{stderr}");

    // A node starting on this machine reads the choice instead of measuring, runs it, and
    // reports it; the operator sees it on the dashboard.
    let addr = cluster.addr.clone();
    let node = cluster.add_node_with_env(&addr, &["--model", model, "--threads", "2"], &env);
    cluster.wait_nodes(MODEL, 1);
    let log = std::fs::read_to_string(cluster.dir.path().join(format!("node{node}.log"))).unwrap();
    assert!(log.contains("remembered for this machine and model") && !log.contains("tuning: measuring"), "{log}");
    assert!(log.contains(&format!("quantization={chosen}")), "{log}");
    let admin = std::fs::read_to_string(cluster.dir.path().join("data/admin-token")).unwrap();
    // An int4 node adds how its prefill multiplies (decided at start, timed or configured),
    // and, where libtorch packs int4 for its AVX-512 or AVX2 kernel, that a lone sequence
    // takes the fused step.
    let fused_here = ludus::inference::int4_prefill::layout().is_some_and(|l| l.halves);
    let shown = |tuning: &str| match chosen.as_str() {
        "int4" => {
            tuning.starts_with(&format!("{reason}; int4 prefill in "))
                && match fused_here {
                    true => tuning.ends_with("); fused decode for a lone sequence"),
                    false => tuning.ends_with(')'),
                }
        }
        _ => tuning == reason,
    };
    wait_for("the node's tuning on the dashboard", Duration::from_secs(30), || {
        let (status, body) = cluster.get_admin("/admin/dashboard", admin.trim());
        let data: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        status == 200 && data["nodes"][0]["tuning"].as_str().is_some_and(shown)
    });
}

/// `ludus demo` (what `make demo` runs) on a machine that has tuned nothing yet: its node
/// measures at start-up and the demo serves. The measurement once ran on the server's
/// runtime thread and panicked there ("Cannot block the current thread from within a
/// runtime"), so a fresh machine's first demo died before it served.
#[test]
fn the_demo_starts_and_serves_on_a_machine_that_has_not_tuned_yet() {
    use std::io::BufRead;
    let Some(path) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tune_dir = dir.path().join("tune");
    let log = std::fs::File::create(dir.path().join("demo.log")).unwrap();
    let mut child = ludus()
        .current_dir(dir.path())
        .env("LUDUS__ENGINE__TUNE", "true")
        .env("LUDUS__ENGINE__TUNE_DIR", &tune_dir)
        .env("LUDUS__SERVER__BIND", "127.0.0.1:0")
        .args(["demo", "--nodes", "1", "--model", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !lines.iter().any(|l: &String| l.starts_with("API key")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default();
                panic!("the demo did not start:\n{}\n{log}", lines.join("\n"));
            }
        }
    }
    let addr = lines[0].split("http://").nth(1).unwrap().split(' ').next().unwrap().to_string();
    let key = lines[1].rsplit(' ').next().unwrap().to_string();
    let body = format!(
        r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Greet the traveller."}}], "max_tokens": 4}}"#
    );
    // The node joins once its model is loaded and tuned.
    wait_for("the demo's node", Duration::from_secs(120), || {
        let models = super::cluster::raw(&addr, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        models.body.contains(MODEL)
    });
    let response = super::cluster::post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes());
    // The tuning was measured and stored before the node joined.
    let stored = std::fs::read_dir(&tune_dir).map(|d| d.count()).unwrap_or(0);
    // Ctrl-C: the demo stops its Postgres and anvil too.
    let _ = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let _ = child.wait();
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(stored > 0, "no tuning stored in {}", tune_dir.display());
}
