//! `ludus generate`: one completion from a local model, streamed to stdout, or one JSON
//! object with the text, the token ids and timings (`--json`).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::RuntimeArgs;
use crate::inference::{ChatMessage, Event, GenerateRequest, SamplingParams};
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
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// One answer, in the format and threads the flags and settings say: a one-off command
/// neither measures nor reads start-up tuning (nodes do).
pub fn run(settings: &Settings, args: GenerateArgs) -> anyhow::Result<()> {
    let settings = &settings.untuned();
    let engine = args.runtime.start_engine(settings, &args.model, Some(1))?;
    let (prompt, prompt_text) = {
        let model_prompt =
            |text: String| -> anyhow::Result<(Vec<u32>, String)> { Ok((engine.tokenizer.encode(&text, false)?, text)) };
        match (&args.prompt, &args.chat) {
            (Some(p), _) => (engine.tokenizer.encode(p, true)?, p.clone()),
            (None, Some(user)) => {
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(ChatMessage::new("system", system));
                }
                messages.push(ChatMessage::new("user", user));
                model_prompt(engine.template.render(&messages, true)?)?
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
        ..Default::default()
    };
    let mut events = engine.submit(request)?;
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = events.blocking_recv() {
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

fn decode_rate(tokens: usize, ttft_ms: f64, total_ms: f64) -> f64 {
    let ms = total_ms - ttft_ms;
    if tokens > 1 && ms > 0.0 {
        (tokens - 1) as f64 / ms * 1e3
    } else {
        0.0
    }
}
