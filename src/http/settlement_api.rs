//! Settlement over HTTP: where to claim (`GET /v1/settlement`), a node's payouts with
//! their Merkle proofs (`GET /v1/settlement/payouts/{address}`, public: the amounts
//! become public on chain when claimed anyway), and the operator's views
//! (`GET /admin/epochs`, `POST /admin/settle` to settle now).

use actix_web::{web, HttpRequest, HttpResponse};

use super::errors::ApiError;
use super::registry_api::{require_admin, unavailable};
use super::server::AppState;
use crate::actors::ServeError;

fn settlement(state: &AppState) -> Result<&super::server::SettlementInfo, ApiError> {
    state
        .settlement
        .as_ref()
        .ok_or_else(|| ServeError::NotFound("settlement (this server has no [settlement] rpc_url)".into()).into())
}

/// The chain a node claims on.
pub async fn info(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let s = settlement(&state)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "settlement", "contract": s.contract, "rpc_url": s.rpc_url,
    })))
}

/// A node's payouts in confirmed epochs, each with its proof.
pub async fn payouts(path: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let s = settlement(&state)?;
    let address = path.into_inner();
    let node =
        crate::ledger::games::normalize_wallet(&address).map_err(|e| ApiError::invalid("address", e.to_string()))?;
    let claims = state.store.payout_claims(&node).await.map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "payouts", "node": node, "contract": s.contract, "rpc_url": s.rpc_url, "data": claims,
    })))
}

/// The latest epochs with their posting state.
pub async fn epochs(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let data = state.store.recent_epochs(50).await.map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": data})))
}

/// Makes an epoch due now; settlement runs in the background (watch `/admin/epochs`).
pub async fn settle(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let s = settlement(&state)?;
    s.actor.do_send(crate::actors::settlement::SettleNow);
    Ok(HttpResponse::Accepted().json(serde_json::json!({"object": "settlement", "status": "settling"})))
}
