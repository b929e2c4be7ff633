//! The chain: the settlement contract's bindings and the clients that talk to it over
//! JSON-RPC with `alloy`. Knows nothing of actors, HTTP or the ledger.
//!
//! - [`contracts`]: `sol!` bindings generated from `contracts/artifacts/*.json`.
//! - [`client`]: the operator's client — reads (epochs, escrow) and the signed,
//!   stored-before-broadcast transaction that posts an epoch, and its status.
//! - [`deploy`]: `ludus chain deploy` (settlement contract, and a test token).
//! - [`claim`]: a node's claims (`ludus claim`).
//! - [`anvil`]: a local anvil chain for the demo and the tests.
//! - [`error`]: what went wrong, retryable or not.

pub mod anvil;
pub mod claim;
pub mod client;
pub mod contracts;
pub mod deploy;
pub mod error;

pub use client::{SettlementClient, TxStatus};
pub use error::ChainError;

use alloy::primitives::{Address, U256};

use crate::ledger::Units;

/// Our base units as the contract's `uint256`.
pub fn to_u256(units: Units) -> U256 {
    U256::from(units.0)
}

/// A contract amount back in base units (amounts above u128 do not occur in this ledger).
pub fn from_u256(value: U256) -> Result<Units, ChainError> {
    u128::try_from(value).map(Units).map_err(|_| ChainError::Unexpected(format!("amount {value} exceeds u128")))
}

/// Parses `0x…` into an address with a clear error.
pub fn parse_address(what: &str, s: &str) -> Result<Address, ChainError> {
    s.trim().parse().map_err(|_| ChainError::Config(format!("{what}: `{s}` is not an address (0x + 40 hex digits)")))
}

/// A secp256k1 identity as an alloy signer (the same key, the same address).
pub fn signer_of(identity: &crate::crypto::identity::Identity) -> alloy::signers::local::PrivateKeySigner {
    alloy::signers::local::PrivateKeySigner::from_signing_key(identity.signing_key().clone())
}
