//! Start-up tuning for real, on the default model: `ludus model tune` measures both formats
//! at every thread count and remembers the choice; a later start reads it without measuring
//! and runs what was chosen; settings given explicitly are never tuned; a node's heartbeat
//! carries the choice to the operator's dashboard. What is chosen depends on the CPU, so the
//! tests check that a choice was made from real measurements, never which one.

use std::time::Duration;

use super::cluster::{ludus, wait_for, Cluster};
use super::helpers::smollm2;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

#[test]
fn a_machine_is_measured_once_and_its_choice_is_used_shown_and_reported() {
    let Some(path) = smollm2() else { return };
    let model = path.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tune_dir = dir.path().join("tune");
    let env = [
        ("LUDUS__ENGINE__TUNE", "true"),
        ("LUDUS__ENGINE__TUNE_DIR", tune_dir.to_str().unwrap()),
        ("RUST_LOG", "info"),
    ];
    let run = |args: &[&str]| {
        let out = ludus().envs(env).args(args).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), stdout.to_string(), stderr.to_string())
    };

    // Measured: both formats that meet the bar, each at 1 and 2 threads alone and at batch 8.
    let (ok, stdout, stderr) = run(&["model", "tune", model, "--threads", "2"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let tuning = &report["tuning"];
    let chosen = tuning["quantization"].as_str().unwrap().to_string();
    assert!(["int4", "int8"].contains(&chosen.as_str()), "{tuning}");
    let formats: Vec<&str> =
        tuning["rates"].as_array().unwrap().iter().map(|r| r["quantization"].as_str().unwrap()).collect();
    assert_eq!(formats, ["int4", "int8"], "{tuning}");
    for rates in tuning["rates"].as_array().unwrap() {
        let threads: Vec<u64> = rates["batch1"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
        assert_eq!(threads, [1, 2], "{rates}");
        for p in rates["batch1"].as_array().unwrap() {
            assert!(p[1].as_f64().unwrap() > 0.0, "{rates}");
        }
        assert!(rates["batch8"].as_f64().unwrap() > 0.0, "{rates}");
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

    // A start with everything auto reads the choice and runs it, without measuring again.
    let generate =
        ["generate", "--model", model, "--threads", "2", "--prompt", "Once upon a time", "--max-tokens", "3"];
    let (ok, _, stderr) = run(&generate);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("remembered for this machine and model"), "{stderr}");
    assert!(!stderr.contains("tuning: measuring"), "{stderr}");
    assert!(stderr.contains(&format!("quantization={chosen}")), "{stderr}");
    assert_eq!(stderr.matches("model loaded").count(), 1, "one load, the chosen format: {stderr}");

    // Explicit settings are never tuned; a bad one is refused with the reason.
    let explicit = [&generate[..], &["--quantize", "int8", "--single-sequence-threads", "1"]].concat();
    let (ok, _, stderr) = run(&explicit);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("tuning"), "{stderr}");
    assert!(stderr.contains("quantization=int8"), "{stderr}");
    let (ok, _, stderr) = run(&[&generate[..], &["--single-sequence-threads", "many"]].concat());
    assert!(!ok && stderr.contains("neither a count nor auto"), "{stderr}");

    // A node reports its choice; the operator sees it on the dashboard.
    let mut cluster = Cluster::start(&format!("model_files = {{ \"{MODEL}\" = \"{model}\" }}\n"));
    let addr = cluster.addr.clone();
    cluster.add_node_with_env(&addr, &["--model", model, "--threads", "2"], &env);
    cluster.wait_nodes(MODEL, 1);
    let admin = std::fs::read_to_string(cluster.dir.path().join("data/admin-token")).unwrap();
    wait_for("the node's tuning on the dashboard", Duration::from_secs(30), || {
        let (status, body) = cluster.get_admin("/admin/dashboard", admin.trim());
        let data: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        status == 200 && data["nodes"][0]["tuning"].as_str() == Some(reason.as_str())
    });
}
