//! `ludus serve`, `ludus node`, `ludus games add` and `ludus demo`: starting the network's
//! processes from the command line.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::RuntimeArgs;
use crate::http::server::{open_store, shutdown_signal};
use crate::http::start_server;
use crate::ledger::Store;
use crate::node::{run_node, Backend, FakeSpec, NodeModel, NodeOptions};
use crate::settings::Settings;

/// Runs the server until SIGINT/SIGTERM, then shuts down gracefully.
pub fn serve(settings: Settings) -> anyhow::Result<()> {
    actix_web::rt::System::new().block_on(async move {
        let (handle, server) = start_server(&settings).await?;
        tracing::info!(addr = %handle.addr, "serving");
        eprintln!("ludus listening on http://{}", handle.addr);
        eprintln!("distributor address {} (nodes may pin it with --distributor-address)", handle.distributor_address);
        let server = actix_web::rt::spawn(server);
        shutdown_signal().await;
        tracing::info!(grace_s = handle.grace.as_secs(), "shutting down: draining running jobs");
        handle.shutdown().await;
        server.await??;
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Distributor websocket URL, e.g. ws://127.0.0.1:8080/ws/node
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
    let bundle = args.model.as_deref().filter(|p| args.fake_engine.is_none() && crate::crypto::protect::is_bundle(p));
    let model = match bundle {
        Some(path) => {
            // The key arrives inside the sealed session; the model loads in memory then.
            let manifest = crate::crypto::protect::read_manifest(path)?;
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
pub struct GamesAddArgs {
    /// The game's name (letters, digits, '-' and '_').
    pub name: String,
    /// Requests per minute allowed for the key (default: [games] in the config).
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute allowed for the key.
    #[arg(long)]
    pub tpm: Option<u32>,
}

/// Runs `f` against the registry database (the private cluster is stopped afterwards
/// if this command had to start it).
fn with_store<T>(settings: &Settings, f: impl AsyncFnOnce(Store) -> anyhow::Result<T>) -> anyhow::Result<T> {
    actix_web::rt::System::new().block_on(async move {
        let (store, cluster) = open_store(settings).await?;
        let result = f(store).await;
        if let Some(cluster) = cluster.filter(|c| c.started_here) {
            cluster.stop()?;
        }
        result
    })
}

pub fn games_add(settings: &Settings, args: GamesAddArgs) -> anyhow::Result<()> {
    let rpm = args.rpm.unwrap_or(settings.games.requests_per_minute);
    let tpm = args.tpm.unwrap_or(settings.games.tokens_per_minute);
    let (id, key) = with_store(settings, async |store| Ok(store.add_game(&args.name, rpm, tpm).await?))?;
    eprintln!("created game `{}` (id {id}); its API key (shown once, stored hashed):", args.name);
    println!("{key}");
    Ok(())
}

pub fn games_list(settings: &Settings) -> anyhow::Result<()> {
    let games = with_store(settings, async |store| Ok(store.list_games().await?))?;
    println!("{}", serde_json::to_string_pretty(&games)?);
    Ok(())
}

/// `ludus games suspend NAME --reason …` and `ludus games resume NAME`.
pub fn games_set_status(settings: &Settings, name: &str, suspend: Option<&str>) -> anyhow::Result<()> {
    let status = if suspend.is_some() { "suspended" } else { "active" };
    with_store(settings, async |store| Ok(store.set_game_status(name, status, suspend).await?))?;
    eprintln!("game `{name}` is now {status} (keys take it up within seconds)");
    Ok(())
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Local compute nodes to start.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
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
    let key_file = demo_dir.join("api-key");
    let model_name = crate::inference::model::model_name(&args.model);
    actix_web::rt::System::new().block_on(async move {
        let (handle, server) = start_server(&settings).await?;
        let server = actix_web::rt::spawn(server);
        // The demo game's key survives restarts (the private database keeps the game).
        let saved = std::fs::read_to_string(&key_file).ok().map(|k| k.trim().to_string()).filter(|k| !k.is_empty());
        let known = match &saved {
            Some(k) => handle.store.lookup_key(&crate::ledger::hash_key(k)).await?.is_some(),
            None => false,
        };
        let key = match saved {
            Some(k) if known => k,
            _ => {
                let name = format!("demo-{}", std::process::id());
                let (_, k) = handle.store.add_game(&name, 100_000, 100_000_000).await?;
                std::fs::write(&key_file, format!("{k}\n"))?;
                k
            }
        };
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
            let backend = Arc::new(node_backend(&settings, &node_args)?);
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
        println!("Ludus demo: http://{} with {} node(s) serving `{model_name}`", handle.addr, args.nodes);
        println!("API key (also in {}): {key}", key_file.display());
        println!();
        println!("curl http://{}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\", handle.addr);
        println!("  -d '{{\"model\": \"{model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Greet the traveller as a grumpy blacksmith.\"}}]}}'");
        println!();
        println!("Ctrl-C to stop.");
        shutdown_signal().await;
        handle.shutdown().await;
        server.await??;
        Ok(())
    })
}
