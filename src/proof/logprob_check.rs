//! Checking the log probabilities a node reported to a game (`logprobs`): one prefill of
//! prompt + completion on the reference of the node's declared format, each row's logits
//! taken as the sampler saw them (penalties, `logit_bias`, the grammar mask), and the
//! node's values compared with the reference's ([`crate::inference::logprobs::deviation`]).
//! An honest node differs by rounding; the limit is its format's tie margin (a gap in logit
//! units, which log probabilities share), so a node that shades them cannot shade far.

use super::format::Format;
use crate::inference::kv_cache::KvCache;
use crate::inference::llama::LogitsFor;
use crate::inference::logprobs::{deviation, TokenLogprobs};
use crate::inference::sampling::apply_penalties;
use crate::inference::{InferError, Model, SamplingParams};

/// Rows per prefill chunk (bounds the logits held at once).
const CHUNK: usize = 256;

/// The largest deviation of `reported` (one per completion token) from `model`'s, or why
/// the report does not fit the task. `prompt` ends with the `prefix` tokens earlier nodes
/// generated (a failover continuation).
pub fn worst_deviation(
    model: &Model,
    prompt: &[u32],
    prefix: usize,
    completion: &[u32],
    params: &SamplingParams,
    reported: &[TokenLogprobs],
) -> Result<Result<f32, String>, InferError> {
    let (p, g) = (prompt.len(), completion.len());
    if reported.len() != g {
        return Ok(Err(format!("{} log probabilities for {g} tokens", reported.len())));
    }
    if p == 0 || g == 0 {
        return Ok(Ok(0.0));
    }
    let (mut history, mut constraint) = super::verify::sampler_state(model, prompt, prefix, params)?;
    let llama = &model.llama;
    let tokens: Vec<u32> = prompt.iter().chain(&completion[..g - 1]).copied().collect();
    let mut cache = KvCache::new(&llama.config, 1, tokens.len(), llama.device, llama.kind)?;
    let mut worst = 0f32;
    for start in (0..tokens.len()).step_by(CHUNK) {
        let end = (start + CHUNK).min(tokens.len());
        let first = (p - 1).max(start);
        let want = if first >= end { LogitsFor::None } else { LogitsFor::From(first - start) };
        let out = llama.prefill(&mut cache, 0, &tokens[start..end], start, want)?;
        if first >= end {
            continue;
        }
        let logits = Vec::<f32>::try_from(
            &out.logits.f_to_kind(tch::Kind::Float)?.f_to_device(tch::Device::Cpu)?.f_flatten(0, -1)?,
        )?;
        let vocab = logits.len() / (end - first);
        for (i, row) in (first..end).enumerate() {
            let gi = row + 1 - p;
            let mut l = logits[i * vocab..(i + 1) * vocab].to_vec();
            apply_penalties(&mut l, params, &history);
            if let Some(c) = constraint.as_mut() {
                c.mask(&mut l)?;
                if c.advance(completion[gi]).is_err() {
                    return Ok(Err(format!("token {gi} leaves the task's grammar")));
                }
            }
            worst = worst.max(deviation(&reported[gi], &l, completion[gi], params.logprobs.unwrap_or(0)));
            history.push_generated(completion[gi]);
        }
    }
    Ok(Ok(worst))
}

/// Why reported log probabilities fail, if they do: off by more than `format`'s tie
/// margin (scaled by the operator's `tie_margin_scale`).
pub fn judge(worst: f32, format: Format, tie_margin_scale: f32) -> Option<String> {
    let limit = format.tie_margin() * tie_margin_scale;
    (worst > limit).then(|| format!("reported log probabilities are off by {worst:.3} (limit {limit:.2} for {format})"))
}
