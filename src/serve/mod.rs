//! `ludus serve`'s process, assembled in one place: read the inputs ([`inputs`]), start
//! the actor tree ([`tree`]), hand the HTTP layer its state (`http::server` only routes
//! and listens), and shut it all down gracefully (stop accepting, let running jobs finish
//! within the grace period, fail queued ones, commit the last receipts).

pub mod inputs;
pub mod tree;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::web;

use crate::actors::cluster::write_offs::WriteOffs;
use crate::actors::messages::{Drain, FlushReceipts};
use crate::actors::node_proxy::NodeProxyConfig;
use crate::actors::{Distributor, Registry};
use crate::crypto::identity::Address;
use crate::http::openai::RequestLimits;
use crate::http::server::AppState;
use crate::ledger::cluster::PrivateCluster;
use crate::ledger::Store;
use crate::settings::Settings;

pub use inputs::open_store;

/// How long a graceful shutdown waits for the last receipts to be committed.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Starts the actors and the HTTP server inside the current actix System. The returned
/// future runs the server until it stops.
pub async fn start(settings: &Settings) -> std::io::Result<(ServerHandle, actix_web::dev::Server)> {
    let s = settings.clone();
    let (store, cluster) = open_store(&s).await?;
    let ticket_secret = Arc::new(store.shared_secret("ticket_mac").await.map_err(std::io::Error::other)?);
    let identity = inputs::identity(&s)?;
    let core = tree::start_core(&s, &store, &identity)?;
    let settlement = tree::start_settlement(&s, &store, &core.clock, &identity)?;
    let keys = inputs::ModelKeys::load(&s.server.data_dir.join("model-keys"))?;
    let quality_game = store.internal_game("ludus-quality-checks").await.map_err(std::io::Error::other)?;
    let verification = tree::start_verifiers(&s, &core, &store, &keys.keys, quality_game).await?;
    let completion = tree::start_completion(&s, &core, ticket_secret.clone(), verification.clone());
    let proxy_config = NodeProxyConfig {
        heartbeat_interval: Duration::from_millis(s.distributor.heartbeat_interval_ms),
        node_timeout: Duration::from_millis(s.distributor.node_timeout_ms),
        identity: identity.clone(),
        banned: inputs::banned_nodes(&s)?,
        bundle_nodes: Arc::new(keys.bundle_nodes(&s.distributor.bundle_nodes)?),
        model_keys: keys.keys,
        ticket_secret,
        registry: core.registry.clone(),
        completion,
        verification,
        max_frames_per_s: s.distributor.max_node_frames_per_s,
        max_queued_bytes: s.distributor.max_node_queue_bytes,
        task_stall_timeout: inputs::task_stall_timeout(&s)?,
        sessions: core.sessions.clone(),
    };
    let catalog = Arc::new(inputs::load_catalog(&s).await?);
    let state = web::Data::new(AppState {
        clock: core.clock.clone(),
        gateway: core.gateway.clone(),
        distributor: core.distributor.clone(),
        request_limits: RequestLimits {
            default_max_tokens: s.server.default_max_tokens,
            max_tokens_limit: s.server.max_tokens_limit,
        },
        max_body_bytes: s.server.max_body_bytes,
        body_timeout: Duration::from_millis(s.server.client_body_timeout_ms),
        proxy_config,
        store: store.clone(),
        admin_token_hash: inputs::admin_token_hash(&s)?,
        settlement,
        auth_throttle: crate::http::auth_throttle::AuthThrottle::new(s.server.failed_auth_per_minute),
        proof_throttle: crate::http::auth_throttle::AuthThrottle::reads(
            "receipt proofs and payout claims",
            crate::http::settlement_api::RECEIPT_PROOFS_PER_MINUTE,
        ),
        node_throttle: (s.server.node_connections_per_minute > 0).then(|| {
            crate::http::auth_throttle::AuthThrottle::reads("node connections", s.server.node_connections_per_minute)
        }),
        node_links: crate::http::node_links::NodeLinks::new(s.server.node_links_per_address),
        trusted_proxies: crate::http::client_addr::TrustedProxies::parse(&s.server.trusted_proxies)
            .map_err(std::io::Error::other)?,
        chaos: s.server.chaos,
        registry: core.registry.clone(),
        catalog: catalog.clone(),
        peers: core.peers.clone(),
        checks: core.checks.clone(),
        registry_metrics: Default::default(),
        http_metrics: Default::default(),
        traffic: Default::default(),
    });
    let (addr, server) = crate::http::server::listen(state, &s.server)?;
    // Answers lost between servers, written off: those left unwritten by the last run go
    // to the ledger now, whether or not this run is in a network.
    let write_offs = WriteOffs::open(store.clone(), &s.server.data_dir.join("write-offs.log"))?;
    tree::start_cluster(&s, &core, catalog, write_offs, addr.port()).await?;
    let handle = ServerHandle {
        addr,
        distributor_address: identity.address,
        http: server.handle(),
        distributor: core.distributor,
        registry: core.registry,
        store,
        grace: Duration::from_secs(s.server.shutdown_grace_s),
        cluster,
    };
    Ok((handle, server))
}

impl ServerHandle {
    /// Graceful stop: drain the distributor, let HTTP finish within the grace period,
    /// commit the last receipts, and stop the private database if this process started it.
    pub async fn shutdown(&self) {
        // Stop accepting first: behind a load balancer, the next request goes to another
        // server rather than to a 503 here. Running requests go on.
        let stopped = self.http.stop(true);
        let _ = self.distributor.send(Drain).await;
        stopped.await;
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
