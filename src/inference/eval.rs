//! Quality measures for comparing a model with a compressed copy of itself (a quantized
//! load, a distilled student): perplexity on a text, and teacher-forced greedy agreement
//! and KL divergence against a reference model on the same tokens.

use tch::{Kind, Tensor};

use super::error::{InferError, Result};
use super::kv_cache::KvCache;
use super::llama::{Llama, LogitsFor};

/// Log-probabilities `[positions, vocab]` (f32) of the next token after every position of
/// `tokens`, in one prefill of a fresh cache.
pub fn log_probs(model: &Llama, tokens: &[u32]) -> Result<Tensor> {
    if tokens.is_empty() {
        return Err(InferError::InvalidRequest("no tokens to evaluate".into()));
    }
    let mut cache = KvCache::new(&model.config, 1, tokens.len(), model.device, model.kind)?;
    let logits = model.prefill(&mut cache, 0, tokens, 0, LogitsFor::All)?.logits;
    Ok(logits.f_to_kind(Kind::Float)?.f_log_softmax(-1, Kind::Float)?.f_to_device(tch::Device::Cpu)?)
}

/// Perplexity of `tokens`, scored in windows of `window` tokens (each window starts a
/// fresh context; the first token of each window is context only).
pub fn perplexity(model: &Llama, tokens: &[u32], window: usize) -> Result<f64> {
    let window = window.max(2);
    let (mut nll, mut count) = (0f64, 0usize);
    for chunk in tokens.chunks(window).filter(|c| c.len() >= 2) {
        let lp = log_probs(model, &chunk[..chunk.len() - 1])?;
        let targets: Vec<i64> = chunk[1..].iter().map(|&t| t as i64).collect();
        let picked = lp.f_gather(1, &Tensor::f_from_slice(&targets)?.f_unsqueeze(1)?, false)?;
        nll -= picked.f_sum(Kind::Double)?.f_double_value(&[])?;
        count += targets.len();
    }
    if count == 0 {
        return Err(InferError::InvalidRequest("need at least two tokens to measure perplexity".into()));
    }
    Ok((nll / count as f64).exp())
}

/// How a candidate model compares with a reference on the same token windows.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Agreement {
    /// Positions compared.
    pub positions: usize,
    /// Share of positions where both models' most likely next token is the same.
    pub greedy: f64,
    /// Mean KL(reference ‖ candidate) of the next-token distributions, in nats.
    pub kl: f64,
}

/// Compares `candidate` with `reference` on every position of every window of `tokens`
/// (teacher forcing: both read the same text, so one early difference does not cascade).
pub fn agreement(reference: &Llama, candidate: &Llama, tokens: &[u32], window: usize) -> Result<Agreement> {
    let (mut same, mut kl, mut positions) = (0i64, 0f64, 0usize);
    for chunk in tokens.chunks(window.max(1)) {
        let p = log_probs(reference, chunk)?;
        let q = log_probs(candidate, chunk)?;
        same += p.f_argmax(-1, false)?.f_eq_tensor(&q.f_argmax(-1, false)?)?.f_sum(Kind::Int64)?.int64_value(&[]);
        kl += p.f_exp()?.f_mul(&p.f_sub(&q)?)?.f_sum(Kind::Double)?.f_double_value(&[])?;
        positions += chunk.len();
    }
    if positions == 0 {
        return Err(InferError::InvalidRequest("no tokens to compare".into()));
    }
    Ok(Agreement { positions, greedy: same as f64 / positions as f64, kl: kl / positions as f64 })
}
