//! `ludus chain deploy` (operators) and `ludus claim` (node owners).

use std::path::PathBuf;

use alloy::primitives::Address;
use clap::{Args, Subcommand};

use crate::books::PayoutClaim;
use crate::chain::deploy::{deploy, DeployPlan};
use crate::chain::{parse_address, signer_of};
use crate::crypto::identity::Identity;

#[derive(Debug, Subcommand)]
pub enum ChainCommand {
    /// Deploy the settlement contract (and, with --test-token, a mintable test ERC-20).
    Deploy(DeployArgs),
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The chain's JSON-RPC URL.
    #[arg(long, env = "LUDUS_RPC_URL")]
    pub rpc: String,
    /// Hex key file of the deploying account (pays the gas).
    #[arg(long)]
    pub key: PathBuf,
    /// The ERC-20 games pay in. Omit it together with --test-token for tests and demos.
    #[arg(long, conflicts_with = "test_token", required_unless_present = "test_token")]
    pub token: Option<String>,
    /// Deploy the mintable test token (the deployer mints) and settle in it.
    #[arg(long)]
    pub test_token: bool,
    /// The operator that posts epochs: the server's settlement key (`[settlement]
    /// operator_key`, else its identity key). Default: the deploying account.
    #[arg(long)]
    pub operator: Option<String>,
    /// Who collects the fees. Default: the operator.
    #[arg(long)]
    pub treasury: Option<String>,
    /// Seconds between a game asking for its escrow back and getting it: at least two
    /// epochs, so the usage before the request is settled first (the server warns otherwise).
    #[arg(long, default_value_t = 172_800)]
    pub withdrawal_delay: u64,
    /// Also write the deployment (JSON) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ClaimArgs {
    /// The node's key file: payouts go to its address.
    #[arg(long)]
    pub key: PathBuf,
    /// The server the node works for (it serves the payouts and their proofs).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The chain's RPC URL. Default: the one the server advertises.
    #[arg(long, env = "LUDUS_RPC_URL")]
    pub rpc: Option<String>,
    /// Key file of the account that pays the claim's gas. Default: the node's key
    /// (its address then needs a little of the chain's native currency).
    #[arg(long)]
    pub gas_key: Option<PathBuf>,
    /// The node's receipt log (default: the key file's name + `.receipts`, where `ludus
    /// node` keeps it). Before claiming, up to --check-tasks of its confirmed receipts are
    /// checked against the chain's block anchors, as `ludus verify-receipt` does.
    #[arg(long)]
    pub receipts: Option<PathBuf>,
    /// How many of the node's newest confirmed receipts to check before claiming (0: none).
    #[arg(long, default_value_t = 16)]
    pub check_tasks: usize,
}

fn load(path: &std::path::Path, what: &str) -> anyhow::Result<Identity> {
    Identity::load(path).map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
}

pub fn run(cmd: ChainCommand) -> anyhow::Result<()> {
    match cmd {
        ChainCommand::Deploy(args) => {
            let deployer = signer_of(&load(&args.key, "--key")?);
            let operator = match &args.operator {
                Some(a) => parse_address("--operator", a)?,
                None => deployer.address(),
            };
            let treasury = match &args.treasury {
                Some(a) => parse_address("--treasury", a)?,
                None => operator,
            };
            let token = args.token.as_deref().map(|t| parse_address("--token", t)).transpose()?;
            let plan = DeployPlan { token, operator, treasury, withdrawal_delay_s: args.withdrawal_delay };
            let deployment = actix_web::rt::System::new().block_on(deploy(&args.rpc, deployer, &plan))?;
            let json = serde_json::to_string_pretty(&deployment)?;
            if let Some(out) = &args.out {
                std::fs::write(out, format!("{json}\n")).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
            }
            println!("{json}");
            eprintln!(
                "deployed Settlement at {:#x}; set [settlement] contract = \"{:#x}\" and rpc_url in the server's config",
                deployment.settlement, deployment.settlement
            );
            Ok(())
        }
    }
}

#[derive(serde::Deserialize)]
struct PayoutsResponse {
    contract: String,
    rpc_url: Option<String>,
    data: Vec<PayoutClaim>,
}

/// Fetches the node's payouts from the server and claims the unclaimed ones.
pub fn claim(args: ClaimArgs) -> anyhow::Result<()> {
    let node = load(&args.key, "--key")?;
    let own_gas = args.gas_key.is_none();
    let payer = match &args.gas_key {
        Some(path) => signer_of(&load(path, "--gas-key")?),
        None => signer_of(&node),
    };
    let node_address: Address = parse_address("node", &node.address.to_string())?;
    actix_web::rt::System::new().block_on(async move {
        let url = format!("{}/v1/settlement/payouts/{:#x}", args.server.trim_end_matches('/'), node_address);
        let client = awc::Client::builder().timeout(std::time::Duration::from_secs(30)).finish();
        let mut response = client.get(&url).send().await.map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?;
        let body = response.body().limit(64 << 20).await.map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?;
        if !response.status().is_success() {
            anyhow::bail!("GET {url}: {} {}", response.status(), String::from_utf8_lossy(&body));
        }
        let payouts: PayoutsResponse = serde_json::from_slice(&body)?;
        let rpc = args.rpc.clone().or(payouts.rpc_url).ok_or_else(|| {
            anyhow::anyhow!("the server publishes no RPC URL ([settlement] public_rpc_url is empty): pass --rpc URL")
        })?;
        let contract = parse_address("the server's contract", &payouts.contract)?;
        if args.check_tasks > 0 {
            let log = args.receipts.clone().unwrap_or_else(|| {
                let mut name = args.key.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                name.push(".receipts");
                args.key.with_file_name(name)
            });
            let own = crate::node::receipts::confirmed_receipts(&log)?;
            let report =
                super::receipts::check_own_tasks(&args.server, &node, &rpc, contract, &own, args.check_tasks).await?;
            eprintln!(
                "checked {} of this node's tasks against the chain's anchors ({} not anchored yet; {} confirmed in {})",
                report.checked,
                report.not_anchored_yet,
                own.len(),
                log.display()
            );
        }
        let payer_address = payer.address();
        let provider = crate::chain::client::provider_for(&rpc, payer)?;
        if own_gas && !payouts.data.is_empty() {
            use alloy::providers::Provider;
            let balance = provider.get_balance(payer_address).await.map_err(|e| anyhow::anyhow!("{rpc}: {e}"))?;
            if balance.is_zero() {
                anyhow::bail!(
                    "{node_address:#x} has no gas money on this chain: send it a little of the chain's native \
                     currency, or pass --gas-key FILE to pay the claim from another account"
                );
            }
        }
        let report = crate::chain::claim::claim_all(&provider, contract, node_address, &payouts.data).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        for (epoch, why) in &report.refused {
            eprintln!("epoch {epoch}: not claimed, the contract would refuse it: {why}");
        }
        if !report.refused.is_empty() && report.claimed.is_empty() {
            anyhow::bail!("every unclaimed epoch was refused by the contract (see above)");
        }
        if report.claimed.is_empty() {
            eprintln!(
                "nothing to claim for {node_address:#x} ({} epochs claimed before)",
                report.already_claimed.len()
            );
        } else {
            eprintln!("claimed {} base units for {node_address:#x} over {} epochs", report.total, report.claimed.len());
        }
        Ok(())
    })
}
