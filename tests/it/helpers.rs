//! Shared test helpers: tiny models on disk, the real SmolLM2 when present, engines.

use std::path::{Path, PathBuf};

use ludus::inference::tiny_model::{write_gguf, write_safetensors_dir, TinySpec};
use ludus::inference::{Engine, EngineConfig, Event, Finished, GenerateRequest, Model};
use tch::Device;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2")
}

/// The real SmolLM2 model: `None` (the test is skipped) unless `scripts/setup` fetched it;
/// with `LUDUS_REQUIRE_MODEL=1` (CI) a missing model fails the test instead.
pub fn smollm2() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("LUDUS_REQUIRE_MODEL").is_err(),
        "LUDUS_REQUIRE_MODEL is set but {} is missing: run scripts/setup",
        path.display()
    );
    eprintln!("skipped: {} not found (run scripts/setup)", path.display());
    None
}

/// A tiny model written to a temporary directory (GGUF file and HF directory).
pub struct Tiny {
    pub dir: tempfile::TempDir,
    pub gguf: PathBuf,
    pub hf: PathBuf,
}

pub fn tiny(spec: &TinySpec) -> Tiny {
    let dir = tempfile::tempdir().expect("temp dir");
    let gguf = dir.path().join("tiny.gguf");
    let hf = dir.path().join("tiny-hf");
    write_gguf(&gguf, spec).expect("write tiny gguf");
    write_safetensors_dir(&hf, spec).expect("write tiny safetensors");
    Tiny { dir, gguf, hf }
}

pub fn engine(path: &Path, max_batch: usize) -> Engine {
    let model = Model::load(path, Device::Cpu, None).expect("model loads");
    Engine::start(
        model,
        EngineConfig {
            max_batch,
            max_context: 1024,
            prefill_chunk: 64,
            threads: 0,
            single_sequence_threads: 0,
            prefix_cache_bytes: 0,
            speculative: ludus::inference::Speculation::OFF,
            draft_model: None,
        },
    )
    .expect("engine starts")
}

/// Runs a request to the end: (token ids, text, finish).
pub fn collect(engine: &Engine, request: GenerateRequest) -> (Vec<u32>, String, Finished) {
    drain(engine.submit(request).expect("submit"))
}

pub fn drain(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, String, Finished) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Done(done) => {
                text.push_str(&done.tail);
                return (ids, text, done);
            }
            Event::Error(e) | Event::Rejected(e) => panic!("generation failed: {e}"),
            Event::PromptHidden { .. } | Event::PromptCached { .. } => {}
        }
    }
    panic!("stream ended without Done");
}

/// The Python that has the `openai` SDK (`scripts/setup --test` installs it): `None` (the
/// test is skipped) when missing, except with `LUDUS_REQUIRE_MODEL=1` (CI), where it fails.
pub fn python_with_openai() -> Option<String> {
    let python = std::env::var("LUDUS_PYTHON")
        .unwrap_or_else(|_| format!("{}/.cache/ludus/venv/bin/python", std::env::var("HOME").unwrap()));
    let has_sdk = std::process::Command::new(&python).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !has_sdk {
        assert!(std::env::var("LUDUS_REQUIRE_MODEL").is_err(), "the openai SDK is missing: run scripts/setup --test");
        eprintln!("skipped: {python} cannot import openai (run scripts/setup --test)");
        return None;
    }
    Some(python)
}

/// Panics with the command's output unless it succeeded.
pub fn assert_success(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether an optional test tool is present; when it is not, the caller skips its part,
/// unless `LUDUS_REQUIRE_TOOLS=1` (set by `make test`, so CI) makes that a failure.
pub fn required_tool(what: &str, present: bool) -> bool {
    if !present {
        assert!(std::env::var("LUDUS_REQUIRE_TOOLS").is_err(), "LUDUS_REQUIRE_TOOLS is set but {what} is missing");
        eprintln!("skipped: {what} is missing");
    }
    present
}

/// How far apart the seeded sampler scores tokens `a` and `b` after `prompt` + `before`,
/// on `model`'s own logits (0 = a tie).
pub fn score_gap(
    model: &ludus::inference::Model,
    prompt: &[u32],
    before: &[u32],
    a: u32,
    b: u32,
    params: &ludus::inference::SamplingParams,
) -> f64 {
    use ludus::inference::kv_cache::KvCache;
    use ludus::inference::llama::LogitsFor;
    use ludus::inference::sampling::{candidates, gumbel};
    let context: Vec<u32> = prompt.iter().chain(before).copied().collect();
    let mut cache = KvCache::new(&model.llama.config, 1, context.len(), tch::Device::Cpu, model.llama.kind).unwrap();
    let _guard = tch::no_grad_guard();
    let logits = model.llama.prefill(&mut cache, 0, &context, 0, LogitsFor::Last).unwrap().logits;
    let logits = Vec::<f32>::try_from(&logits.flatten(0, -1)).unwrap();
    let position = context.len() as u64;
    let score = |t: u32| -> f64 {
        if params.temperature == 0.0 {
            return logits[t as usize] as f64;
        }
        // A token outside the reference's candidates (top-k/top-p) is no near-tie.
        match candidates(&logits, params).into_iter().find(|c| c.0 == t) {
            Some((_, s)) => s as f64 + gumbel(params.seed, position, t),
            None => f64::INFINITY,
        }
    };
    (score(a) - score(b)).abs()
}
