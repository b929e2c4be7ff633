//! `ludus model inspect PATH` and the tokenizer loader behind `ludus tokenize`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::inference::tokenizer::Tokenizer;
use crate::inference::weights::WeightSource;

pub fn load_tokenizer(path: &Path) -> anyhow::Result<Tokenizer> {
    Ok(match WeightSource::open(path)? {
        WeightSource::Gguf(g) => Tokenizer::from_gguf(&g)?,
        WeightSource::Safetensors(s) => Tokenizer::from_hf_dir(&s.dir)?,
        WeightSource::Memory { .. } => anyhow::bail!("in-memory weights have no tokenizer file"),
    })
}

pub fn run(path: &Path) -> anyhow::Result<()> {
    if crate::crypto::protect::is_bundle(path) {
        let m = crate::crypto::protect::read_manifest(path)?;
        let report = serde_json::json!({"path": path.display().to_string(), "format": m.format, "name": m.name,
            "key_id": m.key_id, "parameters": m.config.num_parameters(), "config": m.config, "tokenizer": m.tokenizer});
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
        WeightSource::Safetensors(s) => {
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
        "architecture": "llama",
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
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
