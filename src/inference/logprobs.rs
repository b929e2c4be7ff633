//! Log probabilities of sampled tokens (OpenAI's `logprobs` / `top_logprobs`).
//!
//! A token's log probability is `log_softmax(l)[token]`, where `l` are the logits the
//! sampler saw: after penalties, `logit_bias` and the grammar mask, before the temperature
//! (so that they do not depend on how the game sampled). Masked tokens have −∞ and are
//! never among the top ones. The node computes them; the server bounds them; the verifier
//! recomputes them on the reference and measures how far the node's are
//! ([`deviation`]).

pub use crate::task::{TokenLogprobs, MAX_TOP_LOGPROBS};

/// `log Σ exp(l)` over the finite logits (−∞ when there are none).
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = logits.iter().filter(|v| v.is_finite()).map(|&v| ((v - max) as f64).exp()).sum();
    max as f64 + sum.ln()
}

/// The log probabilities at one position: of `token`, and the `top` best tokens.
pub fn compute(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let lse = log_sum_exp(logits);
    let of = |t: u32| logits.get(t as usize).map_or(f32::NEG_INFINITY, |&l| (l as f64 - lse) as f32);
    let top = top.min(MAX_TOP_LOGPROBS);
    let mut best: Vec<u32> = Vec::new();
    if top > 0 {
        let mut ids: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
        let k = top.min(ids.len());
        if k > 0 && k < ids.len() {
            ids.select_nth_unstable_by(k - 1, |&a, &b| {
                logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b))
            });
        }
        ids.truncate(k);
        ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        best = ids;
    }
    TokenLogprobs { logprob: of(token), top: best.into_iter().map(|t| (t, of(t))).collect() }
}

/// What a node's log probabilities must look like whatever the model: finite, at most 0,
/// alternatives best first, within the vocabulary, as many as asked for (`exact`; under a
/// grammar fewer tokens may be allowed, and the verifier counts them), the sampled token's
/// value agreeing with its own entry.
pub fn check_shape(lp: &TokenLogprobs, token: u32, want_top: usize, vocab: usize, exact: bool) -> Result<(), String> {
    let fine = |v: f32| v.is_finite() && v <= 1e-3;
    if !fine(lp.logprob) {
        return Err(format!("log probability {} is not a finite value at most 0", lp.logprob));
    }
    let count_ok = if exact {
        lp.top.len() == want_top
    } else {
        lp.top.len() <= want_top && (want_top == 0 || !lp.top.is_empty())
    };
    if !count_ok {
        return Err(format!("{} alternatives, {want_top} asked for", lp.top.len()));
    }
    for (i, &(t, v)) in lp.top.iter().enumerate() {
        if t as usize >= vocab || !fine(v) {
            return Err(format!("alternative {i} is out of range ({t}, {v})"));
        }
        if i > 0 && v > lp.top[i - 1].1 {
            return Err("alternatives are not best first".into());
        }
        if lp.top[..i].iter().any(|&(u, _)| u == t) {
            return Err(format!("token {t} is listed twice"));
        }
        if t == token && (v - lp.logprob).abs() > 1e-4 {
            return Err("the sampled token's two values differ".into());
        }
    }
    Ok(())
}

/// How far reported log probabilities are from the ones `logits` give, for a request of
/// `want_top` alternatives: the largest difference over the sampled token and every
/// reported alternative, and over each token the reference ranks above the last reported
/// alternative but the node left out. Fewer alternatives than the reference has is ∞.
pub fn deviation(reported: &TokenLogprobs, logits: &[f32], token: u32, want_top: usize) -> f32 {
    let reference = compute(logits, token, want_top);
    if reported.top.len() < reference.top.len() {
        return f32::INFINITY;
    }
    let lse = log_sum_exp(logits);
    let of = |t: u32| logits.get(t as usize).map_or(f32::NEG_INFINITY, |&l| (l as f64 - lse) as f32);
    let gap = |a: f32, b: f32| if a == b { 0.0 } else { (a - b).abs() };
    let mut worst = gap(reported.logprob, reference.logprob);
    for &(t, v) in &reported.top {
        worst = worst.max(gap(v, of(t)));
    }
    // A token the reference puts in the list, missing from the node's: it is off by at
    // least its margin over the node's last alternative.
    if let Some(&(_, floor)) = reported.top.last() {
        for &(t, v) in &reference.top {
            if !reported.top.iter().any(|&(u, _)| u == t) {
                worst = worst.max(v - floor);
            }
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_are_normalised_and_best_first() {
        let logits = [1.0f32, 3.0, f32::NEG_INFINITY, 2.0, 0.5];
        let lp = compute(&logits, 3, 3);
        let total: f64 =
            logits.iter().filter(|v| v.is_finite()).map(|&v| (v as f64 - log_sum_exp(&logits)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 0]);
        assert!((lp.logprob - lp.top[1].1).abs() < 1e-7);
        assert!(check_shape(&lp, 3, 3, 5, true).is_ok());
        assert_eq!(deviation(&lp, &logits, 3, 3), 0.0);
        // The masked token is never an alternative, even when more are asked for.
        assert_eq!(compute(&logits, 1, 20).top.len(), 4);
    }

    #[test]
    fn lies_are_measured_and_malformed_values_refused() {
        let logits = [1.0f32, 3.0, 0.0, 2.0];
        let honest = compute(&logits, 1, 2);
        let flattered = TokenLogprobs { logprob: 0.0, top: vec![(1, 0.0), (3, -1.0)] };
        assert!(deviation(&flattered, &logits, 1, 2) > 0.3);
        let short = TokenLogprobs { logprob: honest.logprob, top: honest.top[..1].to_vec() };
        assert_eq!(deviation(&short, &logits, 1, 2), f32::INFINITY, "a shortened list shows");
        let hidden = TokenLogprobs { logprob: honest.logprob, top: vec![(1, honest.top[0].1), (0, -2.5)] };
        assert!(deviation(&hidden, &logits, 1, 2) > 0.5, "leaving out the second best shows");
        assert!(check_shape(&TokenLogprobs { logprob: 0.5, top: vec![] }, 1, 0, 4, true).is_err());
        assert!(check_shape(&TokenLogprobs { logprob: -1.0, top: vec![(3, -2.0), (1, -1.0)] }, 1, 2, 4, true).is_err());
        assert!(check_shape(&TokenLogprobs { logprob: -1.0, top: vec![(9, -1.0)] }, 1, 1, 4, true).is_err());
        assert!(check_shape(&honest, 1, 3, 4, true).is_err(), "fewer alternatives than asked for");
        assert!(check_shape(&honest, 1, 3, 4, false).is_ok(), "under a grammar fewer may be allowed");
        assert!(check_shape(&honest, 1, 1, 4, true).is_err(), "more alternatives than asked for");
    }
}
