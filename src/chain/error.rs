//! `ChainError`: why a chain operation failed, and whether retrying can help.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChainError {
    /// The RPC endpoint could not be reached or answered with an error: retry later.
    #[error("chain RPC: {0}")]
    Rpc(String),
    /// The contract rejected the call (decoded when it is one of the contract's errors).
    #[error("the contract reverted: {0}")]
    Reverted(String),
    /// Wrong configuration: fix it, retrying will not help.
    #[error("settlement configuration: {0}")]
    Config(String),
    #[error("unexpected chain state: {0}")]
    Unexpected(String),
    /// A receipt's proof did not hold: the published record is not what was signed or
    /// anchored.
    #[error("the receipt does not check out: {0}")]
    ProofFailed(String),
    /// Not on chain yet (e.g. a block not anchored yet): try again later.
    #[error("not on chain yet: {0}")]
    NotYet(String),
}

impl ChainError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ChainError::Rpc(_) | ChainError::NotYet(_))
    }
}
