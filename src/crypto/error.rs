//! `CryptoError`: what can go wrong with keys, signatures and sealed frames.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("invalid secp256k1 key: {0}")]
    InvalidKey(String),
    #[error("signature does not verify or recover: {0}")]
    BadSignature(String),
    #[error("the signature recovers to {recovered}, not the claimed {claimed}")]
    WrongSigner { claimed: String, recovered: String },
    #[error("frame rejected: sequence {got} is not above the last accepted {last}")]
    Replay { got: u64, last: u64 },
    #[error("frame rejected: authentication failed (tampered, truncated, or from another session)")]
    Unauthentic,
    #[error("frame rejected: too short to be sealed ({0} bytes)")]
    Truncated(usize),
}
