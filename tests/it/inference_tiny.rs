//! The model and tokenizer on tiny random models: both file formats agree, quantized
//! weights stay close, and cached decoding equals a full forward pass.

use ludus::inference::kv_cache::KvCache;
use ludus::inference::llama::LogitsFor;
use ludus::inference::quant::GgmlType;
use ludus::inference::tiny_model::TinySpec;
use ludus::inference::tokenizer::StreamDecoder;
use ludus::inference::Model;
use tch::{Device, Kind, Tensor};

use crate::helpers::tiny;

const TOKENS: &[u32] = &[5, 71, 258, 100, 33, 260, 12, 99, 150, 201, 3, 44];

fn logits_all(model: &Model, tokens: &[u32]) -> Tensor {
    let mut cache = KvCache::new(&model.llama.config, 1, 64, Device::Cpu, model.llama.kind).unwrap();
    model.llama.prefill(&mut cache, 0, tokens, 0, LogitsFor::All).unwrap().logits
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[])
}

#[test]
fn gguf_and_safetensors_copies_give_the_same_logits() {
    let t = tiny(&TinySpec::default());
    let from_gguf = Model::load(&t.gguf, Device::Cpu, None).unwrap();
    let from_hf = Model::load(&t.hf, Device::Cpu, None).unwrap();
    let mut hf_config = from_hf.llama.config.clone();
    hf_config.rms_norm_eps = 1e-5f32 as f64; // GGUF stores it as f32
    assert_eq!(from_gguf.llama.config, hf_config);
    let a = logits_all(&from_gguf, TOKENS);
    let b = logits_all(&from_hf, TOKENS);
    assert_eq!(a.size(), vec![TOKENS.len() as i64, 275]);
    // The GGUF copy stores Q/K permuted; a wrong un-permutation gives errors near 1.
    assert!(rel_err(&a, &b) < 1e-5, "relative error {}", rel_err(&a, &b));
    let text = "the cat sat on 12 mats\n\n<|im_start|>user";
    assert_eq!(from_gguf.tokenizer.encode(text, false).unwrap(), from_hf.tokenizer.encode(text, false).unwrap());
}

#[test]
fn quantized_copies_stay_close_to_f32() {
    let base = tiny(&TinySpec::default());
    let reference = logits_all(&Model::load(&base.gguf, Device::Cpu, None).unwrap(), TOKENS);
    let mut errors = Vec::new();
    for (dtype, tolerance) in
        [(GgmlType::F16, 0.01), (GgmlType::Q8_0, 0.05), (GgmlType::Q4_1, 0.6), (GgmlType::Q4_0, 0.6)]
    {
        let q = tiny(&TinySpec { dtype, ..TinySpec::default() });
        let logits = logits_all(&Model::load(&q.gguf, Device::Cpu, None).unwrap(), TOKENS);
        let err = rel_err(&logits, &reference);
        assert!(err < tolerance && err > 0.0, "{dtype:?}: relative error {err}");
        errors.push(err);
    }
    assert!(errors[0] < errors[1] && errors[1] < errors[2].min(errors[3]), "more bits, less error: {errors:?}");
}

#[test]
fn chunked_prefill_and_cached_decode_equal_one_full_pass() {
    let t = tiny(&TinySpec::default());
    let model = Model::load(&t.gguf, Device::Cpu, None).unwrap();
    let full = logits_all(&model, TOKENS);
    let mut cache = KvCache::new(&model.llama.config, 3, 64, Device::Cpu, Kind::Float).unwrap();
    // Slot 2, prefill 5 tokens in two chunks, then decode the rest one at a time after
    // moving the sequence to slot 0 (what the engine does when compacting).
    model.llama.prefill(&mut cache, 2, &TOKENS[..3], 0, LogitsFor::None).unwrap();
    let out = model.llama.prefill(&mut cache, 2, &TOKENS[3..5], 3, LogitsFor::All).unwrap();
    assert!(rel_err(&out.logits, &full.narrow(0, 3, 2)) < 1e-5);
    cache.move_slot(2, 0).unwrap();
    for (i, &tok) in TOKENS.iter().enumerate().skip(5) {
        let out = model.llama.decode(&mut cache, &[tok], &[i]).unwrap();
        let err = rel_err(&out.logits, &full.narrow(0, i as i64, 1));
        assert!(err < 1e-5, "position {i}: {err}");
    }
}

