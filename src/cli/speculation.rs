//! `ludus bench decode --draft ngram`: batch-1 decode with and without speculative
//! decoding on the same engine's weights, side by side in one run (alternating, best of
//! each), on two workloads: a story the model writes from a few words, and an NPC
//! answering from a persona (what games send). Reports each rate, their ratio, how many
//! drafted tokens were kept, and whether the two runs produced the same tokens.

use crate::inference::{ChatMessage, Engine, Event, GenerateRequest, SamplingParams, Speculation};

/// One generation's token ids and its decode rate after the first token.
fn timed(engine: &Engine, prompt: &[u32], tokens: usize, min_tokens: usize) -> anyhow::Result<(Vec<u32>, f64)> {
    let request = GenerateRequest {
        prompt: prompt.to_vec(),
        params: SamplingParams::greedy(),
        max_tokens: tokens,
        min_tokens,
        ..Default::default()
    };
    let mut rx = engine.submit(request)?;
    let mut ids = Vec::new();
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Token { id, .. } => ids.push(id),
            Event::Done(done) => {
                let decode_ms = (done.timings.total_ms - done.timings.time_to_first_token_ms).max(1e-3);
                return Ok((ids, (done.completion_tokens.saturating_sub(1)) as f64 / (decode_ms / 1e3)));
            }
            Event::Error(e) | Event::Rejected(e) => anyhow::bail!("generation failed: {e}"),
            Event::PromptHidden { .. } | Event::PromptCached { .. } => {}
        }
    }
    anyhow::bail!("the engine stopped mid-generation")
}

/// The engine over the same weights with `speculative` set (the KV cache is re-made).
pub fn restart(engine: Engine, speculative: Speculation) -> anyhow::Result<Engine> {
    let mut config = engine.config.clone();
    config.speculative = speculative;
    let tuning = engine.tuning.clone();
    let model = engine.into_model().ok_or_else(|| anyhow::anyhow!("the engine thread panicked"))?;
    let mut engine = Engine::start(model, config)?;
    engine.tuning = tuning;
    Ok(engine)
}

/// The workloads: (name, prompt, min_tokens).
fn workloads(engine: &Engine, tokens: usize) -> anyhow::Result<Vec<(&'static str, Vec<u32>, usize)>> {
    let story = engine.tokenizer.encode("Once upon a time, a knight", false)?;
    let persona = "You are Brakka, the smith of Emberfall, a village under a sleeping volcano. You have \
        forged blades for three kings and trust none of them. Your brother Torv vanished on the ash \
        road. Prices: a sword costs 40 gold, a shield 25 gold, mending 5 gold. Stay in character.";
    let messages = [
        ChatMessage::new("system", persona),
        ChatMessage::new("user", "What do you sell, and for how much? And what happened to Torv?"),
    ];
    let npc = engine.tokenizer.encode(&engine.template.render(&messages, true)?, false)?;
    // The story runs its full length; the NPC answers until it is done.
    Ok(vec![("story", story, tokens), ("npc", npc, 0)])
}

/// Measures with speculation `on` against off; gives the engine back (speculation `on`).
pub fn side_by_side(engine: Engine, on: Speculation, tokens: usize) -> anyhow::Result<(Engine, serde_json::Value)> {
    let work = workloads(&engine, tokens)?;
    let mut engine = engine;
    let mut rows = Vec::new();
    for (name, prompt, min_tokens) in &work {
        let (mut best_off, mut best_on) = (0f64, 0f64);
        let (mut ids_off, mut ids_on) = (Vec::new(), Vec::new());
        let mut kept = (0u64, 0u64);
        // Off, on, off, on: each rate is the better of two, measured alternately.
        for _ in 0..2 {
            engine = restart(engine, Speculation::OFF)?;
            let (ids, rate) = timed(&engine, prompt, tokens, *min_tokens)?;
            (ids_off, best_off) = (ids, best_off.max(rate));
            engine = restart(engine, on)?;
            let (ids, rate) = timed(&engine, prompt, tokens, *min_tokens)?;
            (ids_on, best_on) = (ids, best_on.max(rate));
            let s = engine.load.speculation();
            kept = (s.drafted, s.accepted);
        }
        let first_difference = ids_off.iter().zip(&ids_on).position(|(a, b)| a != b);
        let identical = first_difference.is_none() && ids_off.len() == ids_on.len();
        let ratio = best_on / best_off;
        eprintln!(
            "{name:>6}: {best_off:6.1} tokens/s without, {best_on:6.1} with speculation ({ratio:.2}x); \
             {}/{} drafted tokens kept; {} tokens, {}",
            kept.1,
            kept.0,
            ids_on.len(),
            if identical { "identical".to_string() } else { format!("parted at token {first_difference:?}") }
        );
        rows.push(serde_json::json!({
            "workload": name,
            "tokens": ids_on.len(),
            "tokens_per_s_without": best_off,
            "tokens_per_s_with": best_on,
            "ratio": ratio,
            "drafted": kept.0,
            "accepted": kept.1,
            "identical": identical,
        }));
    }
    // What the engine chose at start, before the runs above (measured on its own thread).
    let cap = engine.load.draft_cap.load(std::sync::atomic::Ordering::Relaxed);
    let (engine, pass_ms) = pass_costs(engine, on.k + 1)?;
    let shown: Vec<String> = pass_ms
        .iter()
        .enumerate()
        .map(|(i, ms)| match i {
            0 => format!("a plain step {ms:.1} ms"),
            _ => format!("{} rows {ms:.1} ms", i + 1),
        })
        .collect();
    eprintln!("after 32 tokens: {}; drafts capped at {cap} of k = {}", shown.join(", "), on.k);
    let report = serde_json::json!({
        "draft": on.draft.to_string(), "k": on.k, "draft_cap": cap, "batch1": rows, "pass_ms_by_rows": pass_ms
    });
    Ok((engine, report))
}

/// Median time of a plain decode step and of one pass of 2..=`rows` rows (what a draft of
/// each length costs against that step), with the engine's single-sequence threads
/// ([`crate::inference::pass_cost::measure`], which the engine ran at start too).
fn pass_costs(engine: Engine, rows: usize) -> anyhow::Result<(Engine, Vec<f64>)> {
    let config = engine.config.clone();
    let tuning = engine.tuning.clone();
    let model = engine.into_model().ok_or_else(|| anyhow::anyhow!("the engine thread panicked"))?;
    let before = tch::get_num_threads();
    let threads = if config.single_sequence_threads == 0 { config.threads } else { config.single_sequence_threads };
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let costs = crate::inference::pass_cost::measure(&model.llama, rows, false);
    tch::set_num_threads(before);
    let mut engine = Engine::start(model, config)?;
    engine.tuning = tuning;
    Ok((engine, costs?))
}
