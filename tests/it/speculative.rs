//! Speculative decoding keeps the model's own tokens: the same requests with and without
//! n-gram drafting, or a draft model's (greedy and seeded, f32 and int4, one at a time and eight at once) give
//! the same ids, up to float near-ties between a one-row and a several-row pass (f32 gave
//! identical ids in every case here; int4's bf16 kernels part at a near-tie now and then,
//! as between batch sizes), while drafts are really checked and kept; a proof made from
//! speculative passes is verified.

use ludus::inference::speculative::SpeculationStats;
use ludus::inference::{
    ChatMessage, Draft, Engine, EngineConfig, GenerateRequest, Model, Quantization, SamplingParams, Speculation,
};
use tch::Device;

use crate::helpers::{drain, score_gap, smollm2};

/// An NPC whose answers quote its prompt (prices, names): drafts have something to find.
fn prompt(model: &Model, line: &str) -> Vec<u32> {
    let persona = "You are Brakka, the smith of Emberfall, a village under a sleeping volcano. \
        Prices: a sword costs 40 gold, a shield costs 25 gold, mending costs 5 gold. Your brother \
        Torv vanished on the ash road. Answer in full sentences and repeat the prices you quote.";
    model.chat_prompt(&[ChatMessage::new("system", persona), ChatMessage::new("user", line)]).unwrap()
}

fn lines() -> Vec<&'static str> {
    vec![
        "How much is a sword, and how much is a shield?",
        "What happened to your brother Torv?",
        "How much does mending cost?",
        "Where is the ash road?",
        "Tell me the prices again.",
        "Who are you?",
        "What is Emberfall?",
        "Is the volcano sleeping?",
    ]
}

fn start(quantization: Quantization, speculative: Speculation, max_batch: usize) -> Engine {
    start_with_draft(quantization, speculative, max_batch, None)
}

fn start_with_draft(
    quantization: Quantization,
    speculative: Speculation,
    max_batch: usize,
    draft_model: Option<std::path::PathBuf>,
) -> Engine {
    let path = smollm2().expect("checked by the caller");
    let model = Model::load_quantized(&path, Device::Cpu, None, quantization, None).unwrap();
    let config = EngineConfig {
        max_batch,
        max_context: 1024,
        prefill_chunk: 128,
        threads: 2,
        single_sequence_threads: 0,
        prefix_cache_bytes: 0,
        speculative,
        draft_model,
    };
    Engine::start(model, config).unwrap()
}

// These tests are about the drafting itself: up to k tokens whatever a pass costs on this
// CPU (`timed: false`); with the default, timed, an engine may draft nothing here
// (`with_the_fused_step_on_speculation_drafts_only_where_a_pass_pays`).
const NGRAM: Speculation = Speculation { draft: Draft::Ngram, k: 4, timed: false };
const DRAFT_MODEL: Speculation = Speculation { draft: Draft::Model, k: 4, timed: false };

/// Runs `lines` on `engine`, `together` at a time; the ids of each answer. Together,
/// answers get different lengths (8, 16, … 56 tokens at most, and the last 96), so that
/// the batch thins out and the last one runs alone, where speculation starts.
fn run(engine: &Engine, model: &Model, params: &SamplingParams, together: usize) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for group in lines().chunks(together) {
        let streams: Vec<_> = group
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let request = GenerateRequest {
                    prompt: prompt(model, l),
                    params: params.clone(),
                    max_tokens: if together == 1 {
                        40
                    } else if i + 1 < group.len() {
                        8 * (i + 1)
                    } else {
                        96
                    },
                    // The last of a group runs its full length, alone for the second half.
                    min_tokens: if together > 1 && i + 1 == group.len() { 96 } else { 0 },
                    ..Default::default()
                };
                engine.submit(request).expect("submit")
            })
            .collect();
        out.extend(streams.into_iter().map(|rx| drain(rx).0));
    }
    out
}

