//! `Model`: everything needed to serve one checkpoint — the transformer, its tokenizer and
//! its chat template — loaded from a GGUF file or a Hugging Face directory, plus the
//! device and dtype choice (`auto` = CUDA when present, else CPU).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use tch::{Device, Kind};

use super::chat_template::{ChatMessage, ChatTemplate};
use super::error::{InferError, Result};
use super::llama::Llama;
use super::model_text::ModelText;
use super::qlinear::Quantization;
use super::tokenizer::Tokenizer;
use super::weights::WeightSource;

/// `--device auto|cpu|cuda[:N]`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{other}` (auto, cpu, cuda, cuda:N)")),
        }
    }
}

impl DeviceChoice {
    pub fn resolve(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(if super::cuda::available() { Device::Cuda(0) } else { Device::Cpu }),
            Self::Cuda(n) => {
                if !super::cuda::driver_present() {
                    return Err(InferError::DeviceUnavailable(format!("cuda:{n} (no NVIDIA driver on this machine)")));
                }
                super::cuda::load_backend().map_err(InferError::DeviceUnavailable)?;
                if tch::Cuda::is_available() && n < tch::Cuda::device_count() as usize {
                    Ok(Device::Cuda(n))
                } else {
                    Err(InferError::DeviceUnavailable(format!("cuda:{n}")))
                }
            }
        }
    }
}

/// `--dtype f32|bf16|f16`; the default is f32 on CPU and bf16 on CUDA.
pub fn parse_dtype(s: &str) -> Result<Kind, String> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        other => Err(format!("unknown dtype `{other}` (f32, bf16, f16)")),
    }
}

/// The default dtype under a quantization: int4 computes in bf16 on both devices (its
/// kernels take bf16 activations), so the rest of the model (norms, attention, KV cache)
/// follows and a CPU node's memory drops further; otherwise [`default_dtype`].
pub fn default_dtype_for(device: Device, quantization: Quantization) -> Kind {
    if quantization == Quantization::Int4 {
        Kind::BFloat16
    } else {
        default_dtype(device)
    }
}

pub fn default_dtype(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

pub struct Model {
    /// The name games ask for (`model` in the API): the file or directory stem.
    pub name: String,
    pub path: PathBuf,
    pub llama: Llama,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("name", &self.name).field("path", &self.path).finish_non_exhaustive()
    }
}

/// The name a model file is served under.
pub fn model_name(path: &Path) -> String {
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    file.strip_suffix(".gguf").unwrap_or(&file).to_string()
}

impl Model {
    /// Loads a model on `device` in `dtype` (None = the device's default).
    pub fn load(path: &Path, device: Device, dtype: Option<Kind>) -> Result<Self> {
        Self::load_with_key(path, device, dtype, None)
    }

    /// Loads a model file, directory, or protected bundle (which needs its `key`; the
    /// bundle is decrypted in memory only).
    pub fn load_with_key(path: &Path, device: Device, dtype: Option<Kind>, key: Option<&[u8; 32]>) -> Result<Self> {
        Self::load_quantized(path, device, dtype, Quantization::None, key)
    }

    /// Like [`Model::load_with_key`], with the linear layers stored as `quantization` says.
    pub fn load_quantized(
        path: &Path,
        device: Device,
        dtype: Option<Kind>,
        quantization: Quantization,
        key: Option<&[u8; 32]>,
    ) -> Result<Self> {
        Self::load_with_progress(path, device, dtype, quantization, key, &mut |_, _| {})
    }

    /// [`Model::load_quantized`], calling `progress(layers done, layers)` while it loads.
    pub fn load_with_progress(
        path: &Path,
        device: Device,
        dtype: Option<Kind>,
        quantization: Quantization,
        key: Option<&[u8; 32]>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let kind = dtype.unwrap_or_else(|| default_dtype_for(device, quantization));
        let text = ModelText::load(path)?;
        let source = if crate::inference::protect::is_bundle(path) {
            crate::inference::protect::open_bundle(path, key)?.1
        } else {
            WeightSource::open(path)?
        };
        let llama = Llama::load_with_progress(&source, device, kind, quantization, progress)?;
        drop(source);
        release_freed_memory();
        if text.tokenizer.vocab_size() > llama.config.vocab_size {
            return Err(InferError::Tokenizer(format!(
                "tokenizer has {} tokens but the model only {}",
                text.tokenizer.vocab_size(),
                llama.config.vocab_size
            )));
        }
        let ModelText { name, tokenizer, template, .. } = text;
        Ok(Self { name, path: path.to_path_buf(), llama, tokenizer, template })
    }

    /// Renders and tokenizes a conversation, ready for generation.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        self.tokenizer.encode(&text, false)
    }

    /// Tokenizes a plain completion prompt (with BOS when the model wants one).
    pub fn completion_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(prompt, true)
    }
}

/// Hands the heap pages freed after loading (the f32 copies every layer passes through)
/// back to the OS, so a quantized model's resident memory is its packed size rather
/// than the loader's high-water mark.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: glibc's malloc_trim only releases free pages of the heap.
        unsafe {
            malloc_trim(0);
        }
    }
}
