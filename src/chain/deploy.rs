//! `ludus chain deploy`: puts a settlement contract (and, for tests and the demo, the
//! test token) on a chain, and the helpers the demo and tests use to fund games.

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;

use super::client::contract_error;
use super::contracts::{LudusTestToken, Settlement};
use super::error::ChainError;
use super::to_u256;
use crate::books::Units;

/// What a deployment produced (printed and written as JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Deployment {
    pub chain_id: u64,
    pub settlement: Address,
    pub token: Address,
    /// Whether `token` is the mintable test token deployed here.
    pub test_token: bool,
    pub operator: Address,
    pub treasury: Address,
    pub withdrawal_delay_s: u64,
}

/// What to deploy.
#[derive(Debug, Clone)]
pub struct DeployPlan {
    /// An existing ERC-20; `None` deploys the test token (the deployer mints).
    pub token: Option<Address>,
    pub operator: Address,
    pub treasury: Address,
    pub withdrawal_delay_s: u64,
}

fn provider(rpc_url: &str, signer: PrivateKeySigner) -> Result<DynProvider, ChainError> {
    let url = rpc_url.parse().map_err(|e| ChainError::Config(format!("rpc url `{rpc_url}`: {e}")))?;
    Ok(ProviderBuilder::new().wallet(EthereumWallet::from(signer)).connect_http(url).erased())
}

/// Deploys per `plan`, signed by `deployer`.
pub async fn deploy(rpc_url: &str, deployer: PrivateKeySigner, plan: &DeployPlan) -> Result<Deployment, ChainError> {
    let p = provider(rpc_url, deployer)?;
    let chain_id = p.get_chain_id().await.map_err(|e| ChainError::Rpc(format!("chain id: {e}")))?;
    let (token, test_token) = match plan.token {
        Some(t) => (t, false),
        None => {
            let token =
                LudusTestToken::deploy(p.clone()).await.map_err(|e| contract_error("deploying the token", e))?;
            (*token.address(), true)
        }
    };
    let settlement = Settlement::deploy(p, token, plan.operator, plan.treasury, plan.withdrawal_delay_s)
        .await
        .map_err(|e| contract_error("deploying Settlement", e))?;
    Ok(Deployment {
        chain_id,
        settlement: *settlement.address(),
        token,
        test_token,
        operator: plan.operator,
        treasury: plan.treasury,
        withdrawal_delay_s: plan.withdrawal_delay_s,
    })
}

/// Waits for a sent call's receipt and insists it succeeded.
async fn mined(
    provider: &DynProvider,
    pending: alloy::providers::PendingTransactionBuilder<alloy::network::Ethereum>,
    what: &str,
) -> Result<(), ChainError> {
    let receipt = super::client::wait_receipt(provider, *pending.tx_hash(), std::time::Duration::from_secs(60)).await?;
    if !receipt.status() {
        return Err(ChainError::Reverted(format!("{what}: the transaction reverted")));
    }
    Ok(())
}

/// Test token only: mints `amount` to `game` (signed by the token's deployer), then the
/// game approves and deposits it into its escrow.
pub async fn mint_and_deposit(
    rpc_url: &str,
    deployment: &Deployment,
    minter: PrivateKeySigner,
    game: PrivateKeySigner,
    amount: Units,
) -> Result<(), ChainError> {
    let game_address = game.address();
    let p = provider(rpc_url, minter)?;
    let token = LudusTestToken::new(deployment.token, p.clone());
    let sent = token.mint(game_address, to_u256(amount)).send().await.map_err(|e| contract_error("mint", e))?;
    mined(&p, sent, "mint").await?;
    deposit(rpc_url, deployment, game, amount).await
}

/// The game approves the contract and deposits `amount` into its own escrow.
pub async fn deposit(
    rpc_url: &str,
    deployment: &Deployment,
    game: PrivateKeySigner,
    amount: Units,
) -> Result<(), ChainError> {
    let p = provider(rpc_url, game)?;
    let token = LudusTestToken::new(deployment.token, p.clone());
    let sent =
        token.approve(deployment.settlement, to_u256(amount)).send().await.map_err(|e| contract_error("approve", e))?;
    mined(&p, sent, "approve").await?;
    let settlement = Settlement::new(deployment.settlement, p.clone());
    let sent = settlement.deposit(to_u256(amount)).send().await.map_err(|e| contract_error("deposit", e))?;
    mined(&p, sent, "deposit").await
}

/// The token balance of `who`.
pub async fn token_balance(rpc_url: &str, token: Address, who: Address) -> Result<U256, ChainError> {
    let url = rpc_url.parse().map_err(|e| ChainError::Config(format!("rpc url `{rpc_url}`: {e}")))?;
    let p = ProviderBuilder::new().connect_http(url).erased();
    LudusTestToken::new(token, p).balanceOf(who).call().await.map_err(|e| contract_error("balanceOf", e))
}

/// Sends `wei` of the chain's native currency (gas money) from `from` to `to`.
pub async fn send_native(rpc_url: &str, from: PrivateKeySigner, to: Address, wei: U256) -> Result<(), ChainError> {
    use alloy::network::TransactionBuilder;
    let p = provider(rpc_url, from)?;
    let tx = alloy::rpc::types::TransactionRequest::default().with_to(to).with_value(wei);
    let sent = p.send_transaction(tx).await.map_err(|e| ChainError::Rpc(format!("transfer: {e}")))?;
    mined(&p, sent, "transfer").await
}

/// Whether this version's settlement contract lives at `address` (the demo redeploys
/// otherwise).
pub async fn has_code(rpc_url: &str, address: Address) -> Result<bool, ChainError> {
    let url = rpc_url.parse().map_err(|e| ChainError::Config(format!("rpc url `{rpc_url}`: {e}")))?;
    let p = ProviderBuilder::new().connect_http(url).erased();
    if p.get_code_at(address).await.map_err(|e| ChainError::Rpc(format!("code: {e}")))?.is_empty() {
        return Ok(false);
    }
    // A contract from before block anchoring has code but no `lastAnchoredBlock()`.
    Ok(Settlement::new(address, p).lastAnchoredBlock().call().await.is_ok())
}

/// The escrow `game` holds that settlement can count on.
pub async fn available_escrow(rpc_url: &str, settlement: Address, game: Address) -> Result<Units, ChainError> {
    let url = rpc_url.parse().map_err(|e| ChainError::Config(format!("rpc url `{rpc_url}`: {e}")))?;
    let p = ProviderBuilder::new().connect_http(url).erased();
    let amount = Settlement::new(settlement, p)
        .availableEscrow(game)
        .call()
        .await
        .map_err(|e| contract_error("availableEscrow", e))?;
    Ok(super::from_u256(amount))
}
