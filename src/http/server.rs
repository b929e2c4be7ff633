//! Starting `ludus serve`: the supervised actors, the HTTP server, and graceful shutdown
//! (stop accepting, let running jobs finish within the grace period, fail queued ones).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::{Addr, Supervisor};
use actix_web::{web, App, HttpServer};

use super::openai::RequestLimits;
use super::routes;
use crate::actors::clock::SubscribeBlocks;
use crate::actors::distributor::DistributorConfig;
use crate::actors::game_store::GameStore;
use crate::actors::messages::Drain;
use crate::actors::node_proxy::NodeProxyConfig;
use crate::actors::{Clock, Distributor, Gateway};
use crate::crypto::identity::{Address, Identity};
use crate::settings::Settings;

/// Shared by every HTTP worker.
pub struct AppState {
    pub clock: Addr<Clock>,
    pub gateway: Addr<Gateway>,
    pub distributor: Addr<Distributor>,
    pub request_limits: RequestLimits,
    pub max_body_bytes: usize,
    pub proxy_config: NodeProxyConfig,
}

/// A running server.
pub struct ServerHandle {
    pub addr: SocketAddr,
    /// The distributor's identity address (nodes may pin it).
    pub distributor_address: Address,
    pub http: actix_web::dev::ServerHandle,
    pub distributor: Addr<Distributor>,
    pub grace: Duration,
}

impl ServerHandle {
    /// Graceful stop: drain the distributor, then let HTTP finish within the grace period.
    pub async fn shutdown(&self) {
        let _ = self.distributor.send(Drain).await;
        self.http.stop(true).await;
    }
}

/// Starts the actors and the HTTP server inside the current actix System. The returned
/// future runs the server until it stops.
pub async fn start_server(settings: &Settings) -> std::io::Result<(ServerHandle, actix_web::dev::Server)> {
    let s = settings.clone();
    let store = Arc::new(GameStore::open(s.server.data_dir.join("games.json")));
    let config = DistributorConfig {
        queue_capacity: s.distributor.queue_capacity,
        queue_timeout: Duration::from_millis(s.distributor.queue_timeout_ms),
        max_attempts: s.distributor.max_attempts,
        catalog: s.distributor.models.clone(),
    };
    let distributor = Supervisor::start(move |_| Distributor::new(config));
    let clock = {
        let (block, epoch) = (Duration::from_millis(s.clock.block_time_ms), Duration::from_secs(s.clock.epoch_time_s));
        Supervisor::start(move |_| Clock::new(block, epoch))
    };
    clock.do_send(SubscribeBlocks(distributor.clone().recipient()));
    let gateway = {
        let distributor = distributor.clone();
        Supervisor::start(move |_| Gateway::new(store, distributor))
    };
    let key_file = s.server.key_file.clone().unwrap_or_else(|| s.server.data_dir.join("distributor.key"));
    let identity = Arc::new(Identity::load_or_create(&key_file).map_err(std::io::Error::other)?);
    tracing::info!(address = %identity.address, key = %key_file.display(), "distributor identity (nodes may pin it)");
    let mut banned = HashSet::new();
    for a in &s.distributor.banned_nodes {
        banned
            .insert(a.parse::<Address>().map_err(|e| std::io::Error::other(format!("distributor.banned_nodes: {e}")))?);
    }
    let banned = Arc::new(banned);
    let distributor_address = identity.address;
    let model_keys = Arc::new(load_model_keys(&s.server.data_dir.join("model-keys"))?);
    let state = web::Data::new(AppState {
        clock,
        gateway,
        distributor: distributor.clone(),
        request_limits: RequestLimits {
            default_max_tokens: s.server.default_max_tokens,
            max_tokens_limit: s.server.max_tokens_limit,
        },
        max_body_bytes: s.server.max_body_bytes,
        proxy_config: NodeProxyConfig {
            heartbeat_interval: Duration::from_millis(s.distributor.heartbeat_interval_ms),
            node_timeout: Duration::from_millis(s.distributor.node_timeout_ms),
            identity,
            banned,
            model_keys,
        },
    });
    let grace = Duration::from_secs(s.server.shutdown_grace_s);
    let mut server = HttpServer::new(move || App::new().app_data(state.clone()).configure(routes::configure))
        // Tokens are small writes: without TCP_NODELAY, Nagle + delayed ACKs hold them ~40 ms.
        .on_connect(|conn, _| {
            if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
                let _ = tcp.set_nodelay(true);
            }
        })
        .disable_signals()
        .shutdown_timeout(grace.as_secs())
        .backlog(4096)
        .max_connections(50_000);
    if s.server.workers > 0 {
        server = server.workers(s.server.workers);
    }
    let server = server.bind(&s.server.bind)?;
    let addr = *server.addrs().first().ok_or_else(|| std::io::Error::other("the server bound no address"))?;
    let server = server.run();
    let handle = ServerHandle { addr, distributor_address, http: server.handle(), distributor, grace };
    Ok((handle, server))
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
fn load_model_keys(dir: &std::path::Path) -> std::io::Result<std::collections::BTreeMap<String, String>> {
    let mut keys = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(keys) };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "key") {
            continue;
        }
        let key = crate::crypto::protect::read_key_file(&path).map_err(|e| std::io::Error::other(e.to_string()))?;
        keys.insert(crate::crypto::protect::key_id(&key), hex::encode(key));
    }
    tracing::info!(keys = keys.len(), dir = %dir.display(), "model key store loaded");
    Ok(keys)
}
