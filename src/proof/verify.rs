//! Checking a proof against a reference copy of the model: one prefill over prompt +
//! completion (in chunks, far cheaper than decoding), then
//!
//! 1. every commitment against the recomputed hidden state of its row, within
//!    [`Tolerances`] (relative RMS error of the committed values, share of the committed
//!    indices still in the top-k);
//! 2. every generated token against the seeded sampler on the recomputed logits (the
//!    sampler is a pure function of logits, seed and position); a different pick is
//!    forgiven only when it was a near-tie.

use serde::Serialize;
use tch::Device;

use super::commitment::{positions, TopK, CHUNK};
use super::signed::Proof;
use crate::inference::kv_cache::KvCache;
use crate::inference::llama::LogitsFor;
use crate::inference::sampling::{apply_penalties, candidates, gumbel, sample, TokenHistory};
use crate::inference::{InferError, Model, SamplingParams};

/// How much wider (for the node's token) and narrower (for the reference's pick) a
/// top-p nucleus may be in another dtype. min-p gets a factor of 2 both ways; top-k is
/// doubled for the node's token and loses its last rank for the reference's pick.
const NUCLEUS_SLACK: f32 = 0.05;

/// Rows per verification prefill chunk (bounds the logits held at once).
const VERIFY_CHUNK: usize = 256;

/// How close an honest run must come. Calibrated in `docs/proof-of-inference.md`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Tolerances {
    /// Largest relative RMS error of a commitment's values.
    pub max_value_error: f32,
    /// Smallest share of committed indices that must be in the recomputed top-k.
    pub min_index_overlap: f32,
    /// Largest score gap (scaled logit + Gumbel noise; logits when greedy) between the
    /// best token the node could surely have picked and the node's token, for which a
    /// different token is a near-tie ([`tie_margin`]).
    pub max_tie_margin: f32,
}

impl Default for Tolerances {
    fn default() -> Self {
        Self { max_value_error: 0.05, min_index_overlap: 0.85, max_tie_margin: 2.0 }
    }
}

impl Tolerances {
    /// The tolerances for a proof that names `quantization` (checked against a reference
    /// in the same format). int8 quantizes activations at run time, so a token's hidden
    /// state depends slightly on whether it was decoded alone (the node) or in a prefill
    /// (the verifier): its value, overlap and tie limits are relaxed, still far from every
    /// model cheat (docs/proof-of-inference.md, "Quantized nodes"). int4 is weight-only
    /// and as repeatable as bf16: the defaults hold.
    pub fn for_quantization(self, quantization: &str) -> Self {
        match quantization {
            "int8" => Self {
                max_value_error: self.max_value_error * 3.0,
                min_index_overlap: self.min_index_overlap - 0.1,
                // Honest int8 tasks came within 1.94 of the default 2.0 (100 tasks).
                max_tie_margin: self.max_tie_margin * 1.5,
            },
            _ => self,
        }
    }
}

/// The outcome of a check, with the measurements behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub accepted: bool,
    /// Why it was rejected (empty when accepted).
    pub reasons: Vec<String>,
    pub commitments: usize,
    pub worst_value_error: f32,
    pub worst_index_overlap: f32,
    pub tokens: usize,
    /// Tokens the verifier's sampler would not have picked, beyond a near-tie.
    pub token_mismatches: usize,
    /// Tokens that differ from the verifier's pick but by a near-tie.
    pub near_ties: usize,
    /// The largest score gap seen between the verifier's pick and the node's token.
    pub worst_tie_margin: f32,
}

