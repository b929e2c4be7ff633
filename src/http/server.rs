//! Starting `ludus serve`: the supervised actors, the HTTP server, and graceful shutdown
//! (stop accepting, let running jobs finish within the grace period, fail queued ones).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::{web, App, HttpServer};

use super::openai::RequestLimits;
use super::routes;
use crate::actors::clock::{SubscribeBlocks, SubscribeEpochs};
use crate::actors::completion::{Completion, CompletionConfig};
use crate::actors::distributor::DistributorConfig;
use crate::actors::messages::{Drain, FlushReceipts};
use crate::actors::node_proxy::NodeProxyConfig;
use crate::actors::settler::{Settler, SettlerConfig};
use crate::actors::supervisor;
use crate::actors::{Clock, Distributor, Gateway, Registry, Settlement};
use crate::crypto::identity::{Address, Identity};
use crate::ledger::cluster::PrivateCluster;
use crate::ledger::Store;
use crate::settings::Settings;

/// How long a graceful shutdown waits for the last receipts to be committed.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared by every HTTP worker.
pub struct AppState {
    pub clock: Addr<Clock>,
    pub gateway: Addr<Gateway>,
    pub distributor: Addr<Distributor>,
    pub request_limits: RequestLimits,
    pub max_body_bytes: usize,
    /// Time a request body may take to arrive, from the end of its head.
    pub body_timeout: Duration,
    pub proxy_config: NodeProxyConfig,
    pub store: Store,
    /// SHA-256 (hex) of the admin token.
    pub admin_token_hash: String,
    /// Settlement, when `[settlement] rpc_url` is set.
    pub settlement: Option<SettlementInfo>,
    /// Failed key checks per client IP.
    pub auth_throttle: super::auth_throttle::AuthThrottle,
    /// Whose forwarding headers name the client (for that throttle).
    pub trusted_proxies: super::client_addr::TrustedProxies,
    /// Fault injection for resilience drills (`server.chaos`).
    pub chaos: bool,
    /// Request counts and latencies for `/metrics`.
    pub http_metrics: super::metrics::HttpMetrics,
    /// Samples of the API counters for the dashboard's charts.
    pub traffic: super::dashboard::TrafficHistory,
    pub registry: Addr<Registry>,
    /// Tokenizers of the models the server accounts for (prompt counts, the games' text).
    pub catalog: Arc<crate::actors::catalog::Catalog>,
}

/// What the HTTP layer knows of settlement.
pub struct SettlementInfo {
    pub actor: Addr<Settlement>,
    /// `0x…`
    pub contract: String,
    /// The RPC URL nodes claim through (`[settlement] public_rpc_url`), if published.
    pub rpc_url: Option<String>,
}

/// A running server.
pub struct ServerHandle {
    pub addr: SocketAddr,
    /// The distributor's identity address (nodes may pin it).
    pub distributor_address: Address,
    pub http: actix_web::dev::ServerHandle,
    pub distributor: Addr<Distributor>,
    pub registry: Addr<Registry>,
    pub store: Store,
    pub grace: Duration,
    /// The private Postgres cluster, when no database URL was configured.
    pub cluster: Option<PrivateCluster>,
}

impl ServerHandle {
    /// Graceful stop: drain the distributor, let HTTP finish within the grace period,
    /// commit the last receipts, and stop the private database if this process started it.
    pub async fn shutdown(&self) {
        let _ = self.distributor.send(Drain).await;
        self.http.stop(true).await;
        let deadline = std::time::Instant::now() + FLUSH_TIMEOUT;
        loop {
            match self.registry.send(FlushReceipts).await {
                Ok((0, false)) | Err(_) => break,
                Ok((buffered, _)) if std::time::Instant::now() > deadline => {
                    tracing::warn!(buffered, "receipts not committed at shutdown; the nodes still hold them");
                    break;
                }
                Ok(_) => actix_web::rt::time::sleep(Duration::from_millis(50)).await,
            }
        }
        if let Some(cluster) = self.cluster.as_ref().filter(|c| c.started_here) {
            if let Err(e) = cluster.stop() {
                tracing::warn!(error = %e, "could not stop the private Postgres cluster");
            }
        }
    }
}

