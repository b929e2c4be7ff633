//! `LlamaConfig`: the hyper-parameters of a Llama-family model, read from GGUF metadata
//! (`llama.*` keys) or a Hugging Face `config.json`.

use std::path::Path;

use serde::Deserialize;

use super::error::{InferError, Result};
use super::gguf::GgufFile;

/// Llama 3.1-style frequency-dependent rotary scaling.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Number of parameters (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads);
        let per_layer = attn + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.num_layers * per_layer + d + head
    }

    /// Bytes of KV cache one token takes in `dtype_bytes`-sized elements.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(InferError::InvalidRequest(format!("model config: {what}")));
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!("{} heads cannot share {} KV heads", self.num_heads, self.num_kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} is odd", self.head_dim));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("empty model".to_string());
        }
        Ok(())
    }

    /// Reads the `{arch}.*` keys of a GGUF file (arch = `llama` or `mistral`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.get_str("general.architecture").unwrap_or("").to_string();
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(InferError::UnsupportedArchitecture(arch));
        }
        let int = |key: &str| -> Result<usize> {
            let full = format!("{arch}.{key}");
            file.get_u64(&full).map(|v| v as usize).ok_or(InferError::MissingMetadata(full))
        };
        let float =
            |key: &str, default: f64| file.get(&format!("{arch}.{key}")).and_then(|v| v.as_f64()).unwrap_or(default);
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = int("attention.head_count_kv").unwrap_or(num_heads);
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => file
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(<[_]>::len)
                .ok_or_else(|| InferError::MissingMetadata(format!("{arch}.vocab_size")))?,
        };
        let head_dim = int("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let config = Self {
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: float("rope.freq_base", 10_000.0),
            rope_scaling: None,
            max_position_embeddings: int("context_length").unwrap_or(4096),
            tie_word_embeddings: !file.tensors.contains_key("output.weight"),
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            architectures: Option<Vec<String>>,
            model_type: Option<String>,
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rms_norm_eps: Option<f64>,
            rope_theta: Option<f64>,
            rope_scaling: Option<serde_json::Value>,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
        }
        let text = std::fs::read_to_string(path).map_err(|e| InferError::io(path, e))?;
        let hf: Hf = serde_json::from_str(&text).map_err(|e| InferError::format(path, e.to_string()))?;
        let kind = hf.model_type.clone().unwrap_or_default();
        let arch_ok = matches!(kind.as_str(), "llama" | "mistral")
            || hf.architectures.iter().flatten().any(|a| a == "LlamaForCausalLM" || a == "MistralForCausalLM");
        if !arch_ok {
            return Err(InferError::UnsupportedArchitecture(kind));
        }
        let rope_scaling = match hf.rope_scaling {
            Some(v) if v.get("rope_type").and_then(|t| t.as_str()) == Some("llama3") => {
                Some(serde_json::from_value(v).map_err(|e| InferError::format(path, format!("rope_scaling: {e}")))?)
            }
            Some(serde_json::Value::Null) | None => None,
            Some(other) => return Err(InferError::format(path, format!("unsupported rope_scaling {other}"))),
        };
        let config = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }
}
