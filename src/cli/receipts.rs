//! `ludus verify-receipt`: checks one task's receipt against the chain, trusting the
//! server for nothing but the data (see [`crate::chain::receipt_check`]); and the same
//! check of a node's own tasks that `ludus claim` runs before claiming.

use std::path::PathBuf;

use alloy::primitives::Address;
use clap::Args;

use crate::books::ReceiptProof;
use crate::chain::receipt_check::{check_on_chain, CheckedReceipt};
use crate::chain::{parse_address, ChainError};
use crate::protocol::SignedReceipt;

#[derive(Debug, Args)]
pub struct VerifyReceiptArgs {
    /// The task: a completion's `id` (`chatcmpl-…`), or its 16 hex digits.
    pub task: String,
    /// The server that recorded it (serves `/v1/receipts/{task}/proof`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Ask as the game that made the request: its API key (or the operator's admin token).
    #[arg(long, env = "LUDUS_API_KEY", conflicts_with = "node_key")]
    pub api_key: Option<String>,
    /// Ask as the node that answered: its key file signs the request.
    #[arg(long)]
    pub node_key: Option<PathBuf>,
    /// Read the proof from this file (a saved `/v1/receipts/{task}/proof` answer) instead
    /// of asking the server.
    #[arg(long)]
    pub proof: Option<PathBuf>,
    /// The chain's RPC URL. Default: the one the server advertises.
    #[arg(long, env = "LUDUS_RPC_URL")]
    pub rpc: Option<String>,
    /// The settlement contract to check against. Pin it: by default it is the one the
    /// server names, which a dishonest server could choose.
    #[arg(long, env = "LUDUS_CONTRACT")]
    pub contract: Option<String>,
}

/// The `/v1/receipts/{task}/proof` answer.
#[derive(Debug, serde::Deserialize)]
pub struct ProofResponse {
    pub contract: Option<String>,
    pub rpc_url: Option<String>,
    pub proof: ReceiptProof,
}

/// Who asks the server for a proof.
pub enum Asker<'a> {
    /// A game's API key, or the operator's admin token.
    Bearer(&'a str),
    /// The node that answered, signing the request.
    Node(&'a crate::crypto::identity::Identity),
}

/// Asks `server` for the proof of `task` (hex).
pub async fn fetch_proof(server: &str, task: u64, asker: &Asker<'_>) -> anyhow::Result<ProofResponse> {
    let url = format!("{}/v1/receipts/{task:016x}/proof", server.trim_end_matches('/'));
    let client = awc::Client::builder().timeout(std::time::Duration::from_secs(30)).finish();
    let mut request = client.get(&url);
    match asker {
        Asker::Bearer(token) => request = request.insert_header(("Authorization", format!("Bearer {token}"))),
        Asker::Node(identity) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let signature = identity.sign(&crate::protocol::receipt::proof_request_message(task, now));
            request = request
                .insert_header(("X-Ludus-Node", identity.address.to_string()))
                .insert_header(("X-Ludus-Time", now.to_string()))
                .insert_header(("X-Ludus-Signature", hex::encode(signature)));
        }
    }
    let mut response = request.send().await.map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?;
    let body = response.body().limit(64 << 20).await.map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        anyhow::bail!("GET {url}: {} {}", response.status(), String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).map_err(|e| anyhow::anyhow!("GET {url}: not a receipt proof: {e}"))
}

/// The chain to check on: the flags, else what the server advertises.
fn chain_of(rpc: Option<&str>, contract: Option<&str>, answer: &ProofResponse) -> anyhow::Result<(String, Address)> {
    let rpc = rpc.map(str::to_string).or_else(|| answer.rpc_url.clone()).ok_or_else(|| {
        anyhow::anyhow!("no RPC URL: pass --rpc URL (the server publishes none in [settlement] public_rpc_url)")
    })?;
    let contract = match contract {
        Some(c) => parse_address("--contract", c)?,
        None => {
            let named = answer
                .contract
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("the server names no settlement contract: pass --contract ADDRESS"))?;
            eprintln!("checking against contract {named}, as the server names it (pass --contract to pin it)");
            parse_address("the server's contract", named)?
        }
    };
    Ok((rpc, contract))
}

