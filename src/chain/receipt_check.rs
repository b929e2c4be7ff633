//! Checking one receipt against the chain without trusting the server that published it
//! (`ludus verify-receipt`, and `ludus claim` for a node's own tasks).
//!
//! From a [`ReceiptProof`] (served at `GET /v1/receipts/{task}/proof`):
//!
//! 1. the signed bytes read back into a receipt whose keccak is the receipt hash, signed
//!    by the node it names, for the task, game and model the registry recorded, with the
//!    token counts it billed;
//! 2. the receipt hash leads by its Merkle path to the block root;
//! 3. on chain, through any RPC: the contract's `blockAnchored(anchor, block, root, path)`
//!    holds, and the anchoring transaction was mined, successful, and sent to the
//!    contract.
//!
//! Any failed step is an error naming what did not hold; nothing is taken on trust.

use alloy::primitives::{Address, FixedBytes, B256};
use alloy::providers::{DynProvider, Provider};

use super::contracts::Settlement;
use super::error::ChainError;
use crate::books::ReceiptProof;
use crate::crypto::merkle::{self, Hash};
use crate::protocol::SignedReceipt;

/// What a successful check established.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckedReceipt {
    pub task: u64,
    pub node: String,
    pub game_id: i64,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub block: u64,
    pub anchor: u64,
    pub anchor_tx: String,
    pub chain_block: u64,
}

fn bad(what: impl Into<String>) -> ChainError {
    ChainError::ProofFailed(what.into())
}

fn hash(what: &str, s: &str) -> Result<Hash, ChainError> {
    let bytes = hex::decode(s.trim_start_matches("0x")).map_err(|_| bad(format!("{what} `{s}` is not hex")))?;
    bytes.try_into().map_err(|_| bad(format!("{what} `{s}` is not 32 bytes")))
}

fn path(what: &str, list: &[String]) -> Result<Vec<Hash>, ChainError> {
    if list.len() > 64 {
        return Err(bad(format!("{what} has {} steps; a tree of 2^64 leaves has 64", list.len())));
    }
    list.iter().map(|h| hash(what, h)).collect()
}

/// The checks that need no chain: the receipt is what its node signed, and it is in its
/// block. Returns the node's receipt.
pub fn check_offline(proof: &ReceiptProof) -> Result<SignedReceipt, ChainError> {
    let signed = proof
        .signed_bytes
        .as_deref()
        .ok_or_else(|| bad("the server published no signed bytes for this receipt (recorded before they were kept)"))?;
    let bytes = hex::decode(signed.trim_start_matches("0x")).map_err(|_| bad("signed_bytes is not hex"))?;
    let signature = proof.signature.trim_start_matches("0x");
    let receipt = SignedReceipt::from_signed_bytes(&bytes, signature)
        .map_err(|e| bad(format!("the signed bytes are not a receipt: {e}")))?;
    let receipt_hash = hash("receipt_hash", &proof.receipt_hash)?;
    if receipt.hash() != receipt_hash {
        return Err(bad("the signed bytes do not hash to the receipt hash"));
    }
    let node: crate::crypto::identity::Address =
        receipt.ticket.node.parse().map_err(|_| bad(format!("the receipt names node `{}`", receipt.ticket.node)))?;
    if !receipt.signed_by(&node) {
        return Err(bad(format!("the signature is not that of {node}, the node the receipt names")));
    }
    let mismatch = |field: &str, recorded: String, signed: String| {
        bad(format!("the registry recorded {field} {recorded}, the node signed {signed}"))
    };
    if receipt.ticket.task.0 != proof.task {
        return Err(mismatch("task", proof.task.to_string(), receipt.ticket.task.0.to_string()));
    }
    if !node.to_string().eq_ignore_ascii_case(&proof.node) {
        return Err(mismatch("node", proof.node.clone(), node.to_string()));
    }
    if receipt.ticket.game != proof.game_id {
        return Err(mismatch("game", proof.game_id.to_string(), receipt.ticket.game.to_string()));
    }
    if receipt.ticket.model != proof.model {
        return Err(mismatch("model", proof.model.clone(), receipt.ticket.model.clone()));
    }
    if receipt.prompt_tokens != proof.prompt_tokens {
        return Err(mismatch("prompt tokens", proof.prompt_tokens.to_string(), receipt.prompt_tokens.to_string()));
    }
    // The registry bills a continuation only for its own tokens, not the failed node's.
    let own = receipt.ticket.own_tokens(receipt.completion_tokens);
    if own != proof.completion_tokens {
        return Err(mismatch("completion tokens", proof.completion_tokens.to_string(), own.to_string()));
    }
    let receipt_path = path("receipt_path", &proof.receipt_path)?;
    let block_root = hash("block_root", &proof.block_root)?;
    if !merkle::verify(&receipt_hash, &receipt_path, &block_root) {
        return Err(bad(format!("the receipt's path does not lead to block {}'s root", proof.block)));
    }
    Ok(receipt)
}

/// Every check, the chain's included, through `provider` against `contract`.
pub async fn check_on_chain(
    provider: &DynProvider,
    contract: Address,
    proof: &ReceiptProof,
) -> Result<CheckedReceipt, ChainError> {
    let receipt = check_offline(proof)?;
    let anchor = proof
        .anchor
        .as_ref()
        .ok_or_else(|| ChainError::NotYet(format!("block {} is not anchored on chain yet", proof.block)))?;
    let block_root = hash("block_root", &proof.block_root)?;
    let block_path = path("block_path", &anchor.block_path)?;
    let settlement = Settlement::new(contract, provider.clone());
    let anchored = settlement
        .blockAnchored(
            anchor.id,
            proof.block,
            FixedBytes(block_root),
            block_path.iter().map(|h| FixedBytes(*h)).collect(),
        )
        .call()
        .await
        .map_err(|e| super::client::contract_error("blockAnchored()", e))?;
    if !anchored {
        return Err(bad(format!(
            "the contract at {contract} does not hold block {} with root {} in anchor {}",
            proof.block, proof.block_root, anchor.id
        )));
    }
    let tx = anchor.tx_hash.as_deref().ok_or_else(|| bad("the proof names no anchoring transaction"))?;
    let tx_hash = B256::from(hash("tx_hash", tx)?);
    let mined = provider
        .get_transaction_receipt(tx_hash)
        .await
        .map_err(|e| ChainError::Rpc(format!("transaction receipt: {e}")))?
        .ok_or_else(|| bad(format!("the anchoring transaction {tx} is not on this chain")))?;
    if !mined.status() || mined.to != Some(contract) {
        return Err(bad(format!("transaction {tx} did not succeed against {contract}")));
    }
    Ok(CheckedReceipt {
        task: proof.task,
        node: receipt.ticket.node.clone(),
        game_id: receipt.ticket.game,
        model: receipt.ticket.model.clone(),
        prompt_tokens: proof.prompt_tokens,
        completion_tokens: proof.completion_tokens,
        block: proof.block,
        anchor: anchor.id,
        anchor_tx: tx.to_string(),
        chain_block: mined.block_number.unwrap_or_default(),
    })
}
