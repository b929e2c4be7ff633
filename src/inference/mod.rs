//! The inference engine: everything between a model file and a stream of tokens.
//! It knows nothing of the network, the ledger or the chain.
//!
//! - [`gguf`], [`safetensors`], [`quant`], [`weights`]: read checkpoints and dequantize.
//! - [`config`], [`llama`], [`kv_cache`]: the Llama-family transformer and its cache.
//! - [`tokenizer`], [`chat_template`]: text in, ids in; ids out, text out.
//! - [`sampling`]: a pure function of (logits, seed, position).
//! - [`engine`]: continuous batching on a dedicated thread.
//! - [`model`]: loads all of the above from one path; [`tiny_model`] writes test models.

pub mod chat_template;
pub mod config;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod kv_cache;
pub mod llama;
pub mod model;
pub mod quant;
pub mod safetensors;
pub mod sampling;
pub mod tiny_model;
pub mod tokenizer;
pub mod weights;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use engine::{Engine, EngineConfig, Event, FinishReason, Finished, GenerateRequest};
pub use error::InferError;
pub use model::{DeviceChoice, Model};
pub use sampling::SamplingParams;
