//! Where a model's weights come from: a GGUF file or a Hugging Face safetensors directory,
//! behind one interface that speaks GGUF tensor names (`blk.0.attn_q.weight`, ...).
//!
//! [`WeightSource::tensor`] hands every family's weights over in one canonical form:
//! - GGUF stores a Llama model's Q and K rows permuted for interleaved rotary embeddings
//!   (llama.cpp's converter); they are put back in Hugging Face's half-split order.
//! - Gemma's Hugging Face norms hold `w` for a gain of `1 + w`; the canonical gain is
//!   `1 + w`, as in GGUF.
//! - Phi-3's fused `qkv_proj` and `gate_up_proj` are served as separate Q, K, V, gate and
//!   up tensors (the model fuses them again, in every format).

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::config::{Family, LlamaConfig};
use super::error::{InferError, Result};
use super::gguf::GgufFile;
use super::safetensors::SafetensorsDir;

// One per model load: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum WeightSource {
    Gguf(GgufFile),
    /// A Hugging Face directory, and the family its `config.json` names (it decides the
    /// tensor names).
    Safetensors(SafetensorsDir, Family),
    /// Weights already decoded in memory (a decrypted protected bundle), in the model's
    /// own layout: nothing is un-permuted.
    Memory {
        path: PathBuf,
        config: LlamaConfig,
        tensors: std::collections::HashMap<String, Tensor>,
    },
}

impl WeightSource {
    /// Opens a `.gguf` file or a directory with `config.json` + `*.safetensors`.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let dir = SafetensorsDir::open(path)?;
            // A bad config.json is reported by `config()`, with its reason.
            let family = LlamaConfig::from_hf_json(&path.join("config.json")).map(|c| c.family).unwrap_or_default();
            Ok(Self::Safetensors(dir, family))
        } else if path.exists() {
            Ok(Self::Gguf(GgufFile::open(path)?))
        } else {
            Err(InferError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")))
        }
    }

    pub fn path(&self) -> PathBuf {
        match self {
            Self::Gguf(g) => g.path.clone(),
            Self::Safetensors(s, _) => s.dir.clone(),
            Self::Memory { path, .. } => path.clone(),
        }
    }

    pub fn config(&self) -> Result<LlamaConfig> {
        match self {
            Self::Gguf(g) => LlamaConfig::from_gguf(g),
            Self::Safetensors(s, _) => LlamaConfig::from_hf_json(&s.dir.join("config.json")),
            Self::Memory { config, .. } => Ok(config.clone()),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            Self::Gguf(g) => g.tensors.contains_key(name),
            Self::Safetensors(s, family) => {
                let name = match fused_part(name) {
                    Some((fused, _)) if family.fused_projections() => fused,
                    _ => name.to_string(),
                };
                s.tensors.contains_key(&hf_name(&name, *family))
            }
            Self::Memory { tensors, .. } => tensors.contains_key(name),
        }
    }

    /// Loads one tensor (by GGUF name) as `f32` on the CPU, checked against `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize], config: &LlamaConfig) -> Result<Tensor> {
        // Bundles in memory hold the separate tensors already.
        if config.family.fused_projections() && !matches!(self, Self::Memory { .. }) {
            if let Some((fused, part)) = fused_part(name) {
                return self.fused_slice(&fused, part, shape, config);
            }
        }
        self.stored_tensor(name, shape, config)
    }

    /// [`WeightSource::tensor`] for a tensor as stored, fused or not.
    fn stored_tensor(&self, name: &str, shape: &[usize], config: &LlamaConfig) -> Result<Tensor> {
        let (values, got) = match self {
            Self::Gguf(g) => g.tensor_f32(name)?,
            Self::Safetensors(s, _) => s.tensor_f32(&hf_name(name, config.family))?,
            Self::Memory { tensors, .. } => {
                let t = tensors.get(name).ok_or_else(|| InferError::MissingTensor(name.to_string()))?;
                let got: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
                if got != shape {
                    return Err(InferError::Shape { name: name.to_string(), got, expected: shape.to_vec() });
                }
                return Ok(t.shallow_clone());
            }
        };
        if got != shape {
            return Err(InferError::Shape { name: name.to_string(), got, expected: shape.to_vec() });
        }
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_slice(&values)?.f_reshape(&dims)?;
        // llama.cpp permutes Q and K rows for its interleaved rotary form in Llama models
        // only; the other families keep Hugging Face's half-split rows.
        let permuted = matches!(self, Self::Gguf(_)) && config.family == Family::Llama;
        // Biases were permuted with their rows.
        if permuted && (name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias")) {
            return unpermute_rotary(&t, config.num_heads);
        }
        if permuted && (name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias")) {
            return unpermute_rotary(&t, config.num_kv_heads);
        }
        if matches!(self, Self::Safetensors(..)) && config.family.norm_offset() && name.ends_with("norm.weight") {
            return Ok(t.f_add_scalar(1.0)?);
        }
        Ok(t)
    }

    /// Rows `part` of a fused projection (Phi-3's `attn_qkv`, and `ffn_up` holding gate
    /// then up), as the separate tensor `shape` names.
    fn fused_slice(&self, fused: &str, part: FusedPart, shape: &[usize], config: &LlamaConfig) -> Result<Tensor> {
        let hd = config.head_dim;
        let (q, kv, f) = (config.num_heads * hd, config.num_kv_heads * hd, config.intermediate_size);
        let (start, rows, total) = match part {
            FusedPart::Q => (0, q, q + 2 * kv),
            FusedPart::K => (q, kv, q + 2 * kv),
            FusedPart::V => (q + kv, kv, q + 2 * kv),
            FusedPart::Gate => (0, f, 2 * f),
            FusedPart::Up => (f, f, 2 * f),
        };
        let cols = shape.get(1).copied().unwrap_or(config.hidden_size);
        let all = self.stored_tensor(fused, &[total, cols], config)?;
        let t = all.f_narrow(0, start as i64, rows as i64)?.f_contiguous()?;
        let got: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        if got != shape {
            return Err(InferError::Shape { name: fused.to_string(), got, expected: shape.to_vec() });
        }
        Ok(t)
    }
}

