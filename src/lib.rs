//! # Ludus
//!
//! A compute network that serves LLM inference to games. This crate holds the whole
//! product; `src/main.rs` only parses the command line and calls in here.
//!
//! ## Bird's-eye view
//!
//! ```text
//! game server ──HTTP──▶ gateway ──▶ distributor ──websocket──▶ node agent ──▶ engine
//!                                        ▲                                    │
//!                                        └──────────── sealed tokens ◀─────────┘
//! ```
//!
//! - [`inference`]: model files → tokens. GGUF/safetensors loaders, the Llama model on
//!   libtorch, tokenizers, chat templates, pure seeded sampling, continuous batching.
//! - [`cli`]: the `ludus` subcommands (`generate`, `tokenize`, `model inspect`, `bench`).
//! - [`settings`]: layered configuration (`config/default.toml`, a file, `LUDUS__*`).
//!
//! Dependencies point one way: the network and node layers stand on `inference`; the
//! engine knows nothing of them.

pub mod cli;
pub mod inference;
pub mod protocol;
pub mod settings;
