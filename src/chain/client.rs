//! The operator's settlement client: reads the contract (last epoch, posted roots,
//! anchors, escrow), posts epochs and anchors block roots. A post is signed here — nonce, gas estimate with headroom,
//! EIP-1559 fees — and handed back as bytes with its hash *before* it is broadcast, so
//! the caller can store it first and, after any crash, look the same transaction up or
//! broadcast it again instead of signing a second one.

use std::time::Duration;

use alloy::eips::eip2718::Encodable2718;
use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, FixedBytes, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;

use super::contracts::Settlement;
use super::error::ChainError;
use super::{from_u256, to_u256};
use crate::books::SentTx;
use crate::books::Units;
use crate::crypto::merkle::Hash;

/// How long one RPC call may take before it counts as an outage.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Gas limit = estimate × this / 100.
const GAS_HEADROOM_PERCENT: u64 = 130;

/// Where a sent transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// Neither in the mempool nor on chain.
    Unknown,
    /// In the mempool.
    Pending,
    /// In a block, with `confirmations` blocks on top counted (1 = just mined).
    Mined { block: u64, success: bool, gas_used: u64, confirmations: u64 },
}

/// An epoch as posted on chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostedEpoch {
    pub payout_root: Hash,
    pub payout_total: Units,
    pub charge_total: Units,
}

/// Maps an RPC or contract failure: a decoded contract error, or an error answer that says
/// the execution reverted, is a revert; anything else on the wire (an outage, a provider's
/// rate limit, a wallet short of gas money) is worth retrying.
///
/// The difference moves money: a revert makes the settler discard its planned epoch, and
/// every node's pay waits for the next boundary, a day later; a retry posts the same plan
/// once the provider answers again (or the operator's wallet is funded).
pub fn contract_error(context: &str, e: alloy::contract::Error) -> ChainError {
    if let Some(revert) = e.as_decoded_interface_error::<Settlement::SettlementErrors>() {
        return ChainError::Reverted(format!("{context}: {}", super::contracts::describe_revert(&revert)));
    }
    match &e {
        alloy::contract::Error::TransportError(t)
            if t.as_error_resp()
                .is_some_and(|p| says_reverted(p.code, &p.message, p.data.as_deref().map(|d| d.get()))) =>
        {
            ChainError::Reverted(format!("{context}: {t}"))
        }
        alloy::contract::Error::TransportError(_) => ChainError::Rpc(format!("{context}: {e}")),
        _ => ChainError::Unexpected(format!("{context}: {e}")),
    }
}

/// Whether a JSON-RPC error answer reports a reverted execution: code 3 (EIP-1474's
/// "execution reverted", with the revert data), or a message or data that says so (geth,
/// anvil and most providers word it "execution reverted"; some send -32000 or -32603 with
/// it; OpenEthereum and older Nethermind send -32015 "VM execution error", the revert in
/// its data: their other execution failures, out of gas, are no revert).
fn says_reverted(code: i64, message: &str, data: Option<&str>) -> bool {
    let says = |text: &str| text.to_ascii_lowercase().contains("revert");
    code == 3 || says(message) || data.is_some_and(says)
}

fn rpc_error(context: &str, e: impl std::fmt::Display) -> ChainError {
    ChainError::Rpc(format!("{context}: {e}"))
}

/// Runs one RPC future with the timeout, as an outage when it expires.
async fn timed<T, E: std::fmt::Display>(
    context: &str,
    f: impl std::future::IntoFuture<Output = Result<T, E>>,
) -> Result<T, ChainError> {
    match tokio::time::timeout(RPC_TIMEOUT, f.into_future()).await {
        Ok(result) => result.map_err(|e| rpc_error(context, e)),
        Err(_) => Err(ChainError::Rpc(format!("{context}: no answer within {} s", RPC_TIMEOUT.as_secs()))),
    }
}