/// The registry database: the configured URL, or the data directory's private cluster.
pub async fn open_store(settings: &Settings) -> std::io::Result<(Store, Option<PrivateCluster>)> {
    let (url, cluster) = if settings.database.url.is_empty() {
        let data_dir = settings.server.data_dir.clone();
        let (cluster, url) = actix_web::rt::task::spawn_blocking(move || PrivateCluster::for_data_dir(&data_dir))
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        (url, Some(cluster))
    } else {
        (settings.database.url.expose().to_string(), None)
    };
    let store = Store::open(&url, settings.database.pool_size)
        .await
        .map_err(|e| std::io::Error::other(format!("registry database: {e}")))?;
    Ok((store, cluster))
}

/// The admin token's hash: from the config, else `data_dir/admin-token` (created, 0600).
fn admin_token_hash(settings: &Settings) -> std::io::Result<String> {
    if !settings.server.admin_token.is_empty() {
        return Ok(crate::ledger::hash_key(settings.server.admin_token.expose()));
    }
    let path = settings.server.data_dir.join("admin-token");
    let token = match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let token = format!("ludus-admin-{}", hex::encode(rand::random::<[u8; 24]>()));
            std::fs::create_dir_all(&settings.server.data_dir)?;
            let mut options = std::fs::OpenOptions::new();
            std::os::unix::fs::OpenOptionsExt::mode(options.write(true).create(true).truncate(true), 0o600);
            std::io::Write::write_all(&mut options.open(&path)?, format!("{token}\n").as_bytes())?;
            tracing::info!(path = %path.display(), "created the admin token");
            token
        }
    };
    Ok(crate::ledger::hash_key(&token))
}

/// The text sides of the models this server accounts for: `[distributor] model_files` and
/// the verifier's reference models.
fn load_catalog(s: &Settings) -> std::io::Result<crate::actors::catalog::Catalog> {
    let mut files = s.verifier.models.clone();
    files.extend(s.distributor.model_files.clone());
    let catalog = crate::actors::catalog::Catalog::load(&files).map_err(std::io::Error::other)?;
    tracing::info!(models = ?catalog.names(), "the server counts prompt tokens and makes the text of these models itself");
    Ok(catalog)
}