/// Each answer equal, or parted only where the two tokens score within the format's tie
/// margin on the reference; how many were identical.
fn same_up_to_near_ties(
    reference: &Model,
    model: &Model,
    want: &[Vec<u32>],
    got: &[Vec<u32>],
    params: &SamplingParams,
    what: &str,
) -> usize {
    let margin = ludus::proof::Format::of(reference.llama.quantization, tch::Kind::Float).tie_margin() as f64;
    let mut identical = 0;
    for (i, line) in lines().iter().enumerate().take(want.len()) {
        match want[i].iter().zip(&got[i]).position(|(a, b)| a != b) {
            Some(k) => {
                let gap = score_gap(reference, &prompt(model, line), &want[i][..k], want[i][k], got[i][k], params);
                assert!(gap < margin, "{what}, answer {i}: parted at token {k} by {gap}, not a near-tie");
                eprintln!("{what}: answer {i} parted at token {k}, a near-tie (gap {gap:.1e})");
            }
            None => {
                assert_eq!(want[i], got[i], "{what}: answer {i} is shorter");
                identical += 1;
            }
        }
    }
    identical
}

/// The lines `together` at a time without and with speculation, compared; the drafting
/// engine's counters and the tokens it produced.
fn compare(
    quantization: Quantization,
    reference: &Model,
    model: &Model,
    (name, params): (&str, &SamplingParams),
    together: usize,
) -> (SpeculationStats, usize) {
    compare_drafting(quantization, reference, model, (name, params), together, (NGRAM, None))
}

/// [`compare`] with a drafter of one's own: a speculation setting and its draft model.
fn compare_drafting(
    quantization: Quantization,
    reference: &Model,
    model: &Model,
    (name, params): (&str, &SamplingParams),
    together: usize,
    (speculative, draft_model): (Speculation, Option<std::path::PathBuf>),
) -> (SpeculationStats, usize) {
    let plain = start(quantization, Speculation::OFF, together);
    let drafting = start_with_draft(quantization, speculative, together, draft_model);
    let want = run(&plain, model, params, together);
    let got = run(&drafting, model, params, together);
    let what = format!("{quantization} {name}, batch {together}");
    let identical = same_up_to_near_ties(reference, model, &want, &got, params, &what);
    let s = drafting.load.speculation();
    eprintln!("{what}: {identical}/{} identical; {s:?}", want.len());
    assert_eq!(plain.load.speculation(), SpeculationStats::default(), "off means no draft");
    (s, got.iter().map(Vec::len).sum())
}

/// With the default timing, the engine compares a pass of two rows with the step it takes
/// when it does not draft (the fused batch-1 step, int4 on CPU), and drafts nothing where
/// the second row costs more than a drafted token saves: the answers are then the plain
/// engine's, token for token. Where a pass does pay, it drafts no more than the cap, and
/// the answers may part only at near-ties, as above.
#[test]
fn with_the_fused_step_on_speculation_drafts_only_where_a_pass_pays() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let reference = Model::load_quantized(&path, Device::Cpu, None, Quantization::Int4, None).unwrap();
    if let Err(why) = reference.llama.fused_decode() {
        eprintln!("no fused step here ({why})");
    }
    let greedy = SamplingParams::greedy();
    let plain = start(Quantization::Int4, Speculation::OFF, 1);
    let drafting = start(Quantization::Int4, Speculation { timed: true, ..NGRAM }, 1);
    let want = run(&plain, &model, &greedy, 1);
    let got = run(&drafting, &model, &greedy, 1);
    let cap = drafting.load.draft_cap.load(std::sync::atomic::Ordering::Relaxed);
    let s = drafting.load.speculation();
    eprintln!("int4, timed n-gram drafting: cap {cap} of k = 4; {s:?}");
    if cap == 0 {
        assert_eq!(s, SpeculationStats::default(), "a cap of 0 drafts nothing");
        assert_eq!(want, got, "without drafts, the plain engine's answers");
    } else {
        assert!(s.passes > 0 && s.drafted <= s.passes * cap as u64, "{s:?} with a cap of {cap}");
        same_up_to_near_ties(&reference, &model, &want, &got, &greedy, "int4 timed, greedy");
    }
}

