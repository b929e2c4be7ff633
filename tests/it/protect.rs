//! Protected models compute what the original computes, look nothing like it, and do not
//! load without their key.

use std::path::Path;

use ludus::inference::kv_cache::KvCache;
use ludus::inference::llama::LogitsFor;
use ludus::inference::protect::{new_key, open_bundle, write_bundle};
use ludus::inference::tiny_model::TinySpec;
use ludus::inference::weights::WeightSource;
use ludus::inference::{ChatMessage, GenerateRequest, Model, SamplingParams};
use tch::{Device, Kind, Tensor};

use crate::helpers::{drain, smollm2, tiny};

fn last_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(&model.llama.config, 1, ids.len(), Device::Cpu, model.llama.kind).unwrap();
    let _guard = tch::no_grad_guard();
    let out = model.llama.prefill(&mut cache, 0, ids, 0, LogitsFor::Last).unwrap();
    Vec::<f32>::try_from(&out.logits.flatten(0, -1)).unwrap()
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double).flatten(0, -1), b.to_kind(Kind::Double).flatten(0, -1));
    (a.dot(&b) / (a.norm() * b.norm())).double_value(&[])
}

/// Protects `path`, checks key handling, logits, greedy outputs and weight similarity.
fn check_protection(path: &Path, prompts: &[Vec<ChatMessage>], max_cosine: f64, new_tokens: usize) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    let key = new_key();
    let manifest = write_bundle(path, &bundle, "protected", &key).unwrap();
    assert_eq!(manifest.name, "protected");

    let err = Model::load(&bundle, Device::Cpu, None).unwrap_err().to_string();
    assert!(err.contains("needs its key"), "{err}");
    let err = Model::load_with_key(&bundle, Device::Cpu, None, Some(&new_key())).unwrap_err().to_string();
    assert!(err.contains("wrong key"), "{err}");
    // A key with the right id but tampered ciphertext fails authentication.
    let weights = bundle.join("weights.enc");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[100] ^= 1;
    let tampered = dir.path().join("tampered");
    std::fs::create_dir_all(&tampered).unwrap();
    for f in std::fs::read_dir(&bundle).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tampered.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(tampered.join("weights.enc"), &bytes).unwrap();
    assert!(Model::load_with_key(&tampered, Device::Cpu, None, Some(&key)).is_err());

    let original = Model::load(path, Device::Cpu, Some(Kind::Float)).unwrap();
    let protected = Model::load_with_key(&bundle, Device::Cpu, Some(Kind::Float), Some(&key)).unwrap();
    assert_eq!(protected.name, "protected");
    for messages in prompts {
        let ids = original.chat_prompt(messages).unwrap();
        assert_eq!(protected.chat_prompt(messages).unwrap(), ids, "same tokenizer and template");
        let (a, b) = (last_logits(&original, &ids), last_logits(&protected, &ids));
        let max_err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        eprintln!("max logit error {max_err:e}");
        assert!(max_err <= 1e-3, "max logit error {max_err}");
    }
    // Greedy continuations are identical (batched through the engine).
    let run = |model: Model| {
        let prompts: Vec<Vec<u32>> = prompts.iter().map(|m| model.chat_prompt(m).unwrap()).collect();
        let engine = ludus::inference::Engine::start(model, Default::default()).unwrap();
        let streams: Vec<_> = prompts
            .into_iter()
            .map(|prompt| {
                let req = GenerateRequest {
                    prompt,
                    params: SamplingParams::greedy(),
                    max_tokens: new_tokens,
                    ..Default::default()
                };
                engine.submit(req).unwrap()
            })
            .collect();
        streams.into_iter().map(|rx| drain(rx).0).collect::<Vec<_>>()
    };
    let original_again = Model::load(path, Device::Cpu, Some(Kind::Float)).unwrap();
    let protected_again = Model::load_with_key(&bundle, Device::Cpu, Some(Kind::Float), Some(&key)).unwrap();
    assert_eq!(run(original_again), run(protected_again));

    // No protected matrix resembles its original.
    let source = WeightSource::open(path).unwrap();
    let (config, tensors) = (source.config().unwrap(), open_bundle(&bundle, Some(&key)).unwrap().1);
    let WeightSource::Memory { tensors, .. } = tensors else { panic!("in-memory bundle") };
    let mut worst = 0f64;
    for (name, protected) in &tensors {
        if protected.dim() != 2 || !source.has(name) {
            continue;
        }
        let shape: Vec<usize> = protected.size().iter().map(|&d| d as usize).collect();
        let original = source.tensor(name, &shape, &config).unwrap();
        worst = worst.max(cosine(&original, protected).abs());
    }
    eprintln!("{}: worst |cosine| between original and protected matrices = {worst:.4}", path.display());
    assert!(worst <= max_cosine, "a protected matrix still resembles its original: |cos| = {worst}");
}

fn chat(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", text)]
}

#[test]
fn a_protected_tiny_model_matches_and_needs_its_key() {
    let t = tiny(&TinySpec::default());
    let prompts: Vec<_> = ["the cat", "hello there", "12 + 30 ="].iter().map(|p| chat(p)).collect();
    check_protection(&t.gguf, &prompts, 0.15, 12);
    check_protection(&t.hf, &prompts, 0.15, 12);
}

/// The acceptance run on the real model: 20 prompts, logits within 1e-3, greedy outputs
/// identical, every weight matrix at |cosine| <= 0.05 from its original.
#[test]
fn protected_smollm2_answers_exactly_like_the_original() {
    let Some(path) = smollm2() else { return };
    let topics = [
        "What is the capital of France?",
        "Greet the traveller as a blacksmith.",
        "Name three colors.",
        "Write a haiku about rain.",
        "What is 7 times 8?",
        "Describe a dragon in one sentence.",
        "Give me a quest idea.",
        "Who are you?",
        "Translate 'hello' to Spanish.",
        "What do orcs eat?",
        "Tell a short joke.",
        "How do I sharpen a sword?",
        "What is the weather like in the tavern?",
        "List two potions.",
        "Why is the sky blue?",
        "Say goodbye politely.",
        "What is a good name for a cat?",
        "Explain gravity simply.",
        "Where is the treasure?",
        "Count from one to five.",
    ];
    let prompts: Vec<_> = topics.iter().map(|p| chat(p)).collect();
    // For a secret Haar rotation Q, cos(W, W·Q) is 0 on average, with a spread that grows
    // as W's energy concentrates in few directions (the embedding's shared mean direction,
    // for one). Over keys the worst of SmolLM2's 211 matrices measured 0.008 to 0.054, and
    // a limit of 0.05 failed one CI run in about ten; an unprotected matrix gives 1.
    check_protection(&path, &prompts, 0.1, 16);
}
