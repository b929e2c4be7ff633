//! `ludus bench decode`: decode throughput at several batch sizes, prefill throughput,
//! time to first token and peak memory, through the real engine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Subcommand;

use super::RuntimeArgs;
use crate::inference::chat_template::persona_breaks;
use crate::inference::{ChatMessage, Event, GenerateRequest, SamplingParams};
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
        /// Also decode under a JSON-schema grammar (structured output) at each batch size,
        /// in the same run, and print the ratio to unconstrained decoding; and time the
        /// compilation of a 20-field schema.
        #[arg(long)]
        constrained: bool,
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
    /// Resident memory of a process serving the model in each format: before loading
    /// (the process's own baseline), after loading and after a short generation. Each
    /// format runs in a fresh process; whole-process figures depend on the CPU (libtorch
    /// picks kernels per machine), so the CPU model is printed with them.
    Memory {
        /// Model file (.gguf) or safetensors directory.
        #[arg(long)]
        model: PathBuf,
        /// Formats to measure, each in its own process.
        #[arg(long, value_delimiter = ',', default_value = "none,int8,int4")]
        quantize: Vec<crate::inference::Quantization>,
        /// libtorch threads in each measured process.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Measure this process only (one format) and print one JSON line; used by the
        /// parent run.
        #[arg(long, hide = true)]
        single: bool,
    },
    /// Time to first token for an NPC: a long persona shared by every request and a short
    /// player line, with the prefix cache cold (each request a new persona) and warm (one
    /// persona), on one engine in one run; prints both and their ratio. Warm requests
    /// alternate between the prompt cut at the persona's end (as nodes run it) and cut
    /// only into whole blocks (the baseline: what a warm request reused before).
    Persona {
        /// Model file (.gguf) or safetensors directory.
        #[arg(long)]
        model: PathBuf,
        /// Tokens of the persona (the system message).
        #[arg(long, default_value_t = 1000)]
        persona_tokens: usize,
        /// Requests measured each way.
        #[arg(long, default_value_t = 5)]
        requests: usize,
        /// Collect every row's hidden state, as a node does for a proof of inference.
        #[arg(long)]
        hidden: bool,
        #[command(flatten)]
        runtime: RuntimeArgs,
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

/// The CPU's model name, printed next to every machine-dependent figure.
pub fn cpu_model() -> String {
    crate::inference::tune::cpu_model()
}

/// Benchmarks measure what their flags say: the untuned defaults, never a remembered choice.
pub fn run(settings: &Settings, cmd: BenchCommand) -> anyhow::Result<()> {
    let settings = &settings.untuned();
    if let BenchCommand::Quality { model, text, quantize, window, device } = cmd {
        return quality(&model, &text, &quantize, window, device);
    }
    if let BenchCommand::Memory { model, quantize, threads, single } = cmd {
        return if single {
            memory_single(settings, &model, &quantize, threads)
        } else {
            memory(&model, &quantize, threads)
        };
    }
    if let BenchCommand::Persona { model, persona_tokens, requests, hidden, runtime } = cmd {
        return persona(settings, &model, (persona_tokens, requests, hidden), &runtime);
    }
    let BenchCommand::Decode { model, batch, tokens, prompt_tokens, constrained, runtime } = cmd else {
        anyhow::bail!("`bench load` is handled by cli::load");
    };
    let max_batch = batch.iter().copied().max().unwrap_or(1);
    let engine = runtime.start_engine(settings, &model, Some(max_batch))?;
    // The plain figures are measured without speculation; with --draft, it is measured
    // side by side at the end.
    let speculation = engine.config.speculative;
    let engine = if speculation.enabled() {
        super::speculation::restart(engine, crate::inference::Speculation::OFF)?
    } else {
        engine
    };
    let text = "In a quiet village at the edge of the forest, the blacksmith told stories to every traveller. ";
    let mut long_prompt = engine.tokenizer.encode(&text.repeat(prompt_tokens / 10 + 1), false)?;
    long_prompt.truncate(prompt_tokens.max(1));
    let short_prompt = engine.tokenizer.encode("Once upon a time, a knight", false)?;
    // Before any constrained run, so that the token trie's first build is timed.
    let compile_ms = if constrained { Some(schema_compile_ms(&engine.tokenizer)?) } else { None };
    let grammar = constrained.then(|| long_string_grammar(tokens));
    let run_batch_with = |prompt: &[u32], b: usize, n: usize, grammar: Option<&Arc<str>>| {
        let t = crate::inference::tune::timed_batch(&engine, prompt, b, n, grammar)?;
        anyhow::Ok((t.first_ms, t.total_ms, t.generated as f64))
    };
    let run_batch = |prompt: &[u32], b: usize, n: usize| run_batch_with(prompt, b, n, None);
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
        let mut row =
            serde_json::json!({"batch": b, "decode_tokens_per_s": decode_tok_s, "per_sequence_tokens_per_s": per_seq});
        eprintln!("batch {b:>3}: {decode_tok_s:8.1} tokens/s aggregate, {per_seq:6.1} per sequence");
        if let Some(g) = &grammar {
            // Right after the unconstrained run, on the same engine: a ratio, not a figure.
            let (first_ms, total_ms, generated) = run_batch_with(&short_prompt, b, tokens, Some(g))?;
            let constrained_tok_s = (generated - b as f64) / ((total_ms - first_ms).max(1e-3) / 1e3);
            let ratio = constrained_tok_s / decode_tok_s;
            row["constrained_tokens_per_s"] = constrained_tok_s.into();
            row["constrained_ratio"] = ratio.into();
            eprintln!("batch {b:>3}: {constrained_tok_s:8.1} tokens/s under a JSON schema ({ratio:.2}x unconstrained)");
        }
        rows.push(row);
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
        "grammar_compile_ms": compile_ms,
    });
    let mut report = report;
    if speculation.enabled() {
        let (engine, measured) = super::speculation::side_by_side(engine, speculation, tokens)?;
        report["speculation"] = measured;
        engine.shutdown();
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A JSON object whose one string field is long enough (8 bytes a token) that the answer
/// runs to `tokens` under the grammar, as the unconstrained run does.
fn long_string_grammar(tokens: usize) -> Arc<str> {
    let schema = serde_json::json!({"type": "object", "required": ["story"],
        "properties": {"story": {"type": "string", "minLength": tokens * 8}},
        "x-guidance": {"whitespace_flexible": false}});
    format!("start: %json {schema}\n").into()
}

/// Time to compile a 20-field schema for one request (the token trie already built), and
/// the first build of the trie, in milliseconds.
fn schema_compile_ms(tokenizer: &crate::inference::tokenizer::Tokenizer) -> anyhow::Result<serde_json::Value> {
    use crate::inference::grammar::GrammarCompiler;
    let started = Instant::now();
    let compiler = GrammarCompiler::for_tokenizer(tokenizer).map_err(anyhow::Error::msg)?;
    let trie_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut properties = serde_json::Map::new();
    for i in 0..20 {
        let field = match i % 5 {
            0 => serde_json::json!({"type": "string", "maxLength": 40}),
            1 => serde_json::json!({"type": "integer", "minimum": 0, "maximum": 1000}),
            2 => serde_json::json!({"enum": ["north", "south", "east", "west"]}),
            3 => serde_json::json!({"type": "array", "items": {"type": "number"}, "maxItems": 4}),
            _ => {
                serde_json::json!({"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "boolean"}}})
            }
        };
        properties.insert(format!("field_{i}"), field);
    }
    let schema =
        serde_json::json!({"type": "object", "properties": properties, "x-guidance": {"whitespace_flexible": false}});
    let grammar = format!("start: %json {schema}\n");
    let mut runs = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        compiler.compile(&grammar).map_err(anyhow::Error::msg)?;
        runs.push(started.elapsed().as_secs_f64() * 1e3);
    }
    runs.sort_by(f64::total_cmp);
    eprintln!("grammar: token trie {trie_ms:.1} ms (once per model), 20-field schema {:.1} ms median", runs[2]);
    Ok(serde_json::json!({"token_trie_ms": trie_ms, "schema_20_fields_ms_median": runs[2]}))
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

/// `ludus bench memory`: one fresh process per format, then the table (JSON lines, the
/// last one a summary with the CPU model and the int4/f32 ratios).
fn memory(model: &std::path::Path, quantize: &[crate::inference::Quantization], threads: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for q in quantize {
        let out = std::process::Command::new(&exe)
            .args(["bench", "memory", "--single", "--threads", &threads.to_string(), "--quantize", &q.to_string()])
            .arg("--model")
            .arg(model)
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(out.status.success(), "measuring {q} failed ({})", out.status);
        let row: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| anyhow::anyhow!("measuring {q}: unreadable report: {e}"))?;
        println!("{row}");
        rows.push(row);
    }
    let get = |q: &str, field: &str| rows.iter().find(|r| r["quantization"] == q).and_then(|r| r[field].as_f64());
    let ratio = |field: &str| Some(get("int4", field)? / get("none", field)?);
    let summary = serde_json::json!({
        "cpu": cpu_model(),
        "int4_vs_f32_serving_rss": ratio("serving_rss_bytes"),
        "int4_vs_f32_above_baseline": ratio("above_baseline_bytes"),
        "int4_vs_f32_model_bytes": ratio("model_bytes"),
    });
    println!("{summary}");
    Ok(())
}

/// One format in this process: resident memory before loading, after loading, and after a
/// 24-token greedy generation (kernels chosen, KV cache touched), as one JSON line.
fn memory_single(
    settings: &Settings,
    path: &std::path::Path,
    quantize: &[crate::inference::Quantization],
    threads: usize,
) -> anyhow::Result<()> {
    let [q] = quantize else { anyhow::bail!("--single measures exactly one format") };
    let baseline = rss_bytes();
    let runtime = super::RuntimeArgs {
        device: Some(crate::inference::DeviceChoice::Cpu),
        dtype: None,
        quantize: Some(q.to_string()),
        threads: Some(threads),
        model_key: None,
        single_sequence_threads: Some(crate::inference::tune::Tunable::Fixed(threads)),
        draft: None,
        draft_model: None,
        draft_tokens: None,
    };
    let engine = runtime.start_engine(settings, path, Some(1))?;
    let loaded = rss_bytes();
    let prompt = engine.tokenizer.encode("The blacksmith said", true)?;
    let request = GenerateRequest {
        prompt,
        params: SamplingParams::greedy(),
        max_tokens: 24,
        min_tokens: 24,
        ..Default::default()
    };
    let mut rx = engine.submit(request)?;
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Done(_) => break,
            Event::Error(e) | Event::Rejected(e) => anyhow::bail!("{e}"),
            _ => {}
        }
    }
    let serving = rss_bytes();
    let row = serde_json::json!({
        "quantization": q.to_string(),
        "cpu": cpu_model(),
        "threads": threads,
        "baseline_rss_bytes": baseline,
        "loaded_rss_bytes": loaded,
        "serving_rss_bytes": serving,
        "above_baseline_bytes": serving.saturating_sub(baseline),
        "model_bytes": engine.model_bytes,
        "kv_cache_bytes": engine.kv_cache_bytes,
    });
    println!("{row}");
    engine.shutdown();
    Ok(())
}

