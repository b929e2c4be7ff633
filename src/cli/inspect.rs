//! `ludus model inspect PATH [--budget 8GiB]` (with a memory plan) and the tokenizer loader behind `ludus tokenize`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::inference::config::{Activation, LlamaConfig};
use crate::inference::memory_plan::{plan, quantizations_for, Workload, RUNTIME_BYTES};
use crate::inference::tokenizer::Tokenizer;
use crate::inference::weights::WeightSource;

pub fn load_tokenizer(path: &Path) -> anyhow::Result<Tokenizer> {
    Ok(match WeightSource::open(path)? {
        WeightSource::Gguf(g) => Tokenizer::from_gguf(&g)?,
        WeightSource::Safetensors(s, _) => Tokenizer::from_hf_dir(&s.dir)?,
        WeightSource::Memory { .. } => anyhow::bail!("in-memory weights have no tokenizer file"),
    })
}

/// Prints the model's report, with what start-up tuning chose for it (`tunings`, from the
/// tuning cache); with `plan = (budget, context, batch)`, also a memory plan.
pub fn run(path: &Path, plan: Option<(u64, Workload)>, tunings: Vec<serde_json::Value>) -> anyhow::Result<()> {
    if tunings.is_empty() {
        eprintln!("not tuned on this machine yet: `ludus model tune` (or a node's first start) measures it");
    }
    if crate::inference::protect::is_bundle(path) {
        let m = crate::inference::protect::read_manifest(path)?;
        let report = serde_json::json!({"path": path.display().to_string(), "format": m.format, "name": m.name,
            "key_id": m.key_id, "parameters": m.config.num_parameters(), "config": m.config, "tokenizer": m.tokenizer,
            "tunings": tunings});
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let source = WeightSource::open(path)?;
    let config = source.config()?;
    let mut types: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (format, n_tensors, bytes) = match &source {
        WeightSource::Gguf(g) => {
            for t in g.tensors.values() {
                let e = types.entry(format!("{:?}", t.dtype)).or_default();
                e.0 += 1;
                e.1 += t.numel();
            }
            (format!("GGUF v{}", g.version), g.tensors.len(), g.tensors.values().map(|t| t.n_bytes).sum::<usize>())
        }
        WeightSource::Safetensors(s, _) => {
            for t in s.tensors.values() {
                let e = types.entry(format!("{:?}", t.dtype)).or_default();
                e.0 += 1;
                e.1 += t.shape.iter().product::<usize>();
            }
            ("safetensors".to_string(), s.tensors.len(), std::fs::metadata(path).map(|m| m.len() as usize).unwrap_or(0))
        }
        WeightSource::Memory { .. } => anyhow::bail!("in-memory weights cannot be inspected"),
    };
    let params = config.num_parameters();
    let report = serde_json::json!({
        "path": path.display().to_string(),
        "format": format,
        "architecture": config.family.name(),
        "family_switches": family_switches(&config),
        "parameters": params,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "tied_embeddings": config.tie_word_embeddings,
        "tensors": n_tensors,
        "tensor_bytes": bytes,
        "tensor_types": types.iter().map(|(k, (n, e))| (k.clone(), serde_json::json!({"tensors": n, "elements": e}))).collect::<serde_json::Map<_, _>>(),
        "memory_f32_bytes": params * 4,
        "kv_cache_bytes_per_token_f32": config.kv_bytes_per_token(4),
        "tunings": tunings,
    });
    let mut report = report;
    if let Some((budget, workload)) = plan {
        report["memory_plan"] = memory_plan(&config, budget, workload);
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The plan for CUDA (bf16) and CPU (f32), as JSON, with a readable table on stderr.
fn memory_plan(config: &LlamaConfig, budget: u64, workload: Workload) -> serde_json::Value {
    let context = workload.context.min(config.max_position_embeddings as u64).max(1);
    let (batch, workload) = (workload.batch, Workload { context, ..workload });
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "memory plan: {batch} sequence(s) × {context} tokens, a {:.0} MiB prefix cache, budget {:.0} MiB",
        mib(workload.prefix_cache_bytes),
        mib(budget)
    );
    eprintln!(
        "{:<6} {:<12} {:>12} {:>12} {:>12}  {:<5} {:>12}",
        "device", "quantization", "weights MiB", "KV MiB", "total MiB", "fits", "max context"
    );
    let mut out = serde_json::Map::new();
    for (device, tch_device) in [("cuda", tch::Device::Cuda(0)), ("cpu", tch::Device::Cpu)] {
        // Each format in the dtype it runs in by default (int4: bf16 everywhere).
        let rows: Vec<_> = quantizations_for(device == "cuda")
            .iter()
            .flat_map(|&q| {
                let kind = crate::inference::model::default_dtype_for(tch_device, q);
                plan(config, &[q], tch_device, kind, workload, budget)
            })
            .collect();
        for r in &rows {
            eprintln!(
                "{device:<6} {:<12} {:>12.0} {:>12.0} {:>12.0}  {:<5} {:>12}",
                format!("{} ({})", r.quantization, r.dtype),
                mib(r.weight_bytes),
                mib(r.kv_cache_bytes),
                mib(r.total_bytes),
                if r.fits { "yes" } else { "no" },
                r.max_context_in_budget
            );
        }
        out.insert(device.to_string(), serde_json::to_value(rows).unwrap_or_default());
    }
    serde_json::json!({"budget_bytes": budget, "context": context, "batch": batch,
        "prefix_cache_bytes": workload.prefix_cache_bytes, "runtime_bytes": RUNTIME_BYTES, "devices": out})
}

/// The family-specific switches a model sets, by name (`docs/architecture.md` has the table).
fn family_switches(c: &LlamaConfig) -> Vec<String> {
    let mut on = Vec::new();
    let flags = [
        ("qkv_bias", c.qkv_bias),
        ("qk_norm", c.qk_norm),
        ("sandwich_norms", c.sandwich_norms),
        ("embedding_scale", c.embedding_scale.is_some()),
        ("gelu_tanh", c.activation == Activation::GeluTanh),
        ("attn_softcap", c.attn_softcap.is_some()),
        ("final_softcap", c.final_softcap.is_some()),
        ("sliding_window", c.sliding_window.is_some()),
        ("local_rope_base", c.rope_local_theta.is_some()),
        ("partial_rotary", c.rotary_dim.is_some_and(|r| r < c.head_dim)),
        ("longrope", c.long_rope.is_some()),
        ("linear_rope", c.rope_linear_factor.is_some()),
        ("llama3_rope", c.rope_scaling.is_some()),
    ];
    for (name, set) in flags {
        if set {
            on.push(name.to_string());
        }
    }
    on
}