#[test]
fn speculation_keeps_the_models_tokens_one_at_a_time_and_eight_at_once() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let greedy = SamplingParams::greedy();
    // Sampled from the whole vocabulary: with top-p, a token at the nucleus' edge can fall
    // in or out between a one-row and a several-row pass, which no tie margin measures.
    let seeded = SamplingParams { temperature: 0.9, top_p: 1.0, seed: 5, ..Default::default() };
    for quantization in [Quantization::None, Quantization::Int4] {
        let reference = Model::load_quantized(&path, Device::Cpu, None, quantization, None).unwrap();
        for case in [("greedy", &greedy), ("seeded", &seeded)] {
            // One at a time: every step of every answer may speculate; kept drafts are
            // steps saved.
            let (s, tokens) = compare(quantization, &reference, &model, case, 1);
            assert!(s.passes > 0 && s.accepted > 0, "{quantization} {}: drafts checked and some kept: {s:?}", case.0);
            // Each pass yields its kept tokens, plus one unless a kept token ended the
            // answer: the counters cannot claim more than was produced.
            assert!(tokens as u64 >= s.passes + s.accepted, "{tokens} tokens, {s:?}");
            // Eight at once: speculation only for the sequence left alone in the batch.
            let (s, _) = compare(quantization, &reference, &model, case, 8);
            assert!(s.passes > 0, "{quantization} {}: the sequence left alone speculated: {s:?}", case.0);
        }
    }
}

/// A draft model (here the target's own file, so that greedy drafts mostly hold and
/// sampled ones often fail) keeps the target's tokens: greedy and seeded, f32 and int4,
/// one at a time and eight at once, as n-gram drafting does.
#[test]
fn a_draft_model_keeps_the_models_tokens() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let greedy = SamplingParams::greedy();
    let seeded = SamplingParams { temperature: 0.9, top_p: 0.95, seed: 5, ..Default::default() };
    // Sampled from the whole vocabulary: with top-p, a token at the nucleus' edge can fall
    // in or out between a one-row and a several-row pass, which no tie margin measures.
    let seeded = SamplingParams { top_p: 1.0, ..seeded };
    let drafter = (DRAFT_MODEL, Some(path.clone()));
    for quantization in [Quantization::None, Quantization::Int4] {
        let reference = Model::load_quantized(&path, Device::Cpu, None, quantization, None).unwrap();
        for case in [("greedy", &greedy), ("seeded", &seeded)] {
            let (s, tokens) = compare_drafting(quantization, &reference, &model, case, 1, drafter.clone());
            assert!(s.passes > 0 && s.accepted > 0, "{quantization} {}: drafts checked and some kept: {s:?}", case.0);
            assert!(tokens as u64 >= s.passes + s.accepted, "{tokens} tokens, {s:?}");
            if case.0 == "seeded" {
                // Greedy drafts against sampled tokens: some fail, and the answer is still
                // the target's.
                assert!(s.accepted < s.drafted, "{quantization} seeded: some drafts failed: {s:?}");
            }
        }
    }
    let reference = Model::load_quantized(&path, Device::Cpu, None, Quantization::None, None).unwrap();
    let (s, _) = compare_drafting(Quantization::None, &reference, &model, ("seeded", &seeded), 8, drafter);
    assert!(s.passes > 0, "f32 seeded, batch 8: the sequence left alone speculated: {s:?}");
}

/// A draft model must tokenize exactly like its target, and speculation with draft
/// "model" needs one: both refused at start with a clear error.
#[test]
fn a_draft_model_of_another_tokenizer_or_none_is_refused() {
    let Some(path) = smollm2() else { return };
    let model = || Model::load(&path, Device::Cpu, None).unwrap();
    let config = |draft_model| EngineConfig {
        max_batch: 1,
        max_context: 256,
        speculative: DRAFT_MODEL,
        draft_model,
        ..Default::default()
    };
    let error = Engine::start(model(), config(None)).err().expect("refused").to_string();
    assert!(error.contains("needs a draft model"), "{error}");
    let gemma = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    if !crate::helpers::required_tool("Gemma 3 270M (scripts/setup --test)", gemma.is_file()) {
        return;
    }
    let error = Engine::start(model(), config(Some(gemma))).err().expect("refused").to_string();
    assert!(error.contains("does not share the tokenizer"), "{error}");
}

