//! The engine: continuous batching over one [`Model`] on a dedicated thread.
//!
//! Sequences join and leave the running batch between decode steps. Each step runs at
//! most one prefill chunk (of the oldest admitted sequence, [`EngineConfig::prefill_chunk`]
//! tokens) and then one decode step for every running sequence, so a long prompt never
//! stalls the others for more than one chunk; with none running, up to [`PASSES_ALONE`]
//! chunks, as passes that give the numbers of a chunk alone. Running sequences occupy KV slots `0..B`
//! (compacted when one leaves), which makes the batch's cache a zero-copy view.
//!
//! A sequence decoded alone may speculate ([`super::speculative`]): its last token and a
//! few drafted ones go through the model as one short chunk, and the drafted tokens are
//! kept while the sampler, on the target's own logits, draws them.
//!
//! Callers get a channel of [`Event`]s per request; dropping the receiver cancels the
//! sequence, and its slot is free at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::error::{InferError, Result};
use super::grammar::{Constraint, GrammarCompiler};
use super::kv_cache::KvCache;
use super::llama::{LogitsFor, PrefillChunk};
use super::model::Model;
use super::prefix_cache::{chunk_ends, BlockName, PrefixCache, PrefixStats};
use super::sampling::{apply_penalties, sample, SamplingParams, TokenHistory};
use super::speculative::{Draft, DraftModel, Speculation, SpeculationStats};
use super::text_stream::TextStream;
use super::tokenizer::Tokenizer;

/// Prefill chunks a prompt runs in one step while no other sequence decodes: each is a
/// pass computed exactly as a step of its own would (same rows, same numbers, so a prefix
/// cache hit still changes no token), and int4 on the CPU unpacks its weights once for
/// all of them rather than once per chunk (docs/benchmarks.md, "Prefill passes"); other
/// formats and devices gain nothing and lose nothing. With sequences
/// decoding, a step holds one chunk, so that their tokens keep coming.
pub const PASSES_ALONE: usize = 4;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoded together (KV slots).
    pub max_batch: usize,
    /// Longest sequence (prompt + completion) in tokens; bounded by the model's context.
    pub max_context: usize,
    /// Prompt tokens run per prefill chunk.
    pub prefill_chunk: usize,
    /// libtorch intra-op threads for the engine thread (0 = libtorch's default). OpenMP
    /// settings are per thread, so the engine thread sets its own.
    pub threads: usize,
    /// Threads for a step that decodes a single sequence and prefills nothing (0 = same
    /// as `threads`). Such a step is bound by memory bandwidth, which one core saturates
    /// on typical desktop CPUs; more threads only add synchronization (docs/benchmarks.md).
    pub single_sequence_threads: usize,
    /// Memory for the prefix cache ([`super::prefix_cache`]), in bytes; 0 turns it off.
    pub prefix_cache_bytes: usize,
    /// Speculative decoding of a sequence decoded alone ([`super::speculative`]).
    pub speculative: Speculation,
    /// The draft model of `speculative.draft = model`: loaded beside the target, on its
    /// device, in its dtype and format.
    pub draft_model: Option<std::path::PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_context: 4096,
            prefill_chunk: 256,
            threads: 0,
            single_sequence_threads: 1,
            prefix_cache_bytes: 0,
            speculative: Speculation::OFF,
            draft_model: None,
        }
    }
}

/// One generation request.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Completion tokens already produced elsewhere (mid-stream failover): prefilled after
    /// the prompt, counted as generated, and never re-emitted.
    pub prefix: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Send the final hidden state of every position (proof of inference).
    pub collect_hidden: bool,
    /// End-of-sequence tokens are masked out until this many tokens were generated.
    pub min_tokens: usize,
    /// Prompt positions where a prefill chunk ends besides every `prefill_chunk` tokens
    /// ([`super::prefix_cache::chunk_ends`]): the end of a chat prompt's persona
    /// ([`super::chat_template::persona_breaks`]), so that the part it shares with other
    /// requests (a persona) is cached whole. Like the chunk size, they decide which rows
    /// are computed together; with the same cuts, a cached and an uncached run give the
    /// same bits.
    pub breaks: Vec<usize>,
}

pub use crate::task::FinishReason;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub queued_ms: f64,
    pub time_to_first_token_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    /// Text held back (a possible stop-sequence prefix) that turned out not to be one.
    pub tail: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The first `rows` positions of the prompt came from the prefix cache without their
    /// hidden states (with `collect_hidden`; sent before any `PromptHidden`). The hidden
    /// states of a prompt's last [`HIDDEN_TAIL_ROWS`] rows always come, computed or cached.
    PromptCached {
        rows: usize,
    },
    /// The prompt's final hidden states, `[rows, hidden]` flattened (with `collect_hidden`).
    PromptHidden {
        rows: usize,
        values: Vec<f32>,
    },
    /// One sampled token and the text it releases (possibly empty). `hidden` is the final
    /// hidden state of the position whose logits chose it (with `collect_hidden`).
    Token {
        id: u32,
        text: String,
        hidden: Option<Vec<f32>>,
        /// With `params.logprobs`: the token's log probability and the best alternatives.
        logprobs: Option<crate::task::TokenLogprobs>,
    },
    Done(Finished),
    /// The request cannot run (context overflow, unknown token): the caller's fault.
    Rejected(String),
    /// The engine failed while running the sequence.
    Error(String),
}

