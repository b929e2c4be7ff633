//! `ludus generate`: one completion from a local model, streamed to stdout, or one JSON
//! object with the text, the token ids and timings (`--json`). With `--proof-out` it also
//! proves the answer as a node does, at batch 1 (a fresh challenge, signed by a fresh key),
//! and writes the stored proof that `ludus verify` checks: how an owner sees whether this
//! machine's proofs pass the server's verifier (a GPU node's against the CPU reference)
//! before joining. A serving node batches and reuses cached prefixes, which moves its
//! numbers a little further; a proof that fails here fails there.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::RuntimeArgs;
use crate::crypto::identity::Identity;
use crate::inference::{ChatMessage, Event, GenerateRequest, SamplingParams};
use crate::proof::commitment::DEFAULT_TOP_K;
use crate::proof::{Format, ProofBuilder, StoredProof};
use crate::protocol::TaskInput;
use crate::settings::Settings;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model file (.gguf) or safetensors directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A raw completion prompt.
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sampling seed (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop sequences (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Also prove the answer as a node would, at batch 1 (random challenge, throwaway key),
    /// and write the stored proof here (mode 0600), for `ludus verify FILE --model …`.
    #[arg(long)]
    pub proof_out: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// One answer, in the format and threads the flags and settings say: a one-off command
/// neither measures nor reads start-up tuning (nodes do).
pub fn run(settings: &Settings, args: GenerateArgs) -> anyhow::Result<()> {
    let settings = &settings.untuned();
    let engine = args.runtime.start_engine(settings, &args.model, Some(1))?;
    let (prompt, prompt_text, input) = {
        let model_prompt =
            |text: String| -> anyhow::Result<(Vec<u32>, String)> { Ok((engine.tokenizer.encode(&text, false)?, text)) };
        match (&args.prompt, &args.chat) {
            (Some(p), _) => (engine.tokenizer.encode(p, true)?, p.clone(), TaskInput::Text(p.clone())),
            (None, Some(user)) => {
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(ChatMessage::new("system", system));
                }
                messages.push(ChatMessage::new("user", user));
                let (ids, text) = model_prompt(engine.template.render(&messages, true)?)?;
                (ids, text, TaskInput::Chat(messages))
            }
            (None, None) => anyhow::bail!("give --prompt or --chat"),
        }
    };
    tracing::debug!(prompt = %prompt_text, tokens = prompt.len(), "prompt");
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed,
        ..Default::default()
    };
    let request = GenerateRequest {
        prompt: prompt.clone(),
        params,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        collect_hidden: args.proof_out.is_some(),
        ..Default::default()
    };
    let mut prover = args.proof_out.as_ref().map(|_| {
        let mut challenge = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut challenge);
        ProofBuilder::new(challenge, DEFAULT_TOP_K).format(Format::of(engine.quantization, engine.kind))
    });
    let params = request.params.clone();
    let mut events = engine.submit(request)?;
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = events.blocking_recv() {
        if let Some(prover) = prover.as_mut() {
            prover.observe(&event);
        }
        match event {
            Event::Token { id, text: piece, .. } => {
                ids.push(id);
                text.push_str(&piece);
                if !args.json {
                    write!(stdout, "{piece}")?;
                    stdout.flush()?;
                }
            }
            Event::Done(done) => {
                text.push_str(&done.tail);
                if let (Some(path), Some(prover)) = (&args.proof_out, prover.as_mut()) {
                    write_proof(path, prover, &engine.model_name, input, params, &ids)?;
                }
                if args.json {
                    let out = serde_json::json!({
                        "text": text,
                        "prompt_tokens": prompt,
                        "completion_tokens": ids,
                        "finish_reason": done.reason,
                        "seed": seed,
                        "timings": {
                            "time_to_first_token_ms": done.timings.time_to_first_token_ms,
                            "total_ms": done.timings.total_ms,
                            "decode_tokens_per_s": decode_rate(ids.len(), done.timings.time_to_first_token_ms, done.timings.total_ms),
                        },
                    });
                    writeln!(stdout, "{out}")?;
                } else {
                    writeln!(stdout, "{}", done.tail)?;
                }
                return Ok(());
            }
            Event::Error(e) | Event::Rejected(e) => anyhow::bail!("generation failed: {e}"),
            Event::PromptHidden { .. } | Event::PromptCached { .. } => {}
        }
    }
    anyhow::bail!("the engine stopped before finishing")
}

/// Signs the answer's proof with a throwaway key and writes it as a stored proof.
fn write_proof(
    path: &std::path::Path,
    prover: &mut ProofBuilder,
    model: &str,
    input: TaskInput,
    params: SamplingParams,
    completion: &[u32],
) -> anyhow::Result<()> {
    let task = rand::random::<u64>() >> 1;
    let proof = prover
        .finish(&Identity::generate(), task, model, completion)
        .ok_or_else(|| anyhow::anyhow!("the engine sent no hidden state for the prompt's committed row"))?;
    let stored = StoredProof { proof, input, params, prefix: Vec::new(), completion: completion.to_vec() };
    // The proof holds the prompt: readable by its owner only, like the server's kept proofs.
    let mut options = std::fs::OpenOptions::new();
    std::os::unix::fs::OpenOptionsExt::mode(options.write(true).create(true).truncate(true), 0o600);
    let written =
        options.open(path).and_then(|mut f| std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(&stored)?));
    written.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn decode_rate(tokens: usize, ttft_ms: f64, total_ms: f64) -> f64 {
    let ms = total_ms - ttft_ms;
    if tokens > 1 && ms > 0.0 {
        (tokens - 1) as f64 / ms * 1e3
    } else {
        0.0
    }
}
