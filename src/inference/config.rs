//! `LlamaConfig`: the hyper-parameters of a decoder-only transformer of the Llama lineage —
//! Llama, Mistral, Qwen 2/2.5/3, Gemma 2/3 and Phi-3/3.5/4-mini — read from GGUF metadata
//! (`{arch}.*` keys) or a Hugging Face `config.json`.
//!
//! The families share one model ([`super::llama::Llama`]); where they differ, a switch
//! here says so (bias on Q/K/V, norms on Q and K, sandwich norms, GeGLU, soft-capping,
//! sliding-window layers, partial or rescaled rotary embeddings). The table of which
//! family sets which switch is in `docs/architecture.md`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{InferError, Result};
use super::gguf::GgufFile;

/// Which model family a checkpoint belongs to: decides the weight names, the switches
/// below and the tokenizer's quirks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
        }
    }

    /// Gemma stores RMSNorm gains as `w` and multiplies by `1 + w`; GGUF files (llama.cpp's
    /// converter) and this crate store `1 + w`.
    pub fn norm_offset(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }

    /// Phi-3 stores Q, K and V as one `qkv_proj` and gate and up as one `gate_up_proj`.
    pub fn fused_projections(self) -> bool {
        matches!(self, Self::Phi3)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU (Llama, Qwen, Phi).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

/// Llama 3.1-style frequency-dependent rotary scaling.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Phi-3's LongRoPE: one divisor per rotary frequency, and a factor on cos and sin.
///
/// Hugging Face switches from the short to the long factors once a sequence passes
/// `original_max_position_embeddings`, which changes the positions of keys already in
/// the cache. Ludus uses the short factors and caps the context there, so a cached key
/// never changes meaning (see `max_position_embeddings`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub attention_factor: f64,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
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
    #[serde(default)]
    pub family: Family,
    /// Q, K and V projections carry a bias (Qwen 2).
    #[serde(default)]
    pub qkv_bias: bool,
    /// RMSNorm over each head of Q and K before the rotary embedding (Qwen 3, Gemma 3).
    #[serde(default)]
    pub qk_norm: bool,
    /// Norms on the attention and MLP outputs too, before the residual add (Gemma).
    #[serde(default)]
    pub sandwich_norms: bool,
    /// The embedding is multiplied by this (Gemma: √hidden).
    #[serde(default)]
    pub embedding_scale: Option<f64>,
    #[serde(default)]
    pub activation: Activation,
    /// Attention scores are multiplied by this (default `1/√head_dim`).
    #[serde(default)]
    pub query_scale: Option<f64>,
    /// `cap · tanh(score / cap)` on attention scores (Gemma 2).
    #[serde(default)]
    pub attn_softcap: Option<f64>,
    /// `cap · tanh(logit / cap)` on the output logits (Gemma 2).
    #[serde(default)]
    pub final_softcap: Option<f64>,
    /// Sliding layers see only the last this-many positions.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Which layers slide (empty: none).
    #[serde(default)]
    pub sliding_layers: Vec<bool>,
    /// The rotary base of sliding layers when it differs from `rope_theta` (Gemma 3).
    #[serde(default)]
    pub rope_local_theta: Option<f64>,
    /// Dimensions of each head that rotate (Phi-4-mini: ¾ of the head); default all.
    #[serde(default)]
    pub rotary_dim: Option<usize>,
    /// Positions are divided by this in global layers (Gemma 3 4B and up).
    #[serde(default)]
    pub rope_linear_factor: Option<f64>,
    #[serde(default)]
    pub long_rope: Option<LongRope>,
}

