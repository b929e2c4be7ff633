//! `ludus bench load`: a load generator for the whole network path (HTTP → gateway →
//! distributor → node websocket → back). Fixed-concurrency (closed loop) or fixed
//! arrival rate (open loop). With no `--url` it self-hosts a server with fake-engine
//! nodes on loopback, so it measures the network's own overhead: the fake engine's
//! direct call latency is measured too and subtracted. With `--node-model` the self-hosted
//! nodes run that model; with `--personas` every request opens with one of a few long NPC
//! personas (the prefix cache's and cache-aware routing's workload) and, streamed, the
//! report gives the time to first token.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::inference::Event;
use crate::node::{run_node, Backend, FakeSpec, NodeOptions};
use crate::protocol::{TaskId, TaskInput, TaskSpec};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Server base URL; omitted = self-host a server with fake-engine nodes.
    #[arg(long)]
    pub url: Option<String>,
    /// API key (required with --url).
    #[arg(long)]
    pub key: Option<String>,
    /// Model to request (the self-hosted fake nodes serve `fake`).
    #[arg(long, default_value = "fake")]
    pub model: String,
    /// Closed loop: this many requests in flight at all times.
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: requests started per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Completion tokens per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Fake-engine nodes when self-hosting.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Stream responses (SSE) instead of whole JSON bodies; the report then has the time
    /// to first token.
    #[arg(long)]
    pub stream: bool,
    /// Self-host nodes that run this model file (engine settings from the config) instead
    /// of fake-engine ones.
    #[arg(long, conflicts_with = "url")]
    pub node_model: Option<std::path::PathBuf>,
    /// Requests open with one of this many NPC personas (a long system message each, as
    /// games send): worker w of the closed loop, or request i of the open loop, speaks to
    /// persona w (or i) modulo this. 0: a one-line user message only.
    #[arg(long, default_value_t = 0)]
    pub personas: usize,
    /// Words per persona (SmolLM2's tokenizer makes about 1.3 tokens of a word).
    #[arg(long, default_value_t = 750)]
    pub persona_words: usize,
    /// The number of the first persona: runs against one server with different numbers
    /// meet personas no earlier run warmed (a cold prefix cache without a restart).
    #[arg(long, default_value_t = 0)]
    pub first_persona: usize,
}

