//! Cryptography for the node link and node identities. Knows nothing of actors or HTTP.
//!
//! - [`identity`]: secp256k1 key files; a node's Ethereum address is its id and payout
//!   address; signatures over handshake transcripts with public-key recovery.
//! - [`session`]: X25519 key agreement, HKDF-SHA256 key derivation and AES-256-GCM-SIV
//!   sealing with one key per direction, AAD = (session id, direction, sequence number)
//!   and strictly increasing sequence numbers.

pub mod error;
pub mod identity;
pub mod merkle;
pub mod session;

pub use error::CryptoError;