/// Prompt rows at the end of a prompt whose hidden states a request that collects them
/// always gets, computed or restored from the prefix cache (which keeps every row's): a
/// proof commits to rows among a prompt's last 32 (`proof::commitment::CHUNK`, checked by
/// a test).
pub const HIDDEN_TAIL_ROWS: usize = 64;

/// Live load figures, read by the node's heartbeats.
#[derive(Debug, Default)]
pub struct EngineLoad {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub queued_tokens: AtomicUsize,
    pub generated_tokens: AtomicU64,
    /// The prefix cache's counters and the names of the blocks it holds (most recently
    /// used first), for the heartbeat; empty when it is off.
    pub prefix: std::sync::Mutex<PrefixReport>,
    /// Passes that checked a draft, tokens drafted and tokens kept ([`super::speculative`]).
    pub speculation_passes: AtomicU64,
    pub drafted_tokens: AtomicU64,
    pub accepted_tokens: AtomicU64,
    /// Draft tokens a pass may carry, as the pass costs measured at start allow
    /// ([`super::pass_cost`]); 0 until measured, or with speculation off.
    pub draft_cap: AtomicUsize,
}

impl EngineLoad {
    /// Speculative decoding's counters so far.
    pub fn speculation(&self) -> SpeculationStats {
        SpeculationStats {
            passes: self.speculation_passes.load(Ordering::Relaxed),
            drafted: self.drafted_tokens.load(Ordering::Relaxed),
            accepted: self.accepted_tokens.load(Ordering::Relaxed),
        }
    }
}

/// What a node says of its prefix cache.
#[derive(Debug, Clone, Default)]
pub struct PrefixReport {
    pub stats: PrefixStats,
    /// Block size in tokens (0 when the cache is off).
    pub block: usize,
    pub held: Vec<BlockName>,
}

/// Block names a heartbeat carries at most (the most recently used).
pub const MAX_REPORTED_BLOCKS: usize = 64;

struct Command {
    request: GenerateRequest,
    /// The request's grammar, compiled by the caller (never on the engine thread).
    constraint: Option<Constraint>,
    events: UnboundedSender<Event>,
    received: Instant,
}

/// Handle to the engine thread.
pub struct Engine {
    commands: mpsc::Sender<Command>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<super::chat_template::ChatTemplate>,
    pub model_name: String,
    pub config: EngineConfig,
    pub load: Arc<EngineLoad>,
    pub device: Device,
    pub kind: Kind,
    pub weight_bytes: usize,
    /// Weight memory held (embedding included; a draft model's too), for heartbeats and
    /// planning.
    pub model_bytes: usize,
    /// KV-cache memory, allocated up front for `max_batch × max_context` tokens (and a
    /// draft model's one slot).
    pub kv_cache_bytes: usize,
    pub quantization: super::qlinear::Quantization,
    pub hidden_size: usize,
    /// What start-up tuning chose and why ([`super::tune`]); None when nothing was tuned.
    pub tuning: Option<String>,
    thread: Option<std::thread::JoinHandle<Model>>,
}

