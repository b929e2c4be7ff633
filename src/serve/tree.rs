//! The actor tree of `ludus serve`, and who feeds whom: the Clock ticks the Distributor,
//! the Registry and Settlement; the Gateway admits into the Distributor; Completion (on
//! its own thread) hands finished jobs to the Registry and, through the policy, to the
//! verifier pool (or, when it is full, to the check backlog, which feeds the pool later),
//! whose verdicts reach the Registry and the Distributor. Every actor but the verifier
//! pool and Completion runs under the supervisor, which restarts it.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use actix::{Addr, Recipient};

use crate::actors::catalog::Catalog;
use crate::actors::check_backlog::{BacklogConfig, CheckBacklog, Replay};
use crate::actors::check_log::{CheckLog, OwedCheck};
use crate::actors::clock::{SubscribeBlocks, SubscribeEpochs};
use crate::actors::cluster::write_offs::WriteOffs;
use crate::actors::cluster::{wire, Cluster, ClusterConfig, Peers, ServerParts};
use crate::actors::completion::{Completion, CompletionConfig, Verification};
use crate::actors::completion_log::CompletionLog;
use crate::actors::distributor::DistributorConfig;
use crate::actors::messages::{RecordUsage, VerificationDone};
use crate::actors::sessions::Sessions;
use crate::actors::settler::{Settler, SettlerConfig};
use crate::actors::supervisor;
use crate::actors::verifier::Verifier;
use crate::actors::{Clock, Distributor, Gateway, Registry, Settlement};
use crate::crypto::identity::Identity;
use crate::http::server::SettlementInfo;
use crate::ledger::Store;
use crate::proof::policy::Policy;
use crate::settings::Settings;

/// The supervised actors every server runs.
pub struct Core {
    pub distributor: Addr<Distributor>,
    pub clock: Addr<Clock>,
    pub gateway: Addr<Gateway>,
    pub registry: Addr<Registry>,
    /// Which finished tasks get checked (shared by the Registry and Completion).
    pub policy: Arc<Policy>,
    /// Answers held for their verdict, kept across a crash.
    pub completions: Arc<CompletionLog>,
    /// Sampled tasks' checks, kept across a crash until their verdict is in the ledger.
    pub checks: Arc<CheckLog>,
    /// The checks owed from before this start, for the check backlog to take.
    pub owed_checks: std::sync::Mutex<Vec<OwedCheck>>,
    /// The other servers of the network (stays empty without `[cluster] nats_url`).
    pub peers: Arc<Peers>,
    /// The live session of each node key (one key, one session, network-wide).
    pub sessions: Arc<Sessions>,
}

/// Starts the Distributor, the Clock, the Gateway and the Registry, wired together.
pub fn start_core(s: &Settings, store: &Store, identity: &Identity) -> io::Result<Core> {
    let config = DistributorConfig {
        queue_capacity: s.distributor.queue_capacity,
        queue_timeout: Duration::from_millis(s.distributor.queue_timeout_ms),
        max_attempts: s.distributor.max_attempts,
        catalog: s.distributor.models.clone(),
        quarantine: Duration::from_secs(s.verifier.quarantine_s),
        prefix_routing: s.distributor.prefix_routing,
    };
    let peers = Peers::new(Duration::from_millis(s.cluster.peer_timeout_ms.max(1)));
    let budgets: Arc<std::sync::OnceLock<Recipient<RecordUsage>>> = Arc::default();
    let distributor = {
        let (peers, budgets, store) = (peers.clone(), budgets.clone(), store.clone());
        supervisor::start("distributor", move |_| {
            Distributor::new(config.clone(), peers.clone()).charging(budgets.clone()).persisting(store.clone())
        })
    };
    let clock = {
        let (block, epoch) = (Duration::from_millis(s.clock.block_time_ms), Duration::from_secs(s.clock.epoch_time_s));
        supervisor::start("clock", move |_| Clock::new(block, epoch))
    };
    clock.do_send(SubscribeBlocks(distributor.clone().recipient()));
    let gateway = {
        let (store, distributor, peers) = (store.clone(), distributor.clone(), peers.clone());
        let unread_limit = super::inputs::stream_unread_limit(s)?;
        supervisor::start("gateway", move |_| Gateway::new(store, distributor, peers, unread_limit))
    };
    let _ = budgets.set(gateway.clone().recipient());
    let policy = Arc::new(Policy::new(s.verifier.first_tasks, s.verifier.sample_rate));
    let completions = Arc::new(CompletionLog::open(&s.server.data_dir.join("completions.log"))?);
    let (checks, owed_checks) = CheckLog::open(&s.server.data_dir.join("checks.log"))?;
    let checks = Arc::new(checks);
    let registry = {
        let (store, server, max) = (store.clone(), identity.address.to_string(), s.registry.max_buffered_receipts);
        let (policy, floor) = (policy.clone(), s.verifier.suspect_below);
        let (completions, quarantine) = (completions.clone(), distributor.clone().recipient());
        let checks = checks.clone();
        supervisor::start("registry", move |_| {
            Registry::new(store, server, max)
                .with_policy(policy, floor)
                .with_completion_log(completions)
                .with_check_log(checks)
                .with_quarantine(quarantine.clone())
        })
    };
    clock.do_send(SubscribeBlocks(registry.clone().recipient()));
    Ok(Core {
        distributor,
        clock,
        gateway,
        registry,
        policy,
        completions,
        checks,
        owed_checks: std::sync::Mutex::new(owed_checks),
        peers,
        sessions: Sessions::new(),
    })
}

