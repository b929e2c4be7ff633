//! Near-tie steering on the real SmolLM2, checked the way the server checks: every proof
//! against the reference of the format it declares and that claim against the stricter
//! formats (`verify_claimed`), then each node's forgiven near-ties summed over its tasks
//! (`steering::judge`).
//!
//! - Honest nodes in every format (the real engine, batch 8) are never flagged and never
//!   rejected.
//! - Steering rogues run the real model in their own decode loop and pick, within the
//!   margin of the format they declare, (a) one chosen word whenever it is close enough,
//!   (b) anything but the end of the answer whenever that is close enough, or (c) claim
//!   int8 while running f32 (and steer in its margin). The false claim, and steering toward
//!   a word in int8, are caught in at least 99 % of runs of 300 generated tokens; steering
//!   that finds fewer chances (a margin of 1.0 in int4 and bf16, or the end of the answer)
//!   takes longer, and must be caught within 3,000.
//!
//! `LUDUS_STEERING_RUNS=N` runs per rogue (default 2) and `LUDUS_STEERING_HONEST=N` tasks
//! per honest format (default 8; `LUDUS_STEERING_OFFSET=K` starts them at task K); the table in docs/proof-of-inference.md is
//! `LUDUS_STEERING_RUNS=100 LUDUS_STEERING_HONEST=100 cargo test --release --test it
//! steering:: -- --nocapture`.

use std::collections::HashMap;
use std::time::Instant;

use ludus::crypto::identity::{keccak, Identity};
use ludus::inference::kv_cache::KvCache;
use ludus::inference::llama::LogitsFor;
use ludus::inference::sampling::{candidates, gumbel, sample};
use ludus::inference::{ChatMessage, Engine, EngineConfig, GenerateRequest, Model, Quantization, SamplingParams};
use ludus::proof::steering::{judge, NodeDeviations, TaskDeviations};
use ludus::proof::verify::verify_claimed;
use ludus::proof::{Format, Proof, ProofBuilder, Tolerances};
use tch::{Device, Kind, Tensor};

use super::helpers::smollm2;

/// The model name proofs carry.
pub const MODEL_NAME: &str = "SmolLM2-135M-Instruct.Q4_1";
/// Most tokens per answer.
const MAX_TOKENS: usize = 64;
/// Generated tokens per rogue run.
const RUN_TOKENS: usize = 300;
/// How long a run of a rogue that need not be caught within [`RUN_TOKENS`] may go on.
const LONG_RUN_TOKENS: usize = 3_000;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Half open questions, half questions with a short answer (where the end of the answer
/// comes early and a rogue can pass over it).
const ASKS: &[&str] = &[
    "Greet the traveller as a grumpy blacksmith.",
    "Answer in one word: is the forest safe at night?",
    "Tell me a rumour about the old mill.",
    "Reply with yes or no: will you join my party?",
    "Describe the castle gate in one sentence.",
    "In a few words, what is your name?",
    "Warn the player about wolves in the forest.",
    "Answer briefly: how much is a healing potion?",
];

pub struct Task {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub challenge: [u8; 32],
}

/// The i-th task: a chat prompt, greedy or seeded sampling, a fresh challenge.
fn task(model: &Model, i: usize) -> Task {
    let messages = vec![
        ChatMessage { role: "system".into(), content: "You are an NPC in a fantasy village.".into() },
        ChatMessage { role: "user".into(), content: format!("{} (#{i})", ASKS[i % ASKS.len()]) },
    ];
    let params = if i.is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams { temperature: 0.8, top_p: 0.95, seed: 7000 + i as u64, ..Default::default() }
    };
    Task {
        prompt: model.chat_prompt(&messages).unwrap(),
        params,
        challenge: keccak(&(i as u64 ^ 0x5eed).to_be_bytes()),
    }
}

fn rows(t: &Tensor) -> Vec<f32> {
    let t = t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
    let mut out = vec![0f32; t.numel()];
    t.copy_data(&mut out, t.numel());
    out
}