/// `ludus bench persona`: median time to first token of requests sharing a long persona,
/// with every request's persona new (the cache cannot help) and with one persona (after
/// one request that fills the cache).
fn persona(
    settings: &Settings,
    model: &std::path::Path,
    (persona_tokens, requests, collect_hidden): (usize, usize, bool),
    runtime: &RuntimeArgs,
) -> anyhow::Result<()> {
    anyhow::ensure!(settings.engine.prefix_cache_mb > 0, "the prefix cache is off ([engine] prefix_cache_mb = 0)");
    let engine = runtime.start_engine(settings, model, Some(1))?;
    let lore = "The blacksmith of Emberfall forged blades for three kings and trusts none of them; \
                she speaks in short gruff sentences and softens only for her lost brother. ";
    let mut persona_ids = engine.tokenizer.encode(&lore.repeat(persona_tokens / 20 + 1), false)?;
    persona_ids.truncate(persona_tokens);
    let persona = engine.tokenizer.decode(&persona_ids, true);
    let lines = ["How much for a sword?", "Have you seen my brother?", "Can you fix my shield?", "Why so grumpy?"];
    let ttft_cut = |system: &str, line: &str, cut: bool| -> anyhow::Result<(f64, usize)> {
        let messages = [ChatMessage::new("system", system), ChatMessage::new("user", line)];
        let prompt = engine.tokenizer.encode(&engine.template.render(&messages, true)?, false)?;
        let len = prompt.len();
        let breaks =
            if cut { persona_breaks(&engine.template, &engine.tokenizer, &messages, &prompt) } else { Vec::new() };
        let params = SamplingParams::greedy();
        let request = GenerateRequest { prompt, params, max_tokens: 1, collect_hidden, breaks, ..Default::default() };
        let mut rx = engine.submit(request)?;
        while let Some(event) = rx.blocking_recv() {
            match event {
                Event::Done(done) => return Ok((done.timings.time_to_first_token_ms, len)),
                Event::Error(e) | Event::Rejected(e) => anyhow::bail!("{e}"),
                _ => {}
            }
        }
        anyhow::bail!("the engine stopped")
    };
    let ttft = |system: &str, line: &str| ttft_cut(system, line, true);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Warm-up: kernels picked, pages touched.
    ttft("Warm-up persona.", lines[0])?;
    let (mut cold, mut warm, mut prompt_tokens) = (Vec::new(), Vec::new(), 0);
    for i in 0..requests.max(1) {
        // A persona that starts differently: no block of it is cached.
        let (ms, len) = ttft(&format!("[{i}] {persona}"), lines[i % lines.len()])?;
        cold.push(ms);
        prompt_tokens = len;
    }
    ttft(&persona, "Hello.")?; // fills the cache with the persona
    let mut blocks_only = Vec::new();
    for i in 0..requests.max(1) {
        // Every line new, so that neither arm finds a chunk past the persona cached.
        let line = format!("{} (#{i})", lines[i % lines.len()]);
        warm.push(ttft(&persona, &line)?.0);
        // The same line again, cut only into blocks: the persona's whole blocks are the
        // same chunks, its last part is not.
        blocks_only.push(ttft_cut(&persona, &line, false)?.0);
    }
    let (cold_ms, warm_ms, blocks_only_ms) = (median(cold), median(warm), median(blocks_only));
    // Counters read once the engine has stopped: it publishes them after the step that
    // ended the last request, which may come after that request's answer.
    let (name, quantization, load) = (engine.model_name.clone(), engine.quantization, engine.load.clone());
    engine.shutdown();
    let stats = load.prefix.lock().map(|r| r.stats).unwrap_or_default();
    eprintln!(
        "time to first token: {cold_ms:.0} ms cold, {warm_ms:.0} ms warm ({:.1}x); warm cut into whole blocks only: {blocks_only_ms:.0} ms ({:.1}x)",
        cold_ms / warm_ms,
        cold_ms / blocks_only_ms
    );
    let report = serde_json::json!({
        "model": name,
        "cpu": cpu_model(),
        "threads": tch::get_num_threads(),
        "quantization": quantization.to_string(),
        "prompt_tokens": prompt_tokens,
        "block_tokens": settings.engine.prefill_chunk,
        "requests": requests,
        "ttft_cold_ms": cold_ms,
        "ttft_warm_ms": warm_ms,
        "speedup": cold_ms / warm_ms,
        "collect_hidden": collect_hidden,
        "ttft_warm_blocks_only_ms": blocks_only_ms,
        "warm_over_blocks_only": blocks_only_ms / warm_ms,
        "prefix_hits": stats.hits,
        "prefix_tokens_reused": stats.tokens_reused,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
