//! Prometheus metrics at `GET /metrics` (text exposition format 0.0.4): HTTP requests by
//! route and status with a latency histogram (time to the response head — for streams,
//! the first token), tokens served, live nodes per model, actor panics, the proof checks
//! owed in the check log; from the registry the verification outcomes, the oldest picked
//! task still unpaid, the checks waiting in the backlog, the last committed block and the
//! last settled epoch (read at most once per 5 s); in a network of servers, the servers
//! heard and the jobs that crossed. Counters live in this process; scrape every server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use actix_web::{web, HttpResponse};

use super::errors::ApiError;
use super::server::AppState;
use crate::actors::messages::ListModels;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
struct Series {
    count: u64,
    sum_s: f64,
    /// Observations at or under each bucket bound (cumulative at render time).
    buckets: [u64; BUCKETS.len()],
}

/// Totals for the operator's dashboard (see [`HttpMetrics::api_totals`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApiTotals {
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub bucket_bounds_s: Vec<f64>,
    pub buckets: Vec<u64>,
}

/// Prompt and completion tokens served (counted when a task's usage is recorded).
pub static PROMPT_TOKENS: AtomicU64 = AtomicU64::new(0);
pub static COMPLETION_TOKENS: AtomicU64 = AtomicU64::new(0);

/// Counts a finished task's tokens.
pub fn count_tokens(usage: &crate::protocol::TaskUsage) {
    PROMPT_TOKENS.fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
    COMPLETION_TOKENS.fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
}

/// HTTP requests, by (route pattern, status).
#[derive(Default)]
pub struct HttpMetrics {
    series: Mutex<BTreeMap<(String, u16), Series>>,
}

impl HttpMetrics {
    pub fn observe(&self, route: &str, status: u16, elapsed: Duration) {
        let Ok(mut series) = self.series.lock() else { return };
        let s = series.entry((route.to_string(), status)).or_default();
        let secs = elapsed.as_secs_f64();
        s.count += 1;
        s.sum_s += secs;
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            s.buckets[i] += 1;
        }
    }

    /// Totals over the game-facing API (`/v1/*` routes): requests, server-side errors
    /// (5xx), and the latency histogram (per-bucket counts, not cumulative).
    pub fn api_totals(&self) -> ApiTotals {
        let mut t =
            ApiTotals { bucket_bounds_s: BUCKETS.to_vec(), buckets: vec![0; BUCKETS.len()], ..Default::default() };
        let Ok(series) = self.series.lock() else { return t };
        for ((route, status), s) in series.iter().filter(|((route, _), _)| route.starts_with("/v1/")) {
            let _ = route;
            t.requests += s.count;
            if *status >= 500 {
                t.server_errors += s.count;
            } else if *status >= 400 {
                t.client_errors += s.count;
            }
            for (a, b) in t.buckets.iter_mut().zip(s.buckets.iter()) {
                *a += b;
            }
        }
        t
    }

    fn render(&self, out: &mut String) {
        let Ok(series) = self.series.lock() else { return };
        out.push_str("# HELP ludus_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE ludus_http_requests_total counter\n");
        for ((route, status), s) in series.iter() {
            let _ = writeln!(out, "ludus_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {}", s.count);
        }
        out.push_str(
            "# HELP ludus_http_request_duration_seconds Time to the response head (streams: the first token).\n",
        );
        out.push_str("# TYPE ludus_http_request_duration_seconds histogram\n");
        let mut by_route: BTreeMap<&str, Series> = BTreeMap::new();
        for ((route, _), s) in series.iter() {
            let r = by_route.entry(route.as_str()).or_default();
            r.count += s.count;
            r.sum_s += s.sum_s;
            for (a, b) in r.buckets.iter_mut().zip(s.buckets.iter()) {
                *a += b;
            }
        }
        for (route, s) in by_route {
            let mut cumulative = 0;
            for (bound, n) in BUCKETS.iter().zip(s.buckets.iter()) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "ludus_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "ludus_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(out, "ludus_http_request_duration_seconds_sum{{route=\"{route}\"}} {}", s.sum_s);
            let _ = writeln!(out, "ludus_http_request_duration_seconds_count{{route=\"{route}\"}} {}", s.count);
        }
    }
}

