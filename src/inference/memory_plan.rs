//! Memory planning: what a model takes in memory for each quantization and context
//! length, and whether it fits a budget (`ludus model inspect PATH --budget 8GiB`).
//!
//! The estimate follows what [`super::llama::Llama::load_quantized`] allocates: linear
//! layers at [`Quantization::bytes_per_weight`], the embedding and output head as
//! [`table_format`] stores them (the model dtype; under a quantization, per-row int8 on
//! CPU and bf16 on CUDA), norms in the model dtype, and a KV cache of `batch × context`
//! tokens in the model dtype, the prefix cache's reserve (`[engine] prefix_cache_mb`),
//! plus the runtime's own footprint.

use tch::{Device, Kind};

use super::config::LlamaConfig;
use super::qlinear::{table_format, Quantization, TableFormat};

/// Resident memory of the runtime with no model: libtorch, the tokenizer, the server
/// link (measured: 115 MiB on CPU, docs/lightweight-models.md). A CUDA context adds
/// about 500 MiB of host memory but little GPU memory, so both use this figure.
pub const RUNTIME_BYTES: u64 = 128 << 20;

/// One row of a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlanRow {
    pub quantization: Quantization,
    /// The dtype of activations, norms and the KV cache.
    pub dtype: String,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    /// The prefix cache's reserve (it fills up to this as prompts are cached).
    pub prefix_cache_bytes: u64,
    pub total_bytes: u64,
    pub fits: bool,
    /// The longest context (for `batch` sequences) that fits the budget; 0 if none.
    pub max_context_in_budget: u64,
}

/// Bytes of weights for `config` stored as `quantization` on `device`, other tensors in
/// `kind`.
pub fn weight_bytes(config: &LlamaConfig, quantization: Quantization, device: Device, kind: Kind) -> u64 {
    let c = config;
    let (d, f, hd) = (c.hidden_size as u64, c.intermediate_size as u64, c.head_dim as u64);
    let linear_per_layer = d * hd * (2 * c.num_heads as u64 + 2 * c.num_kv_heads as u64) + 3 * d * f;
    let head = c.vocab_size as u64 * d;
    let elt = kind.elt_size_in_bytes() as u64;
    let per_weight = quantization.bytes_per_weight(kind);
    let linear = (linear_per_layer * c.num_layers as u64) as f64 * per_weight;
    let norms = (2 * d * c.num_layers as u64 + d) * elt;
    // A tied head shares the embedding's table.
    let table = match table_format(quantization, device, d as i64) {
        TableFormat::ModelDtype => head * elt,
        TableFormat::BFloat16 => head * 2,
        // One byte per weight and a bf16 scale per row.
        TableFormat::Int8Rows => head + 2 * c.vocab_size as u64,
    };
    let (embed, out) = (table, if c.tie_word_embeddings { 0 } else { table });
    linear as u64 + norms + embed + out
}

/// KV-cache bytes for `batch` sequences of `context` tokens in `kind`.
pub fn kv_cache_bytes(config: &LlamaConfig, kind: Kind, batch: u64, context: u64) -> u64 {
    config.kv_bytes_per_token(kind.elt_size_in_bytes()) as u64 * batch * context
}

/// The quantizations a device runs: int8 is CPU only.
pub fn quantizations_for(cuda: bool) -> &'static [Quantization] {
    if cuda {
        &[Quantization::None, Quantization::Int4]
    } else {
        &[Quantization::None, Quantization::Int8, Quantization::Int4]
    }
}

/// What the engine is sized for: `batch` sequences of `context` tokens, and the prefix
/// cache's reserve in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub batch: u64,
    pub context: u64,
    pub prefix_cache_bytes: u64,
}

/// Plans each of `quantizations` for a device and its dtype.
pub fn plan(
    config: &LlamaConfig,
    quantizations: &[Quantization],
    device: Device,
    kind: Kind,
    workload: Workload,
    budget: u64,
) -> Vec<PlanRow> {
    let Workload { batch, context, prefix_cache_bytes } = workload;
    quantizations
        .iter()
        .copied()
        .map(|q| {
            let weights = weight_bytes(config, q, device, kind);
            let kv = kv_cache_bytes(config, kind, batch, context);
            let total = RUNTIME_BYTES + weights + kv + prefix_cache_bytes;
            let per_token = kv_cache_bytes(config, kind, batch, 1).max(1);
            let room = budget.saturating_sub(RUNTIME_BYTES + weights + prefix_cache_bytes);
            PlanRow {
                quantization: q,
                dtype: format!("{kind:?}").to_lowercase(),
                weight_bytes: weights,
                kv_cache_bytes: kv,
                prefix_cache_bytes,
                total_bytes: total,
                fits: total <= budget,
                max_context_in_budget: (room / per_token).min(config.max_position_embeddings as u64),
            }
        })
        .collect()
}

