//! `ludus serve`, `ludus node` and `ludus demo`: starting the network's processes from the
//! command line.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::RuntimeArgs;
use crate::ledger::Store;
use crate::node::{run_node, Backend, FakeSpec, NodeModel, NodeOptions};
use crate::serve::shutdown_signal;
use crate::settings::Settings;

/// Runs the server until SIGINT/SIGTERM, then shuts down gracefully.
pub fn serve(settings: Settings) -> anyhow::Result<()> {
    actix_web::rt::System::new().block_on(async move {
        let (handle, server) = crate::serve::start(&settings).await?;
        tracing::info!(addr = %handle.addr, "serving");
        announce(&format!("ludus listening on http://{}\n", handle.addr));
        announce(&format!(
            "distributor address {} (nodes may pin it with --distributor-address)\n",
            handle.distributor_address
        ));
        let server = actix_web::rt::spawn(server);
        shutdown_signal().await;
        tracing::info!(grace_s = handle.grace.as_secs(), "shutting down: draining running jobs");
        handle.shutdown().await;
        server.await??;
        Ok(())
    })
}

/// Writes one whole line to stderr in a single write. `eprintln!` writes a formatted line
/// piece by piece (stderr is unbuffered), so a supervisor or script tailing the log could
/// read "ludus listening on http://127.0.0.1:" before the port arrives.
fn announce(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Distributor websocket URL, e.g. ws://127.0.0.1:8080/ws/node; several servers of one
    /// network separated by commas (the node moves to the next when its server goes away).
    #[arg(long)]
    pub connect: String,
    /// Model file or directory (not needed with --fake-engine).
    #[arg(long, required_unless_present = "fake_engine")]
    pub model: Option<PathBuf>,
    /// Node key file (created on first use, mode 0600).
    #[arg(long, default_value = ".ludus/node.key")]
    pub key: PathBuf,
    /// Only join a distributor whose key has this address (printed by `ludus serve`).
    #[arg(long)]
    pub distributor_address: Option<crate::crypto::identity::Address>,
    /// Sequences to run at once (default: the engine's max_batch).
    #[arg(long, default_value_t = 0)]
    pub capacity: usize,
    /// Local log of signed receipts kept until the registry confirms them
    /// (default: the key file's path + `.receipts`).
    #[arg(long)]
    pub receipts: Option<PathBuf>,
    /// TEST DOUBLE for load tests: emit TOKENS tokens (MS_PER_TOKEN apart) without a model.
    #[arg(long, value_name = "TOKENS[:MS_PER_TOKEN]")]
    pub fake_engine: Option<FakeSpec>,
    /// Model name the fake engine announces.
    #[arg(long, default_value = "fake", requires = "fake_engine")]
    pub fake_model_name: String,
    /// Text of each fake token.
    #[arg(long, default_value = " tok", requires = "fake_engine")]
    pub fake_text: String,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Builds the backend a node runs on.
pub fn node_backend(settings: &Settings, args: &NodeArgs) -> anyhow::Result<Backend> {
    Ok(match (&args.fake_engine, &args.model) {
        (Some(spec), _) => {
            tracing::warn!("running the FAKE engine: tokens are not produced by a model");
            Backend::Fake(FakeSpec {
                model: args.fake_model_name.clone(),
                text: args.fake_text.clone(),
                ..spec.clone()
            })
        }
        (None, Some(model)) => Backend::Engine(args.runtime.start_engine(settings, model, None)?),
        (None, None) => anyhow::bail!("give --model PATH (or --fake-engine for load tests)"),
    })
}

pub fn node(settings: Settings, args: NodeArgs) -> anyhow::Result<()> {
    let bundle =
        args.model.as_deref().filter(|p| args.fake_engine.is_none() && crate::inference::protect::is_bundle(p));
    let model = match bundle {
        Some(path) => {
            // The key arrives inside the sealed session; the model loads in memory then.
            let manifest = crate::inference::protect::read_manifest(path)?;
            let capacity = settings.engine.max_batch;
            let (settings, runtime, path) = (settings.clone(), args.runtime.clone(), path.to_path_buf());
            NodeModel::Bundle {
                name: manifest.name,
                key_id: manifest.key_id,
                capacity,
                load: Arc::new(move |key| {
                    Ok(Backend::Engine(runtime.start_engine_with_key(&settings, &path, None, Some(key))?))
                }),
            }
        }
        None => NodeModel::Ready(Arc::new(node_backend(&settings, &args)?)),
    };
    let options = NodeOptions {
        connect: args.connect.clone(),
        key: args.key.clone(),
        capacity: args.capacity,
        distributor_address: args.distributor_address,
        receipts: args.receipts.clone(),
    };
    actix_web::rt::System::new().block_on(async move {
        tokio::select! {
            result = run_node(model, options) => result,
            _ = shutdown_signal() => Ok(()),
        }
    })
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Local compute nodes to start.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// The model the demo's nodes serve.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Serve plus N local nodes on loopback, with a demo key; runs until Ctrl-C.
pub fn demo(mut settings: Settings, args: DemoArgs) -> anyhow::Result<()> {
    let demo_dir = PathBuf::from(".ludus/demo");
    settings.server.data_dir = demo_dir.join("data");
    std::fs::create_dir_all(&settings.server.data_dir)?;
    let model_name = crate::inference::model::model_name(&args.model);
    // The server counts the demo model's prompts and makes its text, and holds it as the
    // verifier's reference: the proof of inference is on from the first request.
    settings.distributor.model_files.entry(model_name.clone()).or_insert_with(|| args.model.clone());
    settings.verifier.models.entry(model_name.clone()).or_insert_with(|| args.model.clone());
    // The demo's chain: anvil on loopback, its state kept next to the demo's database.
    let anvil = crate::chain::anvil::Anvil::start_with_state(Some(1), Some(&demo_dir.join("anvil-state.json")))?;
    actix_web::rt::System::new().block_on(async move {
        let deployment = demo_chain(&mut settings, &anvil, &demo_dir).await?;
        let (handle, server) = crate::serve::start(&settings).await?;
        let server = actix_web::rt::spawn(server);
        let key_file = demo_dir.join("api-key");
        let key = demo_game_key(&handle.store, &key_file).await?;
        fund_demo_game(&handle.store, &key, &anvil, &deployment).await?;
        start_demo_nodes(&settings, &args, &handle, &demo_dir)?;
        println!("Ludus demo: http://{} with {} node(s) serving `{model_name}`", handle.addr, args.nodes);
        println!("API key (also in {}): {key}", key_file.display());
        println!();
        println!("curl http://{}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\", handle.addr);
        println!("  -d '{{\"model\": \"{model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Greet the traveller as a grumpy blacksmith.\"}}]}}'");
        println!();
        println!(
            "Settlement: anvil at {}, contract {:#x}, an epoch every {} s (GET /admin/epochs with the token in {}).",
            anvil.url,
            deployment.settlement,
            settings.clock.epoch_time_s,
            settings.server.data_dir.join("admin-token").display()
        );
        // A funded anvil account to pay claims' gas with (the node keys hold no ether).
        let gas_key = demo_dir.join("gas.key");
        std::fs::write(&gas_key, format!("{}\n", hex::encode(anvil.keys[8].to_bytes())))?;
        println!(
            "Claim a node's earnings after an epoch: ludus claim --key {} --server http://{} --gas-key {}",
            demo_dir.join("node-0.key").display(),
            handle.addr,
            gas_key.display()
        );
        println!("Ctrl-C to stop.");
        shutdown_signal().await;
        handle.shutdown().await;
        server.await??;
        Ok(())
    })
}

/// The demo game's key: the one saved in `key_file` while the private database still
/// knows it (the demo survives restarts), else a new game's.
async fn demo_game_key(store: &Store, key_file: &std::path::Path) -> anyhow::Result<String> {
    let saved = std::fs::read_to_string(key_file).ok().map(|k| k.trim().to_string()).filter(|k| !k.is_empty());
    if let Some(k) = saved {
        if store.lookup_key(&crate::ledger::hash_key(&k)).await?.is_some() {
            return Ok(k);
        }
    }
    let name = format!("demo-{}", std::process::id());
    let (_, k) = store.add_game(&name, 100_000, 100_000_000).await?;
    std::fs::write(key_file, format!("{k}\n"))?;
    Ok(k)
}

/// The demo game keeps its escrow at anvil's third account, topped up to 1,000 tokens
/// when under 100 (a fresh chain starts it at zero).
async fn fund_demo_game(
    store: &Store,
    key: &str,
    anvil: &crate::chain::anvil::Anvil,
    deployment: &crate::chain::deploy::Deployment,
) -> anyhow::Result<()> {
    let game = anvil.keys[2].clone();
    if let Some(info) = store.lookup_key(&crate::ledger::hash_key(key)).await? {
        if let Err(e) = store.set_game_wallet(&info.game, &format!("{:#x}", game.address())).await {
            tracing::warn!(error = %e, "could not give the demo game its wallet");
        }
    }
    let escrow = crate::chain::deploy::available_escrow(&anvil.url, deployment.settlement, game.address()).await?;
    if escrow < crate::books::Units(100 * 10u128.pow(18)) {
        let amount = crate::books::Units(1_000 * 10u128.pow(18));
        crate::chain::deploy::mint_and_deposit(&anvil.url, deployment, anvil.keys[0].clone(), game, amount).await?;
    }
    Ok(())
}

/// The demo's `--nodes` compute nodes, each on its own thread, pinned to this server.
fn start_demo_nodes(
    settings: &Settings,
    args: &DemoArgs,
    handle: &crate::serve::ServerHandle,
    demo_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let url = format!("ws://{}/ws/node", handle.addr);
    for i in 0..args.nodes {
        let node_args = NodeArgs {
            connect: url.clone(),
            model: Some(args.model.clone()),
            key: demo_dir.join(format!("node-{i}.key")),
            capacity: 0,
            distributor_address: None,
            receipts: None,
            fake_engine: None,
            fake_model_name: String::new(),
            fake_text: String::new(),
            runtime: args.runtime.clone(),
        };
        // Loading may tune the engine, which waits on it: that must not happen on a thread
        // that drives the server's runtime (it panicked there on a machine's first demo).
        let backend = std::thread::scope(|s| s.spawn(|| node_backend(settings, &node_args)).join())
            .map_err(|_| anyhow::anyhow!("loading demo node {i}'s model panicked"))??;
        let backend = Arc::new(backend);
        let options = NodeOptions {
            connect: node_args.connect,
            key: node_args.key,
            capacity: 0,
            distributor_address: Some(handle.distributor_address),
            receipts: None,
        };
        std::thread::Builder::new().name(format!("demo-node-{i}")).spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                if let Err(e) = run_node(backend, options).await {
                    tracing::error!(error = %e, "demo node stopped");
                }
            })
        })?;
    }
    Ok(())
}