/// A label value in the Prometheus text format: backslash, double quote and newline escaped,
/// so a name cannot end its label or its line.
fn label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn gauge(out: &mut String, name: &str, help: &str, kind: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The per-model queues: jobs waiting, the games they belong to, the oldest one's wait,
/// and what the queues refused.
fn render_queues(out: &mut String, queues: &crate::actors::messages::QueueTotals) {
    let label = |model: &str| format!("{{model=\"{}\"}}", label_value(model));
    let jobs: Vec<(String, u64)> = queues.models.iter().map(|q| (label(&q.model), q.jobs as u64)).collect();
    gauge(out, "ludus_queued_jobs", "Jobs waiting in each model's queue on this server.", "gauge", &jobs);
    let running = [(String::new(), queues.running as u64)];
    gauge(out, "ludus_running_jobs", "Jobs running on this server's nodes.", "gauge", &running);
    let games: Vec<(String, u64)> = queues.models.iter().map(|q| (label(&q.model), q.games as u64)).collect();
    gauge(out, "ludus_queued_games", "Games with jobs waiting in each model's queue.", "gauge", &games);
    let _ = writeln!(
        out,
        "# HELP ludus_queue_oldest_wait_seconds How long the oldest job in each model's queue has waited.\n# TYPE ludus_queue_oldest_wait_seconds gauge"
    );
    for q in &queues.models {
        let _ = writeln!(out, "ludus_queue_oldest_wait_seconds{} {:.3}", label(&q.model), q.oldest_wait_s);
    }
    let refused = [
        ("{reason=\"full\"}".to_string(), queues.refused_full),
        ("{reason=\"gave_way\"}".to_string(), queues.gave_way),
        ("{reason=\"timeout\"}".to_string(), queues.timed_out),
    ];
    gauge(
        out,
        "ludus_queue_refused_total",
        "Jobs the queues refused: full (429 queue_full, other servers' forwarded jobs too), gave_way (a full queue's place taken by a game holding far fewer), timeout (waited out queue_timeout_ms, or a quality-check re-run its longer wait).",
        "counter",
        &refused,
    );
}

/// `GET /metrics`.
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut out = String::new();
    state.http_metrics.render(&mut out);
    let tokens = [
        ("{kind=\"prompt\"}".to_string(), PROMPT_TOKENS.load(Ordering::Relaxed)),
        ("{kind=\"completion\"}".to_string(), COMPLETION_TOKENS.load(Ordering::Relaxed)),
    ];
    gauge(&mut out, "ludus_tokens_total", "Tokens served.", "counter", &tokens);
    let models = state.distributor.send(ListModels).await.unwrap_or_default();
    let nodes: Vec<(String, u64)> =
        models.iter().map(|(model, n)| (format!("{{model=\"{}\"}}", label_value(model)), *n as u64)).collect();
    gauge(&mut out, "ludus_nodes", "Live nodes serving each model.", "gauge", &nodes);
    let queues = state.distributor.send(crate::actors::messages::QueueCounters).await.unwrap_or_default();
    render_queues(&mut out, &queues);
    let prefix = state.distributor.send(crate::actors::messages::PrefixCounters).await.unwrap_or_default();
    let requests = [("{result=\"hit\"}".to_string(), prefix.hits), ("{result=\"miss\"}".to_string(), prefix.misses)];
    gauge(
        &mut out,
        "ludus_prefix_cache_requests",
        "Requests the live nodes' prefix caches served, by whether they found cached blocks (summed over live nodes).",
        "gauge",
        &requests,
    );
    let reused = [(String::new(), prefix.tokens_reused)];
    gauge(
        &mut out,
        "ludus_prefix_cache_tokens_reused",
        "Prompt tokens the live nodes did not prefill thanks to their prefix caches.",
        "gauge",
        &reused,
    );
    let routed = [(String::new(), prefix.routed)];
    gauge(
        &mut out,
        "ludus_prefix_routed_total",
        "Jobs sent to a node because its prefix cache held the start of their prompt.",
        "counter",
        &routed,
    );
    let peers = &state.peers;
    let servers = [(String::new(), peers.servers(std::time::Instant::now()) as u64)];
    gauge(
        &mut out,
        "ludus_cluster_servers",
        "Servers of the network this one hears, itself included.",
        "gauge",
        &servers,
    );
    let crossed = [
        ("{direction=\"out\"}".to_string(), peers.forwarded.load(Ordering::Relaxed)),
        ("{direction=\"in\"}".to_string(), peers.served_for_others.load(Ordering::Relaxed)),
    ];
    gauge(
        &mut out,
        "ludus_cluster_jobs_total",
        "Jobs sent to another server (out) and run for another server (in).",
        "counter",
        &crossed,
    );
    let undelivered = [(String::new(), peers.undelivered.load(Ordering::Relaxed))];
    gauge(
        &mut out,
        "ludus_cluster_undelivered_total",
        "Forwarded jobs this server wrote off, not billed: their answer never reached the game whole (given up here, or run here for a server that went away).",
        "counter",
        &undelivered,
    );
    let panics = [(String::new(), crate::actors::supervisor::PANICS.load(Ordering::Relaxed))];
    gauge(&mut out, "ludus_actor_panics_total", "Actor panics caught and restarted.", "counter", &panics);
    let owed = [(String::new(), state.checks.owed() as u64)];
    gauge(
        &mut out,
        "ludus_checks_owed",
        "Checks this server owes: sampled tasks whose verdict is not yet written (unpaid until then), and delivered-token checks not yet in Postgres.",
        "gauge",
        &owed,
    );
    // From the registry (each skipped when the database is unreachable: the scrape still works).
    out.push_str(&state.registry_metrics.render(&state.store).await);
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(out))
}

