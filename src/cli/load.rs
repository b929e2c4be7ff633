//! `ludus bench load`: a load generator for the whole network path (HTTP → gateway →
//! distributor → node websocket → back). Fixed-concurrency (closed loop) or fixed
//! arrival rate (open loop). With no `--url` it self-hosts a server with fake-engine
//! nodes on loopback, so it measures the network's own overhead: the fake engine's
//! direct call latency is measured too and subtracted.

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
    /// Stream responses (SSE) instead of whole JSON bodies.
    #[arg(long)]
    pub stream: bool,
}

#[derive(Default)]
struct Results {
    latencies: Vec<Duration>,
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

pub fn run(settings: &Settings, args: LoadArgs) -> anyhow::Result<()> {
    let settings = settings.clone();
    actix_web::rt::System::new().block_on(async move {
        // The self-hosted network lives as long as the run (its data directory with it).
        let (base, key, _network) = match (&args.url, &args.key) {
            (Some(url), Some(key)) => (url.trim_end_matches('/').to_string(), key.clone(), None),
            (Some(_), None) => anyhow::bail!("--url needs --key"),
            (None, _) => {
                let (base, key, dir) = self_host(&settings, &args).await?;
                (base, key, Some(dir))
            }
        };
        let direct = direct_engine_latency(args.max_tokens).await;
        let connections = args.concurrency.unwrap_or(256);
        let target = Target {
            client: awc::Client::builder()
                .connector(awc::Connector::new().limit(connections))
                .timeout(Duration::from_secs(60))
                .finish(),
            url: format!("{base}/v1/chat/completions"),
            key,
            body: serde_json::json!({
                "model": args.model, "max_tokens": args.max_tokens, "stream": args.stream,
                "messages": [{"role": "user", "content": "Say something, villager."}],
            }),
            stream: args.stream,
            max_tokens: args.max_tokens,
            results: Rc::default(),
        };
        let started = Instant::now();
        let mode = drive(&target, &args, connections).await;
        let report = report(&args, mode, started.elapsed().as_secs_f64(), &mut target.results.borrow_mut(), &direct);
        println!("{}", serde_json::to_string_pretty(&report)?);
        Ok(())
    })
}

/// A throwaway server (private database, temporary data directory) with `--nodes`
/// fake-engine nodes on loopback and a game with a key; returns its base URL, the key and
/// the directory to keep alive.
async fn self_host(settings: &Settings, args: &LoadArgs) -> anyhow::Result<(String, String, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let mut s = settings.clone();
    s.server.bind = "127.0.0.1:0".into();
    s.server.data_dir = dir.path().to_path_buf();
    s.distributor.queue_capacity = 100_000;
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
        let spec = FakeSpec {
            tokens: args.max_tokens,
            per_token: Duration::ZERO,
            model: args.model.clone(),
            text: " tok".into(),
        };
        let options = NodeOptions {
            connect: format!("ws://{}/ws/node", handle.addr),
            key: dir.path().join(format!("n{i}.key")),
            capacity: 4096,
            distributor_address: Some(handle.distributor_address),
            receipts: None,
        };
        actix_web::rt::spawn(async move {
            let _ = run_node(Arc::new(Backend::Fake(spec)), options).await;
        });
    }
    wait_for_nodes(&format!("http://{}/v1/models", handle.addr), args.nodes).await?;
    Ok((format!("http://{}", handle.addr), key, dir))
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
    body: serde_json::Value,
    stream: bool,
    max_tokens: usize,
    results: Rc<RefCell<Results>>,
}

impl Target {
    /// One request, timed; counted only when the whole answer arrived.
    async fn request(self) {
        let started = Instant::now();
        let outcome = self.send().await;
        let mut r = self.results.borrow_mut();
        match outcome {
            Ok(()) => r.latencies.push(started.elapsed()),
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(e);
            }
        }
    }

    async fn send(&self) -> Result<(), String> {
        let mut response = self
            .client
            .post(&self.url)
            .bearer_auth(&self.key)
            .send_json(&self.body)
            .await
            .map_err(|e| e.to_string())?;
        let bytes = response.body().limit(1 << 20).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}: {}", response.status(), String::from_utf8_lossy(&bytes)));
        }
        let complete = if self.stream {
            bytes.ends_with(b"data: [DONE]\n\n")
        } else {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["usage"]["completion_tokens"].as_u64())
                == Some(self.max_tokens as u64)
        };
        if !complete {
            return Err(format!("incomplete answer: {}", String::from_utf8_lossy(&bytes)));
        }
        Ok(())
    }
}

/// Sends requests until `--duration-s` is over: at a fixed rate (open loop) or with
/// `connections` in flight at all times (closed loop). Returns which it was.
async fn drive(target: &Target, args: &LoadArgs, connections: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration_s);
    if let Some(rate) = args.rate {
        let mut tick = actix_web::rt::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut handles = Vec::new();
        while Instant::now() < deadline {
            tick.tick().await;
            handles.push(actix_web::rt::spawn(target.clone().request()));
        }
        for h in handles {
            let _ = h.await;
        }
        format!("fixed rate {rate} req/s")
    } else {
        let workers: Vec<_> = (0..connections)
            .map(|_| {
                let target = target.clone();
                actix_web::rt::spawn(async move {
                    while Instant::now() < deadline {
                        target.clone().request().await;
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
    let n = r.latencies.len();
    let added = |p: f64| percentile(&r.latencies, p) - percentile(direct, p);
    serde_json::json!({
        "mode": mode,
        "stream": args.stream,
        "max_tokens": args.max_tokens,
        "requests_ok": n,
        "errors": r.errors,
        "first_error": r.first_error,
        "requests_per_s": n as f64 / elapsed,
        "latency_ms": {"p50": percentile(&r.latencies, 0.5), "p90": percentile(&r.latencies, 0.9), "p99": percentile(&r.latencies, 0.99)},
        "direct_engine_ms": {"p50": percentile(direct, 0.5), "p99": percentile(direct, 0.99)},
        "added_latency_ms": {"p50": added(0.5), "p90": added(0.9), "p99": added(0.99)},
    })
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