/// Parses `8GiB`, `512MiB`, `8GB`, `1.5GiB` or a plain number of bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.trim().parse().map_err(|_| format!("`{s}` is not a size (e.g. 8GiB, 512MiB)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        other => return Err(format!("unknown size unit `{other}` (B, KiB, MiB, GiB, KB, MB, GB)")),
    };
    if value < 0.0 || !value.is_finite() {
        return Err(format!("`{s}` is not a size"));
    }
    Ok((value * scale) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1 8B's published shape.
    fn llama3_8b() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 128_256,
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: None,
            max_position_embeddings: 131_072,
            tie_word_embeddings: false,
            ..LlamaConfig::default()
        }
    }

    #[test]
    fn an_8b_model_fits_8_gib_only_in_int4() {
        let gib = 1u64 << 30;
        let all = [Quantization::None, Quantization::Int8, Quantization::Int4];
        let workload = Workload { batch: 1, context: 8192, prefix_cache_bytes: 0 };
        let rows = plan(&llama3_8b(), &all, Device::Cuda(0), Kind::BFloat16, workload, 8 * gib);
        let by = |q| rows.iter().find(|r| r.quantization == q).unwrap();
        // 8.03 B parameters: about 16 GB in bf16, 8 GB in int8, under 5 GB in int4.
        assert!(by(Quantization::None).weight_bytes > 14 * gib); // 16.06 GB
        assert!(!by(Quantization::None).fits);
        assert!(!by(Quantization::Int8).fits, "{:?}", by(Quantization::Int8));
        let int4 = by(Quantization::Int4);
        assert!(int4.fits, "{int4:?}");
        assert!(int4.weight_bytes < 7 * gib && int4.weight_bytes > 5 * gib, "{int4:?}");
        // 8k tokens of bf16 KV cache: 32 layers × 2 × 8 heads × 128 × 2 bytes × 8192 = 1 GiB.
        assert_eq!(int4.kv_cache_bytes, gib);
        assert!(int4.max_context_in_budget > 8192);
        // Measured on an H100 (docs/device/h100-int4-check.json): 4.867 GiB for every
        // linear layer and the head in int4 (0.306 GiB) plus an int8 embedding
        // (0.489 GiB); on CUDA the engine keeps the embedding and the head in bf16. The
        // plan must agree within 2 %.
        let bf16_tables = 2.0 * 128_256.0 * 4096.0 * 2.0;
        let measured = (4.867 - 0.4893 - 0.3058) * gib as f64 + bf16_tables;
        assert!((int4.weight_bytes as f64 / measured - 1.0).abs() < 0.02, "{}", int4.weight_bytes as f64 / gib as f64);
    }

    #[test]
    fn quantized_vocabulary_tables_are_int8_on_cpu_and_bf16_on_cuda() {
        let c = llama3_8b();
        let table = c.vocab_size as u64 * c.hidden_size as u64;
        let cpu = weight_bytes(&c, Quantization::Int4, Device::Cpu, Kind::BFloat16);
        let cuda = weight_bytes(&c, Quantization::Int4, Device::Cuda(0), Kind::BFloat16);
        // Untied: the embedding and the head each save a byte per weight, less a bf16
        // scale per row.
        assert_eq!(cuda - cpu, 2 * (table - 2 * c.vocab_size as u64));
    }

    #[test]
    fn weights_match_the_parameter_count_when_unquantized() {
        let c = llama3_8b();
        assert_eq!(weight_bytes(&c, Quantization::None, Device::Cpu, Kind::Float), c.num_parameters() as u64 * 4);
    }

    #[test]
    fn sizes_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_bytes("8GiB"), Ok(8 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").unwrap_err().contains("not a size"));
        assert!(parse_bytes("8 parsecs").unwrap_err().contains("unknown size unit"));
    }

    #[test]
    fn the_prefix_cache_reserve_counts_against_the_budget() {
        let gib = 1u64 << 30;
        let (c, q) = (llama3_8b(), [Quantization::Int4]);
        let without = Workload { batch: 1, context: 8192, prefix_cache_bytes: 0 };
        let with = Workload { prefix_cache_bytes: gib, ..without };
        let (a, b) = (
            plan(&c, &q, Device::Cuda(0), Kind::BFloat16, without, 8 * gib).remove(0),
            plan(&c, &q, Device::Cuda(0), Kind::BFloat16, with, 8 * gib).remove(0),
        );
        assert_eq!(b.total_bytes, a.total_bytes + gib);
        // 1 GiB of bf16 KV is 8,192 tokens of this model: the reserve costs exactly that.
        assert_eq!(a.max_context_in_budget - b.max_context_in_budget, 8192);
    }
}