/// An honest node: the real engine, its proof in its own format.
fn honest_generate(engine: &Engine, node: &Identity, tasks: &[(usize, Task)]) -> Vec<(Vec<u32>, Proof)> {
    let format = Format::of(engine.quantization, engine.kind);
    let receivers: Vec<_> = tasks
        .iter()
        .map(|(_, t)| {
            let request = GenerateRequest {
                prompt: t.prompt.clone(),
                params: t.params.clone(),
                max_tokens: MAX_TOKENS,
                collect_hidden: true,
                ..GenerateRequest::default()
            };
            engine.submit(request).unwrap()
        })
        .collect();
    receivers
        .into_iter()
        .zip(tasks)
        .map(|(rx, (i, t))| {
            let mut builder = ProofBuilder::new(t.challenge, 64).format(format);
            let completion = ludus::proof::signed::collect_blocking(rx, &mut builder).unwrap();
            let proof = builder.finish(node, *i as u64, "smollm2", &completion).expect("a proof");
            (completion, proof)
        })
        .collect()
}

/// How a rogue picks its tokens, within the margin of the format it declares.
#[derive(Clone, Copy)]
pub struct Steer {
    pub claim: Format,
    /// Prefer this token whenever it scores within the margin of the sampler's pick.
    pub word: Option<u32>,
    /// Never end the answer while another token scores within the margin.
    pub skip_end: bool,
}

impl Steer {
    /// Its own sampler's pick, then the steered one. Stays 10 % inside the margin, so its
    /// own numbers and the reference's may differ a little without a mismatch. Below the
    /// calibration temperature (0.8) the verifier scales score gaps by T / 0.8
    /// (`proof::verify::tie_margin`): the scores' room grows to margin × 0.8 / T, all of
    /// which it takes.
    fn choose(&self, logits: &[f32], params: &SamplingParams, position: u64, stops: &[u32]) -> u32 {
        let pick = sample(logits, params, position);
        let scored: Vec<(u32, f64)> = if params.temperature == 0.0 {
            logits.iter().enumerate().map(|(t, &l)| (t as u32, l as f64)).collect()
        } else {
            candidates(logits, params)
                .into_iter()
                .map(|(t, s)| (t, s as f64 + gumbel(params.seed, position, t)))
                .collect()
        };
        let score = |token: u32| scored.iter().find(|&&(t, _)| t == token).map(|&(_, s)| s);
        let budget = if params.temperature == 0.0 {
            0.9 * self.claim.tie_margin() as f64
        } else {
            0.9 * self.claim.tie_margin() as f64 / (params.temperature as f64 / 0.8).min(1.0)
        };
        let best = score(pick).unwrap_or(f64::INFINITY);
        if self.skip_end && stops.contains(&pick) {
            let other = scored
                .iter()
                .filter(|(t, _)| !stops.contains(t))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .filter(|&&(_, s)| best - s <= budget);
            if let Some(&(t, _)) = other {
                return t;
            }
        }
        if let Some(word) = self.word {
            if !stops.contains(&pick) && score(word).is_some_and(|s| best - s <= budget) {
                return word;
            }
        }
        pick
    }
}