/// Which slice of a fused projection a separate tensor is.
#[derive(Debug, Clone, Copy)]
enum FusedPart {
    Q,
    K,
    V,
    Gate,
    Up,
}

/// The fused tensor holding `name` (Phi-3: `blk.N.attn_qkv.weight`, `blk.N.ffn_up.weight`).
fn fused_part(name: &str) -> Option<(String, FusedPart)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let (fused, part) = match leaf {
        "attn_q.weight" => ("attn_qkv", FusedPart::Q),
        "attn_k.weight" => ("attn_qkv", FusedPart::K),
        "attn_v.weight" => ("attn_qkv", FusedPart::V),
        "ffn_gate.weight" => ("ffn_up", FusedPart::Gate),
        "ffn_up.weight" => ("ffn_up", FusedPart::Up),
        _ => return None,
    };
    Some((format!("blk.{layer}.{fused}.weight"), part))
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows go from interleaved rotary pairs
/// back to the half-split order.
/// A bias (1-D) moves like a matrix of one column.
fn unpermute_rotary(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let shape = w.size();
    let (rows, cols) = (shape[0], shape.get(1).copied().unwrap_or(1));
    let n_head = n_head as i64;
    let half = rows / n_head / 2;
    Ok(w.f_reshape([n_head, half, 2, cols])?.f_transpose(1, 2)?.f_reshape(shape.as_slice())?)
}

/// Maps a GGUF tensor name to its Hugging Face name in `family`'s checkpoints.
pub fn hf_name(gguf: &str, family: Family) -> String {
    let global = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = global {
        return name.to_string();
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_string();
    };
    let Some((layer, leaf)) = rest.split_once('.') else {
        return gguf.to_string();
    };
    let gemma = family.norm_offset();
    let hf_leaf = match leaf {
        "attn_norm.weight" => "input_layernorm.weight",
        // Llama's second norm feeds the MLP; Gemma's of that name is the attention's
        // output norm, and its MLP's input norm is `pre_feedforward_layernorm`.
        "ffn_norm.weight" if gemma => "pre_feedforward_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "post_attention_norm.weight" => "post_attention_layernorm.weight",
        "post_ffw_norm.weight" => "post_feedforward_layernorm.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_qkv.weight" => "self_attn.qkv_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" if family.fused_projections() => "mlp.gate_up_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        other => other,
    };
    format!("model.layers.{layer}.{hf_leaf}")
}

/// Moves a loaded `f32` tensor to the model's device and dtype.
pub fn place(t: Tensor, device: Device, kind: Kind) -> Result<Tensor> {
    Ok(t.f_to_device(device)?.f_to_kind(kind)?.f_contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp permutes Q/K biases with their rows; both come back in order.
    #[test]
    fn permuted_rows_and_biases_come_back_in_order() {
        let (heads, rows, cols) = (2, 8, 3);
        let matrix: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let bias: Vec<f32> = (0..rows).map(|v| v as f32).collect();
        let permuted = crate::inference::tiny_model::permute_rotary(&matrix, rows, cols, heads);
        let permuted_bias = crate::inference::tiny_model::permute_rotary(&bias, rows, 1, heads);
        assert_ne!(permuted, matrix);
        let back = unpermute_rotary(&Tensor::from_slice(&permuted).reshape([rows as i64, cols as i64]), heads).unwrap();
        assert_eq!(Vec::<f32>::try_from(back.flatten(0, -1)).unwrap(), matrix);
        let back = unpermute_rotary(&Tensor::from_slice(&permuted_bias), heads).unwrap();
        assert_eq!(back.size(), vec![rows as i64]);
        assert_eq!(Vec::<f32>::try_from(back).unwrap(), bias);
    }
}
