//! What a node runs tasks on: the real inference engine, or — for load tests only, behind
//! the `--fake-engine` flag — a test double that emits N tokens without a model.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::inference::chat_template::persona_breaks;
use crate::inference::engine::{Finished, Timings};
use crate::inference::{Engine, Event, FinishReason, GenerateRequest};
use crate::protocol::messages::MAX_PREFIX_BLOCKS;
use crate::protocol::{NodeLoad, PrefixHeld, TaskInput, TaskSpec};

/// Shape of the fake engine: `--fake-engine TOKENS[:MS_PER_TOKEN]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeSpec {
    pub tokens: usize,
    pub per_token: Duration,
    pub model: String,
    /// Text of every fake token (tests tag nodes with it).
    pub text: String,
}

impl std::str::FromStr for FakeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, ms) = s.split_once(':').unwrap_or((s, "0"));
        let tokens = n.parse().map_err(|_| format!("`{s}`: expected TOKENS[:MS_PER_TOKEN]"))?;
        let ms: f64 = ms.parse().map_err(|_| format!("`{s}`: expected TOKENS[:MS_PER_TOKEN]"))?;
        Ok(Self { tokens, per_token: Duration::from_secs_f64(ms / 1e3), model: "fake".into(), text: " tok".into() })
    }
}

pub enum Backend {
    Engine(Engine),
    Fake(FakeSpec),
}

impl Backend {
    pub fn models(&self) -> Vec<String> {
        match self {
            Self::Engine(e) => vec![e.model_name.clone()],
            Self::Fake(f) => vec![f.model.clone()],
        }
    }

    pub fn capacity(&self) -> usize {
        match self {
            Self::Engine(e) => e.config.max_batch,
            Self::Fake(_) => 1024,
        }
    }

    pub fn device(&self) -> String {
        match self {
            Self::Engine(e) => format!("{:?}/{:?}/{}", e.device, e.kind, e.quantization),
            Self::Fake(_) => "fake".into(),
        }
    }

    /// How the engine stores its weights (fakes are unquantized).
    pub fn quantization(&self) -> crate::inference::Quantization {
        match self {
            Self::Engine(e) => e.quantization,
            Self::Fake(_) => crate::inference::Quantization::None,
        }
    }

    /// The number format its proofs declare (fakes: f32).
    pub fn format(&self) -> crate::proof::Format {
        match self {
            Self::Engine(e) => crate::proof::Format::of(e.quantization, e.kind),
            Self::Fake(_) => crate::proof::Format::F32,
        }
    }

    /// Load figures for heartbeats; `tokens_per_s` is computed by the caller.
    pub fn load(&self) -> (NodeLoad, u64) {
        match self {
            Self::Engine(e) => {
                let l = &e.load;
                let load = NodeLoad {
                    running: l.running.load(Ordering::Relaxed),
                    waiting: l.waiting.load(Ordering::Relaxed),
                    queued_tokens: l.queued_tokens.load(Ordering::Relaxed),
                    tokens_per_s: 0.0,
                    free_memory_bytes: free_memory_bytes(),
                    model_bytes: e.model_bytes as u64,
                    quantization: e.quantization.to_string(),
                    prefix: prefix_held(l),
                    tuning: e.tuning.clone().unwrap_or_default(),
                    context: u32::try_from(e.config.max_context).unwrap_or(u32::MAX),
                };
                (load, l.generated_tokens.load(Ordering::Relaxed))
            }
            Self::Fake(_) => (NodeLoad { free_memory_bytes: free_memory_bytes(), ..NodeLoad::default() }, 0),
        }
    }

    /// Starts a task; events arrive on the returned channel, dropping it cancels. Also
    /// returns the prompt's length in tokens (for a receipt before the end).
    pub fn start(self: &Arc<Self>, task: &TaskSpec) -> Result<(UnboundedReceiver<Event>, usize), String> {
        if !self.models().contains(&task.model) {
            return Err(format!("this node does not serve `{}`", task.model));
        }
        match self.as_ref() {
            Self::Engine(engine) => {
                let prompt = match &task.input {
                    TaskInput::Chat(messages) => {
                        let text = engine.template.render(messages, true).map_err(|e| e.to_string())?;
                        engine.tokenizer.encode(&text, false)
                    }
                    TaskInput::Text(text) => engine.tokenizer.encode(text, true),
                }
                .map_err(|e| e.to_string())?;
                // Cut at the persona's end, so that the next request with it reuses it whole.
                let breaks = match &task.input {
                    TaskInput::Chat(messages) => persona_breaks(&engine.template, &engine.tokenizer, messages, &prompt),
                    TaskInput::Text(_) => Vec::new(),
                };
                let prompt_tokens = prompt.len();
                let request = GenerateRequest {
                    prompt,
                    prefix: task.prefix.clone(),
                    params: task.params.clone(),
                    max_tokens: task.max_tokens,
                    stop: task.stop.clone(),
                    // Hidden states for the proof of inference (a failover task's proof
                    // covers prompt + prefix as its prompt).
                    collect_hidden: task.challenge.is_some(),
                    breaks,
                    ..GenerateRequest::default()
                };
                Ok((engine.submit(request).map_err(|e| e.to_string())?, prompt_tokens))
            }
            Self::Fake(spec) => Ok(fake_run(spec.clone(), task)),
        }
    }
}

/// The fake engine: `spec.tokens` tokens (capped by `max_tokens`) of `spec.text`, paced.
fn fake_run(spec: FakeSpec, task: &TaskSpec) -> (UnboundedReceiver<Event>, usize) {
    let (tx, rx) = unbounded_channel();
    let total = spec.tokens.min(task.max_tokens);
    let start = task.prefix.len();
    let prompt_tokens = match &task.input {
        TaskInput::Chat(m) => m.iter().map(|m| m.content.len() / 4 + 4).sum(),
        TaskInput::Text(t) => t.len() / 4 + 1,
    };
    let received = Instant::now();
    actix_web::rt::spawn(async move {
        for i in start..total {
            if !spec.per_token.is_zero() {
                actix_web::rt::time::sleep(spec.per_token).await;
            }
            if tx
                .send(Event::Token { id: 1000 + i as u32, text: spec.text.clone(), hidden: None, logprobs: None })
                .is_err()
            {
                return;
            }
        }
        let ms = received.elapsed().as_secs_f64() * 1e3;
        let timings = Timings { queued_ms: 0.0, time_to_first_token_ms: ms, total_ms: ms };
        let done = Finished {
            reason: FinishReason::Length,
            tail: String::new(),
            prompt_tokens,
            completion_tokens: total.max(start),
            timings,
        };
        let _ = tx.send(Event::Done(done));
    });
    (rx, prompt_tokens)
}

/// Available memory from /proc/meminfo (0 when unknown).
fn free_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The engine's prefix cache, as a heartbeat carries it.
fn prefix_held(load: &crate::inference::engine::EngineLoad) -> PrefixHeld {
    let Ok(report) = load.prefix.lock() else { return PrefixHeld::default() };
    PrefixHeld {
        block: u32::try_from(report.block).unwrap_or(0),
        blocks: report.held.iter().take(MAX_PREFIX_BLOCKS).map(|n| hex::encode(&n[..8])).collect(),
        hits: report.stats.hits,
        misses: report.stats.misses,
        tokens_reused: report.stats.tokens_reused,
    }
}
