//! Bindings for the contracts in `contracts/`, generated at compile time from the
//! committed artifacts (ABI + bytecode), so the Rust side always matches what
//! `scripts/contracts` compiled.

// `postEpoch` takes seven arguments, and the generated call builder adds `self`.
#![allow(clippy::too_many_arguments)]

alloy::sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    Settlement,
    "contracts/artifacts/Settlement.json"
);

alloy::sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    LudusTestToken,
    "contracts/artifacts/LudusTestToken.json"
);

/// A revert of the settlement contract, by name with its arguments, e.g.
/// `AlreadyClaimed(epoch: 1, node: 0x…)`.
pub fn describe_revert(error: &Settlement::SettlementErrors) -> String {
    format!("{error:?}")
}