fn tensor_rows(t: &tch::Tensor) -> Result<Vec<f32>, InferError> {
    let t = t.f_to_kind(tch::Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let mut out = vec![0f32; t.numel()];
    t.f_copy_data(&mut out, t.numel())?;
    Ok(out)
}

/// Prompt commitments expected for a prompt of `p` tokens.
fn pos_count(p: usize) -> usize {
    p.min(super::commitment::PROMPT_COMMITMENTS)
}

fn penalties_apply(params: &SamplingParams) -> bool {
    params.repetition_penalty != 1.0 || params.frequency_penalty != 0.0 || params.presence_penalty != 0.0
}

/// How far the node's token is below the verifier's pick (0 when they agree).
fn tie_margin(logits: &[f32], params: &SamplingParams, position: u64, expected: u32, actual: u32) -> f32 {
    if expected == actual {
        return 0.0;
    }
    if params.temperature == 0.0 {
        return logits.get(expected as usize).copied().unwrap_or(f32::INFINITY)
            - logits.get(actual as usize).copied().unwrap_or(f32::NEG_INFINITY);
    }
    // A nucleus (top-p, min-p, top-k) computed in another dtype may end one token earlier
    // or later than the reference's, both ways. The node's token may sit just outside the
    // reference's nucleus: relaxed filters admit it. The reference's pick may sit just
    // outside the node's nucleus, where the node could not choose it however high its
    // Gumbel score: the node's token is compared with the best token that tightened
    // filters keep too. Its Gumbel score must be within the margin of that one.
    let relaxed = SamplingParams {
        top_p: (params.top_p + NUCLEUS_SLACK).min(1.0),
        min_p: params.min_p * 0.5,
        top_k: params.top_k * 2,
        ..params.clone()
    };
    let tightened = SamplingParams {
        top_p: if params.top_p < 1.0 { (params.top_p - NUCLEUS_SLACK).max(0.0) } else { 1.0 },
        min_p: (params.min_p * 2.0).min(1.0),
        // Only the last rank can be in one nucleus and not the other.
        top_k: if params.top_k > 0 { (params.top_k - 1).max(1) } else { 0 },
        ..params.clone()
    };
    let scored = |p: &SamplingParams| -> Vec<(u32, f64)> {
        candidates(logits, p).into_iter().map(|(t, s)| (t, s as f64 + gumbel(params.seed, position, t))).collect()
    };
    let Some(node) = scored(&relaxed).into_iter().find(|&(t, _)| t == actual).map(|(_, s)| s) else {
        return f32::INFINITY; // the node's token was not even a candidate
    };
    let best = scored(&tightened).into_iter().map(|(_, s)| s).fold(f64::NEG_INFINITY, f64::max);
    (best - node).max(0.0) as f32
}

/// Checks `proof` for the task (`prompt` tokens, the `completion` the game received,
/// `params` with the seed the distributor fixed) on the reference `model`.
pub fn verify(
    model: &Model,
    proof: &Proof,
    prompt: &[u32],
    completion: &[u32],
    params: &SamplingParams,
    tol: &Tolerances,
) -> Result<Verdict, InferError> {
    let tol = &tol.for_quantization(&proof.quantization);
    let mut v = Verdict {
        accepted: false,
        reasons: Vec::new(),
        commitments: 0,
        worst_value_error: 0.0,
        worst_index_overlap: 1.0,
        tokens: completion.len(),
        token_mismatches: 0,
        near_ties: 0,
        worst_tie_margin: 0.0,
    };
    let (p, g) = (prompt.len(), completion.len());
    let challenge = match proof.challenge_bytes() {
        Ok(c) => c,
        Err(e) => {
            v.reasons.push(e);
            return Ok(v);
        }
    };
    if proof.prompt_tokens as usize != p || proof.completion_tokens as usize != g {
        v.reasons.push(format!(
            "the proof covers {} prompt and {} completion tokens; the task has {p} and {g}",
            proof.prompt_tokens, proof.completion_tokens
        ));
    }
    if proof.output_hash != hex::encode(crate::protocol::receipt::output_hash(completion)) {
        v.reasons.push("the proof is for another completion (output hash)".into());
    }
    if proof.prompt.len() != pos_count(p) {
        v.reasons.push(format!("{} prompt commitments, expected {}", proof.prompt.len(), pos_count(p)));
    }
    if proof.chunks.len() != g.div_ceil(CHUNK) {
        v.reasons.push(format!("{} chunk commitments for {g} tokens", proof.chunks.len()));
    }
    if p == 0 {
        v.reasons.push("the task has an empty prompt".into());
    }
    if !v.reasons.is_empty() {
        return Ok(v);
    }
    let decode = |hex_str: &str| hex::decode(hex_str).map_err(|e| e.to_string()).and_then(|b| TopK::decode(&b));
    let mut commitments = Vec::new();
    let pos = positions(&challenge, p, g);
    for (row, text) in
        pos.prompt_rows.iter().copied().zip(&proof.prompt).chain(pos.chunk_rows.iter().copied().zip(&proof.chunks))
    {
        match decode(text) {
            Ok(top) if top.entries.len() == proof.top_k as usize => commitments.push((row, top)),
            Ok(_) => v.reasons.push("a commitment has the wrong number of entries".into()),
            Err(e) => v.reasons.push(format!("a commitment is malformed: {e}")),
        }
    }
    if !v.reasons.is_empty() {
        return Ok(v);
    }
    // One prefill over prompt + completion (the last token needs no row), in chunks.
    let llama = &model.llama;
    let tokens: Vec<u32> = prompt.iter().chain(completion.iter().take(g.saturating_sub(1))).copied().collect();
    let mut cache = KvCache::new(&llama.config, 1, tokens.len().max(1), llama.device, llama.kind)?;
    let d = llama.config.hidden_size;
    let mut history = TokenHistory::new(prompt);
    for start in (0..tokens.len()).step_by(VERIFY_CHUNK) {
        let end = (start + VERIFY_CHUNK).min(tokens.len());
        // Logits only from row P-1 on: earlier rows chose no generated token.
        let first = (p - 1).max(start);
        let want = if first >= end { LogitsFor::None } else { LogitsFor::From(first - start) };
        let out = llama.prefill(&mut cache, 0, &tokens[start..end], start, want)?;
        let hidden = tensor_rows(&out.hidden)?;
        for (row, top) in commitments.iter().filter(|(r, _)| (start..end).contains(r)) {
            let local = row - start;
            let dist = top.distance(&hidden[local * d..(local + 1) * d]);
            v.commitments += 1;
            v.worst_value_error = v.worst_value_error.max(dist.value_error);
            v.worst_index_overlap = v.worst_index_overlap.min(dist.index_overlap);
        }
        // Rows P-1.. chose the generated tokens.
        if first >= end {
            continue;
        }
        let logits = tensor_rows(&out.logits)?;
        let vocab = logits.len() / (end - first);
        for (i, row) in (first..end).enumerate() {
            let gi = row + 1 - p;
            let row_logits = &logits[i * vocab..(i + 1) * vocab];
            let penalized;
            let l: &[f32] = if penalties_apply(params) {
                let mut copy = row_logits.to_vec();
                apply_penalties(&mut copy, params, &history);
                penalized = copy;
                &penalized
            } else {
                row_logits
            };
            let position = (p + gi) as u64;
            let expected = sample(l, params, position);
            let margin = tie_margin(l, params, position, expected, completion[gi]);
            v.worst_tie_margin = v.worst_tie_margin.max(margin);
            if margin > tol.max_tie_margin {
                v.token_mismatches += 1;
            } else if margin > 0.0 || expected != completion[gi] {
                v.near_ties += 1;
            }
            history.push_generated(completion[gi]);
        }
    }
    if v.commitments != commitments.len() {
        v.reasons.push("a committed row is outside the task".into());
    }
    if v.worst_value_error > tol.max_value_error {
        v.reasons
            .push(format!("hidden states differ: value error {:.4} > {}", v.worst_value_error, tol.max_value_error));
    }
    if v.worst_index_overlap < tol.min_index_overlap {
        v.reasons.push(format!(
            "hidden states differ: top-k overlap {:.3} < {}",
            v.worst_index_overlap, tol.min_index_overlap
        ));
    }
    if v.token_mismatches > 0 {
        v.reasons.push(format!("{} token(s) are not what the seeded sampler picks", v.token_mismatches));
    }
    v.accepted = v.reasons.is_empty();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_ties_are_measured_in_gumbel_scores_and_filters_relax_only_for_the_gap() {
        let greedy = SamplingParams::greedy();
        assert!((tie_margin(&[1.0, 0.9, -5.0], &greedy, 0, 0, 1) - 0.1).abs() < 1e-6);
        assert_eq!(tie_margin(&[1.0, 0.9, -5.0], &greedy, 0, 0, 0), 0.0);
        // Token 2 is outside top-p 0.5 but inside the relaxed nucleus only if the relaxed
        // mass reaches it: with 0.55 it does not, so it is not a candidate at all.
        let nucleus = SamplingParams { temperature: 1.0, top_p: 0.5, seed: 3, ..Default::default() };
        let logits = [3.0f32, 0.0, -3.0];
        assert_eq!(tie_margin(&logits, &nucleus, 7, 0, 2), f32::INFINITY);
        let gap = tie_margin(&logits, &SamplingParams { top_p: 1.0, ..nucleus.clone() }, 7, 0, 1);
        assert!(gap.is_finite());
    }

    /// top-k 3: ranks 1 and 2 are in any honest node's nucleus. Where the seeded draw picks
    /// rank 2 by a wide margin, a node answering rank 1 (greedy) is a mismatch.
    #[test]
    fn the_narrowed_nucleus_still_binds_the_ranks_every_node_has() {
        let logits = [2.0f32, 1.9, 1.8, -4.0];
        let params = SamplingParams { temperature: 1.0, top_k: 3, seed: 5, ..Default::default() };
        let position = (0..10_000u64)
            .find(|&p| sample(&logits, &params, p) == 1 && gumbel(5, p, 1) + 1.9 > gumbel(5, p, 0) + 2.0 + 2.5)
            .expect("a draw where the reference picks rank 2 by a wide Gumbel margin");
        assert!(tie_margin(&logits, &params, position, 1, 0) > 2.5);
        // min-p 1.0 (after narrowing) keeps the best token: a greedy pick there is no ∞.
        let strict = SamplingParams { temperature: 1.0, min_p: 0.6, seed: 5, ..Default::default() };
        assert!(tie_margin(&logits, &strict, position, 1, 0).is_finite());
    }

    /// softmax([2, 1, 0]) = [0.665, 0.245, 0.090]: with top-p 0.7 the reference's nucleus is
    /// {0, 1}, but a node whose probabilities differ by a hair stops at {0}. Where the
    /// reference's Gumbel draw favours token 1, the node's token 0 is still honest.
    #[test]
    fn a_pick_the_nodes_nucleus_may_have_excluded_is_not_held_against_it() {
        let logits = [2.0f32, 1.0, 0.0];
        let params = SamplingParams { temperature: 1.0, top_p: 0.7, seed: 11, ..Default::default() };
        let position = (0..10_000u64)
            .find(|&p| sample(&logits, &params, p) == 1 && gumbel(11, p, 1) + 1.0 > gumbel(11, p, 0) + 2.0 + 2.5)
            .expect("a draw where the reference picks token 1 by a wide Gumbel margin");
        assert_eq!(tie_margin(&logits, &params, position, 1, 0), 0.0);
        // Without a filter, the same draw is a mismatch: token 1 was open to the node too.
        let open = SamplingParams { top_p: 1.0, ..params.clone() };
        assert_eq!(sample(&logits, &open, position), 1);
        assert!(tie_margin(&logits, &open, position, 1, 0) > 2.5);
    }
}
