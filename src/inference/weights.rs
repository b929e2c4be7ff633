//! Where a model's weights come from: a GGUF file or a Hugging Face safetensors directory,
//! behind one interface that speaks GGUF tensor names (`blk.0.attn_q.weight`, ...).
//!
//! GGUF stores the Q and K projections with rows permuted for interleaved rotary
//! embeddings (llama.cpp's converter); [`WeightSource::tensor`] undoes that, so the model
//! uses the Hugging Face half-split rotary form for both sources.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::error::{InferError, Result};
use super::gguf::GgufFile;
use super::safetensors::SafetensorsDir;

pub enum WeightSource {
    Gguf(GgufFile),
    Safetensors(SafetensorsDir),
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
            Ok(Self::Safetensors(SafetensorsDir::open(path)?))
        } else if path.exists() {
            Ok(Self::Gguf(GgufFile::open(path)?))
        } else {
            Err(InferError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")))
        }
    }

    pub fn path(&self) -> PathBuf {
        match self {
            Self::Gguf(g) => g.path.clone(),
            Self::Safetensors(s) => s.dir.clone(),
            Self::Memory { path, .. } => path.clone(),
        }
    }

    pub fn config(&self) -> Result<LlamaConfig> {
        match self {
            Self::Gguf(g) => LlamaConfig::from_gguf(g),
            Self::Safetensors(s) => LlamaConfig::from_hf_json(&s.dir.join("config.json")),
            Self::Memory { config, .. } => Ok(config.clone()),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            Self::Gguf(g) => g.tensors.contains_key(name),
            Self::Safetensors(s) => s.tensors.contains_key(&hf_name(name)),
            Self::Memory { tensors, .. } => tensors.contains_key(name),
        }
    }

    /// Loads one tensor (by GGUF name) as `f32` on the CPU, checked against `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize], config: &LlamaConfig) -> Result<Tensor> {
        let (values, got) = match self {
            Self::Gguf(g) => g.tensor_f32(name)?,
            Self::Safetensors(s) => s.tensor_f32(&hf_name(name))?,
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
        let is_gguf = matches!(self, Self::Gguf(_));
        if is_gguf && name.ends_with("attn_q.weight") {
            return unpermute_rotary(&t, config.num_heads);
        }
        if is_gguf && name.ends_with("attn_k.weight") {
            return unpermute_rotary(&t, config.num_kv_heads);
        }
        Ok(t)
    }
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows go from interleaved rotary pairs
/// back to the half-split order.
fn unpermute_rotary(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.size2()?;
    let n_head = n_head as i64;
    let half = rows / n_head / 2;
    Ok(w.f_reshape([n_head, half, 2, cols])?.f_transpose(1, 2)?.f_reshape([rows, cols])?)
}

/// Maps a GGUF tensor name to its Hugging Face name.
pub fn hf_name(gguf: &str) -> String {
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
    let hf_leaf = match leaf {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
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