impl Engine {
    /// Starts the engine thread; the KV cache is sized by `config`.
    pub fn start(model: Model, mut config: EngineConfig) -> Result<Self> {
        config.speculative.validate().map_err(InferError::InvalidRequest)?;
        config.max_context = config.max_context.min(model.llama.config.max_position_embeddings).max(2);
        config.max_batch = config.max_batch.max(1);
        config.prefill_chunk = config.prefill_chunk.max(1);
        let cache = KvCache::new(
            &model.llama.config,
            config.max_batch,
            config.max_context,
            model.llama.device,
            model.llama.kind,
        )?;
        let prefix = if config.prefix_cache_bytes == 0 {
            None
        } else {
            PrefixCache::new(
                &model.llama.config,
                config.prefill_chunk,
                config.prefix_cache_bytes,
                model.llama.device,
                model.llama.kind,
            )?
        };
        let drafter = match (config.speculative.draft, &config.draft_model) {
            (Draft::Model, None) => {
                return Err(InferError::InvalidRequest(
                    "speculative.draft = \"model\" needs a draft model (engine.draft_model, --draft-model)".into(),
                ))
            }
            (Draft::Model, Some(path)) => {
                let llama = &model.llama;
                let draft = Model::load_quantized(path, llama.device, Some(llama.kind), llama.quantization, None)?;
                Some(DraftModel::new(draft, &model, config.max_context, config.prefill_chunk)?)
            }
            _ => None,
        };
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(EngineLoad::default());
        let handle = Self {
            commands: tx,
            tokenizer: model.tokenizer.clone(),
            template: model.template.clone(),
            model_name: model.name.clone(),
            config: config.clone(),
            load: load.clone(),
            device: model.llama.device,
            kind: model.llama.kind,
            weight_bytes: model.llama.weight_bytes(),
            model_bytes: model.llama.model_bytes() + drafter.as_ref().map_or(0, DraftModel::model_bytes),
            kv_cache_bytes: cache.bytes() + drafter.as_ref().map_or(0, DraftModel::kv_cache_bytes),
            quantization: model.llama.quantization,
            hidden_size: model.llama.config.hidden_size,
            tuning: None,
            thread: None,
        };
        let thread = std::thread::Builder::new()
            .name("ludus-engine".into())
            .spawn(move || {
                Scheduler {
                    model,
                    config,
                    cache,
                    prefix,
                    drafter,
                    rx,
                    load,
                    waiting: VecDeque::new(),
                    prefilling: None,
                    running: Vec::new(),
                    draft_cap: 0,
                }
                .run()
            })
            .map_err(|e| InferError::io("engine thread", e))?;
        Ok(Self { thread: Some(thread), ..handle })
    }

    /// Queues a request; events arrive on the returned channel. Dropping it cancels.
    pub fn submit(&self, request: GenerateRequest) -> Result<UnboundedReceiver<Event>> {
        request.params.validate().map_err(|e| InferError::InvalidRequest(e.to_string()))?;
        if request.prompt.is_empty() {
            return Err(InferError::InvalidRequest("the prompt is empty".into()));
        }
        let constraint = match request.params.grammar.as_deref() {
            Some(grammar) => {
                let compiler = GrammarCompiler::for_tokenizer(&self.tokenizer)?;
                let mut constraint = compiler
                    .compile(grammar)
                    .map_err(|e| InferError::InvalidRequest(format!("the grammar does not compile: {e}")))?;
                // A failover continuation resumes the grammar where the old node left it.
                for &t in &request.prefix {
                    constraint
                        .advance(t)
                        .map_err(|e| InferError::InvalidRequest(format!("the prefix leaves the grammar: {e}")))?;
                }
                Some(constraint)
            }
            None => None,
        };
        let (events, rx) = unbounded_channel();
        self.load.waiting.fetch_add(1, Ordering::Relaxed);
        self.commands
            .send(Command { request, constraint, events, received: Instant::now() })
            .map_err(|_| InferError::EngineStopped)?;
        Ok(rx)
    }

    /// Stops accepting work and waits until running sequences finish.
    pub fn shutdown(self) {
        self.into_model();
    }

    /// Like [`Self::shutdown`], and gives the model back (to start another engine over the
    /// same weights, as the start-up tuning does); None if the engine thread panicked.
    pub fn into_model(mut self) -> Option<Model> {
        let thread = self.thread.take();
        drop(self);
        thread.and_then(|t| t.join().ok())
    }
}

struct Sequence {
    request: GenerateRequest,
    events: UnboundedSender<Event>,
    received: Instant,
    started: Instant,
    first_token: Option<Instant>,
    slot: usize,
    /// Prompt + prefix + generated tokens.
    tokens: Vec<u32>,
    /// How many of `tokens` are in the KV cache.
    cached: usize,
    /// Where the prompt's prefill chunks end ([`super::prefix_cache::chunk_ends`]).
    chunk_ends: Vec<usize>,
    generated: usize,
    history: TokenHistory,
    /// The text released so far, stop sequences applied.
    stream: TextStream,
    /// Where the output stands in its grammar, if it has one.
    constraint: Option<Constraint>,
    /// Tokens the next speculative pass may draft: follows how long the sequence's drafts
    /// have held (a pass of more rows costs more, and a draft that fails early wastes them).
    draft_len: usize,
    /// Passes in a row whose draft failed at its first token, and steps left to decode
    /// plainly before drafting again (0, 1, 3, then 7 after 1, 2, 3, 4+ such passes):
    /// text with nothing to look up stops paying for draft rows, while one miss among
    /// kept drafts costs no draft.
    draft_misses: u32,
    draft_pause: usize,
}

struct Scheduler {
    model: Model,
    config: EngineConfig,
    cache: KvCache,
    prefix: Option<PrefixCache>,
    /// The draft model, with `speculative.draft = model`.
    drafter: Option<DraftModel>,
    rx: mpsc::Receiver<Command>,
    load: Arc<EngineLoad>,
    waiting: VecDeque<Command>,
    prefilling: Option<Sequence>,
    running: Vec<Sequence>,
    /// Draft tokens a pass may carry here ([`super::pass_cost`]), at most `speculative.k`.
    draft_cap: usize,
}