/// A rogue: the real model in its own batched decode loop, every token through `steer`,
/// the proof built from its own hidden states and signed for the format it claims.
pub fn rogue_generate(
    model: &Model,
    steer: Steer,
    node: &Identity,
    tasks: &[(usize, Task)],
    max_tokens: usize,
) -> Vec<(Vec<u32>, Proof)> {
    let llama = &model.llama;
    let stops = &model.tokenizer.stop_tokens;
    let b = tasks.len();
    let longest = tasks.iter().map(|(_, t)| t.prompt.len()).max().unwrap();
    let mut cache = KvCache::new(&llama.config, b, longest + max_tokens + 1, llama.device, llama.kind).unwrap();
    let mut builders: Vec<ProofBuilder> =
        tasks.iter().map(|(_, t)| ProofBuilder::new(t.challenge, 64).format(steer.claim)).collect();
    let mut completions: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let d = llama.config.hidden_size;
    for (slot, (_, t)) in tasks.iter().enumerate() {
        let p = t.prompt.len();
        let out = llama.prefill(&mut cache, slot, &t.prompt, 0, LogitsFor::Last).unwrap();
        let hidden = rows(&out.hidden);
        builders[slot].prompt_rows(p, &hidden);
        builders[slot].token_row(&hidden[(p - 1) * d..p * d]);
        let token = steer.choose(&rows(&out.logits), &t.params, p as u64, stops);
        completions[slot].push(token);
        done[slot] = stops.contains(&token) || max_tokens == 1;
    }
    while !done.iter().all(|&d| d) {
        let last: Vec<u32> = completions.iter().map(|c| *c.last().unwrap()).collect();
        let positions: Vec<usize> = (0..b).map(|s| tasks[s].1.prompt.len() + completions[s].len() - 1).collect();
        let out = llama.decode(&mut cache, &last, &positions).unwrap();
        let (hidden, logits) = (rows(&out.hidden), rows(&out.logits));
        let vocab = logits.len() / b;
        for slot in 0..b {
            if done[slot] {
                continue;
            }
            builders[slot].token_row(&hidden[slot * d..(slot + 1) * d]);
            let row = &logits[slot * vocab..(slot + 1) * vocab];
            let token = steer.choose(row, &tasks[slot].1.params, positions[slot] as u64 + 1, stops);
            completions[slot].push(token);
            done[slot] = stops.contains(&token) || completions[slot].len() == max_tokens;
        }
    }
    builders
        .into_iter()
        .zip(completions)
        .zip(tasks)
        .map(|((mut builder, completion), (i, _))| {
            let proof = builder.finish(node, *i as u64, MODEL_NAME, &completion).expect("a proof");
            (completion, proof)
        })
        .collect()
}

/// What the server concludes of one node's tasks, judged after each one.
#[derive(Default)]
struct Tally {
    tasks: usize,
    rejected: Vec<String>,
    flagged: Option<String>,
    record: NodeDeviations,
    forgiven: u64,
    worst_gap: f32,
    min_mean_error: f32,
    max_mean_error: f32,
    /// Smallest (stricter reference's error) / (own reference's error): below 0.5 is a false claim.
    min_stricter_ratio: f32,
}

impl Tally {
    fn new() -> Self {
        Self { min_mean_error: f32::INFINITY, min_stricter_ratio: f32::INFINITY, ..Self::default() }
    }

    fn check(&mut self, references: &HashMap<Quantization, Model>, (task, completion, proof): (&Task, &[u32], &Proof)) {
        let tol = Tolerances::default();
        let reference = |q: Quantization| references.get(&q);
        let checked =
            verify_claimed(&reference, proof, &task.prompt, 0, completion, &task.params, &tol, Some(&[])).unwrap();
        let v = &checked.verdict;
        if let Ok(dump) = std::env::var("LUDUS_STEERING_DUMP") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).create(true).open(dump).unwrap();
            for d in &v.deviations {
                writeln!(f, "{} {} {:.4} {} {}", v.format, completion.len(), d.gap, d.rank, d.passed_end).unwrap();
            }
            writeln!(f, "{} {} task {:.4} {}", v.format, completion.len(), v.worst_tie_margin, checked.reasons())
                .unwrap();
        }
        self.tasks += 1;
        self.worst_gap = self.worst_gap.max(v.deviations.iter().map(|d| d.gap).fold(0.0, f32::max));
        self.min_mean_error = self.min_mean_error.min(v.mean_value_error);
        self.max_mean_error = self.max_mean_error.max(v.mean_value_error);
        for (_, e) in &checked.stricter {
            self.min_stricter_ratio = self.min_stricter_ratio.min(e / v.mean_value_error.max(1e-9));
        }
        if !checked.accepted() {
            self.rejected.push(checked.reasons());
            return;
        }
        self.forgiven += v.deviations.len() as u64;
        self.record.add(&TaskDeviations::of(v, ludus::proof::Format::declared_by(proof).unwrap()));
        if self.flagged.is_none() {
            self.flagged = judge(&self.record);
        }
    }

    fn caught(&self) -> bool {
        !self.rejected.is_empty() || self.flagged.is_some()
    }
}

