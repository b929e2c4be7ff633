//! `InferError`: everything that can go wrong while loading or running a model, with
//! messages that say what to do about it.

use std::path::PathBuf;

/// Errors of the inference engine.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid model file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(
        "unsupported model architecture `{0}`: Ludus runs llama, mistral, qwen2, qwen3, gemma2, gemma3 (text) and phi3"
    )]
    UnsupportedArchitecture(String),
    #[error("tensor `{tensor}` uses {dtype}, which Ludus cannot load (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)")]
    UnsupportedTensorType { tensor: String, dtype: String },
    #[error("the model has no tensor `{0}`: the checkpoint is incomplete or not of a family Ludus runs")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape { name: String, got: Vec<usize>, expected: Vec<usize> },
    #[error("missing model metadata `{0}`")]
    MissingMetadata(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("grammar: {0}")]
    Grammar(#[from] super::grammar::GrammarError),
    #[error("prompt of {got} tokens plus {max_new} new tokens exceeds the context of {limit} tokens")]
    ContextOverflow { got: usize, max_new: usize, limit: usize },
    #[error("device `{0}` is not available (use --device cpu, or auto)")]
    DeviceUnavailable(String),
    #[error("the engine has stopped")]
    EngineStopped,
    #[error("quantization: {0}")]
    Quantization(String),
    #[error("start-up tuning: {0}")]
    Tuning(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl InferError {
    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Format { path: path.into(), reason: reason.into() }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

pub type Result<T, E = InferError> = std::result::Result<T, E>;