/// Starts the actors and the HTTP server inside the current actix System. The returned
/// future runs the server until it stops.
pub async fn start_server(settings: &Settings) -> std::io::Result<(ServerHandle, actix_web::dev::Server)> {
    let s = settings.clone();
    let (store, cluster) = open_store(&s).await?;
    let ticket_secret = Arc::new(store.shared_secret("ticket_mac").await.map_err(std::io::Error::other)?);
    let config = DistributorConfig {
        queue_capacity: s.distributor.queue_capacity,
        queue_timeout: Duration::from_millis(s.distributor.queue_timeout_ms),
        max_attempts: s.distributor.max_attempts,
        catalog: s.distributor.models.clone(),
        quarantine: Duration::from_secs(s.verifier.quarantine_s),
    };
    let distributor = supervisor::start("distributor", move |_| Distributor::new(config));
    let clock = {
        let (block, epoch) = (Duration::from_millis(s.clock.block_time_ms), Duration::from_secs(s.clock.epoch_time_s));
        supervisor::start("clock", move |_| Clock::new(block, epoch))
    };
    clock.do_send(SubscribeBlocks(distributor.clone().recipient()));
    let gateway = {
        let (store, distributor) = (store.clone(), distributor.clone());
        supervisor::start("gateway", move |_| Gateway::new(store, distributor))
    };
    let key_file = s.server.key_file.clone().unwrap_or_else(|| s.server.data_dir.join("distributor.key"));
    let identity = Arc::new(Identity::load_or_create(&key_file).map_err(std::io::Error::other)?);
    let policy = Arc::new(crate::proof::policy::Policy::new(s.verifier.first_tasks, s.verifier.sample_rate));
    let completions =
        Arc::new(crate::actors::completion_log::CompletionLog::open(&s.server.data_dir.join("completions.log"))?);
    let registry = {
        let (store, server, max) = (store.clone(), identity.address.to_string(), s.registry.max_buffered_receipts);
        let (policy, floor) = (policy.clone(), s.verifier.suspect_below);
        let (completions, quarantine) = (completions.clone(), distributor.clone().recipient());
        supervisor::start("registry", move |_| {
            Registry::new(store, server, max)
                .with_policy(policy, floor)
                .with_completion_log(completions)
                .with_quarantine(quarantine.clone())
        })
    };
    clock.do_send(SubscribeBlocks(registry.clone().recipient()));
    let settlement = start_settlement(&s, &store, &clock, &identity)?;
    tracing::info!(address = %identity.address, key = %key_file.display(), "distributor identity (nodes may pin it)");
    let mut banned = HashSet::new();
    for a in &s.distributor.banned_nodes {
        banned
            .insert(a.parse::<Address>().map_err(|e| std::io::Error::other(format!("distributor.banned_nodes: {e}")))?);
    }
    let banned = Arc::new(banned);
    let distributor_address = identity.address;
    let (model_keys, key_names) = load_model_keys(&s.server.data_dir.join("model-keys"))?;
    let model_keys = Arc::new(model_keys);
    let bundle_nodes = Arc::new(bundle_nodes(&s.distributor.bundle_nodes, &key_names)?);
    let quality_game = store.internal_game("ludus-quality-checks").await.map_err(std::io::Error::other)?;
    let verification = start_verifiers(&s, &model_keys, policy, &registry, &distributor, quality_game).await?;
    let catalog = Arc::new(load_catalog(&s)?);
    let completion = Completion::start_on_own_thread(CompletionConfig {
        ticket_secret: ticket_secret.clone(),
        prices: Arc::new(s.prices.table()),
        registry: registry.clone(),
        distributor: distributor.clone(),
        verification: verification.clone(),
        usage: gateway.clone().recipient(),
        completions,
    });
    let state = web::Data::new(AppState {
        clock,
        gateway: gateway.clone(),
        distributor: distributor.clone(),
        request_limits: RequestLimits {
            default_max_tokens: s.server.default_max_tokens,
            max_tokens_limit: s.server.max_tokens_limit,
        },
        max_body_bytes: s.server.max_body_bytes,
        body_timeout: Duration::from_millis(s.server.client_body_timeout_ms),
        proxy_config: NodeProxyConfig {
            heartbeat_interval: Duration::from_millis(s.distributor.heartbeat_interval_ms),
            node_timeout: Duration::from_millis(s.distributor.node_timeout_ms),
            identity,
            banned,
            model_keys,
            bundle_nodes,
            ticket_secret,
            registry: registry.clone(),
            completion,
            verification,
            max_frames_per_s: s.distributor.max_node_frames_per_s,
            max_queued_bytes: s.distributor.max_node_queue_bytes,
            sessions: Default::default(),
        },
        store: store.clone(),
        admin_token_hash: admin_token_hash(&s)?,
        settlement,
        auth_throttle: super::auth_throttle::AuthThrottle::new(s.server.failed_auth_per_minute),
        trusted_proxies: super::client_addr::TrustedProxies::parse(&s.server.trusted_proxies)
            .map_err(std::io::Error::other)?,
        chaos: s.server.chaos,
        registry: registry.clone(),
        catalog,
        http_metrics: Default::default(),
        traffic: Default::default(),
    });
    super::dashboard::sample_traffic(state.clone().into_inner());
    let grace = Duration::from_secs(s.server.shutdown_grace_s);
    let mut server = HttpServer::new(move || {
        let metrics = state.clone();
        App::new()
            .app_data(state.clone())
            .wrap_fn(move |req, srv| {
                use actix_web::dev::Service as _;
                let (metrics, started) = (metrics.clone(), std::time::Instant::now());
                let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
                let call = srv.call(req);
                async move {
                    let res = call.await?;
                    metrics.http_metrics.observe(&route, res.status().as_u16(), started.elapsed());
                    Ok(res)
                }
            })
            .configure(routes::configure)
    })
    // Tokens are small writes: without TCP_NODELAY, Nagle + delayed ACKs hold them ~40 ms.
    .on_connect(|conn, _| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            let _ = tcp.set_nodelay(true);
        }
    })
    .disable_signals()
    // Slow-loris: a client must deliver its request head within this time.
    .client_request_timeout(Duration::from_millis(s.server.client_request_timeout_ms))
    .shutdown_timeout(grace.as_secs())
    .backlog(4096)
    .max_connections(50_000);
    if s.server.workers > 0 {
        server = server.workers(s.server.workers);
    }
    let server = server.bind(&s.server.bind)?;
    let addr = *server.addrs().first().ok_or_else(|| std::io::Error::other("the server bound no address"))?;
    let server = server.run();
    let handle =
        ServerHandle { addr, distributor_address, http: server.handle(), distributor, registry, store, grace, cluster };
    Ok((handle, server))
}

