//! The chain: the settlement contract's bindings and the clients that talk to it over
//! JSON-RPC with `alloy`. Knows nothing of actors, HTTP or the ledger.
//!
//! - [`contracts`]: `sol!` bindings generated from `contracts/artifacts/*.json`.
//! - [`client`]: the operator's client — reads (epochs, escrow) and the signed,
//!   stored-before-broadcast transaction that posts an epoch, and its status.
//! - [`deploy`]: `ludus chain deploy` (settlement contract, and a test token).
//! - [`claim`]: a node's claims (`ludus claim`).
//! - [`receipt_check`]: one receipt checked against its block and the chain's anchor
//!   (`ludus verify-receipt`), trusting no server.
//! - [`anvil`]: a local anvil chain for the demo and the tests.
//! - [`error`]: what went wrong, retryable or not.

pub mod anvil;
pub mod claim;
pub mod client;
pub mod contracts;
pub mod deploy;
pub mod error;
pub mod receipt_check;

pub use client::{SettlementClient, TxStatus};
pub use error::ChainError;

use alloy::primitives::{Address, U256};

use crate::books::Units;

/// A JSON-RPC URL fit for logs: scheme, host and port only. Providers put the API key in
/// the path, the query or the credentials, so all three are dropped (`…` marks the cut).
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let cut = authority.contains('@') || !tail.trim_start_matches('/').is_empty();
    let scheme = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
    format!("{scheme}{host}{}", if cut { "/…" } else { "" })
}

/// Our base units as the contract's `uint256`.
pub fn to_u256(units: Units) -> U256 {
    U256::from(units.0)
}

/// An escrow amount on chain in base units, saturated at `u128::MAX`. Anyone may deposit
/// for a game (`depositFor`), and a token of huge supply could push one escrow past u128:
/// an error here stopped every game's settlement; a budget of `u128::MAX` charges only
/// what the ledger owes (far below), which the contract checks against the real escrow.
pub fn from_u256(value: U256) -> Units {
    Units(u128::try_from(value).unwrap_or(u128::MAX))
}

/// Parses `0x…` into an address with a clear error.
pub fn parse_address(what: &str, s: &str) -> Result<Address, ChainError> {
    s.trim().parse().map_err(|_| ChainError::Config(format!("{what}: `{s}` is not an address (0x + 40 hex digits)")))
}

/// A secp256k1 identity as an alloy signer (the same key, the same address).
pub fn signer_of(identity: &crate::crypto::identity::Identity) -> alloy::signers::local::PrivateKeySigner {
    alloy::signers::local::PrivateKeySigner::from_signing_key(identity.signing_key().clone())
}

#[cfg(test)]
mod tests {
    use super::{from_u256, redacted_url, Units, U256};

    #[test]
    fn an_escrow_past_u128_is_read_saturated_not_refused() {
        assert_eq!(from_u256(U256::from(7u64)), Units(7));
        assert_eq!(from_u256(U256::from(u128::MAX)), Units(u128::MAX));
        assert_eq!(from_u256(U256::from(1u8) << 129), Units(u128::MAX));
        assert_eq!(from_u256(U256::MAX), Units(u128::MAX));
    }

    #[test]
    fn a_logged_rpc_url_keeps_only_its_scheme_host_and_port() {
        assert_eq!(redacted_url("https://mainnet.example.io/v3/0123abcd"), "https://mainnet.example.io/…");
        assert_eq!(redacted_url("https://user:pa55@rpc.example:8545"), "https://rpc.example:8545/…");
        assert_eq!(redacted_url("https://rpc.example/?apikey=s3cret"), "https://rpc.example/…");
        assert_eq!(redacted_url("http://127.0.0.1:8545"), "http://127.0.0.1:8545");
        assert_eq!(redacted_url("http://127.0.0.1:8545/"), "http://127.0.0.1:8545");
        for url in ["https://a.example/v3/KEY", "wss://u:KEY@b.example", "http://c.example?k=KEY", "d.example/KEY"] {
            assert!(!redacted_url(url).contains("KEY"), "{url}");
        }
    }
}
