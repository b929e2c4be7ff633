//! Proof of inference on the real SmolLM2: honest runs in every dtype, batch size and
//! thread count pass; cheating nodes (another model of the same shape, another
//! quantization, a skipped layer, an edited token, an edited prompt, replayed
//! commitments, a false format claim) fail. The verifier checks each proof as the server
//! does: against the reference of the format it declares, then the claim itself.
//!
//! `LUDUS_PROOF_TASKS=N` sets the tasks per case (default 6 in CI); the table in
//! docs/proof-of-inference.md comes from `LUDUS_PROOF_TASKS=100 cargo test --release
//! --test it proof:: -- --nocapture`.

use std::collections::HashMap;
use std::time::Instant;

use ludus::crypto::identity::Identity;
use ludus::inference::llama::Llama;
use ludus::inference::weights::WeightSource;
use ludus::inference::{ChatMessage, Engine, EngineConfig, GenerateRequest, Model, Quantization, SamplingParams};
use ludus::proof::verify::verify_claimed;
use ludus::proof::{verify, Format, Proof, ProofBuilder, Tolerances};
use tch::{Device, Kind, Tensor};

use super::helpers::smollm2;

const COMPLETION: usize = 40;

fn tasks_per_case() -> usize {
    std::env::var("LUDUS_PROOF_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(6)
}

const ASKS: &[&str] = &[
    "Greet the traveller as a grumpy blacksmith.",
    "What do you sell, merchant?",
    "Tell me a rumour about the old mill.",
    "Describe the castle gate in one sentence.",
    "Why is the bridge closed today?",
    "Give the hero a riddle.",
    "What is the price of a healing potion?",
    "Warn the player about wolves in the forest.",
];

/// The i-th task: a prompt and sampling parameters (greedy or seeded sampling).
fn task(model: &Model, i: usize) -> (Vec<u32>, SamplingParams) {
    let messages = vec![
        ChatMessage { role: "system".into(), content: "You are an NPC in a fantasy village.".into() },
        ChatMessage { role: "user".into(), content: format!("{} (#{i})", ASKS[i % ASKS.len()]) },
    ];
    let prompt = model.chat_prompt(&messages).unwrap();
    let params = if i.is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams { temperature: 0.8, top_p: 0.95, seed: 1000 + i as u64, ..Default::default() }
    };
    (prompt, params)
}

fn challenge(i: usize) -> [u8; 32] {
    ludus::crypto::identity::keccak(&(i as u64).to_be_bytes())
}

/// Runs `prompts` on `engine` together (one batch) and builds each task's proof.
fn generate(engine: &Engine, node: &Identity, jobs: &[(usize, Vec<u32>, SamplingParams)]) -> Vec<(Vec<u32>, Proof)> {
    let receivers: Vec<_> = jobs
        .iter()
        .map(|(_, prompt, params)| {
            let request = GenerateRequest {
                prompt: prompt.clone(),
                params: params.clone(),
                max_tokens: COMPLETION,
                collect_hidden: true,
                ..GenerateRequest::default()
            };
            engine.submit(request).unwrap()
        })
        .collect();
    receivers
        .into_iter()
        .zip(jobs)
        .map(|(rx, (i, _, _))| {
            let mut builder = ProofBuilder::new(challenge(*i), 64).format(Format::of(engine.quantization, engine.kind));
            let completion = ludus::proof::signed::collect_blocking(rx, &mut builder).unwrap();
            let proof = builder.finish(node, *i as u64, "smollm2", &completion).expect("a proof");
            (completion, proof)
        })
        .collect()
}

/// Every weight of the model as an f32 tensor in the model's own layout.
fn weights(path: &std::path::Path) -> (ludus::inference::config::LlamaConfig, HashMap<String, Tensor>) {
    let source = WeightSource::open(path).unwrap();
    let config = source.config().unwrap();
    let WeightSource::Gguf(g) = &source else { panic!("a GGUF model") };
    let mut tensors = HashMap::new();
    for name in g.tensors.keys() {
        let (_, shape) = g.tensor_f32(name).unwrap();
        tensors.insert(name.clone(), source.tensor(name, &shape, &config).unwrap());
    }
    (config, tensors)
}

/// A model from edited weights, with the reference's tokenizer and template.
fn model_from(
    reference_path: &std::path::Path,
    edit: impl Fn(&mut HashMap<String, Tensor>, usize),
    kind: Kind,
) -> Model {
    model_from_quantized(reference_path, edit, kind, Quantization::None)
}

/// Like [`model_from`], with the linear layers stored as `quantization`.
fn model_from_quantized(
    reference_path: &std::path::Path,
    edit: impl Fn(&mut HashMap<String, Tensor>, usize),
    kind: Kind,
    quantization: Quantization,
) -> Model {
    let (config, mut tensors) = weights(reference_path);
    edit(&mut tensors, config.num_layers);
    let source = WeightSource::Memory { path: reference_path.to_path_buf(), config, tensors };
    let base = Model::load(reference_path, Device::Cpu, Some(Kind::Float)).unwrap();
    Model { llama: Llama::load_quantized(&source, Device::Cpu, kind, quantization).unwrap(), ..base }
}