/// Starts Settlement when `[settlement] rpc_url` is set. The chain is reached lazily (an
/// RPC outage at start only delays settlement); a bad contract address or key file stops
/// the start with the reason.
fn start_settlement(
    s: &Settings,
    store: &Store,
    clock: &Addr<Clock>,
    identity: &Identity,
) -> std::io::Result<Option<SettlementInfo>> {
    let cfg = &s.settlement;
    if !cfg.enabled() {
        tracing::info!("settlement off ([settlement] rpc_url is empty)");
        return Ok(None);
    }
    let contract = crate::chain::parse_address("settlement.contract", &cfg.contract).map_err(std::io::Error::other)?;
    let signer = match &cfg.operator_key {
        Some(path) => crate::chain::signer_of(
            &Identity::load(path).map_err(|e| std::io::Error::other(format!("settlement.operator_key: {e}")))?,
        ),
        None => crate::chain::signer_of(identity),
    };
    if cfg.node_share_bps > crate::ledger::epochs::BPS {
        return Err(std::io::Error::other("settlement.node_share_bps must be at most 10000"));
    }
    let operator = signer.address();
    let config = SettlerConfig {
        rpc_url: cfg.rpc_url.expose().to_string(),
        contract,
        node_share_bps: cfg.node_share_bps,
        confirmations: cfg.confirmations.max(1),
        epoch_time: Duration::from_secs(s.clock.epoch_time_s.max(1)),
        anchor_interval: Duration::from_secs_f64(cfg.anchor_interval_s.max(0.1)),
        anchor_confirm_wait: Duration::from_secs_f64(cfg.anchor_confirm_wait_s.max(0.0)),
    };
    let settler = Arc::new(Settler::new(store.clone(), config, signer));
    let (retry, poll, every) = (
        Duration::from_secs_f64(cfg.retry_s.max(0.05)),
        Duration::from_millis(cfg.poll_ms.max(10)),
        cfg.escrow_check_blocks,
    );
    let anchor_every = Duration::from_secs_f64(cfg.anchor_interval_s.max(0.1));
    let actor =
        supervisor::start("settlement", move |_| Settlement::new(settler, retry, poll, every).anchoring(anchor_every));
    clock.do_send(SubscribeEpochs(actor.clone().recipient()));
    clock.do_send(SubscribeBlocks(actor.clone().recipient()));
    tracing::info!(contract = %format!("{contract:#x}"), operator = %format!("{operator:#x}"), rpc = %crate::chain::redacted_url(cfg.rpc_url.expose()), "settlement on");
    // The operator's RPC URL often holds a provider key: only the public one is served.
    let rpc_url = Some(cfg.public_rpc_url.clone()).filter(|u| !u.trim().is_empty());
    Ok(Some(SettlementInfo { actor, contract: format!("{contract:#x}"), rpc_url }))
}

