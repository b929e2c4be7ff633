//! The registry's read API: a game's own usage (`GET /v1/usage`, with its API key) and
//! the operator's views (`GET /admin/blocks/{n}`, `GET /admin/nodes`, with the admin token).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::errors::ApiError;
use super::routes::bearer;
use super::server::AppState;
use crate::actors::messages::{Authenticate, CountAs};
use crate::actors::ServeError;

/// The longest window `/v1/usage` reports.
const MAX_USAGE_DAYS: u32 = 366;

pub fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ServeError::Unavailable(e.to_string()).into()
}

pub fn require_admin(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let ip = state.trusted_proxies.client_ip(req);
    let attempt = state.auth_throttle.check(ip)?;
    let presented = bearer(req).map(|t| crate::ledger::hash_key(&t));
    // Comparing hashes: the comparison time says nothing about the token.
    if presented.as_deref() == Some(state.admin_token_hash.as_str()) {
        Ok(())
    } else {
        attempt.failed();
        Err(ServeError::AdminUnauthorized.into())
    }
}

#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    days: Option<u32>,
}

/// A game's tasks, tokens and charges by UTC day.
pub async fn usage(
    req: HttpRequest,
    query: web::Query<UsageQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let days = query.days.unwrap_or(30);
    if days == 0 || days > MAX_USAGE_DAYS {
        return Err(ApiError::invalid("days", format!("days must be 1..={MAX_USAGE_DAYS}")));
    }
    let ip = state.trusted_proxies.client_ip(&req);
    let attempt = state.auth_throttle.check(ip)?;
    let info = state
        .gateway
        .send(Authenticate { bearer: bearer(&req), count: CountAs::Read })
        .await
        .map_err(|e| ApiError::from(ServeError::Internal(e.to_string())))?;
    if matches!(info, Err(ServeError::Unauthorized)) {
        attempt.failed();
    } else {
        drop(attempt);
    }
    let info = info?;
    let data = state.store.usage(info.game_id, days).await.map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "usage", "game": info.game, "days": days, "data": data})))
}

/// One block: root, receipts per node, confirmations and discrepancies.
pub async fn block(
    req: HttpRequest,
    path: web::Path<i64>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let number = path.into_inner();
    match state.store.block_report(number).await.map_err(unavailable)? {
        Some(report) => Ok(HttpResponse::Ok().json(report)),
        None => Err(ServeError::NotFound(format!("block {number}")).into()),
    }
}

/// Every node the registry knows, with its books.
pub async fn nodes(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let data = state.store.node_reports().await.map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": data})))
}
