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
//! - [`actors`]: Gateway, Distributor, one NodeProxy per node, Registry, Settlement, Clock
//!   and the verifier pool — the `ludus serve` runtime.
//! - [`proof`]: proof of inference (commitments, signed proofs, the verifier, the policy).
//! - [`ledger`]: the Postgres registry (receipts, blocks, games, epochs, escrow).
//! - [`chain`]: the settlement contract's bindings and clients (alloy), anvil for demos.
//! - [`http`]: the OpenAI-compatible API, SSE streaming and the node websocket upgrade.
//! - [`node`]: the compute node agent (`ludus node`).
//! - [`cli`]: the `ludus` subcommands.
//! - [`settings`]: layered configuration (`config/default.toml`, a file, `LUDUS__*`).
//!
//! Dependencies point one way: the network and node layers stand on `inference`; the
//! engine knows nothing of them.

pub mod actors;
pub mod books;
pub mod chain;
pub mod cli;
pub mod crypto;
pub mod http;
pub mod inference;
pub mod ledger;
pub mod node;
pub mod proof;
pub mod protocol;
pub mod serve;
pub mod settings;
pub mod task;