/// The demo's settlement: deploys the contract and test token on the demo's anvil (once;
/// kept in `demo_dir/deployment.json` while the chain state lasts), makes the server's
/// identity the operator with gas money, and points `settings` at it.
async fn demo_chain(
    settings: &mut Settings,
    anvil: &crate::chain::anvil::Anvil,
    demo_dir: &std::path::Path,
) -> anyhow::Result<crate::chain::deploy::Deployment> {
    use crate::chain::deploy::{deploy, has_code, send_native, DeployPlan, Deployment};
    let saved_at = demo_dir.join("deployment.json");
    let saved: Option<Deployment> = std::fs::read_to_string(&saved_at).ok().and_then(|t| serde_json::from_str(&t).ok());
    let deployment = match saved {
        Some(d) if has_code(&anvil.url, d.settlement).await? => d,
        _ => {
            let key_file =
                settings.server.key_file.clone().unwrap_or_else(|| settings.server.data_dir.join("distributor.key"));
            let operator = crate::crypto::identity::Identity::load_or_create(&key_file)?;
            let operator = crate::chain::signer_of(&operator).address();
            let deployer = anvil.keys[0].clone();
            let plan = DeployPlan { token: None, operator, treasury: operator, withdrawal_delay_s: 300 };
            let d = deploy(&anvil.url, deployer.clone(), &plan).await?;
            send_native(&anvil.url, deployer, operator, alloy::primitives::U256::from(10u128.pow(20))).await?;
            std::fs::write(&saved_at, serde_json::to_string_pretty(&d)?)?;
            d
        }
    };
    settings.settlement.rpc_url = crate::settings::Secret(anvil.url.clone());
    // The demo's chain is a local anvil: no secret in its URL, so nodes are told it.
    settings.settlement.public_rpc_url = anvil.url.clone();
    settings.settlement.contract = format!("{:#x}", deployment.settlement);
    settings.settlement.confirmations = 1;
    settings.settlement.retry_s = 2.0;
    settings.settlement.poll_ms = 500;
    settings.settlement.escrow_check_blocks = 5;
    settings.settlement.anchor_interval_s = 10.0;
    settings.settlement.anchor_confirm_wait_s = 10.0;
    if settings.clock.epoch_time_s >= 86_400 {
        settings.clock.epoch_time_s = 60;
    }
    Ok(deployment)
}
