//! `ludus bench decode`: decode throughput at several batch sizes, prefill throughput,
//! time to first token and peak memory, through the real engine.

use std::path::PathBuf;
use std::time::Instant;

use clap::Subcommand;

use super::RuntimeArgs;
use crate::inference::{Event, GenerateRequest, SamplingParams};
use crate::settings::Settings;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Decode and prefill throughput of one model on this machine.
    Decode {
        /// Model file (.gguf) or safetensors directory.
        #[arg(long)]
        model: PathBuf,
        /// Batch sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        batch: Vec<usize>,
        /// Tokens generated per sequence.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        /// Prompt length for the prefill measurement.
        #[arg(long, default_value_t = 256)]
        prompt_tokens: usize,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Perplexity on a text, and greedy agreement and KL with the unquantized model, for
    /// each quantization (the first one listed is the reference).
    Quality {
        /// Model file (.gguf) or safetensors directory.
        #[arg(long)]
        model: PathBuf,
        /// A plain-text file to score (docs/lightweight-models.md uses
        /// tests/fixtures/eval/village.txt).
        #[arg(long)]
        text: PathBuf,
        /// Quantizations to compare, reference first.
        #[arg(long, value_delimiter = ',', default_value = "none,int8,int4")]
        quantize: Vec<crate::inference::Quantization>,
        /// Tokens per scoring window.
        #[arg(long, default_value_t = 256)]
        window: usize,
        /// Device: auto, cpu, cuda, cuda:N.
        #[arg(long, default_value = "cpu")]
        device: crate::inference::DeviceChoice,
    },
    /// Load generator against a server (or a self-hosted one with fake-engine nodes).
    Load(super::load::LoadArgs),
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// Resident memory of this process now (VmRSS), in bytes.
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS:")
}

fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

pub fn run(settings: &Settings, cmd: BenchCommand) -> anyhow::Result<()> {
    if let BenchCommand::Quality { model, text, quantize, window, device } = cmd {
        return quality(&model, &text, &quantize, window, device);
    }
    let BenchCommand::Decode { model, batch, tokens, prompt_tokens, runtime } = cmd else {
        anyhow::bail!("`bench load` is handled by cli::load");
    };
    let max_batch = batch.iter().copied().max().unwrap_or(1);
    let engine = runtime.start_engine(settings, &model, Some(max_batch))?;
    let text = "In a quiet village at the edge of the forest, the blacksmith told stories to every traveller. ";
    let mut long_prompt = engine.tokenizer.encode(&text.repeat(prompt_tokens / 10 + 1), false)?;
    long_prompt.truncate(prompt_tokens.max(1));
    let short_prompt = engine.tokenizer.encode("Once upon a time, a knight", false)?;
    let run_batch = |prompt: &[u32], b: usize, n: usize| -> anyhow::Result<(f64, f64, f64)> {
        let started = Instant::now();
        let mut streams = Vec::new();
        for i in 0..b {
            let params = SamplingParams { seed: i as u64, ..SamplingParams::greedy() };
            let request =
                GenerateRequest { prompt: prompt.to_vec(), params, max_tokens: n, min_tokens: n, ..Default::default() };
            streams.push(engine.submit(request)?);
        }
        let (mut first, mut last, mut generated) = (f64::MAX, 0f64, 0usize);
        for mut rx in streams {
            while let Some(event) = rx.blocking_recv() {
                match event {
                    Event::Done(done) => {
                        first = first.min(done.timings.time_to_first_token_ms);
                        generated += done.completion_tokens;
                        break;
                    }
                    Event::Error(e) | Event::Rejected(e) => anyhow::bail!("{e}"),
                    _ => {}
                }
            }
            last = last.max(started.elapsed().as_secs_f64() * 1e3);
        }
        Ok((first, last, generated as f64))
    };
    // Warm-up: first calls allocate and pick kernels.
    run_batch(&short_prompt, 1, 8)?;
    let (ttft_ms, _, _) = run_batch(&long_prompt, 1, 1)?;
    let prefill_tok_s = long_prompt.len() as f64 / (ttft_ms / 1e3);
    let mut rows = Vec::new();
    for &b in &batch {
        let (first_ms, total_ms, generated) = run_batch(&short_prompt, b, tokens)?;
        // Decode rate after all sequences produced their first token.
        let decode_tok_s = (generated - b as f64) / ((total_ms - first_ms).max(1e-3) / 1e3);
        let per_seq = decode_tok_s / b as f64;
        rows.push(
            serde_json::json!({"batch": b, "decode_tokens_per_s": decode_tok_s, "per_sequence_tokens_per_s": per_seq}),
        );
        eprintln!("batch {b:>3}: {decode_tok_s:8.1} tokens/s aggregate, {per_seq:6.1} per sequence");
    }
    let batch1 = rows.iter().find(|r| r["batch"] == 1).and_then(|r| r["decode_tokens_per_s"].as_f64());
    let report = serde_json::json!({
        "model": engine.model_name,
        "device": format!("{:?}", engine.device),
        "dtype": format!("{:?}", engine.kind),
        "threads": tch::get_num_threads(),
        "prefill_prompt_tokens": long_prompt.len(),
        "prefill_tokens_per_s": prefill_tok_s,
        "time_to_first_token_ms": ttft_ms,
        "decode": rows,
        "quantization": engine.quantization.to_string(),
        "model_bytes": engine.model_bytes,
        "kv_cache_bytes": engine.kv_cache_bytes,
        "weight_bytes": engine.weight_bytes,
        "weight_bandwidth_gb_s_batch1": batch1.map(|t| t * engine.weight_bytes as f64 / 1e9),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_bytes": rss_bytes(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `ludus bench quality`: one JSON line per quantization.
fn quality(
    path: &std::path::Path,
    text: &std::path::Path,
    quantize: &[crate::inference::Quantization],
    window: usize,
    device: crate::inference::DeviceChoice,
) -> anyhow::Result<()> {
    use crate::inference::{eval, Model};
    let device = device.resolve()?;
    let text = std::fs::read_to_string(text).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", text.display()))?;
    let Some((&first, rest)) = quantize.split_first() else {
        anyhow::bail!("--quantize needs at least one value");
    };
    let reference = Model::load_quantized(path, device, None, first, None)?;
    let tokens = reference.tokenizer.encode(&text, true)?;
    let report = |q: crate::inference::Quantization, model: &Model| -> anyhow::Result<serde_json::Value> {
        let ppl = eval::perplexity(&model.llama, &tokens, window)?;
        let agreement = eval::agreement(&reference.llama, &model.llama, &tokens, window)?;
        let row = serde_json::json!({
            "model": model.name, "device": format!("{device:?}"), "quantization": q.to_string(),
            "tokens": tokens.len(), "perplexity": ppl, "greedy_agreement": agreement.greedy,
            "kl_nats": agreement.kl, "model_bytes": model.llama.model_bytes(),
        });
        println!("{row}");
        Ok(row)
    };
    report(first, &reference)?;
    for &q in rest {
        let model = Model::load_quantized(path, device, None, q, None)?;
        report(q, &model)?;
    }
    Ok(())
}
