//! The inference engine: everything between a model file and a stream of tokens.
//! It knows nothing of the network, the ledger or the chain.
//!
//! - [`gguf`], [`safetensors`], [`quant`], [`weights`]: read checkpoints and dequantize.
//! - [`config`], [`llama`], [`kv_cache`]: the Llama-family transformer and its cache;
//!   [`fused_decode`]: a lone sequence's int4 step on the CPU in one call.
//! - [`qlinear`], [`fbgemm`], [`int8_table`]: int8/int4 linear layers and vocabulary
//!   tables that keep weights packed in memory.
//! - [`memory_plan`]: weights + KV cache per quantization and context, against a budget.
//! - [`distill`]: trains a smaller student on a teacher's softened distributions.
//! - [`eval`]: perplexity, greedy agreement and KL between a model and a compressed copy.
//! - [`tokenizer`], [`chat_template`]: text in, ids in; ids out, text out.
//! - [`text_stream`]: ids → released text with stop sequences, shared with the server.
//! - [`model_text`]: a model's tokenizer and chat template without its weights.
//! - [`sampling`]: a pure function of (logits, seed, position).
//! - [`grammar`]: constrained decoding (llguidance): the tokens a grammar allows next.
//! - [`logprobs`]: log probabilities of sampled tokens and their alternatives.
//! - [`engine`]: continuous batching on a dedicated thread; [`prefix_cache`]: prompt
//!   blocks kept for the next request that starts with them; [`speculative`]: drafts
//!   checked in one pass, kept exactly when the sampler draws them; [`pass_cost`]: how
//!   many draft rows a pass is worth on this machine, measured at start.
//! - [`tune`]: measures at start-up what decodes fastest here (threads for one sequence,
//!   int8 or int4) and remembers it per machine and model file.
//! - [`cuda`]: opens libtorch's CUDA backend at run time, only where a GPU is wanted.
//! - [`protect`]: model protection, a weight transform (rotation, permutation) with the
//!   result encrypted at rest (AEAD from `crypto`).
//! - [`model`]: loads all of the above from one path; [`tiny_model`] writes test models.

pub mod chat_template;
pub mod config;
pub mod cuda;
pub mod distill;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fbgemm;
pub mod fused_decode;
pub mod gguf;
pub mod grammar;
pub mod int4_prefill;
pub mod int8_table;
pub mod kv_cache;
pub mod llama;
pub mod logprobs;
pub mod memory_plan;
pub mod model;
pub mod model_text;
pub mod pass_cost;
pub mod prefix_cache;
pub mod protect;
pub mod qlinear;
pub mod quant;
pub mod safetensors;
pub mod sampling;
pub mod speculative;
pub mod text_stream;
pub mod tiny_model;
pub mod tokenizer;
pub mod tune;
pub mod weights;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use engine::{Engine, EngineConfig, Event, FinishReason, Finished, GenerateRequest};
pub use error::InferError;
pub use model::{DeviceChoice, Model};
pub use model_text::ModelText;
pub use qlinear::Quantization;
pub use sampling::SamplingParams;
pub use speculative::{Draft, Speculation};