#[test]
fn batched_decode_of_different_lengths_matches_single_decodes() {
    let t = tiny(&TinySpec::default());
    let model = Model::load(&t.gguf, Device::Cpu, None).unwrap();
    let a: &[u32] = &TOKENS[..7];
    let b: &[u32] = &TOKENS[4..8];
    let mut cache = KvCache::new(&model.llama.config, 2, 64, Device::Cpu, Kind::Float).unwrap();
    model.llama.prefill(&mut cache, 0, &a[..6], 0, LogitsFor::None).unwrap();
    model.llama.prefill(&mut cache, 1, &b[..3], 0, LogitsFor::None).unwrap();
    let out = model.llama.decode(&mut cache, &[a[6], b[3]], &[6, 3]).unwrap();
    let alone_a = logits_all(&model, a);
    let alone_b = logits_all(&model, b);
    assert!(rel_err(&out.logits.get(0), &alone_a.get(6)) < 1e-5);
    assert!(rel_err(&out.logits.get(1), &alone_b.get(3)) < 1e-5);
    assert_eq!(out.hidden.size(), vec![2, 64]);
}

#[test]
fn streamed_text_never_splits_a_utf8_sequence() {
    let t = tiny(&TinySpec::default());
    let model = Model::load(&t.gguf, Device::Cpu, None).unwrap();
    let text = "héllo 🎮 wörld — 日本";
    let ids = model.tokenizer.encode(text, false).unwrap();
    assert!(ids.len() > text.chars().count(), "multi-byte chars are several byte tokens here");
    let mut decoder = StreamDecoder::default();
    let mut chunks = Vec::new();
    for &id in &ids {
        chunks.push(decoder.push(&model.tokenizer, id));
    }
    chunks.push(decoder.finish());
    assert!(chunks.iter().all(|c| !c.contains('\u{fffd}')), "{chunks:?}");
    assert!(chunks.iter().any(String::is_empty), "incomplete sequences are held back");
    assert_eq!(chunks.concat(), text);
    assert_eq!(model.tokenizer.decode(&ids, true), text);
}

#[test]
fn bf16_and_f16_run_close_to_f32() {
    let t = tiny(&TinySpec::default());
    let reference = logits_all(&Model::load(&t.gguf, Device::Cpu, Some(Kind::Float)).unwrap(), TOKENS);
    for kind in [Kind::BFloat16, Kind::Half] {
        let model = Model::load(&t.gguf, Device::Cpu, Some(kind)).unwrap();
        assert_eq!(model.llama.kind, kind);
        let logits = logits_all(&model, TOKENS);
        let err = rel_err(&logits, &reference);
        assert!(err < 0.05, "{kind:?}: relative error {err}");
    }
}

#[test]
fn cli_tokenize_and_inspect_describe_the_model() {
    let t = tiny(&TinySpec::default());
    let run = |args: &[&str]| {
        let out = crate::cluster::ludus().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let gguf = t.gguf.to_str().unwrap();
    let ids = run(&["tokenize", "--model", gguf, "--text", "the 42"]);
    let model = Model::load(&t.gguf, Device::Cpu, None).unwrap();
    let expected = model.tokenizer.encode("the 42", false).unwrap();
    assert_eq!(ids, serde_json::json!(expected));
    let info = run(&["model", "inspect", gguf]);
    assert_eq!(info["layers"], 2);
    assert_eq!(info["kv_heads"], 2);
    assert_eq!(info["vocab_size"], 275);
    assert_eq!(info["tensor_types"]["F32"]["tensors"], 20);
    let out = crate::cluster::ludus()
        .args(["generate", "--model", gguf, "--prompt", "the", "--max-tokens", "5", "--seed", "3", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["completion_tokens"].as_array().unwrap().len(), 5);
    assert_eq!(json["finish_reason"], "length");
    let bad = crate::cluster::ludus().args(["model", "inspect", "/nonexistent.gguf"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent.gguf"));
}
