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
//! Leaves, shared by several layers and depending on none:
//!
//! - [`crypto`]: secp256k1 identities, sealed X25519/HKDF/AES-GCM-SIV sessions, Merkle
//!   trees (with the settlement contract's leaf encodings).
//! - [`task`]: what a generation task asks for and how it ended (sampling parameters, chat
//!   messages, finish reasons, log probabilities).
//! - [`books`]: money and the settlement's records (posting states, payout claims,
//!   receipt proofs).
//!
//! Layers, each using only those above it in this list:
//!
//! - [`inference`]: model files → tokens. GGUF/safetensors loaders, the Llama model on
//!   libtorch, tokenizers, chat templates, pure seeded sampling, continuous batching,
//!   model protection.
//! - [`protocol`]: the node link's messages and framing, signed receipts and proofs,
//!   shared by both ends.
//! - [`proof`]: proof of inference (commitments, the proof builder, the verifier, the
//!   policy).
//! - [`ledger`]: the Postgres registry (receipts, blocks, games, epochs, escrow).
//! - [`chain`]: the settlement contract's bindings and clients (alloy), anvil for demos.
//! - [`settings`]: layered configuration (`config/default.toml`, a file, `LUDUS__*`).
//! - [`actors`]: Gateway, Distributor, one NodeProxy per node, Registry, Settlement, Clock
//!   and the verifier pool — the `ludus serve` runtime.
//! - [`http`]: the OpenAI-compatible API, SSE streaming and the node websocket upgrade.
//! - [`node`]: the compute node agent (`ludus node`).
//! - [`serve`]: `ludus serve`'s process — the actor tree built from the settings, handed
//!   to `http`, shut down gracefully.
//! - [`cli`]: the `ludus` subcommands.
//!
//! The table in `docs/architecture.md` ("Dependencies") says exactly what each module may
//! use, and `tests/it/layering.rs` holds the code to it.

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
