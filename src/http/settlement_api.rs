//! Settlement over HTTP: where to claim (`GET /v1/settlement`), a node's payouts with
//! their Merkle proofs (`GET /v1/settlement/payouts/{address}`, public: the amounts
//! become public on chain when claimed anyway), a receipt's proof against the chain
//! (`GET /v1/receipts/{task}/proof`, public: the task id — 64 random bits, the `id` of
//! the completion — is what a game or node needs to ask), and the operator's views
//! (`GET /admin/epochs`, `GET /admin/anchors`, `POST /admin/settle` to settle now).

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

/// A task id as games and nodes see it: `chatcmpl-…`/`cmpl-…` (a completion's `id`),
/// `0x…`, or the 16 hex digits alone.
pub fn parse_task(text: &str) -> Option<u64> {
    let hex = text
        .strip_prefix("chatcmpl-")
        .or_else(|| text.strip_prefix("cmpl-"))
        .or_else(|| text.strip_prefix("0x"))
        .unwrap_or(text);
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// A receipt with its Merkle path to its block root and the block's path to the anchor
/// that put it on chain (null until anchored), for `ludus verify-receipt`.
pub async fn receipt_proof(path: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let text = path.into_inner();
    let task = parse_task(&text)
        .ok_or_else(|| ApiError::invalid("task", format!("`{text}` is not a task id (chatcmpl-<16 hex digits>)")))?;
    let proof = state.store.receipt_proof(task).await.map_err(unavailable)?;
    let proof = proof.ok_or_else(|| {
        ServeError::NotFound(format!("a receipt for task {task:016x} (not recorded, or not yet committed)"))
    })?;
    let contract = state.settlement.as_ref().map(|s| s.contract.clone());
    let rpc_url = state.settlement.as_ref().and_then(|s| s.rpc_url.clone());
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "receipt.proof", "contract": contract, "rpc_url": rpc_url, "proof": proof,
    })))
}

/// Anchoring progress and the latest anchors.
pub async fn anchors(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let progress = state.store.anchor_progress().await.map_err(unavailable)?;
    let data = state.store.recent_anchors(50).await.map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "progress": progress, "data": data})))
}

#[cfg(test)]
mod tests {
    use super::parse_task;

    #[test]
    fn task_ids_parse_in_the_forms_games_see_them() {
        assert_eq!(parse_task("chatcmpl-00000000000000ff"), Some(255));
        assert_eq!(parse_task("cmpl-ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_task("0x10"), Some(16));
        assert_eq!(parse_task("a1b2"), Some(0xa1b2));
        for bad in ["", "chatcmpl-", "0x", "xyz", "1ffffffffffffffff", "-1", "+1"] {
            assert_eq!(parse_task(bad), None, "{bad}");
        }
    }
}
