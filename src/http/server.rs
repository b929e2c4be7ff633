//! The HTTP server: the state every worker shares ([`AppState`]) and the listener
//! ([`listen`]) with its connection settings. The actors behind it are built by
//! `crate::serve`; this module only routes to them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::{web, App, HttpServer};

use super::openai::RequestLimits;
use super::routes;
use crate::actors::node_proxy::NodeProxyConfig;
use crate::actors::{Clock, Distributor, Gateway, Registry, Settlement};
use crate::ledger::Store;
use crate::settings::ServerSettings;

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
    /// Receipt proofs per client IP (each reads a block).
    pub proof_throttle: super::auth_throttle::AuthThrottle,
    /// Node connections per client IP (`None`: no limit).
    pub node_throttle: Option<super::auth_throttle::AuthThrottle>,
    /// Node links each client IP holds open.
    pub node_links: std::sync::Arc<super::node_links::NodeLinks>,
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
    /// The other servers of the network (empty when this one works alone).
    pub peers: Arc<crate::actors::cluster::Peers>,
    /// The proof checks this server owes (written ahead until their verdict lands).
    pub checks: Arc<crate::actors::check_log::CheckLog>,
    /// The registry's figures in `/metrics`, read at most once per few seconds.
    pub registry_metrics: super::metrics::RegistryMetrics,
}

/// What the HTTP layer knows of settlement.
pub struct SettlementInfo {
    pub actor: Addr<Settlement>,
    /// `0x…`
    pub contract: String,
    /// The RPC URL nodes claim through (`[settlement] public_rpc_url`), if published.
    pub rpc_url: Option<String>,
}

/// Binds `[server] bind` and returns the server (not yet running: the caller spawns
/// it) with the address it bound. Every request is timed for `/metrics`; routes are in
/// [`routes::configure`].
pub fn listen(state: web::Data<AppState>, s: &ServerSettings) -> std::io::Result<(SocketAddr, actix_web::dev::Server)> {
    super::dashboard::sample_traffic(state.clone().into_inner());
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
    .on_connect(|conn, ext| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            let _ = tcp.set_nodelay(true);
        }
        super::disconnect::note_socket(conn, ext);
    })
    .disable_signals()
    // Slow-loris: a client must deliver its request head within this time.
    .client_request_timeout(Duration::from_millis(s.client_request_timeout_ms))
    .shutdown_timeout(s.shutdown_grace_s)
    .backlog(4096)
    .max_connections(50_000);
    if s.workers > 0 {
        server = server.workers(s.workers);
    }
    let server = server.bind(&s.bind)?;
    let addr = *server.addrs().first().ok_or_else(|| std::io::Error::other("the server bound no address"))?;
    Ok((addr, server.run()))
}
