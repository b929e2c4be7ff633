//! Quantized weights on SmolLM2-135M (issue: lightweight models): quality against the
//! unquantized model on a fixed text, and the memory each format holds in a process that
//! loads and serves it.

use super::helpers::{fixtures, smollm2};

#[test]
fn int8_and_int4_stay_close_to_the_unquantized_model() {
    let Some(path) = smollm2() else { return };
    let text = fixtures().join("../eval/village.txt");
    let out = crate::cluster::ludus()
        .args(["bench", "quality", "--model", path.to_str().unwrap(), "--text", text.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let get = |q: &str| rows.iter().find(|r| r["quantization"] == q).unwrap_or_else(|| panic!("no {q} row"));
    let ppl = |q: &str| get(q)["perplexity"].as_f64().unwrap();
    let base = ppl("none");
    assert!(base > 5.0 && base < 100.0, "f32 perplexity {base}");
    // Acceptance: within 5 % (int8) and 15 % (int4) of f32.
    assert!(ppl("int8") / base < 1.05, "int8 perplexity {} vs {base}", ppl("int8"));
    assert!(ppl("int4") / base < 1.15, "int4 perplexity {} vs {base}", ppl("int4"));
    for q in ["int8", "int4"] {
        let agreement = get(q)["greedy_agreement"].as_f64().unwrap();
        eprintln!("{q}: perplexity {:.2} (f32 {base:.2}), greedy agreement {agreement:.3}", ppl(q));
        assert!(agreement > 0.75, "{q} greedy agreement {agreement}");
        assert!(get(q)["model_bytes"].as_u64().unwrap() * 3 < get("none")["model_bytes"].as_u64().unwrap());
    }
    // `ludus model inspect --budget` predicts what each format really holds on CPU.
    let out = crate::cluster::ludus()
        .args(["model", "inspect", path.to_str().unwrap(), "--budget", "8GiB"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for row in report["memory_plan"]["devices"]["cpu"].as_array().unwrap() {
        let q = row["quantization"].as_str().unwrap();
        let (planned, held) = (row["weight_bytes"].as_f64().unwrap(), get(q)["model_bytes"].as_f64().unwrap());
        assert!((planned / held - 1.0).abs() < 0.02, "{q}: planned {planned} bytes, the loaded model holds {held}");
    }
}

/// What a serving process holds beyond the weights, the KV cache and its own baseline:
/// activations, allocator slack and the libtorch kernels this CPU picks (~70 MiB more on
/// an AVX-512 Xeon than on an AVX2 EPYC). Far below one extra copy of the weights.
const RUNTIME_SLACK_BYTES: f64 = 200.0 * 1024.0 * 1024.0;

/// Memory per format, measured by `ludus bench memory` (one fresh process per format,
/// loading through the same path as `ludus node`). Asserts what Ludus controls — the bytes
/// each format's weights take, and that a serving process holds nothing beyond its weights,
/// KV cache and a bounded runtime — not a whole-process ratio, which depends on the CPU
/// (that ratio is a benchmark: docs/benchmarks.md).
#[test]
fn an_int4_node_holds_40_percent_of_the_f32_weights_and_no_hidden_copy() {
    let Some(path) = smollm2() else { return };
    let out = crate::cluster::ludus()
        .args(["bench", "memory", "--model", path.to_str().unwrap(), "--quantize", "none,int8,int4", "--threads", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let get = |q: &str, field: &str| {
        rows.iter()
            .find(|r| r["quantization"] == q)
            .and_then(|r| r[field].as_f64())
            .unwrap_or_else(|| panic!("no {field} for {q}: {rows:?}"))
    };
    let summary = rows.last().unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&rows).unwrap());
    assert!(summary["cpu"].as_str().is_some_and(|c| !c.is_empty()), "the CPU is named: {summary}");
    // The weights: int4 at most 40 % of f32, int8 at most 60 %.
    let f32_weights = get("none", "model_bytes");
    assert!(f32_weights > 400e6, "SmolLM2-135M in f32 holds over 400 MB of weights: {f32_weights}");
    assert!(get("int4", "model_bytes") <= 0.40 * f32_weights, "int4 weights vs f32");
    assert!(get("int8", "model_bytes") <= 0.60 * f32_weights, "int8 weights vs f32");
    for q in ["none", "int8", "int4"] {
        let above = get(q, "above_baseline_bytes");
        let accounted = get(q, "model_bytes") + get(q, "kv_cache_bytes");
        // Nothing hidden: above its own baseline, a serving process holds its weights, its
        // KV cache and a bounded runtime (a leftover f32 copy would add 540 MB).
        assert!(
            above <= accounted + RUNTIME_SLACK_BYTES,
            "{q}: {above} bytes above the baseline, {accounted} accounted for"
        );
    }
    // The measure sees the weights: an f32 process grows by at least its weights.
    assert!(get("none", "above_baseline_bytes") >= 0.9 * f32_weights, "f32 weights not resident?");
}