enum Outcome {
    Continue,
    Finished(FinishReason),
    Failed(String),
}

impl Scheduler {
    /// Runs until every handle is dropped and the work is done; gives the model back.
    fn run(mut self) -> Model {
        self.serve();
        self.model
    }

    fn serve(&mut self) {
        if self.config.threads == 0 {
            self.config.threads = tch::get_num_threads().max(1) as usize;
        }
        if self.config.single_sequence_threads == 0 {
            self.config.single_sequence_threads = self.config.threads;
        }
        self.measure_draft_cap();
        let mut current_threads = 0;
        let mut open = true;
        loop {
            let idle = self.waiting.is_empty() && self.prefilling.is_none() && self.running.is_empty();
            if idle {
                if !open {
                    return;
                }
                match self.rx.recv() {
                    Ok(cmd) => self.waiting.push_back(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.waiting.push_back(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            let single = self.running.len() + self.prefilling.is_some() as usize == 1 && self.prefilling.is_none();
            let threads = if single { self.config.single_sequence_threads } else { self.config.threads };
            if threads != current_threads {
                tch::set_num_threads(threads as i32);
                current_threads = threads;
            }
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "engine step failed; failing the sequences in it");
                for seq in self.running.drain(..).chain(self.prefilling.take()) {
                    let _ = seq.events.send(Event::Error(e.to_string()));
                }
            }
            self.publish_load();
        }
    }

    /// With speculation on, on CPU: times a plain step and passes of 2..=k+1 rows as a lone
    /// sequence runs them (its threads) and caps drafts where one more row stops paying,
    /// at 0 where none does ([`super::pass_cost`]). A failed measurement, another device,
    /// or `speculative.timed = false` leaves k.
    fn measure_draft_cap(&mut self) {
        let k = self.config.speculative.k;
        self.draft_cap = k;
        if !self.config.speculative.enabled() {
            return;
        }
        if self.model.llama.device != Device::Cpu || !self.config.speculative.timed {
            self.load.draft_cap.store(k, Ordering::Relaxed);
            return;
        }
        tch::set_num_threads(self.config.single_sequence_threads as i32);
        let started = Instant::now();
        match super::pass_cost::measure(&self.model.llama, k + 1, true) {
            Ok(costs) => {
                self.draft_cap = super::pass_cost::draft_cap(&costs, k);
                let ms: Vec<String> = costs.iter().map(|c| format!("{c:.1}")).collect();
                let secs = started.elapsed().as_secs_f32();
                if self.draft_cap == 0 {
                    tracing::info!(k, step_then_pass_ms = %ms.join("/"), secs, draft_model_unused = self.drafter.is_some(),
                        "speculation: off here, a pass of two rows costs more than a drafted token saves");
                } else {
                    tracing::info!(k, cap = self.draft_cap, step_then_pass_ms = %ms.join("/"), secs,
                        "speculation: draft length capped by pass cost");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not time speculative passes; drafting up to k"),
        }
        self.load.draft_cap.store(self.draft_cap, Ordering::Relaxed);
    }

    /// Restores the cached leading chunks of `tokens` into `slot`, leaving at least the
    /// last token to compute (its logits choose the first one generated); with hidden
    /// states, also those of the restored rows among the last [`HIDDEN_TAIL_ROWS`]. A
    /// failed copy clears the slot and computes everything.
    fn restore_prefix(&mut self, tokens: &[u32], ends: &[usize], collect_hidden: bool, slot: usize) -> RestoredPrompt {
        let Some(prefix) = self.prefix.as_mut() else { return RestoredPrompt::default() };
        let hidden_from = collect_hidden.then(|| tokens.len().saturating_sub(HIDDEN_TAIL_ROWS));
        let limit = tokens.len().saturating_sub(1);
        let restored = prefix.restore(tokens, ends, limit, &mut self.cache, slot, hidden_from);
        // The hidden rows as the prover reads them: a failure to convert them is one to
        // restore.
        let restored = restored.and_then(|r| match &r.hidden {
            Some(h) if collect_hidden => Ok((r.rows, Some((h.size()[0] as usize, tensor_to_vec(h)?)))),
            _ => Ok((r.rows, None)),
        });
        match restored {
            Ok((rows, hidden)) => RestoredPrompt { rows, hidden },
            Err(e) => {
                tracing::warn!(error = %e, "could not restore from the prefix cache; computing the prompt");
                self.cache.clear(slot);
                RestoredPrompt::default()
            }
        }
    }

    fn publish_load(&self) {
        let queued: usize = self.waiting.iter().map(|c| c.request.prompt.len() + c.request.max_tokens).sum::<usize>()
            + self
                .running
                .iter()
                .chain(self.prefilling.as_ref())
                .map(|s| s.request.max_tokens.saturating_sub(s.generated))
                .sum::<usize>();
        self.load.running.store(self.running.len() + self.prefilling.is_some() as usize, Ordering::Relaxed);
        self.load.waiting.store(self.waiting.len(), Ordering::Relaxed);
        self.load.queued_tokens.store(queued, Ordering::Relaxed);
        if let Some(prefix) = &self.prefix {
            let stats = prefix.stats();
            if self.load.prefix.lock().is_ok_and(|r| r.stats != stats) {
                // Built before locking again: the heartbeat reads the report meanwhile.
                let report = PrefixReport { stats, block: prefix.block(), held: prefix.held(MAX_REPORTED_BLOCKS) };
                if let Ok(mut current) = self.load.prefix.lock() {
                    *current = report;
                }
            }
        }
    }

    fn drop_cancelled(&mut self) {
        self.waiting.retain(|c| !c.events.is_closed());
        if self.prefilling.as_ref().is_some_and(|s| s.events.is_closed()) {
            self.prefilling = None;
        }
        let before = self.running.len();
        self.running.retain(|s| !s.events.is_closed());
        if self.running.len() != before {
            self.compact();
        }
    }

    /// Re-packs running sequences into slots `0..B` and the prefilling one into slot `B`.
    fn compact(&mut self) {
        // A sequence whose cache could not be moved is failed, never run on a corrupt cache.
        let mut broken = Vec::new();
        for i in 0..self.running.len() {
            let from = self.running[i].slot;
            if from != i {
                if let Err(e) = self.cache.move_slot(from, i) {
                    tracing::error!(error = %e, "KV slot move failed; failing the sequence");
                    broken.push((i, e.to_string()));
                }
                self.running[i].slot = i;
            }
        }
        for (i, error) in broken.iter().rev() {
            let seq = self.running.remove(*i);
            let _ = seq.events.send(Event::Error(format!("KV cache move failed: {error}")));
        }
        if !broken.is_empty() {
            return self.compact();
        }
        let b = self.running.len();
        if let Some(seq) = self.prefilling.as_mut() {
            if seq.slot != b {
                let moved = self.cache.move_slot(seq.slot, b);
                seq.slot = b;
                if let Err(e) = moved {
                    tracing::error!(error = %e, "KV slot move failed; failing the sequence");
                    if let Some(seq) = self.prefilling.take() {
                        let _ = seq.events.send(Event::Error(format!("KV cache move failed: {e}")));
                    }
                }
            }
        }
    }

    fn admit(&mut self) {
        while self.prefilling.is_none() && self.running.len() < self.config.max_batch {
            let Some(cmd) = self.waiting.pop_front() else {
                return;
            };
            let r = &cmd.request;
            let context = r.prompt.len() + r.prefix.len();
            if context + 1 > self.config.max_context || r.prefix.len() >= r.max_tokens.max(1) {
                let err =
                    InferError::ContextOverflow { got: context, max_new: r.max_tokens, limit: self.config.max_context };
                let _ = cmd.events.send(Event::Rejected(err.to_string()));
                continue;
            }
            if let Some(bad) =
                r.prompt.iter().chain(&r.prefix).find(|&&t| t as usize >= self.model.llama.config.vocab_size)
            {
                let _ = cmd.events.send(Event::Rejected(format!("token id {bad} is outside the vocabulary")));
                continue;
            }
            // A continuation's text goes on from the prefix's: a stop sequence that spans
            // the two ends the answer here as it does for the server, which reads the
            // whole text (a fresh stream would not see it, and generate past the end).
            let mut stream = TextStream::new(&r.stop);
            for &t in &r.prefix {
                stream.push(&self.model.tokenizer, t);
            }
            // Failover after the old node sampled end-of-sequence (or a stop sequence):
            // nothing is left to do.
            if stream.stopped() {
                let done = Finished {
                    reason: FinishReason::Stop,
                    tail: String::new(),
                    prompt_tokens: r.prompt.len(),
                    completion_tokens: r.prefix.len(),
                    timings: Timings::default(),
                };
                let _ = cmd.events.send(Event::Done(done));
                continue;
            }
            let mut history = TokenHistory::new(&r.prompt);
            for &t in &r.prefix {
                history.push_generated(t);
            }
            let slot = self.running.len();
            self.cache.clear(slot);
            let tokens: Vec<u32> = r.prompt.iter().chain(&r.prefix).copied().collect();
            let breaks: Vec<usize> = r.breaks.iter().copied().filter(|&b| b < r.prompt.len()).collect();
            let chunk_ends = chunk_ends(tokens.len(), &breaks, self.config.prefill_chunk);
            let RestoredPrompt { rows: cached, hidden } =
                self.restore_prefix(&tokens, &chunk_ends, r.collect_hidden, slot);
            if cached > 0 && r.collect_hidden {
                let hidden_rows = hidden.as_ref().map_or(0, |(rows, _)| *rows);
                let _ = cmd.events.send(Event::PromptCached { rows: cached - hidden_rows });
                if let Some((rows, values)) = hidden {
                    let _ = cmd.events.send(Event::PromptHidden { rows, values });
                }
            }
            self.prefilling = Some(Sequence {
                generated: r.prefix.len(),
                request: cmd.request,
                events: cmd.events,
                received: cmd.received,
                started: Instant::now(),
                first_token: None,
                slot,
                tokens,
                cached,
                chunk_ends,
                history,
                stream,
                constraint: cmd.constraint,
                draft_len: self.config.speculative.k,
                draft_misses: 0,
                draft_pause: 0,
            });
        }
    }

    /// One pass over the weights: a decode token for every running sequence plus the
    /// next prefill chunk of the admitted sequence, if any (up to [`PASSES_ALONE`] chunks,
    /// as passes, when no sequence is running).
    fn step(&mut self) -> Result<()> {
        if self.running.is_empty() && self.prefilling.is_none() {
            return Ok(());
        }
        if let Some(draft) = self.draft() {
            return self.speculative_step(draft);
        }
        let tokens: Vec<u32> =
            self.running.iter().map(|s| *s.tokens.last().expect("running sequences have tokens")).collect();
        let positions: Vec<usize> = self.running.iter().map(|s| s.cached).collect();
        // Alone, a prompt runs several chunks in one step, each as a pass of its own.
        let passes = if self.running.is_empty() { PASSES_ALONE } else { 1 };
        let chunk_range = self.prefilling.as_ref().map(|seq| {
            let end = step_end(&seq.chunk_ends, seq.cached, self.config.prefill_chunk, passes);
            (seq.slot, seq.cached, end, end == seq.tokens.len())
        });
        let chunk_tokens: Vec<u32> = match (&self.prefilling, chunk_range) {
            (Some(seq), Some((_, start, end, _))) => seq.tokens[start..end].to_vec(),
            _ => Vec::new(),
        };
        let chunk = chunk_range.map(|(slot, start, _, last)| PrefillChunk {
            slot,
            tokens: &chunk_tokens,
            start,
            logits: if last { LogitsFor::Last } else { LogitsFor::None },
            pass_rows: self.config.prefill_chunk,
        });
        // Grammar masks for the tokens this step samples are computed on a second thread
        // while the model runs: off the critical path (docs/benchmarks.md, structured output).
        let pending: Vec<&mut Constraint> =
            self.running.iter_mut().filter_map(|s| s.constraint.as_mut()).filter(|c| c.needs_mask()).collect();
        let (llama, cache) = (&self.model.llama, &mut self.cache);
        let mut run = || {
            let _guard = tch::no_grad_guard();
            llama.step(cache, &tokens, &positions, chunk)
        };
        let out = if pending.is_empty() {
            run()?
        } else {
            std::thread::scope(|scope| {
                let masks = scope.spawn(move || pending.into_iter().for_each(Constraint::prepare));
                let out = run();
                let _ = masks.join();
                out
            })?
        };
        let tokenizer = self.model.tokenizer.clone();
        let d = self.model.llama.config.hidden_size;
        let vocab = self.model.llama.config.vocab_size;
        // Decode rows.
        if !self.running.is_empty() {
            let logits = tensor_to_vec(&out.decode.logits)?;
            let want_hidden = self.running.iter().any(|s| s.request.collect_hidden);
            let hidden = if want_hidden { Some(tensor_to_vec(&out.decode.hidden)?) } else { None };
            let mut finished = Vec::new();
            for (i, seq) in self.running.iter_mut().enumerate() {
                seq.cached += 1;
                let row = logits[i * vocab..(i + 1) * vocab].to_vec();
                let h = match (&hidden, seq.request.collect_hidden) {
                    (Some(all), true) => Some(all[i * d..(i + 1) * d].to_vec()),
                    _ => None,
                };
                match emit(seq, &tokenizer, row, h, self.config.max_context) {
                    Outcome::Continue => {}
                    ended => finished.push((i, ended)),
                }
            }
            for (i, ended) in finished.into_iter().rev() {
                let seq = self.running.remove(i);
                conclude(seq, ended, &self.load);
            }
        }
        // The prefill chunk.
        if let (Some(prefill), Some((_, start, end, last))) = (out.prefill, chunk_range) {
            let seq = self.prefilling.as_mut().expect("a chunk implies a prefilling sequence");
            seq.cached = end;
            if let Some(prefix) = self.prefix.as_mut() {
                // A failure only loses the cache's copy: the sequence's own is intact.
                let stored = prefix.store(
                    &seq.tokens,
                    &seq.chunk_ends,
                    (start, end),
                    &mut self.cache,
                    seq.slot,
                    &prefill.hidden,
                );
                if let Err(e) = stored {
                    tracing::warn!(error = %e, "could not store prompt blocks in the prefix cache");
                }
            }
            if seq.request.collect_hidden {
                let values = tensor_to_vec(&prefill.hidden)?;
                let _ = seq.events.send(Event::PromptHidden { rows: chunk_tokens.len(), values });
            }
            if last {
                // Convert first: on error the sequence is still in `prefilling` and gets its
                // Error event from the caller.
                let logits = tensor_to_vec(&prefill.logits)?;
                let wants_hidden = self.prefilling.as_ref().is_some_and(|s| s.request.collect_hidden);
                let hidden = if wants_hidden { Some(last_row(&prefill.hidden)?) } else { None };
                let mut seq = self.prefilling.take().expect("checked above");
                match emit(&mut seq, &tokenizer, logits, hidden, self.config.max_context) {
                    Outcome::Continue => {
                        self.running.push(seq);
                    }
                    ended => conclude(seq, ended, &self.load),
                }
            }
        }
        self.compact();
        Ok(())
    }
}

impl Scheduler {
    /// Tokens to check after the last one of the sequence decoded alone, when speculation
    /// is on and the drafter has any. Not under a grammar (its masks are prepared one
    /// token ahead, beside the model's pass) nor past what the sequence may still take.
    fn draft(&mut self) -> Option<Vec<u32>> {
        let spec = &self.config.speculative;
        if !spec.enabled() || self.prefilling.is_some() || self.running.len() != 1 {
            return None;
        }
        let seq = &mut self.running[0];
        if seq.constraint.is_some() {
            return None;
        }
        if seq.draft_pause > 0 {
            seq.draft_pause -= 1;
            return None;
        }
        // The pass yields one token past the draft; positions stay inside the context.
        let room = (seq.request.max_tokens.saturating_sub(seq.generated).saturating_sub(1))
            .min(self.config.max_context.saturating_sub(seq.tokens.len()))
            .min(seq.draft_len)
            .min(self.draft_cap);
        if room == 0 {
            return None;
        }
        let draft = match self.drafter.as_mut() {
            Some(drafter) => drafter.propose(&seq.tokens, room).unwrap_or_else(|e| {
                tracing::error!(error = %e, "the draft model failed three passes in a row; it drafts no more");
                Vec::new()
            }),
            None => spec.propose(&seq.tokens, room),
        };
        (!draft.is_empty()).then_some(draft)
    }

    /// One pass for the sequence decoded alone: its last token and `draft` as a chunk at
    /// its position. Row i's logits choose the token after input i, sampled exactly as a
    /// decode step would (same position, penalties, seed); the next row counts only while
    /// the drawn token is the drafted one. The cache keeps the rows of the inputs used.
    fn speculative_step(&mut self, draft: Vec<u32>) -> Result<()> {
        let tokenizer = self.model.tokenizer.clone();
        let (d, vocab) = (self.model.llama.config.hidden_size, self.model.llama.config.vocab_size);
        let seq = &mut self.running[0];
        let start = seq.cached;
        let mut input = Vec::with_capacity(draft.len() + 1);
        input.push(*seq.tokens.last().expect("running sequences have tokens"));
        input.extend_from_slice(&draft);
        let out = {
            let _guard = tch::no_grad_guard();
            self.model.llama.prefill(&mut self.cache, seq.slot, &input, start, LogitsFor::All)?
        };
        let logits = tensor_to_vec(&out.logits)?;
        let hidden = if seq.request.collect_hidden { Some(tensor_to_vec(&out.hidden)?) } else { None };
        let (mut used, mut accepted, mut outcome) = (0, 0u64, Outcome::Continue);
        while used < input.len() {
            let row = logits[used * vocab..(used + 1) * vocab].to_vec();
            let h = hidden.as_ref().map(|all| all[used * d..(used + 1) * d].to_vec());
            outcome = emit(seq, &tokenizer, row, h, self.config.max_context);
            let kept = draft.get(used) == seq.tokens.last();
            used += 1;
            accepted += kept as u64;
            if !kept || !matches!(outcome, Outcome::Continue) {
                break;
            }
        }
        // A draft kept whole may grow; one that failed is cut to what held, plus one; from
        // the second in a row that failed at once, drafting pauses, longer each time.
        let k = self.config.speculative.k;
        seq.draft_len =
            if accepted as usize == draft.len() { (seq.draft_len + 2).min(k) } else { accepted as usize + 1 };
        if accepted == 0 {
            seq.draft_misses += 1;
            seq.draft_pause = (1usize << (seq.draft_misses - 1).min(3)) - 1;
        } else {
            seq.draft_misses = 0;
        }
        // Rows past the last input used hold a rejected draft: forgotten.
        seq.cached = start + used;
        self.cache.set_len(seq.slot, start + used);
        self.load.speculation_passes.fetch_add(1, Ordering::Relaxed);
        self.load.drafted_tokens.fetch_add(draft.len() as u64, Ordering::Relaxed);
        self.load.accepted_tokens.fetch_add(accepted, Ordering::Relaxed);
        if !matches!(outcome, Outcome::Continue) {
            let seq = self.running.remove(0);
            conclude(seq, outcome, &self.load);
        }
        Ok(())
    }
}

/// Samples the next token of `seq` from `logits`, streams it, and says whether it ends.
fn emit(
    seq: &mut Sequence,
    tokenizer: &Tokenizer,
    mut logits: Vec<f32>,
    hidden: Option<Vec<f32>>,
    max_context: usize,
) -> Outcome {
    apply_penalties(&mut logits, &seq.request.params, &seq.history);
    if seq.generated < seq.request.min_tokens {
        for &t in &tokenizer.stop_tokens {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if let Some(constraint) = seq.constraint.as_mut() {
        if let Err(e) = constraint.mask(&mut logits) {
            return Outcome::Failed(format!("grammar: {e}"));
        }
    }
    let position = seq.tokens.len() as u64;
    let token = sample(&logits, &seq.request.params, position);
    let logprobs = seq.request.params.logprobs.map(|top| super::logprobs::compute(&logits, token, top));
    if let Some(constraint) = seq.constraint.as_mut() {
        // Fails only when the mask left nothing to sample (a grammar at a dead end).
        if let Err(e) = constraint.advance(token) {
            return Outcome::Failed(format!("grammar: {e}"));
        }
    }
    seq.tokens.push(token);
    seq.generated += 1;
    seq.history.push_generated(token);
    seq.first_token.get_or_insert_with(Instant::now);
    let is_stop_token = tokenizer.stop_tokens.contains(&token);
    let (text, hit) = seq.stream.push(tokenizer, token);
    let mut reason = hit.then_some(FinishReason::Stop);
    let _ = seq.events.send(Event::Token { id: token, text, hidden, logprobs });
    if is_stop_token {
        reason.get_or_insert(FinishReason::Stop);
    }
    if seq.generated >= seq.request.max_tokens || seq.tokens.len() >= max_context {
        reason.get_or_insert(FinishReason::Length);
    }
    match reason {
        Some(r) => Outcome::Finished(r),
        None => Outcome::Continue,
    }
}

/// What the prefix cache gave a prompt: its leading rows, and the hidden states of those
/// among its last [`HIDDEN_TAIL_ROWS`] (rows, values) when they are collected.
#[derive(Default)]
struct RestoredPrompt {
    rows: usize,
    hidden: Option<(usize, Vec<f32>)>,
}

/// Where a step's prefill ends when it starts at `cached` (a chunk's end, `ends` from
/// [`chunk_ends`]): after up to `passes` chunks, and after the first that ends a piece (is
/// shorter than `block`), so that passes of `block` rows from `cached` are exactly the
/// chunks.
fn step_end(ends: &[usize], cached: usize, block: usize, passes: usize) -> usize {
    let mut end = cached;
    for &e in ends.iter().filter(|&&e| e > cached).take(passes.max(1)) {
        let whole = e - end == block;
        end = e;
        if !whole {
            break;
        }
    }
    end
}

fn conclude(seq: Sequence, ended: Outcome, load: &EngineLoad) {
    match ended {
        Outcome::Finished(reason) => finish(seq, reason, load),
        Outcome::Failed(error) => {
            let _ = seq.events.send(Event::Error(error));
        }
        Outcome::Continue => {}
    }
}

fn finish(mut seq: Sequence, reason: FinishReason, load: &EngineLoad) {
    let now = Instant::now();
    let tail = seq.stream.finish();
    load.generated_tokens.fetch_add((seq.generated - seq.request.prefix.len()) as u64, Ordering::Relaxed);
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
    let timings = Timings {
        queued_ms: ms(seq.received, seq.started),
        time_to_first_token_ms: ms(seq.received, seq.first_token.unwrap_or(now)),
        total_ms: ms(seq.received, now),
    };
    let done =
        Finished { reason, tail, prompt_tokens: seq.request.prompt.len(), completion_tokens: seq.generated, timings };
    let _ = seq.events.send(Event::Done(done));
}

fn tensor_to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let flat = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_flatten(0, -1)?;
    Ok(Vec::<f32>::try_from(&flat)?)
}

fn last_row(t: &Tensor) -> Result<Vec<f32>> {
    let n = t.size()[0];
    tensor_to_vec(&t.f_narrow(0, n - 1, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_takes_whole_chunks_and_stops_after_a_pieces_last() {
        let ends = chunk_ends(40, &[13], 8);
        assert_eq!(ends, [8, 13, 21, 29, 37, 40]);
        assert_eq!(step_end(&ends, 0, 8, 4), 13, "the piece ends at 13");
        assert_eq!(step_end(&ends, 8, 8, 4), 13);
        assert_eq!(step_end(&ends, 13, 8, 1), 21, "one pass, one chunk");
        assert_eq!(step_end(&ends, 13, 8, 4), 40, "three whole chunks and the last");
        assert_eq!(step_end(&ends, 13, 8, 3), 37);
    }
}