/// Polls for the receipt of `hash` until `timeout` (no background watcher: works from
/// any runtime, and an RPC hiccup only costs one poll).
pub async fn wait_receipt(
    provider: &DynProvider,
    hash: B256,
    timeout: Duration,
) -> Result<alloy::rpc::types::TransactionReceipt, ChainError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match provider.get_transaction_receipt(hash).await {
            Ok(Some(receipt)) => return Ok(receipt),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "receipt poll failed; polling again"),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ChainError::Rpc(format!("transaction {hash} not mined within {} s", timeout.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A provider with `signer` as its wallet.
pub fn provider_for(rpc_url: &str, signer: PrivateKeySigner) -> Result<DynProvider, ChainError> {
    let url = rpc_url.parse().map_err(|e| ChainError::Config(format!("rpc_url `{rpc_url}`: {e}")))?;
    Ok(ProviderBuilder::new().wallet(EthereumWallet::from(signer)).connect_http(url).erased())
}

/// The settlement contract, seen by its operator.
#[derive(Clone)]
pub struct SettlementClient {
    provider: DynProvider,
    wallet: EthereumWallet,
    contract: Settlement::SettlementInstance<DynProvider>,
    operator: Address,
    chain_id: u64,
}

impl SettlementClient {
    /// Connects and checks the setup: a contract at `contract`, operated by `signer`.
    pub async fn connect(rpc_url: &str, contract: Address, signer: PrivateKeySigner) -> Result<Self, ChainError> {
        let operator = signer.address();
        let wallet = EthereumWallet::from(signer.clone());
        let provider = provider_for(rpc_url, signer)?;
        let chain_id = timed("chain id", provider.get_chain_id()).await?;
        let code = timed("contract code", provider.get_code_at(contract)).await?;
        if code.is_empty() {
            return Err(ChainError::Config(format!(
                "no contract at {contract} on chain {chain_id}: deploy one with `ludus chain deploy`"
            )));
        }
        let instance = Settlement::new(contract, provider.clone());
        let on_chain = instance.operator().call().await.map_err(|e| contract_error("operator()", e))?;
        if on_chain != operator {
            return Err(ChainError::Config(format!(
                "the settlement key's address {operator} is not the contract's operator ({on_chain})"
            )));
        }
        // A contract from before block anchoring cannot take anchors, so no epoch could post.
        match instance.lastAnchoredBlock().call().await.map_err(|e| contract_error("lastAnchoredBlock()", e)) {
            Ok(_) => {}
            Err(ChainError::Rpc(e)) => return Err(ChainError::Rpc(e)),
            Err(_) => {
                return Err(ChainError::Config(format!(
                    "the contract at {contract} predates block anchoring (it has no lastAnchoredBlock()): settle its \
                     last epoch with the previous Ludus, then deploy a new one with `ludus chain deploy`"
                )))
            }
        }
        Ok(Self { provider, wallet, contract: instance, operator, chain_id })
    }

    pub fn contract_address(&self) -> Address {
        *self.contract.address()
    }

    pub fn operator(&self) -> Address {
        self.operator
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    /// The last epoch posted.
    pub async fn last_epoch(&self) -> Result<u64, ChainError> {
        let call = self.contract.lastEpoch();
        timed("lastEpoch()", call.call()).await
    }

    /// Epoch `n` as posted (None when not posted).
    pub async fn posted_epoch(&self, n: u64) -> Result<Option<PostedEpoch>, ChainError> {
        let call = self.contract.epochs(n);
        let e = timed("epochs()", call.call()).await?;
        if e.postedAt == 0 {
            return Ok(None);
        }
        Ok(Some(PostedEpoch {
            payout_root: e.payoutRoot.0,
            payout_total: Units(e.payoutTotal),
            charge_total: Units(e.chargeTotal),
        }))
    }

    /// Escrow settlement can count on, per wallet (balance less pending withdrawals).
    pub async fn available_escrows(&self, wallets: &[Address]) -> Result<Vec<Units>, ChainError> {
        if wallets.is_empty() {
            return Ok(Vec::new());
        }
        let call = self.contract.availableEscrows(wallets.to_vec());
        let amounts = timed("availableEscrows()", call.call()).await?;
        Ok(amounts.into_iter().map(from_u256).collect())
    }

    /// The chain's newest block number.
    pub async fn head_block(&self) -> Result<u64, ChainError> {
        timed("block number", self.provider.get_block_number()).await
    }

    /// The last epoch posted as of `block`.
    pub async fn last_epoch_at(&self, block: u64) -> Result<u64, ChainError> {
        let call = self.contract.lastEpoch().block(alloy::eips::BlockId::number(block));
        timed("lastEpoch()", call.call()).await
    }

    /// [`Self::available_escrows`] as of `block`.
    pub async fn available_escrows_at(&self, wallets: &[Address], block: u64) -> Result<Vec<Units>, ChainError> {
        if wallets.is_empty() {
            return Ok(Vec::new());
        }
        let call = self.contract.availableEscrows(wallets.to_vec()).block(alloy::eips::BlockId::number(block));
        let amounts = timed("availableEscrows()", call.call()).await?;
        Ok(amounts.into_iter().map(from_u256).collect())
    }

    /// Each wallet's whole escrow (`escrowOf`), pending withdrawal requests included: what
    /// settlement may charge (a request does not shield escrow from usage before it).
    pub async fn escrow_balances(&self, wallets: &[Address]) -> Result<Vec<Units>, ChainError> {
        let mut out = Vec::with_capacity(wallets.len());
        for wallet in wallets {
            let balance = timed("escrowOf()", self.contract.escrowOf(*wallet).call()).await?;
            out.push(from_u256(balance));
        }
        Ok(out)
    }

    /// Seconds between a game's withdrawal request and its payout (the contract's).
    pub async fn withdrawal_delay(&self) -> Result<u64, ChainError> {
        timed("withdrawalDelay()", self.contract.withdrawalDelay().call()).await
    }

    /// Signs the post of one epoch (settling registry blocks `blocks`) at the operator's
    /// next nonce. Reverts that the gas estimate reveals (e.g. `EscrowShort`,
    /// `BlocksNotAnchored`) come back as [`ChainError::Reverted`].
    pub async fn sign_post(
        &self,
        epoch: u64,
        blocks: (u64, u64),
        payout_root: Hash,
        payout_total: Units,
        charges: &[(Address, Units)],
    ) -> Result<SentTx, ChainError> {
        let games: Vec<Address> = charges.iter().map(|(g, _)| *g).collect();
        let amounts: Vec<U256> = charges.iter().map(|(_, a)| to_u256(*a)).collect();
        let call = self
            .contract
            .postEpoch(epoch, blocks.0, blocks.1, FixedBytes(payout_root), to_u256(payout_total), games, amounts)
            .from(self.operator);
        let gas = match tokio::time::timeout(RPC_TIMEOUT, call.estimate_gas()).await {
            Ok(result) => result.map_err(|e| contract_error("postEpoch() gas estimate", e))?,
            Err(_) => return Err(ChainError::Rpc("postEpoch() gas estimate: timed out".into())),
        };
        self.sign(call.into_transaction_request(), gas).await
    }

    /// Signs the anchor of registry blocks `first_block..` with `roots` at the operator's
    /// next nonce.
    pub async fn sign_anchor(&self, first_block: u64, roots: &[Hash]) -> Result<SentTx, ChainError> {
        let roots: Vec<FixedBytes<32>> = roots.iter().map(|r| FixedBytes(*r)).collect();
        let call = self.contract.anchorBlocks(first_block, roots).from(self.operator);
        let gas = match tokio::time::timeout(RPC_TIMEOUT, call.estimate_gas()).await {
            Ok(result) => result.map_err(|e| contract_error("anchorBlocks() gas estimate", e))?,
            Err(_) => return Err(ChainError::Rpc("anchorBlocks() gas estimate: timed out".into())),
        };
        self.sign(call.into_transaction_request(), gas).await
    }

    /// Signs `request` (gas `gas` with headroom, EIP-1559 fees) at the operator's next
    /// nonce, without sending it.
    async fn sign(&self, request: alloy::rpc::types::TransactionRequest, gas: u64) -> Result<SentTx, ChainError> {
        let nonce = timed("nonce", self.provider.get_transaction_count(self.operator).pending()).await?;
        let fees = timed("fee estimate", self.provider.estimate_eip1559_fees()).await?;
        let request = request
            .with_nonce(nonce)
            .with_chain_id(self.chain_id)
            .with_gas_limit(gas * GAS_HEADROOM_PERCENT / 100)
            .with_max_fee_per_gas(fees.max_fee_per_gas)
            .with_max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
        let envelope =
            request.build(&self.wallet).await.map_err(|e| ChainError::Unexpected(format!("signing: {e}")))?;
        Ok(SentTx { hash: envelope.tx_hash().0, raw: envelope.encoded_2718(), nonce })
    }

    /// Signs `stuck` again at its nonce, its fees raised by an eighth (geth's mempool takes
    /// a replacement at 10 % more) and at least to today's estimate: a post signed before
    /// the chain's base fee rose above its fee cap would wait for ever. `None` when its fee
    /// cap is twice the estimate already: fees are not what holds it, and raising them
    /// again and again would only spend the operator's money.
    pub async fn sign_replacement(&self, stuck: &SentTx) -> Result<Option<SentTx>, ChainError> {
        use alloy::consensus::{Transaction, TxEnvelope};
        use alloy::eips::eip2718::Decodable2718;
        let old = TxEnvelope::decode_2718(&mut stuck.raw.as_slice())
            .map_err(|e| ChainError::Unexpected(format!("a stored transaction does not decode: {e}")))?;
        let to = old.to().ok_or_else(|| ChainError::Unexpected("a stored transaction creates a contract".into()))?;
        let fees = timed("fee estimate", self.provider.estimate_eip1559_fees()).await?;
        if old.max_fee_per_gas() >= fees.max_fee_per_gas.saturating_mul(2) {
            return Ok(None);
        }
        let raised = |fee: u128| fee.saturating_add(fee / 8).saturating_add(1);
        let max_fee = raised(old.max_fee_per_gas()).max(fees.max_fee_per_gas);
        let priority =
            raised(old.max_priority_fee_per_gas().unwrap_or(0)).max(fees.max_priority_fee_per_gas).min(max_fee);
        let request = alloy::rpc::types::TransactionRequest::default()
            .with_from(self.operator)
            .with_to(to)
            .with_input(old.input().clone())
            .with_nonce(stuck.nonce)
            .with_chain_id(self.chain_id)
            .with_gas_limit(old.gas_limit())
            .with_max_fee_per_gas(max_fee)
            .with_max_priority_fee_per_gas(priority);
        let envelope =
            request.build(&self.wallet).await.map_err(|e| ChainError::Unexpected(format!("signing: {e}")))?;
        Ok(Some(SentTx { hash: envelope.tx_hash().0, raw: envelope.encoded_2718(), nonce: stuck.nonce }))
    }

    /// The last registry block anchored on chain.
    pub async fn last_anchored_block(&self) -> Result<u64, ChainError> {
        timed("lastAnchoredBlock()", self.contract.lastAnchoredBlock().call()).await
    }

    /// Anchor `id` as stored on chain: (root, first block, last block); None when absent.
    pub async fn posted_anchor(&self, id: u64) -> Result<Option<(Hash, u64, u64)>, ChainError> {
        let a = timed("anchors()", self.contract.anchors(id).call()).await?;
        Ok((a.anchoredAt != 0).then_some((a.root.0, a.firstBlock, a.lastBlock)))
    }

    /// The number of anchors made on chain.
    pub async fn anchor_count(&self) -> Result<u64, ChainError> {
        timed("anchorCount()", self.contract.anchorCount().call()).await
    }

    /// Broadcasts a signed transaction. "Already known" and "nonce too low" answers are
    /// not failures here: the status check that follows tells what happened.
    pub async fn broadcast(&self, raw: &[u8]) -> Result<(), ChainError> {
        match tokio::time::timeout(RPC_TIMEOUT, self.provider.send_raw_transaction(raw)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.as_error_resp().is_some() => {
                tracing::info!(error = %e, "broadcast answered with an error; checking the transaction's status");
                Ok(())
            }
            Ok(Err(e)) => Err(rpc_error("broadcast", e)),
            Err(_) => Err(ChainError::Rpc("broadcast: timed out".into())),
        }
    }

    /// Where transaction `hash` stands.
    pub async fn tx_status(&self, hash: Hash) -> Result<TxStatus, ChainError> {
        let hash = B256::from(hash);
        if let Some(receipt) = timed("transaction receipt", self.provider.get_transaction_receipt(hash)).await? {
            let block = receipt.block_number.unwrap_or_default();
            let head = timed("block number", self.provider.get_block_number()).await?;
            return Ok(TxStatus::Mined {
                block,
                success: receipt.status(),
                gas_used: receipt.gas_used,
                confirmations: head.saturating_sub(block) + 1,
            });
        }
        let known = timed("transaction", self.provider.get_transaction_by_hash(hash)).await?;
        Ok(if known.is_some() { TxStatus::Pending } else { TxStatus::Unknown })
    }

    /// The operator's nonce in the latest block: how many of its transactions were mined.
    pub async fn mined_nonce(&self) -> Result<u64, ChainError> {
        timed("nonce", self.provider.get_transaction_count(self.operator).latest()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::transports::RpcError;

    /// A JSON-RPC error answer, as a provider sends it.
    fn answer(code: i64, message: &str) -> alloy::contract::Error {
        answer_with(serde_json::json!({ "code": code, "message": message }))
    }

    fn answer_with(json: serde_json::Value) -> alloy::contract::Error {
        let payload = serde_json::from_value(json).expect("a payload");
        alloy::contract::Error::TransportError(RpcError::ErrorResp(payload))
    }

    #[test]
    fn only_an_answer_that_says_reverted_is_a_revert() {
        for (code, message) in [(3, "execution reverted"), (-32000, "execution reverted: paused"), (-32603, "Reverted")]
        {
            let e = contract_error("postEpoch()", answer(code, message));
            assert!(matches!(e, ChainError::Reverted(_)), "{code} {message}: {e:?}");
        }
        // OpenEthereum's way: the revert only in the data.
        for data in [
            serde_json::json!({"code": -32015, "message": "VM execution error.", "data": "Reverted 0x08c379a0"}),
            serde_json::json!({"code": -32000, "message": "error", "data": "Reverted 0x"}),
        ] {
            let e = contract_error("postEpoch()", answer_with(data.clone()));
            assert!(matches!(e, ChainError::Reverted(_)), "{data}: {e:?}");
        }
        // A provider's rate limit, a wallet short of gas money, an internal error: the same
        // plan is posted again later, not discarded for a day.
        for (code, message) in [
            (-32005, "exceeded project rate limit"),
            (429, "Too Many Requests"),
            (-32000, "insufficient funds for gas * price + value"),
            (-32603, "internal error"),
        ] {
            let e = contract_error("postEpoch()", answer(code, message));
            assert!(e.is_retryable(), "{code} {message}: {e:?}");
        }
    }
}