/// How long the registry's figures in `/metrics` are reused: they cost seven queries on
/// the pool that block commits and verdicts share (one a count over every receipt), and
/// `/metrics` answers anyone who can reach the server.
pub const REGISTRY_METRICS_TTL: Duration = Duration::from_secs(5);

/// The registry's section of `/metrics`, read at most once per [`REGISTRY_METRICS_TTL`]
/// whatever the scrape rate: scrapes that come while it is read wait for that read.
#[derive(Default)]
pub struct RegistryMetrics {
    cached: tokio::sync::Mutex<Option<(std::time::Instant, String)>>,
    reads: AtomicU64,
}

impl RegistryMetrics {
    /// The section, from the cache while it is fresh.
    pub async fn render(&self, store: &crate::ledger::Store) -> String {
        let mut cached = self.cached.lock().await;
        if let Some((at, text)) = cached.as_ref() {
            if at.elapsed() < REGISTRY_METRICS_TTL {
                return text.clone();
            }
        }
        let reads = self.reads.fetch_add(1, Ordering::Relaxed) + 1;
        let mut out = String::new();
        gauge(
            &mut out,
            "ludus_metrics_registry_reads_total",
            "Reads of the registry's figures for /metrics (at most one per 5 s; the figures below are as of the last).",
            "counter",
            &[(String::new(), reads)],
        );
        if let Ok(counts) = store.verification_counts().await {
            let samples: Vec<(String, u64)> =
                counts.into_iter().map(|(outcome, n)| (format!("{{outcome=\"{outcome}\"}}"), n as u64)).collect();
            gauge(&mut out, "ludus_receipts", "Recorded tasks by verification outcome.", "gauge", &samples);
        }
        if let Ok(age) = store.oldest_sampled_age().await {
            gauge(
                &mut out,
                "ludus_oldest_sampled_seconds",
                "Age of the oldest picked task still waiting for its verdict, unpaid (0: none); alert when it grows past minutes.",
                "gauge",
                &[(String::new(), age)],
            );
        }
        if let Ok(waiting) = store.backlog_len().await {
            let samples = [(String::new(), waiting)];
            gauge(
                &mut out,
                "ludus_check_backlog",
                "Checks waiting for a verifier: sampled tasks (unpaid until checked) and tokens nodes delivered without a proof.",
                "gauge",
                &samples,
            );
        }
        if let Ok(block) = store.last_block().await {
            gauge(
                &mut out,
                "ludus_last_block",
                "Last block committed to the registry.",
                "gauge",
                &[(String::new(), block)],
            );
        }
        if let Ok(progress) = store.anchor_progress().await {
            let anchored = [(String::new(), progress.last_anchored_block)];
            gauge(&mut out, "ludus_last_anchored_block", "Last registry block anchored on chain.", "gauge", &anchored);
        }
        if let Ok(counts) = store.epoch_counts().await {
            let samples: Vec<(String, u64)> =
                counts.into_iter().map(|(status, n)| (format!("{{status=\"{status}\"}}"), n as u64)).collect();
            gauge(&mut out, "ludus_epochs", "Settlement epochs by posting status.", "gauge", &samples);
        }
        *cached = Some((std::time::Instant::now(), out.clone()));
        out
    }
}