/// Joins the network of servers when `[cluster] nats_url` is set: connects to NATS (in
/// the background: a NATS down at start only delays joining) and starts the Cluster actor.
pub async fn start_cluster(
    s: &Settings,
    core: &Core,
    catalog: Arc<Catalog>,
    write_offs: Arc<WriteOffs>,
    port: u16,
) -> io::Result<()> {
    if !s.cluster.enabled() {
        return Ok(());
    }
    let name = cluster_name(&s.cluster.name, port)?;
    let client = Cluster::connect(s.cluster.nats_url.expose(), &name, core.peers.clone(), core.sessions.clone())
        .await
        .map_err(io::Error::other)?;
    let config = ClusterConfig {
        name,
        advert_interval: Duration::from_millis(s.cluster.advert_interval_ms.max(50)),
        max_tokens_limit: s.server.max_tokens_limit,
    };
    let parts = ServerParts {
        peers: core.peers.clone(),
        distributor: core.distributor.clone(),
        catalog,
        completions: core.completions.clone(),
        usage: core.gateway.clone().recipient(),
        sessions: core.sessions.clone(),
        write_offs,
    };
    let cluster = supervisor::start("cluster", move |_| Cluster::new(client, config, parts));
    core.peers.join(cluster.clone().recipient());
    core.sessions.join(cluster.recipient());
    Ok(())
}

/// This server's name in the network: the configured one, or the host name and the HTTP
/// port (unique per machine); refused clearly when it cannot be a NATS subject token.
fn cluster_name(configured: &str, port: u16) -> io::Result<String> {
    let name = if configured.is_empty() {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let host: String =
            host.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        format!("{}-{port}", if host.is_empty() { "ludus" } else { &host })
    } else {
        configured.to_string()
    };
    if !wire::valid_name(&name) {
        return Err(io::Error::other(format!(
            "cluster.name `{name}`: use at most {} letters, digits, - and _",
            wire::MAX_NAME_LEN
        )));
    }
    Ok(name)
}