/// Starts the verifier pool when reference models are configured (each thread loads its
/// own copies; a model that fails to load stops the server with the reason). Models load
/// on blocking threads, never on the event loop.
async fn start_verifiers(
    s: &Settings,
    keys: &Arc<std::collections::BTreeMap<String, String>>,
    policy: Arc<crate::proof::policy::Policy>,
    registry: &Addr<Registry>,
    distributor: &Addr<Distributor>,
    quality_game: i64,
) -> std::io::Result<Option<crate::actors::completion::Verification>> {
    if s.verifier.models.is_empty() {
        return Ok(None);
    }
    // Load once here so a bad path fails the start with a clear error, not a thread panic.
    let (refs, tol, dir) =
        (s.verifier.models.clone(), s.verifier.tolerances(), s.server.data_dir.join("proofs/rejected"));
    let first = {
        let (refs, keys, dir) = (refs.clone(), keys.clone(), dir.clone());
        tokio::task::spawn_blocking(move || crate::actors::verifier::Verifier::load(&refs, &keys, tol, dir))
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?
    };
    let vocab = Arc::new(first.vocab_sizes());
    let first = std::sync::Mutex::new(Some(first));
    let keys = keys.clone();
    let pool = actix::SyncArbiter::start(s.verifier.pool_size.max(1), move || {
        first.lock().ok().and_then(|mut f| f.take()).unwrap_or_else(|| {
            crate::actors::verifier::Verifier::load(&refs, &keys, tol, dir.clone())
                .expect("reference models loaded once already")
        })
    });
    tracing::info!(models = ?s.verifier.models.keys().collect::<Vec<_>>(), pool = s.verifier.pool_size, "verifier pool started");
    Ok(Some(crate::actors::completion::Verification {
        models: Arc::new(s.verifier.models.keys().cloned().collect()),
        vocab,
        policy,
        pool,
        report: vec![registry.clone().recipient(), distributor.clone().recipient()],
        synchronous: s.verifier.synchronous,
        quality_check_rate: s.verifier.quality_check_rate,
        quality_game,
    }))
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Reads the distributor's model key store: every `*.key` file (hex, 32 bytes) in `dir`,
/// indexed by key id. A missing directory is an empty store.
/// Key id → hex key, and key id → the file's name (without `.key`).
type ModelKeys = (std::collections::BTreeMap<String, String>, std::collections::BTreeMap<String, String>);

fn load_model_keys(dir: &std::path::Path) -> std::io::Result<ModelKeys> {
    let (mut keys, mut names) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok((keys, names)) };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "key") {
            continue;
        }
        let key = crate::inference::protect::read_key_file(&path).map_err(|e| std::io::Error::other(e.to_string()))?;
        let id = crate::inference::protect::key_id(&key);
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        keys.insert(id.clone(), hex::encode(key));
        names.insert(id, name);
    }
    tracing::info!(keys = keys.len(), dir = %dir.display(), "model key store loaded");
    Ok((keys, names))
}

/// `[distributor] bundle_nodes` by key id: a name without a key file, or an address that is
/// not one, stops the start with the reason.
fn bundle_nodes(
    config: &std::collections::BTreeMap<String, Vec<String>>,
    names: &std::collections::BTreeMap<String, String>,
) -> std::io::Result<std::collections::HashMap<String, (String, HashSet<Address>)>> {
    let mut out = std::collections::HashMap::new();
    for (id, name) in names {
        out.insert(id.clone(), (name.clone(), HashSet::new()));
    }
    for (name, nodes) in config {
        let Some(id) = names.iter().find(|(_, n)| *n == name).map(|(id, _)| id) else {
            return Err(std::io::Error::other(format!(
                "distributor.bundle_nodes: no key file `{name}.key` in data_dir/model-keys"
            )));
        };
        for node in nodes {
            let address = node.parse::<Address>().map_err(|e| {
                std::io::Error::other(format!("distributor.bundle_nodes.{name}: `{node}` is not a node address: {e}"))
            })?;
            out.get_mut(id).expect("every key id is in the table").1.insert(address);
        }
    }
    Ok(out)
}
