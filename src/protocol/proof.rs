//! A node's signed proof of inference for one task, as it travels with `Done`: the
//! commitments for the rows the challenge selects (`proof::commitment`), bound to the
//! task, the challenge and the completion (by its hash), signed by the node's key. What
//! the commitments mean and how they are checked is `proof`'s business; here they are
//! hex strings under a signature.

use serde::{Deserialize, Serialize};

use crate::crypto::identity::{keccak, recover, Address};

/// A proof whose fields cannot be read: it is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedProof {
    #[error("the proof's signature does not name a signer: {0}")]
    Signature(String),
    #[error("the challenge is not 32 bytes of hex")]
    Challenge,
}

/// A signed proof of inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proof {
    pub task: u64,
    pub model: String,
    /// The distributor's secret challenge for this task, hex.
    pub challenge: String,
    pub prompt_tokens: u32,
    /// Keccak-256 of the completion token ids (as in the receipt), hex.
    pub output_hash: String,
    pub completion_tokens: u32,
    pub top_k: u16,
    /// Commitments for the prompt rows (ascending), hex.
    pub prompt: Vec<String>,
    /// One commitment per chunk of generated tokens, hex.
    pub chunks: Vec<String>,
    /// How the node stored its weights (`int8`, `int4`; empty = unquantized): the
    /// verifier recomputes with the same quantization. Signed, so a node cannot claim a
    /// cheaper format than it ran.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub quantization: String,
    /// The dtype of an unquantized node (`bf16`, `f16`; empty = f32): with
    /// `quantization`, the [`Format`] that fixes the verifier's tie margin. Signed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dtype: String,
    /// The node's signature over [`Proof::digest`], hex.
    pub signature: String,
}

impl Proof {
    /// What the node signs: every field but the signature.
    pub fn digest(&self) -> [u8; 32] {
        let mut b = b"ludus-proof-v1".to_vec();
        b.extend_from_slice(&self.task.to_be_bytes());
        b.extend_from_slice(&(self.model.len() as u32).to_be_bytes());
        b.extend_from_slice(self.model.as_bytes());
        b.extend_from_slice(self.challenge.as_bytes());
        b.extend_from_slice(&self.prompt_tokens.to_be_bytes());
        b.extend_from_slice(self.output_hash.as_bytes());
        b.extend_from_slice(&self.completion_tokens.to_be_bytes());
        b.extend_from_slice(&self.top_k.to_be_bytes());
        for p in &self.prompt {
            b.push(b'^');
            b.extend_from_slice(p.as_bytes());
        }
        for c in &self.chunks {
            b.push(b'|');
            b.extend_from_slice(c.as_bytes());
        }
        // Absent for unquantized proofs, so their digests are unchanged.
        if !self.quantization.is_empty() {
            b.push(b'#');
            b.extend_from_slice(self.quantization.as_bytes());
        }
        if !self.dtype.is_empty() {
            b.push(b'~');
            b.extend_from_slice(self.dtype.as_bytes());
        }
        keccak(&b)
    }

    /// The address that signed it.
    pub fn signer(&self) -> Result<Address, MalformedProof> {
        let sig = hex::decode(&self.signature).map_err(|e| MalformedProof::Signature(e.to_string()))?;
        recover(&self.digest(), &sig).map_err(|e| MalformedProof::Signature(e.to_string()))
    }

    /// Bytes of commitments per chunk of 32 tokens, as encoded (not hex).
    pub fn bytes_per_chunk(&self) -> usize {
        self.chunks.first().map_or(0, |c| c.len() / 2)
    }

    pub fn challenge_bytes(&self) -> Result<[u8; 32], MalformedProof> {
        hex::decode(&self.challenge).ok().and_then(|c| c.try_into().ok()).ok_or(MalformedProof::Challenge)
    }
}