pub fn verify_receipt(args: VerifyReceiptArgs) -> anyhow::Result<()> {
    actix_web::rt::System::new().block_on(async move {
        let answer = match &args.proof {
            Some(path) => serde_json::from_slice(
                &std::fs::read(path).map_err(|e| anyhow::anyhow!("--proof {}: {e}", path.display()))?,
            )
            .map_err(|e| anyhow::anyhow!("--proof {}: not a receipt proof: {e}", path.display()))?,
            None => {
                let task = crate::http::settlement_api::parse_task(&args.task)
                    .ok_or_else(|| anyhow::anyhow!("`{}` is not a task id (chatcmpl-<16 hex digits>)", args.task))?;
                let node;
                let asker = match (&args.api_key, &args.node_key) {
                    (Some(key), _) => Asker::Bearer(key),
                    (None, Some(path)) => {
                        node = crate::crypto::identity::Identity::load(path)
                            .map_err(|e| anyhow::anyhow!("--node-key {}: {e}", path.display()))?;
                        Asker::Node(&node)
                    }
                    (None, None) => anyhow::bail!(
                        "say who asks: --api-key KEY (the game's; env LUDUS_API_KEY) or --node-key FILE (the node's)"
                    ),
                };
                fetch_proof(&args.server, task, &asker).await?
            }
        };
        let (rpc, contract) = chain_of(args.rpc.as_deref(), args.contract.as_deref(), &answer)?;
        let provider = crate::chain::client::provider_for(&rpc, alloy::signers::local::PrivateKeySigner::random())?;
        let checked = check_on_chain(&provider, contract, &answer.proof).await?;
        println!("{}", serde_json::to_string_pretty(&checked)?);
        eprintln!(
            "task {:016x}: signed by {}, in block {}, anchored on chain by {} (anchor {})",
            checked.task, checked.node, checked.block, checked.anchor_tx, checked.anchor
        );
        if let Some(reason) = &answer.proof.written_off {
            eprintln!("task {:016x}: written off, neither charged nor paid: {reason}", checked.task);
        }
        Ok(())
    })
}

/// What checking a node's own tasks found.
#[derive(Debug, Default, serde::Serialize)]
pub struct OwnTasksReport {
    pub checked: usize,
    /// In blocks not anchored yet: checked on a later claim.
    pub not_anchored_yet: usize,
}

/// Checks up to `limit` of the node's confirmed receipts (newest first) against the
/// chain, and that the server publishes exactly the receipt the node signed. Any
/// receipt that does not check out is an error.
pub async fn check_own_tasks(
    server: &str,
    node: &crate::crypto::identity::Identity,
    rpc: &str,
    contract: Address,
    own: &[SignedReceipt],
    limit: usize,
) -> anyhow::Result<OwnTasksReport> {
    let provider = crate::chain::client::provider_for(rpc, alloy::signers::local::PrivateKeySigner::random())?;
    let mut report = OwnTasksReport::default();
    for receipt in own.iter().rev().take(limit) {
        let task = format!("{:016x}", receipt.ticket.task.0);
        let answer = fetch_proof(server, receipt.ticket.task.0, &Asker::Node(node)).await?;
        if answer.proof.receipt_hash != format!("0x{}", hex::encode(receipt.hash())) {
            anyhow::bail!("task {task}: the server publishes another receipt than the one this node signed");
        }
        match check_on_chain(&provider, contract, &answer.proof).await {
            Ok(CheckedReceipt { .. }) => report.checked += 1,
            Err(ChainError::NotYet(_)) => report.not_anchored_yet += 1,
            Err(e) => anyhow::bail!("task {task}: {e}"),
        }
    }
    Ok(report)
}