/// Cheat: another model of the same shapes (every layer's weights taken from the next layer).
pub fn shifted_layers(path: &std::path::Path) -> Model {
    model_from(
        path,
        |t, layers| {
            let old: HashMap<String, Tensor> = t.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
            for (name, tensor) in t.iter_mut() {
                if let Some(rest) = name.strip_prefix("blk.") {
                    let (layer, field) = rest.split_once('.').unwrap();
                    let next = (layer.parse::<usize>().unwrap() + 1) % layers;
                    *tensor = old[&format!("blk.{next}.{field}")].shallow_clone();
                }
            }
        },
        Kind::Float,
    )
}

/// Cheat: the same model requantized to 4 bits (Q4_0-style blocks of 32).
pub fn requantized(path: &std::path::Path) -> Model {
    model_from(
        path,
        |t, _| {
            for (name, tensor) in t.iter_mut() {
                if name.starts_with("blk.") && tensor.dim() == 2 {
                    *tensor = requantize_q4(tensor);
                }
            }
        },
        Kind::Float,
    )
}

/// Cheat: layer 15 skipped (its output projections zeroed: the residual passes through).
pub fn layer_skipped(path: &std::path::Path) -> Model {
    model_from(path, skip_layer_15, Kind::Float)
}

/// Cheat: layer 15 skipped by a node serving int8 (its proofs name int8).
fn layer_skipped_int8(path: &std::path::Path) -> Model {
    model_from_quantized(path, skip_layer_15, Kind::Float, Quantization::Int8)
}

fn skip_layer_15(t: &mut HashMap<String, Tensor>, _: usize) {
    for f in ["attn_output", "ffn_down"] {
        let w = t.get_mut(&format!("blk.15.{f}.weight")).unwrap();
        *w = w.zeros_like();
    }
}

/// Round-to-nearest 4-bit symmetric quantization in blocks of 32 (like GGUF Q4_0).
fn requantize_q4(t: &Tensor) -> Tensor {
    let shape = t.size();
    let blocks = t.reshape([-1, 32]);
    let scale = blocks.abs().amax([1], true) / 7.0;
    let q = (&blocks / &scale.clamp_min(1e-12)).round().clamp(-8.0, 7.0);
    (q * scale).reshape(&shape)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Cheat {
    None,
    EditToken,
    EditPrompt,
    Replay,
    /// The node runs int4 but signs its proof as int8 (the widest tie margin).
    ClaimInt8,
    /// The node runs int8 but signs its proof as int4.
    ClaimInt4,
    /// An honest node on a task with a JSON schema (structured output).
    Constrained,
    /// A task with a JSON schema that the node samples without the mask.
    IgnoreGrammar,
}

/// The grammar of an NPC's JSON answer, as `response_format` compiles it.
fn npc_grammar() -> std::sync::Arc<str> {
    let body = serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"name": "npc", "schema": {
        "type": "object", "required": ["line", "emotion"], "additionalProperties": false,
        "properties": {"line": {"type": "string", "maxLength": 80}, "emotion": {"enum": ["angry", "calm", "afraid"]}}}}}});
    ludus::http::structured::parse(body.as_object().unwrap()).unwrap().grammar.unwrap().into()
}

struct Case {
    name: &'static str,
    /// Honest cases must all pass, cheats must all fail; `None` = reported, not asserted.
    honest: Option<bool>,
    batch: usize,
    threads: usize,
    cheat: Cheat,
    model: Box<dyn Fn() -> Model>,
}

