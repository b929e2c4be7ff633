//! Fault injection for resilience drills: `POST /admin/chaos/panic/{actor}` (admin token,
//! and only when `server.chaos = true`) makes the distributor, gateway or registry panic,
//! to watch its supervisor restart it under real traffic.

use actix_web::{web, HttpRequest, HttpResponse};

use super::errors::ApiError;
use super::registry_api::require_admin;
use super::server::AppState;
use crate::actors::supervisor::InjectPanic;
use crate::actors::ServeError;

pub async fn panic(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    if !state.chaos {
        return Err(ServeError::NotFound("fault injection (it needs server.chaos = true)".into()).into());
    }
    let actor = path.into_inner();
    match actor.as_str() {
        "distributor" => state.distributor.do_send(InjectPanic),
        "gateway" => state.gateway.do_send(InjectPanic),
        "registry" => state.registry.do_send(InjectPanic),
        _ => return Err(ApiError::invalid("actor", "actor must be distributor, gateway or registry")),
    }
    tracing::warn!(%actor, "fault injection: panic requested");
    Ok(HttpResponse::Accepted().json(serde_json::json!({"object": "chaos", "panicked": actor})))
}
