//! The operator's dashboard: `GET /dashboard` serves one self-contained page (HTML, CSS
//! and JavaScript compiled into the binary, nothing fetched from elsewhere), which polls
//! `GET /admin/dashboard` (admin token) every second and draws the network: live nodes,
//! traffic over time (req/s, p50/p99 latency, tokens/s, errors — computed in the page from
//! the deltas of the server's counters, sampled here every [`SAMPLE_EVERY`] for the last
//! five minutes so the charts are full when the page opens), the queues, verification outcomes,
//! blocks, epochs and payouts.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};

use super::errors::ApiError;
use super::metrics::{COMPLETION_TOKENS, PROMPT_TOKENS};
use super::registry_api::{require_admin, unavailable};
use super::server::AppState;
use crate::actors::messages::{ListNodes, PrefixCounters, QueueCounters};

const PAGE: &str = include_str!("dashboard.html");

/// How often the server samples its counters, and how many samples it keeps (5 minutes).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const SAMPLES_KEPT: usize = 150;

/// One sample of the cumulative counters the charts are drawn from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrafficSample {
    pub time_ms: u64,
    pub api: super::metrics::ApiTotals,
    pub completion_tokens: u64,
}

/// The last five minutes of samples.
#[derive(Default)]
pub struct TrafficHistory(Mutex<VecDeque<TrafficSample>>);

impl TrafficHistory {
    fn record(&self, sample: TrafficSample) {
        let Ok(mut q) = self.0.lock() else { return };
        if q.len() == SAMPLES_KEPT {
            q.pop_front();
        }
        q.push_back(sample);
    }

    fn samples(&self) -> Vec<TrafficSample> {
        self.0.lock().map(|q| q.iter().cloned().collect()).unwrap_or_default()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn current(state: &AppState) -> TrafficSample {
    TrafficSample {
        time_ms: now_ms(),
        api: state.http_metrics.api_totals(),
        completion_tokens: COMPLETION_TOKENS.load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// Samples the counters every [`SAMPLE_EVERY`] for as long as the server runs.
pub fn sample_traffic(state: Arc<AppState>) {
    actix_web::rt::spawn(async move {
        let mut tick = actix_web::rt::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            state.traffic.record(current(&state));
        }
    });
}

/// `GET /dashboard`: the page. It holds no data; the admin token comes from the URL
/// fragment (`/dashboard#token=…`, never sent to the server) or a prompt.
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        // Everything is inline; nothing may be loaded from elsewhere.
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ))
        .body(PAGE)
}

/// `GET /admin/dashboard`: one snapshot of everything the page shows.
pub async fn data(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let live = state.distributor.send(ListNodes).await.map_err(|e| unavailable(format!("the distributor: {e}")))?;
    let books = state.store.node_reports().await.map_err(unavailable)?;
    let nodes: Vec<serde_json::Value> = live
        .iter()
        .map(|n| {
            let book = books.iter().find(|b| b.address == n.address);
            let mut v = serde_json::to_value(n).unwrap_or_default();
            v["reputation_bps"] = book.map(|b| b.reputation_bps).into();
            v["registry_status"] = book.map(|b| b.status.clone()).into();
            v["payable"] = book.map(|b| b.payable.to_string()).into();
            v
        })
        .collect();
    let verification: serde_json::Map<String, serde_json::Value> =
        state.store.verification_counts().await.map_err(unavailable)?.into_iter().map(|(k, n)| (k, n.into())).collect();
    let prefix_cache = state.distributor.send(PrefixCounters).await.unwrap_or_default();
    let queues = state.distributor.send(QueueCounters).await.unwrap_or_default();
    let blocks = state.store.recent_blocks(12).await.map_err(unavailable)?;
    let epochs = state.store.recent_epochs(8).await.map_err(unavailable)?;
    let anchoring = state.store.anchor_progress().await.map_err(unavailable)?;
    let payouts = match epochs.first() {
        Some(e) => state.store.epoch_payouts(e.number).await.map_err(unavailable)?,
        None => Vec::new(),
    };
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "time_ms": now_ms(),
        "history": state.traffic.samples(),
        "nodes": nodes,
        "api": state.http_metrics.api_totals(),
        "tokens": {
            "prompt": PROMPT_TOKENS.load(std::sync::atomic::Ordering::Relaxed),
            "completion": COMPLETION_TOKENS.load(std::sync::atomic::Ordering::Relaxed),
        },
        "verification": verification,
        "prefix_cache": prefix_cache,
        "queues": queues,
        "blocks": blocks,
        "epochs": epochs,
        "anchoring": anchoring,
        "latest_epoch_payouts": payouts.iter().map(|(node, amount)| serde_json::json!({"node": node, "amount": amount.to_string()})).collect::<Vec<_>>(),
        "settlement_contract": state.settlement.as_ref().map(|s| s.contract.clone()),
    })))
}
