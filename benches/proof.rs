//! Proof of inference costs on the real SmolLM2, CPU, release build:
//! - generation overhead of building proofs (hidden states collected, top-k per row),
//!   alternating runs with and without, batch 1;
//! - verification time / generation time for ~128-token completions;
//! - proof bytes per 32 generated tokens;
//! - the server's write-ahead of a picked task's check (`actors::check_log`: the
//!   backlog's JSON of prompt, tokens and proof, one append) against that task's
//!   verification, and the `fdatasync` the log adds to a block;
//! - the proof-less check of the same tokens (`proof::delivered`, what a node that failed
//!   before its `Done` gets) on each reference it may be held to, against the
//!   verification.
//!
//! `cargo bench --bench proof` (needs `scripts/setup` for the model). Plain main, no
//! criterion: each figure is a ratio measured in the same run.

use std::time::{Duration, Instant};

use ludus::crypto::identity::Identity;
use ludus::inference::{ChatMessage, Engine, EngineConfig, GenerateRequest, Model, Quantization, SamplingParams};
use ludus::proof::{delivered, verify, ProofBuilder, Tolerances};
use tch::{Device, Kind};

const TOKENS: usize = 128;
const ROUNDS: usize = 3;
const ASKS: &[&str] = &[
    "Tell the long story of the village's founding, with every family's name.",
    "Describe, in detail, every item for sale in your shop and its history.",
    "Recount the whole legend of the dragon of the northern hills.",
];