impl LlamaConfig {
    /// Number of parameters (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads);
        let bias = if self.qkv_bias { (self.num_heads + 2 * self.num_kv_heads) * hd } else { 0 };
        let qk_norms = if self.qk_norm { 2 * hd } else { 0 };
        let norms = if self.sandwich_norms { 4 * d } else { 2 * d };
        let per_layer = attn + bias + qk_norms + 3 * d * f + norms;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.num_layers * per_layer + d + head
    }

    /// Bytes of KV cache one token takes in `dtype_bytes`-sized elements.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes
    }

    /// Whether layer `layer` attends only to a sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_layers.get(layer).copied().unwrap_or(false)
    }

    /// Dimensions of each head that the rotary embedding turns.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim.unwrap_or(self.head_dim)
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
        let rotary = self.rotary_dim();
        if rotary == 0 || rotary > self.head_dim || !rotary.is_multiple_of(2) {
            return bad(format!("rotary dimension {rotary} does not fit a head of {}", self.head_dim));
        }
        if let Some(long) = &self.long_rope {
            if long.short_factor.len() != rotary / 2 {
                return bad(format!(
                    "{} LongRoPE factors for {} rotary frequencies",
                    long.short_factor.len(),
                    rotary / 2
                ));
            }
        }
        if !self.sliding_layers.is_empty() && self.sliding_layers.len() != self.num_layers {
            return bad(format!("{} layer types for {} layers", self.sliding_layers.len(), self.num_layers));
        }
        if self.sliding_window == Some(0) {
            return bad("a sliding window of 0 positions".to_string());
        }
        if self.max_position_embeddings == 0 {
            return bad("a context of 0 positions".to_string());
        }
        let long_rope = self.long_rope.iter().flat_map(|l| l.short_factor.iter().copied().chain([l.attention_factor]));
        let positive = [
            ("attention soft-cap", self.attn_softcap),
            ("logit soft-cap", self.final_softcap),
            ("query scale", self.query_scale),
            ("embedding scale", self.embedding_scale),
            ("rotary base", Some(self.rope_theta)),
            ("local rotary base", self.rope_local_theta),
            ("linear rotary factor", self.rope_linear_factor),
        ]
        .into_iter()
        .chain(long_rope.map(|v| ("LongRoPE factor", Some(v))));
        for (what, v) in positive {
            if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return bad(format!("{what} must be a positive number"));
            }
        }
        Ok(())
    }

    /// Reads the `{arch}.*` keys of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.get_str("general.architecture").unwrap_or("").to_string();
        let family = match arch.as_str() {
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return Err(InferError::UnsupportedArchitecture(arch)),
        };
        let int = |key: &str| -> Result<usize> {
            let full = format!("{arch}.{key}");
            file.get_u64(&full).map(|v| v as usize).ok_or(InferError::MissingMetadata(full))
        };
        let opt_float = |key: &str| file.get(&format!("{arch}.{key}")).and_then(|v| v.as_f64());
        let float = |key: &str, default: f64| opt_float(key).unwrap_or(default);
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
        let num_layers = int("block_count")?;
        let mut config = Self {
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: float("rope.freq_base", 10_000.0),
            rope_scaling: None,
            max_position_embeddings: int("context_length").unwrap_or(4096),
            tie_word_embeddings: !file.tensors.contains_key("output.weight"),
            family,
            qkv_bias: file.tensors.contains_key("blk.0.attn_q.bias"),
            qk_norm: file.tensors.contains_key("blk.0.attn_q_norm.weight"),
            ..Self::default()
        };
        let scaling = file.get_str(&format!("{arch}.rope.scaling.type")).unwrap_or("none");
        if scaling != "none" && !(family == Family::Gemma3 && scaling == "linear") {
            return Err(InferError::InvalidRequest(format!(
                "model config: {arch} rotary scaling `{scaling}` is not supported (Gemma 3's linear scaling and \
                 Phi-3's LongRoPE are)"
            )));
        }
        match family {
            Family::Gemma2 | Family::Gemma3 => {
                config.sandwich_norms = true;
                config.activation = Activation::GeluTanh;
                config.embedding_scale = Some((hidden_size as f64).sqrt());
                // llama.cpp's defaults where early Gemma 2 files lack the keys.
                let gemma2 = family == Family::Gemma2;
                config.attn_softcap = opt_float("attn_logit_softcapping").or(gemma2.then_some(50.0));
                config.final_softcap = opt_float("final_logit_softcapping").or(gemma2.then_some(30.0));
                config.sliding_window = int("attention.sliding_window").ok().or(gemma2.then_some(4096));
                // GGUF has no query_pre_attn_scalar: like llama.cpp, the 27B models (46 and
                // 62 layers) scale by hidden/heads, the others by the head size.
                if matches!((family, num_layers), (Family::Gemma2, 46) | (Family::Gemma3, 62)) {
                    config.query_scale = Some(1.0 / (hidden_size as f64 / num_heads as f64).sqrt());
                }
                // `attention.sliding_window_pattern` when the file has it (a period, or one
                // flag per layer); else llama.cpp's layouts: Gemma 2 alternates sliding and
                // global layers from layer 0, Gemma 3 has five sliding layers, then a
                // global one, the sliding ones on a rotary base of 10,000.
                let pattern = file.get(&format!("{arch}.attention.sliding_window_pattern"));
                let period = if family == Family::Gemma2 { 2 } else { 6 };
                config.sliding_layers = match pattern {
                    Some(p) if p.as_array().is_some() => {
                        p.as_array().into_iter().flatten().map(|v| v.as_bool().unwrap_or(false)).collect()
                    }
                    // A period of 0 means every layer slides (llama.cpp's `set_swa_pattern`).
                    Some(p) => match p.as_u64().unwrap_or(period as u64) as usize {
                        0 => vec![true; num_layers],
                        period => (0..num_layers).map(|l| (l + 1) % period != 0).collect(),
                    },
                    None => (0..num_layers).map(|l| (l + 1) % period != 0).collect(),
                };
                if family == Family::Gemma3 {
                    config.rope_local_theta = Some(10_000.0);
                    if file.get_str(&format!("{arch}.rope.scaling.type")) == Some("linear") {
                        config.rope_linear_factor = opt_float("rope.scaling.factor");
                    }
                }
            }
            Family::Phi3 => {
                config.rotary_dim = int("rope.dimension_count").ok();
                config.sliding_window = int("attention.sliding_window").ok().filter(|&w| w > 0);
                config.sliding_layers = vec![config.sliding_window.is_some(); num_layers];
                if file.tensors.contains_key("rope_factors_short.weight") {
                    let (short, _) = file.tensor_f32("rope_factors_short.weight")?;
                    let original = int("rope.scaling.original_context_length")?;
                    if original == 0 {
                        return Err(InferError::InvalidRequest(
                            "model config: LongRoPE's original context is 0".into(),
                        ));
                    }
                    let factor = config.max_position_embeddings as f64 / original as f64;
                    let attention_factor =
                        opt_float("rope.scaling.attn_factor").unwrap_or_else(|| longrope_mscale(factor, original));
                    config.long_rope =
                        Some(LongRope { short_factor: short.iter().map(|&v| v as f64).collect(), attention_factor });
                    config.max_position_embeddings = config.max_position_embeddings.min(original);
                }
            }
            Family::Llama | Family::Qwen2 | Family::Qwen3 => {}
        }
        if !config.sliding_layers.contains(&true) {
            config.sliding_window = None;
            config.sliding_layers.clear();
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| InferError::io(path, e))?;
        let hf: serde_json::Value = serde_json::from_str(&text).map_err(|e| InferError::format(path, e.to_string()))?;
        let kind = hf["model_type"].as_str().unwrap_or_default().to_string();
        let arch = |name: &str| hf["architectures"].as_array().into_iter().flatten().any(|a| a.as_str() == Some(name));
        let family = match kind.as_str() {
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            "gemma3" => {
                return Err(InferError::format(
                    path,
                    "a multimodal Gemma 3 checkpoint (model_type `gemma3`): Ludus runs the text-only ones \
                     (model_type `gemma3_text`: Gemma 3 270M and 1B)",
                ))
            }
            _ if arch("LlamaForCausalLM") || arch("MistralForCausalLM") => Family::Llama,
            _ => return Err(InferError::UnsupportedArchitecture(kind)),
        };
        let bad = |what: String| InferError::format(path, what);
        let int = |key: &str| hf[key].as_u64().map(|v| v as usize);
        let need = |key: &str| int(key).ok_or_else(|| bad(format!("`{key}` is missing or not a number")));
        let float = |key: &str| hf[key].as_f64();
        // Rotary settings: `rope_theta` and `rope_scaling` in released checkpoints;
        // transformers 5 saves one `rope_parameters` object instead, split per layer type
        // where the types differ (Gemma 3).
        let params = &hf["rope_parameters"];
        let (global_rope, local_rope) = if params["full_attention"].is_object() {
            (&params["full_attention"], &params["sliding_attention"])
        } else {
            (params, &serde_json::Value::Null)
        };
        let scaling = match &hf["rope_scaling"] {
            serde_json::Value::Null => global_rope,
            scaling => scaling,
        };
        let scaling_kind = scaling["rope_type"].as_str().or(scaling["type"].as_str()).unwrap_or("default");
        let hidden_size = need("hidden_size")?;
        let num_heads = need("num_attention_heads")?;
        let num_layers = need("num_hidden_layers")?;
        let head_dim = int("head_dim").unwrap_or(hidden_size / num_heads.max(1));
        let gemma = family.norm_offset();
        let mut config = Self {
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads: int("num_key_value_heads").unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: float("rms_norm_eps").unwrap_or(1e-5),
            rope_theta: float("rope_theta").or(global_rope["rope_theta"].as_f64()).unwrap_or(10_000.0),
            rope_scaling: None,
            max_position_embeddings: int("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: hf["tie_word_embeddings"].as_bool().unwrap_or(gemma),
            family,
            qkv_bias: family == Family::Qwen2,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            ..Self::default()
        };
        if family != Family::Qwen2 && hf["attention_bias"].as_bool() == Some(true) {
            return Err(bad("`attention_bias` (a bias on the output projection too) is not supported".into()));
        }
        if hf["use_sliding_window"].as_bool() == Some(true) && matches!(family, Family::Qwen2 | Family::Qwen3) {
            return Err(
                bad("Qwen's `use_sliding_window` is not supported (no released Qwen model turns it on)".into()),
            );
        }
        if hf["mlp_bias"].as_bool() == Some(true) {
            return Err(bad("`mlp_bias` is not supported".into()));
        }
        if gemma {
            config.sandwich_norms = true;
            config.embedding_scale = Some((hidden_size as f64).sqrt());
            let act = hf["hidden_activation"].as_str().or(hf["hidden_act"].as_str()).unwrap_or("gelu_pytorch_tanh");
            if act != "gelu_pytorch_tanh" {
                return Err(bad(format!("Gemma activation `{act}` is not supported (gelu_pytorch_tanh is)")));
            }
            config.activation = Activation::GeluTanh;
            config.query_scale = float("query_pre_attn_scalar").map(|s| 1.0 / s.sqrt());
            config.attn_softcap = float("attn_logit_softcapping");
            config.final_softcap = float("final_logit_softcapping");
            config.sliding_window = int("sliding_window");
            config.sliding_layers = if family == Family::Gemma2 {
                (0..num_layers).map(|l| l % 2 == 0).collect()
            } else {
                let pattern = int("sliding_window_pattern").unwrap_or(6).max(1);
                (0..num_layers).map(|l| (l + 1) % pattern != 0).collect()
            };
            if family == Family::Gemma3 {
                let local = float("rope_local_base_freq").or(local_rope["rope_theta"].as_f64());
                config.rope_local_theta = Some(local.unwrap_or(10_000.0));
            }
        } else if let Some(act) = hf["hidden_act"].as_str().filter(|a| *a != "silu") {
            return Err(bad(format!("activation `{act}` is not supported (silu is)")));
        }
        if family == Family::Phi3 {
            let factor =
                float("partial_rotary_factor").or(global_rope["partial_rotary_factor"].as_f64()).unwrap_or(1.0);
            // Truncated, as transformers' `int(head_dim * partial_rotary_factor)`.
            let rotary = (head_dim as f64 * factor) as usize;
            config.rotary_dim = (rotary != head_dim).then_some(rotary);
            config.sliding_window = int("sliding_window").filter(|&w| w < config.max_position_embeddings);
            config.sliding_layers = vec![config.sliding_window.is_some(); num_layers];
        }
        // An explicit list of layer types wins over the family's pattern.
        if let Some(types) = hf["layer_types"].as_array() {
            config.sliding_layers = types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect();
            if config.sliding_layers.contains(&true) && config.sliding_window.is_none() {
                return Err(bad("`layer_types` names sliding layers but `sliding_window` is missing".into()));
            }
        }
        if !config.sliding_layers.contains(&true) {
            config.sliding_window = None;
            config.sliding_layers.clear();
        }
        match scaling_kind {
            "default" => {}
            kind => match kind {
                "llama3" => {
                    config.rope_scaling =
                        Some(serde_json::from_value(scaling.clone()).map_err(|e| bad(format!("rope_scaling: {e}")))?)
                }
                "linear" if family == Family::Gemma3 => config.rope_linear_factor = scaling["factor"].as_f64(),
                "longrope" | "su" if family == Family::Phi3 => {
                    let original = int("original_max_position_embeddings")
                        .or(scaling["original_max_position_embeddings"].as_u64().map(|v| v as usize))
                        .filter(|&o| o > 0)
                        .ok_or_else(|| bad("LongRoPE without a positive `original_max_position_embeddings`".into()))?;
                    let short_factor: Vec<f64> = scaling["short_factor"]
                        .as_array()
                        .ok_or_else(|| bad("LongRoPE without `short_factor`".into()))?
                        .iter()
                        .map(|v| v.as_f64().ok_or_else(|| bad("LongRoPE factors must be numbers".into())))
                        .collect::<Result<_>>()?;
                    let factor = config.max_position_embeddings as f64 / original as f64;
                    let attention_factor =
                        scaling["attention_factor"].as_f64().unwrap_or_else(|| longrope_mscale(factor, original));
                    config.long_rope = Some(LongRope { short_factor, attention_factor });
                    config.max_position_embeddings = config.max_position_embeddings.min(original);
                }
                other => return Err(bad(format!("unsupported rope_scaling `{other}` for {family}: {scaling}"))),
            },
        }
        config.validate()?;
        Ok(config)
    }
}

/// LongRoPE's attention factor: `√(1 + ln(scale) / ln(original context))`, 1 when the
/// context is not extended (Hugging Face's `_compute_longrope_parameters`).
fn longrope_mscale(factor: f64, original: usize) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / (original as f64).ln()).sqrt()
    }
}