/// A draft never reaches past max_tokens nor past the context (a pass there would write
/// outside the KV cache and fail the request), and speculation does not run under a
/// grammar.
#[test]
fn speculation_stays_within_max_tokens_the_context_and_out_of_grammars() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let engine = start(Quantization::None, NGRAM, 1);
    // A prompt that repeats itself, so that drafts are found at every step.
    let repeat = "red green blue ".repeat(400);
    let prompt = model.tokenizer.encode(&repeat, false).unwrap();
    let drafted = || engine.load.speculation().drafted;
    let generate = |prompt: &[u32], max_tokens: usize| {
        let before = drafted();
        let request = GenerateRequest {
            prompt: prompt.to_vec(),
            params: SamplingParams::greedy(),
            max_tokens,
            min_tokens: max_tokens,
            ..Default::default()
        };
        let (ids, _, done) = drain(engine.submit(request).unwrap());
        (ids.len(), done.completion_tokens, drafted() - before)
    };
    let short = &prompt[..30];
    // The first token comes from the prompt's pass; a pass drafts at most what is left
    // after the token it always yields.
    assert_eq!(generate(short, 1), (1, 1, 0));
    assert_eq!(generate(short, 2), (2, 2, 0), "one token left: nothing to draft");
    let (n, _, d) = generate(short, 3);
    assert!(n == 3 && d <= 1, "{n} tokens, {d} drafted");
    let (n, _, d) = generate(short, 12);
    assert!(n == 12 && d > 0, "{n} tokens, {d} drafted");
    // Seven positions left in the context (1,024): the answer ends there, drafted into
    // (the model repeats one token here, which drafts find from its third on).
    assert!(prompt.len() > 1017);
    let (n, completion, d) = generate(&prompt[..1017], 10);
    assert!(n == 7 && completion == 7 && d > 0, "{n} tokens, {d} drafted");
    let before = engine.load.speculation();
    let schema = r#"{"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}"#;
    let grammar: std::sync::Arc<str> = format!("start: %json {schema}\n").into();
    let params = SamplingParams { grammar: Some(grammar), ..SamplingParams::greedy() };
    let request = GenerateRequest { prompt: short.to_vec(), params, max_tokens: 24, ..Default::default() };
    let (_, text, _) = drain(engine.submit(request).unwrap());
    assert!(text.starts_with('{'), "{text}");
    assert_eq!(engine.load.speculation(), before, "no draft under a grammar");
    // Untimed, the cap is k, and it bounds every pass (a timed one:
    // `with_the_fused_step_on_speculation_drafts_only_where_a_pass_pays`).
    let cap = engine.load.draft_cap.load(std::sync::atomic::Ordering::Relaxed) as u64;
    let s = engine.load.speculation();
    assert_eq!(cap, 4, "cap {cap} for k = 4, untimed");
    assert!(s.passes > 0 && s.drafted <= s.passes * cap, "{s:?} with a cap of {cap}");
}

#[test]
fn a_proof_made_from_speculative_passes_is_verified() {
    use ludus::crypto::identity::Identity;
    use ludus::proof::signed::collect_blocking;
    use ludus::proof::{verify, ProofBuilder, Tolerances};
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let engine = start(Quantization::None, NGRAM, 1);
    let params = SamplingParams { temperature: 0.7, seed: 3, ..Default::default() };
    let identity = Identity::generate();
    for (i, line) in lines()[..3].iter().enumerate() {
        let challenge = [i as u8 + 1; 32];
        let prompt = prompt(&model, line);
        let request = GenerateRequest {
            prompt: prompt.clone(),
            params: params.clone(),
            max_tokens: 40,
            collect_hidden: true,
            ..Default::default()
        };
        let mut builder = ProofBuilder::new(challenge, ludus::proof::commitment::DEFAULT_TOP_K);
        let completion = collect_blocking(engine.submit(request).unwrap(), &mut builder).unwrap();
        let proof = builder.finish(&identity, i as u64, &model.name, &completion).expect("a proof");
        let verdict = verify(&model, &proof, &prompt, &completion, &params, &Tolerances::default()).unwrap();
        assert!(verdict.accepted, "request {i}: {:?}", verdict.reasons);
    }
    assert!(engine.load.speculation().accepted > 0, "{:?}", engine.load.speculation());
}