fn main() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("skipped: {} not found (run scripts/setup)", path.display());
        return;
    }
    tch::set_num_threads(2);
    let reference = Model::load(&path, Device::Cpu, Some(Kind::Float)).unwrap();
    let config = EngineConfig {
        max_batch: 1,
        max_context: 1024,
        prefill_chunk: 256,
        threads: 2,
        single_sequence_threads: 1,
        prefix_cache_bytes: 0,
        speculative: ludus::inference::Speculation::OFF,
        draft_model: None,
    };
    let engine = Engine::start(Model::load(&path, Device::Cpu, Some(Kind::Float)).unwrap(), config).unwrap();
    // The references a proof-less check may replay on, as the verifier pool loads them.
    let quantized = |q| Model::load_quantized(&path, Device::Cpu, None, q, None).unwrap();
    let (int4, int8) = (quantized(Quantization::Int4), quantized(Quantization::Int8));
    let references = delivered::references(&Tolerances::default());
    let mut delivered_time = vec![Duration::ZERO; references.len()];
    let mut delivered_accepted = vec![0usize; references.len()];
    let node = Identity::generate();
    let tol = Tolerances::default();
    let (mut plain, mut proving, mut verifying) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let (checks, _) = ludus::actors::check_log::CheckLog::open(&dir.path().join("checks.log")).unwrap();
    let (mut owing, mut syncing, mut line_bytes, mut syncs) = (Duration::ZERO, Duration::ZERO, 0, 0);
    let (mut tokens_plain, mut tokens_proving, mut bytes_per_chunk, mut accepted, mut tasks) = (0, 0, 0, 0, 0);
    for round in 0..ROUNDS {
        for (i, ask) in ASKS.iter().enumerate() {
            let messages = vec![ChatMessage { role: "user".into(), content: ask.to_string() }];
            let prompt = reference.chat_prompt(&messages).unwrap();
            let params = SamplingParams { temperature: 0.7, seed: (round * 10 + i) as u64, ..Default::default() };
            for collect_hidden in [false, true] {
                let request = GenerateRequest {
                    prompt: prompt.clone(),
                    params: params.clone(),
                    max_tokens: TOKENS,
                    collect_hidden,
                    ..GenerateRequest::default()
                };
                let started = Instant::now();
                let rx = engine.submit(request).unwrap();
                let mut builder = ProofBuilder::new([i as u8; 32], 64);
                let completion = ludus::proof::signed::collect_blocking(rx, &mut builder).unwrap();
                let proof = collect_hidden.then(|| builder.finish(&node, 1, "smollm2", &completion).unwrap());
                let elapsed = started.elapsed();
                let Some(proof) = proof else {
                    plain += elapsed;
                    tokens_plain += completion.len();
                    continue;
                };
                proving += elapsed;
                tokens_proving += completion.len();
                bytes_per_chunk = proof.bytes_per_chunk();
                let started = Instant::now();
                let verdict = verify(&reference, &proof, &prompt, &completion, &params, &tol).unwrap();
                verifying += started.elapsed();
                accepted += verdict.accepted as usize;
                tasks += 1;
                // The same tokens without a proof, on each reference in the verifier's order.
                for (k, &(quantization, format, limits)) in references.iter().enumerate() {
                    let model = match quantization {
                        Quantization::Int4 => &int4,
                        Quantization::Int8 => &int8,
                        _ => &reference,
                    };
                    let started = Instant::now();
                    let v = delivered::check_tokens(model, &prompt, 0, &completion, &params, limits, format).unwrap();
                    delivered_time[k] += started.elapsed();
                    delivered_accepted[k] += v.accepted as usize;
                }
                // What Completion does for a picked task before writing its completion ahead.
                let check = ludus::actors::verifier::VerifyTask {
                    task: ludus::protocol::TaskId(tasks as u64),
                    node: node.address,
                    model: "smollm2".into(),
                    input: ludus::protocol::TaskInput::Chat(messages.clone()),
                    params: params.clone(),
                    prefix: Vec::new(),
                    completion: completion.clone(),
                    logprobs: Vec::new(),
                    challenge: [i as u8; 32],
                    proof: Some(Box::new(proof)),
                    report: Vec::new(),
                    slot: None,
                };
                let started = Instant::now();
                let line = ludus::actors::check_backlog::encode(&check).unwrap();
                checks.owe(ludus::actors::check_log::CheckKind::Proof, tasks as u64, node.address.0, &line);
                owing += started.elapsed();
                line_bytes += line.len();
                // One block's sync (the log was written to since the last one).
                let started = Instant::now();
                checks.sync();
                syncing += started.elapsed();
                syncs += 1;
            }
        }
    }
    let per_token = |d: Duration, n: usize| d.as_secs_f64() / n.max(1) as f64;
    let overhead = per_token(proving, tokens_proving) / per_token(plain, tokens_plain) - 1.0;
    println!("tasks {tasks}, accepted {accepted}, completion tokens {tokens_proving} (max {TOKENS} each)");
    println!(
        "generation: {:.1} ms/token without proofs, {:.1} ms/token with: overhead {:+.1} %",
        per_token(plain, tokens_plain) * 1e3,
        per_token(proving, tokens_proving) * 1e3,
        overhead * 100.0
    );
    println!(
        "verification: {:.3} s for {:.3} s of generation: ratio {:.3}",
        verifying.as_secs_f64(),
        proving.as_secs_f64(),
        verifying.as_secs_f64() / proving.as_secs_f64()
    );
    println!("proof: {bytes_per_chunk} bytes per 32 generated tokens (top-64, u16 index + f16 value)");
    println!(
        "check written ahead: {:.3} ms per task ({} bytes per line), {:.5} of its verification; \
         the block's fdatasync after it: {:.3} ms",
        owing.as_secs_f64() * 1e3 / tasks.max(1) as f64,
        line_bytes / tasks.max(1),
        owing.as_secs_f64() / verifying.as_secs_f64(),
        syncing.as_secs_f64() * 1e3 / syncs.max(1) as f64,
    );
    for (k, (quantization, format, _)) in references.iter().enumerate() {
        println!(
            "proof-less check on the {quantization} reference ({format} margin): {:.3} s, {:.2} of verification; \
             accepted {}/{tasks} (honest f32 tokens)",
            delivered_time[k].as_secs_f64(),
            delivered_time[k].as_secs_f64() / verifying.as_secs_f64(),
            delivered_accepted[k],
        );
    }
    engine.shutdown();
}
