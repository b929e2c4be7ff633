//! The real SmolLM2-135M-Instruct against Hugging Face transformers' fixtures
//! (`scripts/reference/hf_reference.py`): token ids, last-position logits, greedy
//! continuations, and batch invariance. Dequantization is checked against gguf-py.

use ludus::inference::kv_cache::KvCache;
use ludus::inference::llama::LogitsFor;
use ludus::inference::quant::GgmlType;
use ludus::inference::sampling::{candidates, gumbel};
use ludus::inference::{ChatMessage, GenerateRequest, Model, SamplingParams};
use serde::Deserialize;
use tch::Device;

use crate::helpers::{collect, drain, fixtures, smollm2};

#[derive(Deserialize)]
struct TokenCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    prompt_text: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text_until_eos: String,
    logits_file: String,
}

fn chat_cases() -> Vec<ChatCase> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("chat.json")).unwrap()).unwrap()
}

#[test]
fn dequantization_matches_gguf_py_bit_for_bit() {
    #[derive(Deserialize)]
    struct Case {
        #[serde(rename = "type")]
        name: String,
        type_id: u32,
        raw_hex: String,
        values: Vec<f32>,
    }
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("dequant.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let raw: Vec<u8> = (0..case.raw_hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&case.raw_hex[i..i + 2], 16).unwrap())
            .collect();
        let kind = GgmlType::from_id(case.type_id).unwrap();
        let got = kind.dequantize(&raw, case.values.len()).unwrap();
        for (i, (g, e)) in got.iter().zip(&case.values).enumerate() {
            assert_eq!(g.to_bits(), e.to_bits(), "{} element {i}: {g} vs {e}", case.name);
        }
    }
}

#[test]
fn tokenization_matches_the_reference() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let cases: Vec<TokenCase> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenize.json")).unwrap()).unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let ids = model.tokenizer.encode(&case.text, false).unwrap();
        assert_eq!(ids, case.ids, "text {:?}", case.text);
        assert_eq!(model.tokenizer.decode(&ids, false), case.text);
    }
}

#[test]
fn chat_prompts_and_last_logits_match_transformers() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    for case in chat_cases() {
        assert_eq!(model.template.render(&case.messages, true).unwrap(), case.prompt_text);
        let ids = model.chat_prompt(&case.messages).unwrap();
        assert_eq!(ids, case.prompt_ids);
        let bytes = std::fs::read(fixtures().join(&case.logits_file)).unwrap();
        let expected: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let mut cache = KvCache::new(&model.llama.config, 1, ids.len(), Device::Cpu, model.llama.kind).unwrap();
        let _guard = tch::no_grad_guard();
        let out = model.llama.prefill(&mut cache, 0, &ids, 0, LogitsFor::Last).unwrap();
        let got = Vec::<f32>::try_from(&out.logits.flatten(0, -1)).unwrap();
        assert_eq!(got.len(), expected.len());
        let max_abs = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max_err = got.iter().zip(&expected).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(max_err / max_abs < 1e-3, "{:?}: relative max error {}", case.messages[0].content, max_err / max_abs);
    }
}

#[test]
fn greedy_continuations_match_transformers_in_one_batch() {
    let Some(path) = smollm2() else { return };
    let engine = crate::helpers::engine(&path, 8);
    let cases = chat_cases();
    // All five run together: batching must not change greedy results.
    let streams: Vec<_> = cases
        .iter()
        .map(|c| {
            let n = c.greedy_ids.len();
            let req = GenerateRequest {
                prompt: c.prompt_ids.clone(),
                params: SamplingParams::greedy(),
                max_tokens: n,
                min_tokens: n,
                ..Default::default()
            };
            engine.submit(req).unwrap()
        })
        .collect();
    for (case, rx) in cases.iter().zip(streams) {
        let (ids, _, _) = drain(rx);
        assert_eq!(ids, case.greedy_ids, "{:?}", case.messages.last().unwrap().content);
    }
    // Until EOS, as a game would see it.
    for case in &cases {
        let req = GenerateRequest {
            prompt: case.prompt_ids.clone(),
            params: SamplingParams::greedy(),
            max_tokens: 200,
            ..Default::default()
        };
        let (_, text, _) = collect(&engine, req);
        assert_eq!(text, case.greedy_text_until_eos);
    }
}

/// `ludus generate` in the default format answers a plain question. Not France: even in
/// f32 SmolLM2's first answer token there is a near-tie, "The" at 25.33 against "L" (of
/// a French answer that loops) at 25.24, and int4 and int8 land on either side of it with
/// the rounding of one kernel (prefill attention, chunk size). Japan's "The" leads by 2.4
/// in every format.
#[test]
fn the_capital_of_japan_is_tokyo() {
    let Some(path) = smollm2() else { return };
    let out = crate::cluster::ludus()
        .args([
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--chat",
            "What is the capital of Japan?",
            "--temperature",
            "0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("Tokyo"), "{answer}");
}

/// Same seed and input give the same tokens alone or inside a batch of 8. Sampled runs
/// may only differ at a float near-tie: where they diverge, the two chosen tokens'
/// Gumbel scores (recomputed from a fresh prefill) must be within a small margin.
#[test]
fn seeded_sampling_is_batch_invariant_up_to_near_ties() {
    let Some(path) = smollm2() else { return };
    let engine = crate::helpers::engine(&path, 8);
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let cases = chat_cases();
    let params = SamplingParams { temperature: 0.8, top_p: 0.95, seed: 2024, ..Default::default() };
    let prompt = cases[1].prompt_ids.clone();
    let req = |seed: u64, prompt: &[u32]| GenerateRequest {
        prompt: prompt.to_vec(),
        params: SamplingParams { seed, ..params.clone() },
        max_tokens: 48,
        min_tokens: 48,
        ..Default::default()
    };
    let (alone, _, _) = collect(&engine, req(2024, &prompt));
    let mut streams = vec![engine.submit(req(2024, &prompt)).unwrap()];
    for (i, c) in cases.iter().enumerate().chain(cases.iter().enumerate().take(2)) {
        streams.push(engine.submit(req(i as u64 + 1, &c.prompt_ids)).unwrap());
    }
    let mut results = streams.into_iter().map(|rx| drain(rx).0);
    let batched = results.next().unwrap();
    results.for_each(drop);
    if let Some(k) = alone.iter().zip(&batched).position(|(a, b)| a != b) {
        let context: Vec<u32> = prompt.iter().chain(&alone[..k]).copied().collect();
        let mut cache = KvCache::new(&model.llama.config, 1, context.len(), Device::Cpu, model.llama.kind).unwrap();
        let _guard = tch::no_grad_guard();
        let logits = model.llama.prefill(&mut cache, 0, &context, 0, LogitsFor::Last).unwrap().logits;
        let logits = Vec::<f32>::try_from(&logits.flatten(0, -1)).unwrap();
        let position = context.len() as u64;
        let score = |t: u32| {
            let (_, s) =
                candidates(&logits, &params).into_iter().find(|c| c.0 == t).expect("both choices are candidates");
            s as f64 + gumbel(params.seed, position, t)
        };
        let gap = (score(alone[k]) - score(batched[k])).abs();
        assert!(gap < 1e-3, "diverged at step {k} with a score gap of {gap}: not a near-tie");
        eprintln!("diverged at step {k} at a near-tie (gap {gap})");
    }
}