#[test]
fn honest_runs_pass_and_cheaters_fail() {
    let Some(path) = smollm2() else { return };
    let reference = Model::load(&path, Device::Cpu, Some(Kind::Float)).unwrap();
    let tol = Tolerances::default();
    let node = Identity::generate();
    let p = path.clone();
    let load = move |kind: Kind| {
        let p = p.clone();
        Box::new(move || Model::load(&p, Device::Cpu, Some(kind)).unwrap()) as Box<dyn Fn() -> Model>
    };
    let p = path.clone();
    let quantized = move |q: Quantization| {
        let p = p.clone();
        Box::new(move || Model::load_quantized(&p, Device::Cpu, None, q, None).unwrap()) as Box<dyn Fn() -> Model>
    };
    // The verifier checks each proof against a reference in the quantization it names.
    let references: HashMap<Quantization, Model> = [Quantization::Int8, Quantization::Int4]
        .into_iter()
        .map(|q| (q, Model::load_quantized(&path, Device::Cpu, None, q, None).unwrap()))
        .collect();
    let reference_for = |q: Quantization| if q == Quantization::None { Some(&reference) } else { references.get(&q) };
    let from = |make: fn(&std::path::Path) -> Model| {
        let p = path.clone();
        Box::new(move || make(&p)) as Box<dyn Fn() -> Model>
    };
    let cases = vec![
        Case {
            name: "honest f32, batch 1, 2 threads",
            honest: Some(true),
            batch: 1,
            threads: 2,
            cheat: Cheat::None,
            model: load(Kind::Float),
        },
        Case {
            name: "honest f32, batch 8, 2 threads",
            honest: Some(true),
            batch: 8,
            threads: 2,
            cheat: Cheat::None,
            model: load(Kind::Float),
        },
        Case {
            name: "honest f32, batch 8, 1 thread",
            honest: Some(true),
            batch: 8,
            threads: 1,
            cheat: Cheat::None,
            model: load(Kind::Float),
        },
        Case {
            name: "honest bf16, batch 8",
            honest: Some(true),
            batch: 8,
            threads: 2,
            cheat: Cheat::None,
            model: load(Kind::BFloat16),
        },
        Case {
            name: "honest f16, batch 8",
            honest: Some(true),
            batch: 8,
            threads: 2,
            cheat: Cheat::None,
            model: load(Kind::Half),
        },
        Case {
            name: "honest int8 (fbgemm), batch 8",
            honest: Some(true),
            batch: 8,
            threads: 2,
            cheat: Cheat::None,
            model: quantized(Quantization::Int8),
        },
        Case {
            name: "honest int4, batch 8",
            honest: Some(true),
            batch: 8,
            threads: 2,
            cheat: Cheat::None,
            model: quantized(Quantization::Int4),
        },
        Case {
            // A lone sequence decodes through the fused step (`inference::fused_decode`, the
            // default where the CPU allows): bit for bit libtorch's step, which
            // tests/it/fused_decode.rs checks, so one calibrated case covers both.
            name: "honest int4, batch 1",
            honest: Some(true),
            batch: 1,
            threads: 1,
            cheat: Cheat::None,
            model: quantized(Quantization::Int4),
        },
        Case {
            // int8's margin is the widest: the claim is checked against the int4 reference.
            name: "runs int4, claims int8",
            honest: Some(false),
            batch: 8,
            threads: 2,
            cheat: Cheat::ClaimInt8,
            model: quantized(Quantization::Int4),
        },
        Case {
            // The reverse: int8 numbers fail int4's tight value limit.
            name: "runs int8, claims int4",
            honest: Some(false),
            batch: 8,
            threads: 2,
            cheat: Cheat::ClaimInt4,
            model: quantized(Quantization::Int8),
        },
        Case {
            name: "int8 node with one layer skipped",
            honest: Some(false),
            batch: 8,
            threads: 2,
            cheat: Cheat::None,
            model: from(layer_skipped_int8),
        },
        Case {
            name: "another model, same shapes (layers shifted by one)",
            honest: Some(false),
            batch: 8,
            threads: 2,
            cheat: Cheat::None,
            model: from(shifted_layers),
        },
        Case {
            name: "same model, requantized to 4-bit Q4_0-style",
            honest: Some(false),
            batch: 8,
            threads: 2,
            cheat: Cheat::None,
            model: from(requantized),
        },
        Case {
            name: "one layer skipped (layer 15)",
            honest: Some(false),
            batch: 8,
            threads: 2,
            cheat: Cheat::None,
            model: from(layer_skipped),
        },
        Case {
            name: "honest f32 under a JSON schema, batch 8",
            honest: Some(true),
            batch: 8,
            threads: 2,
            cheat: Cheat::Constrained,
            model: load(Kind::Float),
        },
        Case {
            name: "honest bf16 under a JSON schema, batch 8",
            honest: Some(true),
            batch: 8,
            threads: 2,
            cheat: Cheat::Constrained,
            model: load(Kind::BFloat16),
        },
        Case {
            name: "honest int4 under a JSON schema, batch 8",
            honest: Some(true),
            batch: 8,
            threads: 2,
            cheat: Cheat::Constrained,
            model: quantized(Quantization::Int4),
        },
        Case {
            name: "JSON schema ignored (sampled without the mask)",
            honest: Some(false),
            batch: 8,
            threads: 2,
            cheat: Cheat::IgnoreGrammar,
            model: load(Kind::Float),
        },
        Case {
            name: "one output token edited",
            honest: Some(false),
            batch: 8,
            threads: 2,
            cheat: Cheat::EditToken,
            model: load(Kind::Float),
        },
        Case {
            name: "prompt edited (one token of the request)",
            honest: Some(false),
            batch: 8,
            threads: 2,
            cheat: Cheat::EditPrompt,
            model: load(Kind::Float),
        },
        Case {
            name: "commitments replayed from another task",
            honest: Some(false),
            batch: 8,
            threads: 2,
            cheat: Cheat::Replay,
            model: load(Kind::Float),
        },
    ];
    let n = tasks_per_case();
    let mut table = String::from(
        "| case | tasks | accepted | worst value error | worst top-k overlap | token mismatches | near-ties | worst tie gap | gen s | verify s |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    // LUDUS_PROOF_CASES=a|b runs only the cases whose name contains one of those.
    let only = std::env::var("LUDUS_PROOF_CASES").unwrap_or_default();
    for case in cases.iter().filter(|c| only.split('|').any(|o| c.name.contains(o))) {
        let (row, mut wrong) = run_case(case, &reference, &reference_for, &tol, &node, n);
        table.push_str(&row);
        failures.append(&mut wrong);
    }
    eprintln!("\n{table}");
    if let Ok(out) = std::env::var("LUDUS_PROOF_TABLE") {
        std::fs::write(out, &table).unwrap();
    }
    assert!(failures.is_empty(), "{} wrong verdicts:\n{}", failures.len(), failures.join("\n"));
}

/// The verifier's references for nodes serving f32 or int4.
struct F32AndInt4 {
    f32: Model,
    int4: Model,
}

impl F32AndInt4 {
    fn load(path: &std::path::Path) -> Self {
        Self {
            f32: Model::load(path, Device::Cpu, Some(Kind::Float)).unwrap(),
            int4: Model::load_quantized(path, Device::Cpu, None, Quantization::Int4, None).unwrap(),
        }
    }

    fn get(&self, quantization: Quantization) -> Option<&Model> {
        match quantization {
            Quantization::None => Some(&self.f32),
            Quantization::Int4 => Some(&self.int4),
            _ => None,
        }
    }
}

/// The calibration for each family besides Llama, on the tiny Qwen 2/3, Gemma 2/3 and
/// Phi-3 models of `tests/fixtures/families` (random weights, built in transformers):
/// honest f32 and int4 nodes pass; another family's model of the same width, an edited
/// output token and an edited prompt fail.
#[test]
fn every_family_passes_honest_proofs_and_fails_cheats() {
    let families = ["qwen2", "qwen3", "gemma2", "gemma3", "phi3"];
    let dir = |f: &str| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families").join(f);
    let tol = Tolerances::default();
    let node = Identity::generate();
    let n = tasks_per_case();
    let mut table = String::from(
        "| family: case | tasks | accepted | worst value error | worst top-k overlap | token mismatches | near-ties | worst tie gap | gen s | verify s |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    for (i, family) in families.iter().enumerate() {
        let path = dir(family);
        let impostor = dir(families[(i + 1) % families.len()]);
        let references = F32AndInt4::load(&path);
        let (reference, reference_for) = (&references.f32, |q| references.get(q));
        let f32_of = |p: std::path::PathBuf| {
            Box::new(move || Model::load(&p, Device::Cpu, Some(Kind::Float)).unwrap()) as Box<dyn Fn() -> Model>
        };
        let p = path.clone();
        let int4_model =
            Box::new(move || Model::load_quantized(&p, Device::Cpu, None, Quantization::Int4, None).unwrap());
        let case = |name, honest, cheat, model| Case { name, honest: Some(honest), batch: 4, threads: 2, cheat, model };
        let cases = vec![
            case("honest f32, batch 4", true, Cheat::None, f32_of(path.clone())),
            case("honest int4, batch 4", true, Cheat::None, int4_model),
            case("another family's model, same width", false, Cheat::None, f32_of(impostor)),
            case("one output token edited", false, Cheat::EditToken, f32_of(path.clone())),
            case("prompt edited (one token of the request)", false, Cheat::EditPrompt, f32_of(path.clone())),
        ];
        for case in &cases {
            let (row, mut wrong) = run_case(case, reference, &reference_for, &tol, &node, n);
            table.push_str(&row.replacen("| ", &format!("| {family}: "), 1));
            failures.extend(wrong.drain(..).map(|w| format!("{family}: {w}")));
        }
    }
    eprintln!("\n{table}");
    assert!(failures.is_empty(), "{} wrong verdicts:\n{}", failures.len(), failures.join("\n"));
}

/// The calibration on a real model of another family: Gemma 3 270M (Q4_K_M GGUF from
/// PyPI, de-quantized at load). Honest f32 and int4 (the default) nodes pass; a skipped
/// layer and an edited prompt fail.
#[test]
fn gemma3_270m_passes_honest_proofs_and_fails_cheats() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    if !super::helpers::required_tool("Gemma 3 270M (scripts/setup --test)", path.is_file()) {
        return;
    }
    let references = F32AndInt4::load(&path);
    let (reference, reference_for) = (&references.f32, |q| references.get(q));
    let (p, q) = (path.clone(), path.clone());
    let cases = vec![
        Case {
            name: "gemma3 270m: honest f32, batch 4",
            honest: Some(true),
            batch: 4,
            threads: 2,
            cheat: Cheat::None,
            model: Box::new(move || Model::load(&p, Device::Cpu, Some(Kind::Float)).unwrap()),
        },
        Case {
            name: "gemma3 270m: honest int4, batch 4",
            honest: Some(true),
            batch: 4,
            threads: 2,
            cheat: Cheat::None,
            model: Box::new(move || Model::load_quantized(&q, Device::Cpu, None, Quantization::Int4, None).unwrap()),
        },
        Case {
            name: "gemma3 270m: one layer skipped (layer 15)",
            honest: Some(false),
            batch: 4,
            threads: 2,
            cheat: Cheat::None,
            model: Box::new({
                let p = path.clone();
                move || layer_skipped(&p)
            }),
        },
        Case {
            name: "gemma3 270m: prompt edited (one token of the request)",
            honest: Some(false),
            batch: 4,
            threads: 2,
            cheat: Cheat::EditPrompt,
            model: Box::new({
                let p = path.clone();
                move || Model::load(&p, Device::Cpu, Some(Kind::Float)).unwrap()
            }),
        },
    ];
    // 4 tasks per case in CI (a 270M model with a 262k vocabulary); LUDUS_PROOF_TASKS sets more.
    let n = std::env::var("LUDUS_PROOF_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let (tol, node) = (Tolerances::default(), Identity::generate());
    let mut failures = Vec::new();
    for case in &cases {
        let (_, mut wrong) = run_case(case, reference, &reference_for, &tol, &node, n);
        failures.append(&mut wrong);
    }
    assert!(failures.is_empty(), "{} wrong verdicts:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn ludus_verify_checks_stored_proofs_offline() {
    let Some(path) = smollm2() else { return };
    let reference = Model::load(&path, Device::Cpu, Some(Kind::Float)).unwrap();
    let engine = Engine::start(
        Model::load(&path, Device::Cpu, Some(Kind::Float)).unwrap(),
        EngineConfig {
            max_batch: 1,
            max_context: 512,
            prefill_chunk: 256,
            threads: 2,
            single_sequence_threads: 0,
            prefix_cache_bytes: 0,
            speculative: ludus::inference::Speculation::OFF,
            draft_model: None,
        },
    )
    .unwrap();
    let node = Identity::generate();
    let (prompt, params) = task(&reference, 3);
    let (completion, proof) = generate(&engine, &node, &[(3, prompt, params.clone())]).remove(0);
    engine.shutdown();
    let messages = vec![
        ChatMessage { role: "system".into(), content: "You are an NPC in a fantasy village.".into() },
        ChatMessage { role: "user".into(), content: format!("{} (#3)", ASKS[3]) },
    ];
    let stored = ludus::proof::StoredProof {
        proof,
        input: ludus::protocol::TaskInput::Chat(messages),
        params,
        prefix: vec![],
        completion,
    };
    let dir = tempfile::tempdir().unwrap();
    let run = |stored: &serde_json::Value| {
        let file = dir.path().join("proof.json");
        std::fs::write(&file, serde_json::to_vec(stored).unwrap()).unwrap();
        let out = std::process::Command::new(super::cluster::BIN)
            .args(["verify", file.to_str().unwrap(), "--model", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let honest = serde_json::to_value(&stored).unwrap();
    let (ok, out, err) = run(&honest);
    assert!(ok, "{out}{err}");
    let verdict: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(verdict["signer"], node.address.to_string());
    assert_eq!(verdict["verdict"]["accepted"], true);
    // The completion edited after the fact: the output hash no longer matches.
    let mut tampered = honest.clone();
    tampered["completion"][1] = serde_json::json!(stored.completion[1] + 1);
    let (ok, out, _) = run(&tampered);
    assert!(!ok);
    assert!(out.contains("another completion"), "{out}");
    // Not a proof at all: a clear error naming the file.
    let (ok, _, err) = run(&serde_json::json!({"hello": 1}));
    assert!(!ok && err.contains("is not a stored proof"), "{err}");
}

/// `ludus generate --proof-out` proves an answer the way a node does, and `ludus verify`
/// (the server's CPU reference) accepts it, for a chat in f32 with sampling, a raw prompt
/// in int4 (the default), and an int4 chat at a low temperature (0.2: with the tie margin
/// in Gumbel scores, this very task was rejected on an Intel Xeon, its near-tie blown up
/// 5×); a proof whose committed values were scaled is refused. This is the check a GPU
/// owner runs before joining (`scripts/device-check`).
#[test]
fn a_proof_written_by_ludus_generate_passes_ludus_verify() {
    let Some(path) = smollm2() else { return };
    let model = path.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 3] = [
        (
            "f32",
            &[
                "--quantize",
                "none",
                "--chat",
                "Who guards the bridge?",
                "--temperature",
                "0.8",
                "--seed",
                "9",
                "--max-tokens",
                "40",
            ],
        ),
        (
            "int4",
            &[
                "--quantize",
                "int4",
                "--prompt",
                "The blacksmith of the village",
                "--temperature",
                "0",
                "--max-tokens",
                "40",
            ],
        ),
        (
            "int4-cool",
            &[
                "--quantize",
                "int4",
                "--chat",
                "Tell the traveller about the old mill and the river.",
                "--temperature",
                "0.2",
                "--seed",
                "2",
                "--max-tokens",
                "60",
            ],
        ),
    ];
    for (format, flags) in cases {
        let file = dir.path().join(format!("{format}.json"));
        let out = crate::cluster::ludus()
            .args(["generate", "--model", model, "--device", "cpu", "--json", "--proof-out"])
            .arg(&file)
            .args(flags)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(stored["completion"], answer["completion_tokens"], "{format}: the proof covers the answer printed");
        // An unquantized proof leaves the field out.
        let quantization = if format.starts_with("int4") { "int4" } else { "" };
        assert_eq!(stored["proof"]["quantization"].as_str().unwrap_or(""), quantization);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "the proof holds the prompt: owner-only");
        }
        let verify = |file: &std::path::Path| {
            let out =
                crate::cluster::ludus().args(["verify", file.to_str().unwrap(), "--model", model]).output().unwrap();
            (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let (accepted, verdict) = verify(&file);
        assert!(accepted, "{format}: {verdict}");
        // The same proof with every committed prompt value doubled: the verifier recomputes
        // the hidden state and refuses it.
        let mut forged = stored.clone();
        let commitment = forged["proof"]["prompt"][0].as_str().unwrap().to_string();
        forged["proof"]["prompt"][0] = serde_json::json!(scaled_commitment(&commitment, 2.0));
        let forged_file = dir.path().join(format!("{format}-forged.json"));
        std::fs::write(&forged_file, serde_json::to_vec(&forged).unwrap()).unwrap();
        let (accepted, verdict) = verify(&forged_file);
        assert!(!accepted, "{format}: a forged commitment passed: {verdict}");
        // Refused for its numbers (the verifier recomputed them), not for another reason.
        let verdict: serde_json::Value = serde_json::from_str(&verdict).unwrap();
        assert_eq!(verdict["verdict"]["accepted"], false);
        assert!(verdict["reasons"].as_str().unwrap().contains("value error"), "{format}: {verdict}");
    }
}

/// A hex top-k commitment with its values multiplied by `factor` (indices kept).
fn scaled_commitment(hex_commitment: &str, factor: f32) -> String {
    let top = ludus::proof::commitment::TopK::decode(&hex::decode(hex_commitment).unwrap()).unwrap();
    let scaled =
        ludus::proof::commitment::TopK { entries: top.entries.iter().map(|&(i, v)| (i, v * factor)).collect() };
    hex::encode(scaled.encode())
}

#[test]
fn the_verifier_holds_the_reference_in_the_same_protected_form() {
    use ludus::actors::verifier::Verifier;
    use ludus::inference::protect::{key_id, new_key, write_bundle};
    let tiny = super::helpers::tiny(&ludus::inference::tiny_model::TinySpec::default());
    let bundle = tiny.dir.path().join("bundle");
    let key = new_key();
    write_bundle(&tiny.gguf, &bundle, "tiny", &key).unwrap();
    let references = std::collections::BTreeMap::from([("tiny".to_string(), bundle.clone())]);
    // The verifier takes the bundle's key from the distributor's key store.
    let err =
        Verifier::load(&references, &Default::default(), Tolerances::default(), tiny.dir.path().into()).err().unwrap();
    assert!(err.to_string().contains("no key"), "{err}");
    let keys = std::collections::BTreeMap::from([(key_id(&key), hex::encode(key))]);
    Verifier::load(&references, &keys, Tolerances::default(), tiny.dir.path().into()).unwrap();
    // A node serving the bundle proves against the bundle, not against the public model:
    // the protection rotates the hidden states.
    let protected = Model::load_with_key(&bundle, Device::Cpu, None, Some(&key)).unwrap();
    let public = Model::load(&tiny.gguf, Device::Cpu, None).unwrap();
    let engine = Engine::start(
        Model::load_with_key(&bundle, Device::Cpu, None, Some(&key)).unwrap(),
        EngineConfig {
            max_batch: 1,
            max_context: 256,
            prefill_chunk: 64,
            threads: 1,
            single_sequence_threads: 0,
            prefix_cache_bytes: 0,
            speculative: ludus::inference::Speculation::OFF,
            draft_model: None,
        },
    )
    .unwrap();
    let prompt: Vec<u32> = (1..20).collect();
    let (completion, proof) =
        generate(&engine, &Identity::generate(), &[(5, prompt.clone(), SamplingParams::greedy())]).remove(0);
    engine.shutdown();
    let tol = Tolerances::default();
    let against_bundle = verify(&protected, &proof, &prompt, &completion, &SamplingParams::greedy(), &tol).unwrap();
    assert!(against_bundle.accepted, "{against_bundle:?}");
    let against_public = verify(&public, &proof, &prompt, &completion, &SamplingParams::greedy(), &tol).unwrap();
    assert!(!against_public.accepted && against_public.worst_value_error > 0.5, "{against_public:?}");
}

/// Runs `n` tasks of `case` and checks each proof as the server does; returns the
/// calibration table's row and the wrong verdicts (an honest task rejected, a cheat
/// accepted in more than 1 % of its tasks).
fn run_case<'m>(
    case: &Case,
    reference: &Model,
    reference_for: &dyn Fn(Quantization) -> Option<&'m Model>,
    tol: &Tolerances,
    node: &Identity,
    n: usize,
) -> (String, Vec<String>) {
    let vocab = reference.llama.config.vocab_size as u32;
    let mut failures = Vec::new();
    let engine = Engine::start(
        (case.model)(),
        EngineConfig {
            max_batch: case.batch,
            max_context: 512,
            prefill_chunk: 256,
            threads: case.threads,
            single_sequence_threads: 0,
            prefix_cache_bytes: 0,
            speculative: ludus::inference::Speculation::OFF,
            draft_model: None,
        },
    )
    .unwrap();
    let (mut accepted, mut worst_err, mut worst_overlap, mut mismatches, mut ties, mut gap) =
        (0, 0f32, 1f32, 0, 0, 0f32);
    let (mut gen_s, mut verify_s) = (0f64, 0f64);
    for start in (0..n).step_by(case.batch) {
        let jobs: Vec<(usize, Vec<u32>, SamplingParams)> = (start..(start + case.batch).min(n))
            .map(|i| {
                let (mut prompt, mut params) = task(reference, i);
                if matches!(case.cheat, Cheat::Constrained | Cheat::IgnoreGrammar) {
                    params.grammar = Some(npc_grammar());
                }
                if case.cheat == Cheat::EditPrompt {
                    // The node runs the prompt with one token of the user's message
                    // changed (same length, so only the states can tell).
                    let at = prompt.len() - 12 - i % 4;
                    prompt[at] = (prompt[at] + 7919 * (1 + i as u32)) % vocab;
                }
                (i, prompt, params)
            })
            .collect();
        let t = Instant::now();
        let results = if case.cheat == Cheat::IgnoreGrammar {
            let free: Vec<_> = jobs
                .iter()
                .map(|(i, prompt, params)| (*i, prompt.clone(), SamplingParams { grammar: None, ..params.clone() }))
                .collect();
            generate(&engine, node, &free)
        } else {
            generate(&engine, node, &jobs)
        };
        gen_s += t.elapsed().as_secs_f64();
        for ((i, _, params), (mut completion, mut proof)) in jobs.iter().zip(results) {
            let (true_prompt, _) = task(reference, *i);
            match case.cheat {
                Cheat::EditToken => {
                    let at = (i * 7) % completion.len();
                    completion[at] = (completion[at] + 1 + (*i as u32 * 131) % 1000) % vocab;
                    // A consistent lie: the proof is re-signed over the edited output.
                    proof.output_hash = hex::encode(ludus::protocol::receipt::output_hash(&completion));
                    proof.signature = hex::encode(node.sign(&proof.digest()));
                }
                Cheat::Replay => {
                    // Commitments of another task, relabelled for this one.
                    let other =
                        &generate(&engine, node, &[(i + 1000, task(reference, i + 1000).0, params.clone())])[0].1;
                    proof.prompt = other.prompt.clone();
                    proof.chunks = other.chunks.clone();
                    proof.signature = hex::encode(node.sign(&proof.digest()));
                }
                Cheat::ClaimInt8 | Cheat::ClaimInt4 => {
                    let claim = if case.cheat == Cheat::ClaimInt8 { "int8" } else { "int4" };
                    proof.quantization = claim.into();
                    proof.signature = hex::encode(node.sign(&proof.digest()));
                }
                _ => {}
            }
            let t = Instant::now();
            // As the server checks: the declared format's reference, then the claim itself.
            let checked =
                verify_claimed(&reference_for, &proof, &true_prompt, 0, &completion, params, tol, Some(&[])).unwrap();
            let verdict = ludus::proof::Verdict { accepted: checked.accepted(), ..checked.verdict };
            verify_s += t.elapsed().as_secs_f64();
            accepted += verdict.accepted as usize;
            worst_err = worst_err.max(verdict.worst_value_error);
            worst_overlap = worst_overlap.min(verdict.worst_index_overlap);
            mismatches += verdict.token_mismatches;
            ties += verdict.near_ties;
            gap = gap.max(verdict.worst_tie_margin);
            if case.honest == Some(true) && !verdict.accepted {
                failures.push(format!("{} task {i}: {:?}", case.name, verdict));
            }
        }
    }
    engine.shutdown();
    // Acceptance: no honest task rejected; at least 99 % of each cheat's tasks rejected
    // (so every one of them at CI's small counts).
    if case.honest == Some(false) && ((n - accepted) as f64 / n as f64) < 0.99 {
        failures.push(format!("{}: only {} of {n} rejected", case.name, n - accepted));
    }
    let table_row = format!(
        "| {} | {n} | {accepted} | {worst_err:.4} | {worst_overlap:.3} | {mismatches} | {ties} | {gap:.2} | {gen_s:.1} | {verify_s:.1} |\n",
        case.name
    );
    eprint!("{table_row}");
    (table_row, failures)
}

/// A proof of an empty completion (a node that answers `Done` without a token) is refused
/// with a reason. Replaying it used to panic (the replay judges the token after the last
/// prompt row), which killed a thread of the server's verifier pool for good.
#[test]
fn a_proof_of_no_completion_is_refused_not_a_panic() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let prompt = model.tokenizer.encode("Hello there, traveller", false).unwrap();
    let d = model.llama.config.hidden_size;
    let mut builder = ProofBuilder::new([7; 32], 64);
    builder.prompt_rows(prompt.len(), &vec![0.5; prompt.len() * d]);
    let proof = builder.finish(&Identity::generate(), 1, "smollm2", &[]).expect("a proof");
    let tol = Tolerances::default();
    let verdict = verify(&model, &proof, &prompt, &[], &SamplingParams::greedy(), &tol).unwrap();
    assert!(!verdict.accepted, "{verdict:?}");
    assert!(verdict.reasons.iter().any(|r| r.contains("no completion token")), "{verdict:?}");
}

/// An int8 node's rows depend on which rows it computed together: its prompt in chunks
/// cut at its persona's end, its answer one row at a time. The verifier's replay, in
/// chunks of 256 over prompt and answer, misses them by up to 0.12 (a 300-token persona
/// here), and over the network an honest int8 node was refused at 0.31, past a skipped
/// layer's figures. Replayed as the node ran it, every committed row comes back to the
/// rounding of its commitment: the second replay a refused proof gets is exact enough to
/// tell an honest node from a cheater.
#[test]
fn an_int8_nodes_rows_come_back_whole_when_replayed_as_the_node_ran_it() {
    let Some(path) = smollm2() else { return };
    let load = || Model::load_quantized(&path, Device::Cpu, None, Quantization::Int8, None).unwrap();
    let reference = load();
    // The stricter formats' references, for the format claim `verify_claimed` checks.
    let f32 = Model::load_quantized(&path, Device::Cpu, Some(Kind::Float), Quantization::None, None).unwrap();
    let int4 = Model::load_quantized(&path, Device::Cpu, None, Quantization::Int4, None).unwrap();
    let references = |q: Quantization| match q {
        Quantization::Int8 => Some(&reference),
        Quantization::Int4 => Some(&int4),
        Quantization::None => Some(&f32),
    };
    // Four tasks at once: their answers decode in one batch, beside each other's prompts.
    let config =
        EngineConfig { max_batch: 4, max_context: 1024, threads: 2, prefill_chunk: 128, ..EngineConfig::default() };
    let engine = Engine::start(load(), config).unwrap();
    let node = Identity::generate();
    let persona = [super::network_proof::PERSONA; 6].join(" ");
    let tol = Tolerances::default();
    let asks = ["What do you sell?", "Tell me about Torv.", "Where is the volcano?", "Greet me, smith."];
    let tasks: Vec<_> = asks
        .iter()
        .enumerate()
        .map(|(i, ask)| {
            let messages = vec![
                ChatMessage { role: "system".into(), content: persona.clone() },
                ChatMessage { role: "user".into(), content: ask.to_string() },
            ];
            let prompt = reference.chat_prompt(&messages).unwrap();
            let breaks =
                ludus::proof::verify::node_breaks(&reference, &ludus::protocol::TaskInput::Chat(messages), &prompt);
            assert_eq!(breaks.len(), 1, "the persona is cut at its end");
            let params = SamplingParams { temperature: 0.8, top_p: 0.95, seed: i as u64, ..SamplingParams::default() };
            let request = GenerateRequest {
                prompt: prompt.clone(),
                params: params.clone(),
                max_tokens: 40,
                collect_hidden: true,
                breaks: breaks.clone(),
                ..GenerateRequest::default()
            };
            (prompt, breaks, params, engine.submit(request).unwrap())
        })
        .collect();
    for (i, (prompt, breaks, params, events)) in tasks.into_iter().enumerate() {
        let mut builder = ProofBuilder::new(challenge(i), 64).format(Format::Int8);
        let completion = ludus::proof::signed::collect_blocking(events, &mut builder).unwrap();
        let proof = builder.finish(&node, i as u64, "smollm2", &completion).expect("a proof");
        let chunked = verify::verify_continuation(&reference, &proof, &prompt, 0, &completion, &params, &tol).unwrap();
        let as_run = ludus::proof::verify::verify_scheduled(
            &reference,
            &proof,
            &prompt,
            0,
            &completion,
            &params,
            &tol,
            Some(&breaks),
        )
        .unwrap();
        eprintln!(
            "task {i}: {} prompt, {} answer tokens; worst value error chunked {:.4}, as the node ran it {:.4} (prompt {:.4}, answer {:.4})",
            prompt.len(),
            completion.len(),
            chunked.worst_value_error,
            as_run.worst_value_error,
            as_run.worst_prompt_value_error,
            as_run.worst_answer_value_error
        );
        assert!(as_run.accepted && as_run.replayed_as_the_node_ran_it, "{:?}", as_run.reasons);
        assert_eq!(as_run.commitments, chunked.commitments);
        // bf16 commitments round a value to 2⁻⁹ of itself.
        assert!(as_run.worst_value_error < 0.005, "{}", as_run.worst_value_error);
        assert!(as_run.worst_value_error < chunked.worst_value_error);
        // As the server checks, with limits the chunked replay's figures (0.046 and up
        // here) exceed: int8's answer rows 3 × 0.002. The proof passes only through the
        // second replay, which names the first one's refusal; without the node's cuts it
        // is refused. Past even the second replay's figures, the refusal says it was tried.
        let check = |max_value_error: f32, breaks: Option<&[usize]>| {
            let tol = Tolerances { max_value_error, ..Tolerances::default() };
            verify_claimed(&references, &proof, &prompt, 0, &completion, &params, &tol, breaks).unwrap()
        };
        let claimed = check(0.002, Some(&breaks));
        assert!(claimed.accepted() && claimed.verdict.replayed_as_the_node_ran_it, "{:?}", claimed.reasons());
        assert!(claimed.verdict.first_replay_refused.iter().any(|r| r.contains("hidden states differ")));
        let unscheduled = check(0.002, None);
        assert!(!unscheduled.accepted() && !unscheduled.reasons().contains("as the node ran it"));
        let both = check(1e-6, Some(&breaks));
        assert!(!both.accepted() && !both.verdict.replayed_as_the_node_ran_it);
        assert!(both.reasons().contains("replayed as the node ran it, refused too"), "{}", both.reasons());
    }
    engine.shutdown();
}