#[cfg(test)]
mod label_tests {
    use super::label_value;

    #[test]
    fn label_values_cannot_break_out_of_their_label_or_line() {
        assert_eq!(label_value("plain-model.Q4_1"), "plain-model.Q4_1");
        let evil = "x\"} 1\nludus_fake_metric 999\n\\";
        let escaped = label_value(evil);
        assert!(!escaped.contains('\n'));
        assert_eq!(escaped, "x\\\"} 1\\nludus_fake_metric 999\\n\\\\");
    }
}

#[cfg(test)]
mod queue_tests {
    use super::render_queues;
    use crate::actors::messages::{ModelQueue, QueueTotals};

    #[test]
    fn each_models_queue_is_one_line_per_figure_with_its_name_escaped() {
        let queues = QueueTotals {
            models: vec![
                ModelQueue { model: "a\"} 9\nx".into(), jobs: 3, games: 2, oldest_wait_s: 1.23456 },
                ModelQueue { model: "b".into(), jobs: 1, games: 1, oldest_wait_s: 0.0 },
            ],
            running: 4,
            refused_full: 5,
            gave_way: 6,
            timed_out: 7,
        };
        let mut out = String::new();
        render_queues(&mut out, &queues);
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "ludus_queued_jobs{model=\"a\\\"} 9\\nx\"} 3",
                "ludus_queued_jobs{model=\"b\"} 1",
                "ludus_running_jobs 4",
                "ludus_queued_games{model=\"a\\\"} 9\\nx\"} 2",
                "ludus_queued_games{model=\"b\"} 1",
                "ludus_queue_oldest_wait_seconds{model=\"a\\\"} 9\\nx\"} 1.235",
                "ludus_queue_oldest_wait_seconds{model=\"b\"} 0.000",
                "ludus_queue_refused_total{reason=\"full\"} 5",
                "ludus_queue_refused_total{reason=\"gave_way\"} 6",
                "ludus_queue_refused_total{reason=\"timeout\"} 7",
            ]
        );
        // Every figure is declared once, with its type.
        for name in [
            "ludus_queued_jobs",
            "ludus_running_jobs",
            "ludus_queued_games",
            "ludus_queue_oldest_wait_seconds",
            "ludus_queue_refused_total",
        ] {
            assert_eq!(out.matches(&format!("# TYPE {name} ")).count(), 1, "{name}");
        }
    }
}