/// Starts Settlement when `[settlement] rpc_url` is set. The chain is reached lazily (an
/// RPC outage at start only delays settlement); a bad contract address or key file stops
/// the start with the reason.
pub fn start_settlement(
    s: &Settings,
    store: &Store,
    clock: &Addr<Clock>,
    identity: &Identity,
) -> io::Result<Option<SettlementInfo>> {
    let cfg = &s.settlement;
    if !cfg.enabled() {
        tracing::info!("settlement off ([settlement] rpc_url is empty)");
        return Ok(None);
    }
    let contract = crate::chain::parse_address("settlement.contract", &cfg.contract).map_err(io::Error::other)?;
    let signer = match &cfg.operator_key {
        Some(path) => crate::chain::signer_of(
            &Identity::load(path).map_err(|e| io::Error::other(format!("settlement.operator_key: {e}")))?,
        ),
        None => crate::chain::signer_of(identity),
    };
    if cfg.node_share_bps > crate::ledger::epochs::BPS {
        return Err(io::Error::other("settlement.node_share_bps must be at most 10000"));
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
        replace_after: Duration::from_secs_f64(cfg.replace_stuck_after_s.max(1.0)),
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
pub async fn start_verifiers(
    s: &Settings,
    core: &Core,
    store: &Store,
    keys: &Arc<std::collections::BTreeMap<String, String>>,
    quality_game: i64,
) -> io::Result<Option<Verification>> {
    // Answers of a model without a reference are paid on the node's word: say so, once.
    let unchecked: Vec<&String> = s
        .distributor
        .models
        .iter()
        .chain(s.distributor.model_files.keys())
        .filter(|m| !s.verifier.models.contains_key(*m))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if s.verifier.models.is_empty() {
        tracing::warn!("[verifier] models is empty: no answer is checked, every node is paid on its word");
    } else if !unchecked.is_empty() {
        tracing::warn!(models = ?unchecked, "models sold without a reference in [verifier] models: their answers are paid unchecked");
    }
    if s.verifier.models.is_empty() {
        let owed = core.owed_checks.lock().expect("owed checks lock").len();
        if owed > 0 {
            tracing::warn!(owed, "checks are owed from before this start, but [verifier] models is empty: they wait in the check log until a start with the reference models");
        }
        return Ok(None);
    }
    // Load once here so a bad path fails the start with a clear error, not a thread panic.
    let (refs, tol, dir) =
        (s.verifier.models.clone(), s.verifier.tolerances(), s.server.data_dir.join("proofs/rejected"));
    let first = {
        let (refs, keys, dir) = (refs.clone(), keys.clone(), dir.clone());
        tokio::task::spawn_blocking(move || Verifier::load(&refs, &keys, tol, dir))
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::other)?
    };
    let vocab = Arc::new(first.vocab_sizes());
    let first = std::sync::Mutex::new(Some(first));
    let keys = keys.clone();
    let pool = actix::SyncArbiter::start(s.verifier.pool_size.max(1), move || {
        first.lock().ok().and_then(|mut f| f.take()).unwrap_or_else(|| {
            Verifier::load(&refs, &keys, tol, dir.clone()).expect("reference models loaded once already")
        })
    });
    tracing::info!(models = ?s.verifier.models.keys().collect::<Vec<_>>(), pool = s.verifier.pool_size, "verifier pool started");
    let report: Vec<Recipient<VerificationDone>> =
        vec![core.registry.clone().recipient(), core.distributor.clone().recipient()];
    let backlog = CheckBacklog::new(BacklogConfig {
        store: store.clone(),
        pool: pool.clone(),
        report: report.clone(),
        delivered: core.registry.clone().recipient(),
        policy: core.policy.clone(),
        models: s.verifier.models.keys().cloned().collect(),
        max: s.verifier.backlog_max,
        poll: Duration::from_millis(s.verifier.backlog_poll_ms.max(10)),
        loops: s.verifier.pool_size,
        checks: core.checks.clone(),
        hold: core.distributor.clone().recipient(),
        hold_for: Duration::from_secs(s.verifier.quarantine_s),
    });
    let backlog = supervisor::start("check-backlog", move |_| backlog);
    // Checks owed from before this start: their tasks are marked unpaid and checked.
    let owed = std::mem::take(&mut *core.owed_checks.lock().expect("owed checks lock"));
    backlog.do_send(Replay(owed));
    Ok(Some(Verification {
        models: Arc::new(s.verifier.models.keys().cloned().collect()),
        vocab,
        policy: core.policy.clone(),
        pool,
        load: Default::default(),
        queue: s.verifier.queue,
        backlog,
        checks: core.checks.clone(),
        report,
        synchronous: s.verifier.synchronous,
        quality_check_rate: s.verifier.quality_check_rate,
        quality_game,
    }))
}

/// Starts Completion on its own thread: it prices, logs and hands on every finished job.
pub fn start_completion(
    s: &Settings,
    core: &Core,
    ticket_secret: Arc<[u8; 32]>,
    verification: Option<Verification>,
) -> Addr<Completion> {
    Completion::start_on_own_thread(CompletionConfig {
        ticket_secret,
        prices: Arc::new(s.prices.table()),
        registry: core.registry.clone(),
        distributor: core.distributor.clone(),
        verification,
        usage: core.gateway.clone().recipient(),
        completions: core.completions.clone(),
        peers: core.peers.clone(),
    })
}
