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
//! - [`crypto`]: secp256k1 identities, sealed X25519/HKDF/AES-GCM-SIV sessions.
//! - [`protocol`]: the node link's messages and framing, shared by both ends.
//! - [`actors`]: Gateway, Distributor and one NodeProxy per node — the `ludus serve` runtime.
//! - [`http`]: the OpenAI-compatible API, SSE streaming and the node websocket upgrade.
//! - [`node`]: the compute node agent (`ludus node`).
//! - [`cli`]: the `ludus` subcommands.
//! - [`settings`]: layered configuration (`config/default.toml`, a file, `LUDUS__*`).
//!
//! Dependencies point one way: the network and node layers stand on `inference`; the
//! engine knows nothing of them.

pub mod actors;
pub mod cli;
pub mod crypto;
pub mod http;
pub mod inference;
pub mod ledger;
pub mod node;
pub mod proof;
pub mod protocol;
pub mod settings;
