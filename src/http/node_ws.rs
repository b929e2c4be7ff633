//! `GET /ws/node`: upgrades a compute node's connection to a websocket and starts its
//! `NodeProxy` actor on this worker's arbiter, within `[server]
//! node_connections_per_minute` per client IP (node identities are free, and each
//! handshake costs a key exchange and a signature before the node proves anything), and
//! `node_links_per_address` links open at once ([`super::node_links`]).

use actix::{Actor, AsyncContext};
use actix_web::{web, HttpRequest, HttpResponse};

use super::errors::ApiError;
use super::server::AppState;
use crate::actors::NodeProxy;
use crate::protocol::MAX_FRAME_BYTES;

pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    let ip = state.trusted_proxies.client_ip(&req);
    if let Some(throttle) = &state.node_throttle {
        throttle.check(ip).map_err(ApiError::from)?.failed();
    }
    let slot = state.node_links.open(ip).map_err(ApiError::from)?;
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let stream = stream.max_frame_size(MAX_FRAME_BYTES);
    let distributor = state.distributor.clone();
    let config = state.proxy_config.clone();
    NodeProxy::create(move |ctx| {
        ctx.add_stream(stream);
        NodeProxy::new(session, distributor, config).holding(slot)
    });
    Ok(response)
}
