//! Sampling as a pure function of (logits, seed, position).
//!
//! A verifier or a replacement node holding the same logits reproduces every choice:
//! there is no hidden RNG state. Stochastic choices use Gumbel-max: the winner is
//! `argmax(logit / T + g)` where `g = -ln(-ln u)` and `u` comes from a counter-based hash
//! of (seed, position, token id). Filters (top-k, top-p, min-p) run first on the
//! candidates; tokens whose scaled logit is more than [`CANDIDATE_WINDOW`] below the best
//! (probability ratio below e^-30) are never candidates, which keeps a step O(vocab).

use std::collections::HashMap;

/// Tokens more than this far below the best scaled logit are never sampled.
pub const CANDIDATE_WINDOW: f32 = 30.0;

pub use crate::task::{SamplingParams, MAX_LOGIT_BIAS};

/// Tokens a sequence has seen, for the penalties.
#[derive(Debug, Default, Clone)]
pub struct TokenHistory {
    /// Every token of prompt and completion (repetition penalty).
    seen: HashMap<u32, u32>,
    /// Occurrences in the completion (frequency and presence penalties).
    generated: HashMap<u32, u32>,
}

impl TokenHistory {
    pub fn new(prompt: &[u32]) -> Self {
        let mut h = Self::default();
        for &t in prompt {
            *h.seen.entry(t).or_default() += 1;
        }
        h
    }

    pub fn push_generated(&mut self, token: u32) {
        *self.seen.entry(token).or_default() += 1;
        *self.generated.entry(token).or_default() += 1;
    }
}

/// SplitMix64 finalizer: a strong 64-bit mix, the counter-based RNG behind the noise.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in (0, 1) for (seed, position, token).
pub fn uniform(seed: u64, position: u64, token: u32) -> f64 {
    let h = mix(
        mix(seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_add(position).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ token as u64
    );
    let h = mix(h);
    ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// Standard Gumbel noise for (seed, position, token).
pub fn gumbel(seed: u64, position: u64, token: u32) -> f64 {
    -(-uniform(seed, position, token).ln()).ln()
}

/// Applies the penalties and the logit bias of `params` to `logits` in place.
pub fn apply_penalties(logits: &mut [f32], params: &SamplingParams, history: &TokenHistory) {
    for &(t, bias) in &params.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += bias;
        }
    }
    if params.repetition_penalty != 1.0 {
        for &t in history.seen.keys() {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / params.repetition_penalty } else { *l * params.repetition_penalty };
            }
        }
    }
    if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
        for (&t, &count) in &history.generated {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= params.frequency_penalty * count as f32 + params.presence_penalty;
            }
        }
    }
}

/// Index of the largest value; the lowest index wins ties. NaNs never win.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// The candidates after the temperature and the filters: (token, scaled logit), best first
/// when a filter is set (in token order otherwise).
pub fn candidates(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
    let inv_t = 1.0 / params.temperature.max(1e-6);
    let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max) * inv_t;
    let floor = max - CANDIDATE_WINDOW;
    let mut cands: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l * inv_t))
        .filter(|&(_, s)| s >= floor && s.is_finite())
        .collect();
    if params.top_k == 0 && params.top_p >= 1.0 && params.min_p <= 0.0 {
        // No filter needs the order: skip the sort (thousands of candidates at T ≈ 1).
        return cands;
    }
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        cands.truncate(params.top_k);
    }
    if params.top_p < 1.0 || params.min_p > 0.0 {
        let weights: Vec<f64> = cands.iter().map(|&(_, s)| ((s - max) as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut keep = cands.len();
        if params.min_p > 0.0 {
            // The best candidate's weight is exp(0) = 1.
            keep = weights.iter().take_while(|&&w| w >= params.min_p as f64).count().max(1);
        }
        if params.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, w) in weights.iter().enumerate().take(keep) {
                cum += w / total;
                if cum >= params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        cands.truncate(keep);
    }
    cands
}

/// Picks the next token: a pure function of the (already penalized) logits, the seed and
/// the absolute position of the token being sampled.
pub fn sample(logits: &[f32], params: &SamplingParams, position: u64) -> u32 {
    if params.temperature == 0.0 {
        return argmax(logits);
    }
    let mut best = (0u32, f64::NEG_INFINITY);
    for (token, scaled) in candidates(logits, params) {
        let score = scaled as f64 + gumbel(params.seed, position, token);
        if score > best.1 {
            best = (token, score);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams { temperature: t, seed: 42, ..Default::default() }
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        assert_eq!(sample(&[0.1, 3.0, 3.0, -1.0], &SamplingParams::greedy(), 0), 1);
    }

    #[test]
    fn sampling_is_a_pure_function_of_seed_and_position() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 300.0).collect();
        let a: Vec<u32> = (0..50).map(|p| sample(&logits, &params(1.0), p)).collect();
        let b: Vec<u32> = (0..50).map(|p| sample(&logits, &params(1.0), p)).collect();
        assert_eq!(a, b);
        let other = SamplingParams { seed: 43, ..params(1.0) };
        let c: Vec<u32> = (0..50).map(|p| sample(&logits, &other, p)).collect();
        assert_ne!(a, c, "a different seed must change the draws");
    }

    #[test]
    fn empirical_frequencies_follow_the_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (7.0f32).ln()]; // probabilities 0.1, 0.2, 0.7
        let mut counts = [0usize; 3];
        let n = 20_000;
        for p in 0..n {
            counts[sample(&logits, &params(1.0), p) as usize] += 1;
        }
        for (count, expected) in counts.iter().zip([0.1, 0.2, 0.7]) {
            let freq = *count as f64 / n as f64;
            assert!((freq - expected).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn filters_restrict_the_candidates() {
        let logits = [5.0f32, 4.0, 3.0, 2.0, 1.0];
        let top2 = SamplingParams { top_k: 2, ..params(1.0) };
        assert!((0..500).all(|p| sample(&logits, &top2, p) < 2));
        let top_p = SamplingParams { top_p: 0.5, ..params(1.0) };
        assert!((0..500).all(|p| sample(&logits, &top_p, p) == 0), "token 0 alone holds > 50%");
        let min_p = SamplingParams { min_p: 0.3, ..params(1.0) };
        assert!((0..500).all(|p| sample(&logits, &min_p, p) < 2), "e^-1 > 0.3 > e^-2");
    }

    #[test]
    fn penalties_lower_seen_tokens() {
        let mut logits = vec![2.0f32, 2.0, -1.0];
        let mut history = TokenHistory::new(&[0, 2]);
        history.push_generated(1);
        history.push_generated(1);
        let p =
            SamplingParams { repetition_penalty: 2.0, frequency_penalty: 0.5, presence_penalty: 0.25, ..params(1.0) };
        apply_penalties(&mut logits, &p, &history);
        assert_eq!(logits, vec![1.0, 2.0 / 2.0 - 1.0 - 0.25, -2.0]);
    }

    #[test]
    fn invalid_parameters_are_named() {
        let bad = SamplingParams { top_p: 0.0, ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().param, "top_p");
        let bad = SamplingParams { temperature: f32::NAN, ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().param, "temperature");
        let bad = SamplingParams { logit_bias: vec![(1, 101.0)], ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().param, "logit_bias");
        assert!(SamplingParams::default().validate().is_ok());
    }
}
