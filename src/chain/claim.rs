//! A node's claims: given its payouts and proofs (from the server's
//! `/v1/settlement/payouts/{address}`), claim every epoch not claimed yet in one
//! `claimMany` transaction. Anyone may submit a claim; the tokens go to the node.
//!
//! Each claim is tried alone first (a call, no transaction): one the contract would refuse
//! (an epoch the chain does not hold, as after a reorg, or a proof the server got wrong)
//! is reported and left out, instead of reverting the whole batch and every good claim
//! with it.

use alloy::primitives::{Address, FixedBytes};
use alloy::providers::DynProvider;

use super::client::contract_error;
use super::contracts::Settlement;
use super::error::ChainError;
use super::to_u256;
use crate::books::PayoutClaim;
use crate::books::Units;

/// What a claim run did.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ClaimReport {
    /// (epoch, amount) claimed now.
    pub claimed: Vec<(u64, Units)>,
    /// Epochs claimed before.
    pub already_claimed: Vec<u64>,
    /// (epoch, why) of claims the contract would refuse: left out of the batch.
    pub refused: Vec<(u64, String)>,
    pub total: Units,
    pub tx_hash: Option<String>,
}

fn proof_bytes(claim: &PayoutClaim) -> Result<Vec<FixedBytes<32>>, ChainError> {
    claim
        .proof
        .iter()
        .map(|h| h.parse::<FixedBytes<32>>().map_err(|e| ChainError::Unexpected(format!("proof hash `{h}`: {e}"))))
        .collect()
}

/// Claims every unclaimed epoch of `claims` for `node`, through `provider`'s wallet.
pub async fn claim_all(
    provider: &DynProvider,
    contract: Address,
    node: Address,
    claims: &[PayoutClaim],
) -> Result<ClaimReport, ChainError> {
    let settlement = Settlement::new(contract, provider.clone());
    let mut report = ClaimReport::default();
    let (mut epochs, mut amounts, mut proofs) = (Vec::new(), Vec::new(), Vec::new());
    for claim in claims {
        let done = settlement.claimed(claim.epoch, node).call().await.map_err(|e| contract_error("claimed()", e))?;
        if done {
            report.already_claimed.push(claim.epoch);
            continue;
        }
        let proof = proof_bytes(claim)?;
        let tried = settlement.claim(claim.epoch, node, to_u256(claim.amount), proof.clone()).call().await;
        match tried.map_err(|e| contract_error("claim()", e)) {
            Ok(_) => {}
            Err(ChainError::Reverted(why)) => {
                report.refused.push((claim.epoch, why));
                continue;
            }
            Err(e) => return Err(e),
        }
        epochs.push(claim.epoch);
        amounts.push(to_u256(claim.amount));
        proofs.push(proof);
        report.claimed.push((claim.epoch, claim.amount));
        report.total = report.total.checked_add(claim.amount).map_err(|e| ChainError::Unexpected(e.to_string()))?;
    }
    if epochs.is_empty() {
        return Ok(report);
    }
    let sent = settlement
        .claimMany(node, epochs, amounts, proofs)
        .send()
        .await
        .map_err(|e| contract_error("claimMany()", e))?;
    let hash = *sent.tx_hash();
    let receipt = super::client::wait_receipt(provider, hash, std::time::Duration::from_secs(120)).await?;
    if !receipt.status() {
        return Err(ChainError::Reverted(format!("claimMany() transaction {hash} reverted")));
    }
    report.tx_hash = Some(hash.to_string());
    Ok(report)
}