#[test]
fn steering_rogues_are_flagged_and_honest_nodes_in_every_format_are_not() {
    let Some(path) = smollm2() else { return };
    let load = |q: Quantization, kind: Option<Kind>| Model::load_quantized(&path, Device::Cpu, kind, q, None).unwrap();
    let references: HashMap<Quantization, Model> = [
        (Quantization::None, load(Quantization::None, Some(Kind::Float))),
        (Quantization::Int8, load(Quantization::Int8, None)),
        (Quantization::Int4, load(Quantization::Int4, None)),
    ]
    .into_iter()
    .collect();
    let base = &references[&Quantization::None];
    let the = base.tokenizer.encode(" the", false).unwrap();
    assert_eq!(the.len(), 1, "\" the\" is one token");
    let the = the[0];
    let node = Identity::generate();
    let (honest_n, runs) = (env_count("LUDUS_STEERING_HONEST", 8), env_count("LUDUS_STEERING_RUNS", 2));
    // Other honest tasks than the ones the rates were measured on (out-of-sample checks).
    let offset = env_count("LUDUS_STEERING_OFFSET", 0);
    let only = std::env::var("LUDUS_STEERING_CASES").unwrap_or_default();
    let wanted = |name: &str| only.split('|').any(|o| name.contains(o));
    let mut table = String::from(
        "| node | tasks | tokens | forgiven near-ties | wide | past the end | worst gap | mean value error | stricter / own (min) | rejected | flagged | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    let row = |name: &str, t: &Tally, extra: String, secs: f64| {
        format!(
            "| {name} | {} | {} | {} | {} | {} | {:.2} | {:.4}–{:.4} | {:.2} | {} | {extra} | {secs:.0} |\n",
            t.tasks,
            t.record.tokens,
            t.forgiven,
            t.record.wide,
            t.record.ends_passed,
            t.worst_gap,
            t.min_mean_error,
            t.max_mean_error,
            t.min_stricter_ratio,
            t.rejected.len(),
        )
    };

    // Honest nodes: one node per format, all its tasks judged together.
    let honest: [(&str, Quantization, Option<Kind>); 5] = [
        ("honest f32", Quantization::None, Some(Kind::Float)),
        ("honest f16", Quantization::None, Some(Kind::Half)),
        ("honest bf16", Quantization::None, Some(Kind::BFloat16)),
        ("honest int8", Quantization::Int8, None),
        ("honest int4 (the default)", Quantization::Int4, None),
    ];
    for (name, q, kind) in honest.into_iter().filter(|(n, ..)| wanted(n)) {
        let started = Instant::now();
        let config = EngineConfig { max_batch: 8, max_context: 512, threads: 2, ..Default::default() };
        let engine = Engine::start(load(q, kind), config).unwrap();
        let mut tally = Tally::new();
        for start in (0..honest_n).step_by(8) {
            let tasks: Vec<(usize, Task)> =
                (start..(start + 8).min(honest_n)).map(|i| (i, task(base, i + offset))).collect();
            for ((_, t), (completion, proof)) in tasks.iter().zip(honest_generate(&engine, &node, &tasks)) {
                tally.check(&references, (t, &completion, &proof));
            }
        }
        engine.shutdown();
        if tally.caught() {
            failures.push(format!("{name}: rejected {:?}, flagged {:?}", tally.rejected, tally.flagged));
        }
        let flagged = if tally.flagged.is_some() { "yes" } else { "no" };
        table.push_str(&row(name, &tally, flagged.into(), started.elapsed().as_secs_f64()));
        eprintln!("{}", table.lines().last().unwrap());
    }

    // Rogues: runs of 300 generated tokens, each judged on its own (a fresh node).
    // (name, weights, dtype, steering, caught within RUN_TOKENS in ≥ 99 % of runs)
    let rogues: [(&str, Quantization, Option<Kind>, Steer, bool); 5] = [
        (
            "(c) runs f32, claims int8, steers to \" the\" and past the end",
            Quantization::None,
            Some(Kind::Float),
            Steer { claim: Format::Int8, word: Some(the), skip_end: true },
            true,
        ),
        (
            "(a) steers to \" the\", runs int8",
            Quantization::Int8,
            None,
            Steer { claim: Format::Int8, word: Some(the), skip_end: false },
            true,
        ),
        (
            "(b) passes over the end, runs int8",
            Quantization::Int8,
            None,
            Steer { claim: Format::Int8, word: None, skip_end: true },
            false,
        ),
        (
            "(a) and (b), runs int4 (the default)",
            Quantization::Int4,
            None,
            Steer { claim: Format::Int4, word: Some(the), skip_end: true },
            false,
        ),
        (
            "(a) steers to \" the\", runs bf16",
            Quantization::None,
            Some(Kind::BFloat16),
            Steer { claim: Format::Bf16, word: Some(the), skip_end: false },
            false,
        ),
    ];
    for (name, q, kind, steer, required) in rogues.into_iter().filter(|(n, ..)| wanted(n)) {
        let started = Instant::now();
        let model = load(q, kind);
        let (mut caught, mut total) = (0usize, Tally::new());
        let mut next = 10_000 * (1 + name.len());
        let mut pending: Vec<(Task, Vec<u32>, Proof)> = Vec::new();
        // A run not caught within RUN_TOKENS goes on (for the rogues not required to be
        // caught by then), to say how long it takes.
        let mut late: Vec<usize> = Vec::new();
        for _ in 0..runs {
            let mut tally = Tally::new();
            let (mut run_tokens, mut missed) = (0, false);
            while !tally.caught() {
                if run_tokens >= RUN_TOKENS {
                    missed = true;
                    if required || run_tokens >= LONG_RUN_TOKENS {
                        break;
                    }
                }
                if pending.is_empty() {
                    let tasks: Vec<(usize, Task)> = (next..next + 8).map(|i| (i, task(base, i))).collect();
                    next += 8;
                    let answers = rogue_generate(&model, steer, &node, &tasks, MAX_TOKENS);
                    pending = tasks.into_iter().zip(answers).map(|((_, t), (c, p))| (t, c, p)).rev().collect();
                }
                let (t, completion, proof) = pending.pop().unwrap();
                tally.check(&references, (&t, &completion, &proof));
                run_tokens += completion.len();
                total.tasks += 1;
                total.record.tokens += completion.len() as u64;
            }
            match (missed, tally.caught()) {
                (false, _) => caught += 1,
                (true, true) => late.push(run_tokens),
                (true, false) => late.push(usize::MAX),
            }
            total.forgiven += tally.forgiven;
            total.record.wide += tally.record.wide;
            total.record.ends_passed += tally.record.ends_passed;
            total.worst_gap = total.worst_gap.max(tally.worst_gap);
            total.min_mean_error = total.min_mean_error.min(tally.min_mean_error);
            total.max_mean_error = total.max_mean_error.max(tally.max_mean_error);
            total.min_stricter_ratio = total.min_stricter_ratio.min(tally.min_stricter_ratio);
            total.rejected.extend(tally.rejected.first().cloned());
        }
        if required && (caught as f64) < 0.99 * runs as f64 {
            failures.push(format!("{name}: caught in {caught} of {runs} runs of {RUN_TOKENS} tokens"));
        }
        if !required && late.contains(&usize::MAX) {
            failures.push(format!("{name}: not caught within {LONG_RUN_TOKENS} tokens in some run: {late:?}"));
        }
        let outcome = match late.iter().max() {
            Some(_) if required => format!("{caught} of {runs} runs"),
            Some(worst) => format!("{caught} of {runs} runs; the other {} by {worst} tokens", late.len()),
            None => format!("{caught} of {runs} runs"),
        };
        table.push_str(&row(name, &total, outcome, started.elapsed().as_secs_f64()));
        eprintln!("{}", table.lines().last().unwrap());
        if let Some(reason) = total.rejected.first() {
            eprintln!("  e.g. rejected: {reason}");
        }
    }
    eprintln!("\n{table}");
    if let Ok(out) = std::env::var("LUDUS_STEERING_TABLE") {
        std::fs::write(out, &table).unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
