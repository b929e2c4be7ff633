//! Settlement over HTTP: where to claim (`GET /v1/settlement`), a node's payouts with
//! their Merkle proofs (`GET /v1/settlement/payouts/{address}`, public: the amounts
//! become public on chain when claimed anyway), a receipt's proof against the chain
//! (`GET /v1/receipts/{task}/proof`, for the game that asked — its API key —, the node
//! that answered — a fresh signature of its key — and the operator; task ids are
//! sequential, so an id alone proves nothing), and the operator's views
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
pub async fn payouts(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // Public, and each ask rebuilds the payout tree of every epoch the node was paid in:
    // counted with receipt proofs against one allowance per client IP.
    throttle_unless_operator(&req, &state)?;
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

/// How long a node's signed proof request stays good (either way of the server's clock).
const NODE_REQUEST_SKEW_S: u64 = 300;

/// Who asks for a receipt's proof.
enum Asker {
    Operator,
    Game(i64),
    Node(String),
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The node whose fresh signature over (task, time) the request carries.
fn node_asker(req: &HttpRequest, task: u64) -> Result<Option<String>, ApiError> {
    let Some(node) = header(req, "x-ludus-node") else {
        return Ok(None);
    };
    let refused = |why: &str| -> ApiError { ApiError::invalid("x-ludus-signature", why.to_string()) };
    let time: u64 = header(req, "x-ludus-time")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| refused("X-Ludus-Time (unix seconds) is missing"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if time.abs_diff(now) > NODE_REQUEST_SKEW_S {
        return Err(refused("X-Ludus-Time is more than 5 minutes away from the server's clock"));
    }
    let signature = header(req, "x-ludus-signature").and_then(|s| hex::decode(s.trim_start_matches("0x")).ok());
    let signature = signature.ok_or_else(|| refused("X-Ludus-Signature (hex) is missing"))?;
    let message = crate::protocol::receipt::proof_request_message(task, time);
    match crate::crypto::identity::recover(&message, &signature) {
        Ok(signer) if signer.to_string().eq_ignore_ascii_case(node) => Ok(Some(signer.to_string())),
        _ => Err(refused("the signature is not X-Ludus-Node's over this task and time")),
    }
}

async fn asker(req: &HttpRequest, state: &AppState, task: u64) -> Result<Asker, ApiError> {
    // Throttled like any credential: a bad signature costs a key recovery, and a bad key a lookup.
    let ip = state.trusted_proxies.client_ip(req);
    let attempt = state.auth_throttle.check(ip)?;
    match node_asker(req, task) {
        Ok(Some(node)) => return Ok(Asker::Node(node)),
        Ok(None) => {}
        Err(e) => {
            attempt.failed();
            return Err(e);
        }
    }
    let presented = super::routes::bearer(req);
    if presented.as_deref().map(crate::ledger::hash_key).as_deref() == Some(state.admin_token_hash.as_str()) {
        return Ok(Asker::Operator);
    }
    let info = state
        .gateway
        .send(crate::actors::messages::Authenticate {
            bearer: presented,
            count: crate::actors::messages::CountAs::Nothing,
        })
        .await
        .map_err(|e| ApiError::from(ServeError::Internal(e.to_string())))?;
    if matches!(info, Err(ServeError::Unauthorized)) {
        attempt.failed();
    }
    Ok(Asker::Game(info?.game_id))
}

/// Receipt proofs one client IP may ask for a minute: each reads a row, and one of the
/// asker's own a whole block, whether it is found or not (a signature over a task is good
/// for minutes, and the key throttle counts only failures).
pub const RECEIPT_PROOFS_PER_MINUTE: u32 = 120;

/// Counts an ask for a proof (a receipt's, or a node's payouts) against the client IP's
/// allowance of [`RECEIPT_PROOFS_PER_MINUTE`], found or not. The operator's token is not
/// throttled (behind a proxy missing from `trusted_proxies`, every client shares one
/// allowance).
fn throttle_unless_operator(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let operator = super::routes::bearer(req).as_deref().map(crate::ledger::hash_key).as_deref()
        == Some(state.admin_token_hash.as_str());
    if !operator {
        let ip = state.trusted_proxies.client_ip(req);
        state.proof_throttle.check(ip)?.failed();
    }
    Ok(())
}

/// A receipt with its Merkle path to its block root and the block's path to the anchor
/// that put it on chain (null until anchored), for `ludus verify-receipt`. A task of
/// another game or node reads as not found.
pub async fn receipt_proof(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let text = path.into_inner();
    let task = parse_task(&text)
        .ok_or_else(|| ApiError::invalid("task", format!("`{text}` is not a task id (chatcmpl-<16 hex digits>)")))?;
    throttle_unless_operator(&req, &state)?;
    let asker = asker(&req, &state, task).await?;
    let not_found = || {
        ServeError::NotFound(format!("a receipt of yours for task {task:016x} (not recorded, or not yet committed)"))
    };
    // Whose it is first (one row); the proof reads the whole block.
    let (game, node) = state.store.receipt_owner(task).await.map_err(unavailable)?.ok_or_else(not_found)?;
    let allowed = match &asker {
        Asker::Operator => true,
        Asker::Game(id) => *id == game,
        Asker::Node(asking) => asking.eq_ignore_ascii_case(&node),
    };
    if !allowed {
        return Err(not_found().into());
    }
    let proof = state.store.receipt_proof(task).await.map_err(unavailable)?.ok_or_else(not_found)?;
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