#[derive(Default)]
struct Results {
    latencies: Vec<Duration>,
    /// Time to the first token's text, for streamed requests.
    first_tokens: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

pub fn run(settings: &Settings, mut args: LoadArgs) -> anyhow::Result<()> {
    let settings = settings.clone();
    if let (Some(path), "fake") = (&args.node_model, args.model.as_str()) {
        args.model = crate::inference::model::model_name(path);
    }
    actix_web::rt::System::new().block_on(async move {
        // The self-hosted network lives as long as the run (its data directory with it).
        let (base, key, network) = match (&args.url, &args.key) {
            (Some(url), Some(key)) => (url.trim_end_matches('/').to_string(), key.clone(), None),
            (Some(_), None) => anyhow::bail!("--url needs --key"),
            (None, _) => {
                let (base, key, hosted) = self_host(&settings, &args).await?;
                (base, key, Some(hosted))
            }
        };
        // The network's own overhead is measured against the fake engine only.
        let fake = args.url.is_none() && args.node_model.is_none();
        let direct = if fake { direct_engine_latency(args.max_tokens).await } else { Vec::new() };
        let connections = args.concurrency.unwrap_or(256);
        let target = Target {
            client: awc::Client::builder()
                .connector(awc::Connector::new().limit(connections))
                .timeout(Duration::from_secs(60))
                .finish(),
            url: format!("{base}/v1/chat/completions"),
            key,
            model: args.model.clone(),
            personas: Rc::new(
                (args.first_persona..args.first_persona.saturating_add(args.personas))
                    .map(|i| persona(i, args.persona_words))
                    .collect(),
            ),
            stream: args.stream,
            max_tokens: args.max_tokens,
            results: Rc::default(),
        };
        let started = Instant::now();
        let mode = drive(&target, &args, connections).await;
        let mut report =
            report(&args, mode, started.elapsed().as_secs_f64(), &mut target.results.borrow_mut(), &direct);
        if let Some((_, distributor)) = &network {
            // What the self-hosted nodes' prefix caches did, and what routing made of them.
            let p = distributor.send(crate::actors::messages::PrefixCounters).await.unwrap_or_default();
            report["prefix_cache"] = serde_json::json!({"hits": p.hits, "misses": p.misses,
                "tokens_reused": p.tokens_reused, "routed": p.routed});
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
        Ok(())
    })
}

/// What a self-hosted run keeps alive: the data directory, and the distributor to ask for
/// its counters at the end.
type Hosted = (tempfile::TempDir, actix::Addr<crate::actors::distributor::Distributor>);

/// A throwaway server (private database, temporary data directory) with `--nodes`
/// fake-engine (or `--node-model`) nodes on loopback and a game with a key; returns its
/// base URL, the key and what to keep alive.
async fn self_host(settings: &Settings, args: &LoadArgs) -> anyhow::Result<(String, String, Hosted)> {
    let dir = tempfile::tempdir()?;
    let mut s = settings.clone();
    s.server.bind = "127.0.0.1:0".into();
    s.server.data_dir = dir.path().to_path_buf();
    s.distributor.queue_capacity = 100_000;
    // Every node connects from loopback.
    s.server.node_connections_per_minute = 0;
    s.server.node_links_per_address = 0;
    if let Some(path) = &args.node_model {
        // The server reads the model's tokenizer: it counts prompts itself, and routing by
        // prefix needs the prompt's tokens.
        s.distributor.model_files.insert(args.model.clone(), path.clone());
    }
    if s.database.url.is_empty() {
        // A throwaway database, so a load run never touches real books.
        let cluster = actix_web::rt::task::spawn_blocking(crate::ledger::cluster::PrivateCluster::throwaway).await??;
        s.database.url = crate::settings::Secret(cluster.url("postgres"));
    }
    let (handle, server) = crate::serve::start(&s).await?;
    let game = format!("load-{}", std::process::id());
    let (_, key) = handle.store.add_game(&game, u32::MAX / 2, u32::MAX / 2).await?;
    actix_web::rt::spawn(server);
    for i in 0..args.nodes {
        let (backend, capacity) = match &args.node_model {
            Some(path) => {
                let (settings, path) = (settings.clone(), path.clone());
                let start = move || super::RuntimeArgs::unset().start_engine(&settings, &path, None);
                let engine = actix_web::rt::task::spawn_blocking(start).await??;
                (Backend::Engine(engine), 0)
            }
            None => {
                let tokens = args.max_tokens;
                let text = " tok".into();
                (Backend::Fake(FakeSpec { tokens, per_token: Duration::ZERO, model: args.model.clone(), text }), 4096)
            }
        };
        let options = NodeOptions {
            connect: format!("ws://{}/ws/node", handle.addr),
            key: dir.path().join(format!("n{i}.key")),
            capacity,
            distributor_address: Some(handle.distributor_address),
            receipts: None,
        };
        actix_web::rt::spawn(async move {
            let _ = run_node(Arc::new(backend), options).await;
        });
    }
    wait_for_nodes(&format!("http://{}/v1/models", handle.addr), args.nodes).await?;
    Ok((format!("http://{}", handle.addr), key, (dir, handle.distributor.clone())))
}

/// A persona of about `words` words: the same lore for every persona, opened by a line
/// of its own (so no two share a leading block).
fn persona(i: usize, words: usize) -> String {
    let lore = "The blacksmith of Emberfall forged blades for three kings and trusts none of them; \
                the river spirits demand a song before any crossing; wolves avoid the old mill since \
                the fire; the mayor hides debts to the guild of lanterns; travellers pay in salt. ";
    let opening = format!("You are NPC number {i} of the village, and you never forget it. ");
    let mut text = opening;
    while text.split_whitespace().count() < words {
        text.push_str(lore);
    }
    text
}

/// Waits (up to 10 s) until `/v1/models` lists `nodes` nodes for the first model.
async fn wait_for_nodes(models_url: &str, nodes: usize) -> anyhow::Result<()> {
    let client = awc::Client::default();
    let mut joined = 0;
    for _ in 0..200 {
        joined = match client.get(models_url).send().await {
            Ok(mut r) => {
                r.json::<serde_json::Value>().await.ok().and_then(|v| v["data"][0]["nodes"].as_u64()).unwrap_or(0)
            }
            Err(_) => 0,
        };
        if joined as usize >= nodes {
            return Ok(());
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("only {joined} of {nodes} fake nodes joined")
}

/// Where the requests go and what they carry; results are collected here.
#[derive(Clone)]
struct Target {
    client: awc::Client,
    url: String,
    key: String,
    model: String,
    /// System messages, one per persona (empty: none).
    personas: Rc<Vec<String>>,
    stream: bool,
    max_tokens: usize,
    results: Rc<RefCell<Results>>,
}

impl Target {
    /// The body of request `n` (its persona: `speaker` modulo the personas).
    fn body(&self, speaker: usize, n: usize) -> serde_json::Value {
        let line = format!("Traveller #{n}: what news from the road?");
        let mut messages = vec![serde_json::json!({"role": "user", "content": line})];
        if !self.personas.is_empty() {
            let persona = &self.personas[speaker % self.personas.len()];
            messages.insert(0, serde_json::json!({"role": "system", "content": persona}));
        }
        serde_json::json!({"model": self.model, "max_tokens": self.max_tokens, "stream": self.stream, "messages": messages})
    }

    /// One request, timed; counted only when the whole answer arrived.
    async fn request(self, speaker: usize, n: usize) {
        let started = Instant::now();
        let outcome = self.send(&self.body(speaker, n), started).await;
        let mut r = self.results.borrow_mut();
        match outcome {
            Ok(first_token) => {
                r.latencies.push(started.elapsed());
                r.first_tokens.extend(first_token);
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(e);
            }
        }
    }

    /// Sends one request and reads the whole answer; for a stream, also when the first
    /// token's text arrived.
    async fn send(&self, body: &serde_json::Value, started: Instant) -> Result<Option<Duration>, String> {
        use futures_util::StreamExt;
        let mut response =
            self.client.post(&self.url).bearer_auth(&self.key).send_json(body).await.map_err(|e| e.to_string())?;
        let (mut bytes, mut first_token) = (Vec::new(), None);
        while let Some(chunk) = response.next().await {
            bytes.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
            if bytes.len() > 1 << 20 {
                return Err("an answer over 1 MiB".into());
            }
            if self.stream && first_token.is_none() && has_token_text(&bytes) {
                first_token = Some(started.elapsed());
            }
        }
        if !response.status().is_success() {
            return Err(format!("HTTP {}: {}", response.status(), String::from_utf8_lossy(&bytes)));
        }
        let complete = if self.stream {
            bytes.ends_with(b"data: [DONE]\n\n")
        } else {
            // All the tokens asked for, or a model that ended its answer itself.
            serde_json::from_slice::<serde_json::Value>(&bytes).ok().is_some_and(|v| {
                v["usage"]["completion_tokens"].as_u64() == Some(self.max_tokens as u64)
                    || v["choices"][0]["finish_reason"] == "stop"
            })
        };
        if !complete {
            return Err(format!("incomplete answer: {}", String::from_utf8_lossy(&bytes)));
        }
        Ok(first_token)
    }
}

/// Whether a stream's bytes so far hold a chunk with text (`"content":"` and a character).
fn has_token_text(bytes: &[u8]) -> bool {
    const MARK: &[u8] = b"\"content\":\"";
    bytes.windows(MARK.len() + 1).any(|w| w.starts_with(MARK) && w[MARK.len()] != b'"')
}

/// Sends requests until `--duration-s` is over: at a fixed rate (open loop) or with
/// `connections` in flight at all times (closed loop). Returns which it was.
async fn drive(target: &Target, args: &LoadArgs, connections: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration_s);
    if let Some(rate) = args.rate {
        let mut tick = actix_web::rt::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut handles = Vec::new();
        let mut n = 0;
        while Instant::now() < deadline {
            tick.tick().await;
            handles.push(actix_web::rt::spawn(target.clone().request(n, n)));
            n += 1;
        }
        for h in handles {
            let _ = h.await;
        }
        format!("fixed rate {rate} req/s")
    } else {
        let workers: Vec<_> = (0..connections)
            .map(|worker| {
                let target = target.clone();
                actix_web::rt::spawn(async move {
                    let mut n = 0;
                    while Instant::now() < deadline {
                        target.clone().request(worker, n).await;
                        n += 1;
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.await;
        }
        format!("fixed concurrency {connections}")
    }
}

/// The run's report: throughput, latency percentiles, and the latency the network adds
/// over calling the engine directly.
fn report(args: &LoadArgs, mode: String, elapsed: f64, r: &mut Results, direct: &[Duration]) -> serde_json::Value {
    r.latencies.sort();
    r.first_tokens.sort();
    let n = r.latencies.len();
    let added = |p: f64| percentile(&r.latencies, p) - percentile(direct, p);
    let mut report = serde_json::json!({
        "mode": mode,
        "stream": args.stream,
        "max_tokens": args.max_tokens,
        "requests_ok": n,
        "errors": r.errors,
        "first_error": r.first_error,
        "requests_per_s": n as f64 / elapsed,
        "latency_ms": {"p50": percentile(&r.latencies, 0.5), "p90": percentile(&r.latencies, 0.9), "p99": percentile(&r.latencies, 0.99)},
        "personas": args.personas,
        "first_persona": args.first_persona,
    });
    if !r.first_tokens.is_empty() {
        let first = &r.first_tokens;
        report["time_to_first_token_ms"] = serde_json::json!({"p50": percentile(first, 0.5), "p90": percentile(first, 0.9), "p99": percentile(first, 0.99)});
    }
    if !direct.is_empty() {
        report["direct_engine_ms"] =
            serde_json::json!({"p50": percentile(direct, 0.5), "p99": percentile(direct, 0.99)});
        report["added_latency_ms"] = serde_json::json!({"p50": added(0.5), "p90": added(0.9), "p99": added(0.99)});
    }
    report
}

/// Latency of calling the fake engine directly (no network), for the same token count.
async fn direct_engine_latency(tokens: usize) -> Vec<Duration> {
    let backend = Arc::new(Backend::Fake(FakeSpec {
        tokens,
        per_token: Duration::ZERO,
        model: "fake".into(),
        text: " tok".into(),
    }));
    let mut out = Vec::new();
    for i in 0..200 {
        let spec = TaskSpec {
            id: TaskId(i),
            model: "fake".into(),
            input: TaskInput::Text("x".into()),
            params: Default::default(),
            max_tokens: tokens,
            stop: vec![],
            prefix: vec![],
            challenge: None,
            ticket: crate::protocol::TaskTicket::issue(
                &[0; 32],
                TaskId(i),
                0,
                "fake",
                (tokens as u32, Default::default()),
                &crate::crypto::identity::Address([0; 20]),
            ),
        };
        let started = Instant::now();
        if let Ok((mut rx, _)) = backend.start(&spec) {
            while let Some(ev) = rx.recv().await {
                if matches!(ev, Event::Done(_) | Event::Error(_) | Event::Rejected(_)) {
                    break;
                }
            }
        }
        out.push(started.elapsed());
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_has_token_text_only_once_a_chunk_carries_some() {
        let role = b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n".to_vec();
        assert!(!has_token_text(&role));
        let mut text = role.clone();
        text.extend_from_slice(b"data: {\"choices\":[{\"delta\":{\"content\":\" Hail\"}}]}\n\n");
        assert!(has_token_text(&text));
    }

    #[test]
    fn personas_are_as_long_as_asked_and_differ_from_their_first_words() {
        let (a, b) = (persona(0, 750), persona(1, 750));
        assert!(a.split_whitespace().count() >= 750 && a.split_whitespace().count() < 800);
        assert_ne!(a.split_whitespace().take(5).collect::<Vec<_>>(), b.split_whitespace().take(5).collect::<Vec<_>>());
    }
}
