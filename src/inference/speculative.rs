//! Exact speculative decoding for a sequence decoded alone: a draft of the next few tokens
//! is checked by the target model in one pass over its weights (the last token and the
//! draft, as a short prefill chunk), and each drafted token is kept exactly when it equals
//! what the sampler draws from the target's own logits at that position. The seeded
//! sampler is a pure function of (logits, seed, position), so the tokens are the target's
//! own, drafted or not; a pass always yields at least one token (the one drawn where the
//! draft parted, or after the whole draft).
//!
//! Two drafters:
//! - **Prompt lookup (n-gram)** needs no model: it proposes the tokens that followed the
//!   latest earlier occurrence of the sequence's last few tokens, in the prompt or in what
//!   it already generated. It costs a scan of the sequence per step and pays where answers
//!   quote their prompt (names, lore, rules) or repeat themselves.
//! - **A draft model** ([`DraftModel`]): a smaller model of the same tokenizer (a distilled
//!   student from `ludus distill`, or a small sibling of the target) decodes the draft
//!   greedily on its own KV cache. Its cache keeps the tokens it has seen, so each pass
//!   computes only what the target accepted since, plus the draft.
//!
//! Whatever a drafter proposes, the output is the target's: a draft only decides how many
//! of the target's own tokens one pass yields.

use serde::Deserialize;
use tch::Kind;

use super::error::{InferError, Result};
use super::kv_cache::KvCache;
use super::llama::LogitsFor;
use super::model::Model;

/// Where drafts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Draft {
    /// No speculation: one token per step.
    #[default]
    Off,
    /// Prompt lookup: the continuation of an earlier occurrence of the last n-gram.
    Ngram,
    /// A draft model's greedy continuation (`engine.draft_model`, [`DraftModel`]).
    Model,
}

impl std::str::FromStr for Draft {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" => Ok(Self::Off),
            "ngram" => Ok(Self::Ngram),
            "model" => Ok(Self::Model),
            other => Err(format!("unknown draft {other:?}: off, ngram or model")),
        }
    }
}

impl std::fmt::Display for Draft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Ngram => "ngram",
            Self::Model => "model",
        })
    }
}

/// `[engine] speculative`: the drafter and the most tokens drafted per pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Speculation {
    pub draft: Draft,
    /// Tokens drafted per pass at most (each costs one more row in the target's pass).
    pub k: usize,
    /// Whether the engine times a plain step and passes of 2..=k+1 rows at start and drafts
    /// only as many tokens as pay (none where a second row already costs more than a
    /// drafted token saves: [`super::pass_cost`]); false drafts up to `k` whatever a pass
    /// costs here.
    #[serde(default = "timed_by_default")]
    pub timed: bool,
}

fn timed_by_default() -> bool {
    true
}

/// Most tokens one pass may draft (a pass of more rows costs like a prefill chunk).
pub const MAX_DRAFT_TOKENS: usize = 16;

/// The longest and shortest n-grams looked up, longest first: a longer match predicts
/// better; a single token matches too often to be worth a pass of extra rows.
const MAX_NGRAM: usize = 4;
const MIN_NGRAM: usize = 2;

impl Speculation {
    pub const OFF: Self = Self { draft: Draft::Off, k: 0, timed: true };

    /// Whether passes draft at all.
    pub fn enabled(&self) -> bool {
        self.draft != Draft::Off && self.k > 0
    }

    /// A clear error for a setting out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.draft != Draft::Off && !(1..=MAX_DRAFT_TOKENS).contains(&self.k) {
            return Err(format!("speculative.k must be 1..={MAX_DRAFT_TOKENS} (got {})", self.k));
        }
        Ok(())
    }

    /// Up to `limit` (and `self.k`) tokens to check after `tokens`; empty when nothing is
    /// worth a pass. A draft model proposes through [`DraftModel::propose`] instead.
    pub fn propose(&self, tokens: &[u32], limit: usize) -> Vec<u32> {
        let k = self.k.min(limit);
        match self.draft {
            Draft::Off | Draft::Model => Vec::new(),
            Draft::Ngram if k == 0 => Vec::new(),
            Draft::Ngram => lookup(tokens, k),
        }
    }
}

impl Default for Speculation {
    fn default() -> Self {
        Self::OFF
    }
}

/// Prompt lookup: for n from [`MAX_NGRAM`] down to [`MIN_NGRAM`], the latest earlier
/// occurrence of the last n tokens, and the `k` tokens that followed it. A match near the
/// end continues into its own draft (a copy with overlap, as in LZ77), so a repeating
/// stretch drafts `k` tokens of its period, not just what is left of the sequence.
pub fn lookup(tokens: &[u32], k: usize) -> Vec<u32> {
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if tokens.len() <= n {
            continue;
        }
        let suffix = &tokens[tokens.len() - n..];
        // Latest first: the nearest context predicts best. `start + n < len`, so at least
        // one token follows the match.
        if let Some(start) = (0..tokens.len() - n).rev().find(|&s| &tokens[s..s + n] == suffix) {
            let from = start + n;
            let mut draft = Vec::with_capacity(k);
            for i in from..from + k {
                // `i - len < draft.len()`: from < len, and one token is pushed per step.
                draft.push(if i < tokens.len() { tokens[i] } else { draft[i - tokens.len()] });
            }
            return draft;
        }
    }
    Vec::new()
}

/// A draft model beside the target: same tokenizer, its own one-slot KV cache, greedy.
pub struct DraftModel {
    model: Model,
    cache: KvCache,
    /// The tokens whose keys and values `cache` holds, in order.
    held: Vec<u32>,
    /// Tokens per catch-up pass (the target's prefill chunk).
    chunk: usize,
    /// The target's vocabulary: a proposal past it is dropped (the target could not embed it).
    target_vocab: usize,
    /// Passes in a row that failed; at [`MAX_DRAFT_FAILURES`] the drafter stops for good.
    failures: u32,
}

/// Failed passes in a row after which a draft model stops drafting (each one costs a
/// catch-up over the whole sequence, and the cause, memory or a bad file, rarely passes).
const MAX_DRAFT_FAILURES: u32 = 3;

impl std::fmt::Debug for DraftModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DraftModel").field("model", &self.model).field("held", &self.held.len()).finish()
    }
}

impl DraftModel {
    /// `draft` drafting for `target` over sequences of up to `max_context` tokens (or the
    /// draft's own context, if shorter: past it, it drafts nothing), caught up `chunk`
    /// tokens per pass. Refused unless both tokenize alike, token for token the same bytes
    /// (stop tokens may differ: a base model can draft for its instruct sibling).
    pub fn new(draft: Model, target: &Model, max_context: usize, chunk: usize) -> Result<Self> {
        let (d, t) = (&draft.tokenizer, &target.tokenizer);
        let differs = (0..t.vocab_size().max(d.vocab_size()) as u32).find(|&id| d.token_bytes(id) != t.token_bytes(id));
        if d.vocab_size() != t.vocab_size() || differs.is_some() {
            return Err(InferError::InvalidRequest(format!(
                "draft model {} does not share the tokenizer of {} ({} tokens against {}{}): a draft \
                 must tokenize exactly like its target",
                draft.path.display(),
                target.path.display(),
                d.vocab_size(),
                t.vocab_size(),
                differs.map_or(String::new(), |id| format!(", first different token: {id}"))
            )));
        }
        let llama = &draft.llama;
        let context = max_context.min(llama.config.max_position_embeddings);
        let cache = KvCache::new(&llama.config, 1, context, llama.device, llama.kind)?;
        let target_vocab = target.llama.config.vocab_size;
        Ok(Self { model: draft, cache, held: Vec::new(), chunk: chunk.max(1), target_vocab, failures: 0 })
    }

    /// Up to `k` tokens the draft model expects after `tokens` (greedy). Keeps what it
    /// computed: the next call recomputes only past the longest prefix both share.
    /// Fails only on the pass that makes it stop drafting; other failures draft nothing.
    pub fn propose(&mut self, tokens: &[u32], k: usize) -> Result<Vec<u32>> {
        if k == 0 || tokens.is_empty() || tokens.len() + k > self.cache.max_len() || self.stopped() {
            return Ok(Vec::new());
        }
        // A token the draft cannot embed (the target's vocabulary padded further than the
        // draft's): nothing to draft from.
        let vocab = self.model.llama.config.vocab_size;
        if tokens.iter().any(|&t| t as usize >= vocab) {
            return Ok(Vec::new());
        }
        match self.run(tokens, k) {
            Ok(draft) => {
                self.failures = 0;
                Ok(draft)
            }
            Err(e) => {
                // The cache holds nothing certain: start over next time, if there is one.
                self.held.clear();
                self.cache.set_len(0, 0);
                self.failures += 1;
                if self.stopped() {
                    return Err(e);
                }
                tracing::warn!(error = %e, "the draft model failed; this step decodes without a draft");
                Ok(Vec::new())
            }
        }
    }

    /// Whether it failed [`MAX_DRAFT_FAILURES`] times in a row, and drafts no more.
    pub fn stopped(&self) -> bool {
        self.failures >= MAX_DRAFT_FAILURES
    }

    fn run(&mut self, tokens: &[u32], k: usize) -> Result<Vec<u32>> {
        let _guard = tch::no_grad_guard();
        // The last token is always run again: its logits choose the first draft token.
        let shared = self.held.iter().zip(tokens).take_while(|(a, b)| a == b).count().min(tokens.len() - 1);
        self.held.truncate(shared);
        self.cache.set_len(0, shared);
        let llama = &self.model.llama;
        let mut logits = None;
        for start in (shared..tokens.len()).step_by(self.chunk) {
            let end = (start + self.chunk).min(tokens.len());
            let want = if end == tokens.len() { LogitsFor::Last } else { LogitsFor::None };
            let out = llama.prefill(&mut self.cache, 0, &tokens[start..end], start, want)?;
            self.held.extend_from_slice(&tokens[start..end]);
            logits = Some(out.logits);
        }
        let mut next = greedy(&logits.expect("at least the last token ran"))?;
        let mut draft = Vec::with_capacity(k);
        while next < self.target_vocab {
            draft.push(next as u32);
            if draft.len() == k {
                break;
            }
            let out = llama.decode(&mut self.cache, &[next as u32], &[self.held.len()])?;
            self.held.push(next as u32);
            next = greedy(&out.logits)?;
        }
        Ok(draft)
    }

    /// The draft model (to report which one drafts).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Weight memory of the draft model.
    pub fn model_bytes(&self) -> usize {
        self.model.llama.model_bytes()
    }

    /// Memory of its KV cache (one sequence of its context).
    pub fn kv_cache_bytes(&self) -> usize {
        self.cache.bytes()
    }
}

/// The most likely token of the last row of `logits`.
fn greedy(logits: &tch::Tensor) -> Result<usize> {
    let rows = logits.size()[0];
    let best = logits.f_narrow(0, rows - 1, 1)?.f_to_kind(Kind::Float)?.f_argmax(-1, false)?;
    Ok(best.f_int64_value(&[0])? as usize)
}

/// How drafts fared: tokens kept of those drafted (a draft's rows after its sequence
/// ended count as drafted, not kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpeculationStats {
    /// Passes that checked a draft.
    pub passes: u64,
    /// Tokens drafted in them.
    pub drafted: u64,
    /// Drafted tokens the sampler agreed with (each one a step saved).
    pub accepted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_occurrence_of_the_longest_suffix_predicts() {
        // "a b c d x ... a b c d" → what followed "a b c d" last time.
        let tokens = [1, 2, 3, 4, 9, 8, 1, 2, 3, 4, 7, 6, 5, 1, 2, 3, 4];
        assert_eq!(lookup(&tokens, 2), vec![7, 6], "the latest match, not the first");
        assert_eq!(lookup(&tokens, 10), vec![7, 6, 5, 1, 2, 3, 4, 7, 6, 5], "past the end, its own draft");
        // Only a 2-gram matches ("3 4" then "5").
        assert_eq!(lookup(&[3, 4, 5, 6, 3, 4], 3), vec![5, 6, 3]);
        assert_eq!(lookup(&[3, 4, 5, 6, 3, 4], 6), vec![5, 6, 3, 4, 5, 6], "a period of four");
        // A longer match wins over a later shorter one.
        assert_eq!(lookup(&[1, 2, 3, 10, 9, 2, 3, 11, 1, 2, 3], 1), vec![10]);
    }

    #[test]
    fn nothing_is_drafted_without_a_match_of_two_tokens() {
        assert!(lookup(&[], 4).is_empty());
        assert!(lookup(&[5], 4).is_empty());
        assert!(lookup(&[1, 2, 3, 4, 5], 4).is_empty(), "no repeat");
        assert!(lookup(&[1, 2, 3, 1], 4).is_empty(), "a single token is not enough");
        assert_eq!(lookup(&[7, 7, 7], 4), vec![7, 7, 7, 7], "a run repeats itself");
    }

    /// A tiny draft for a tiny target (same tokenizer, another seed, a shorter context):
    /// what its cache holds after each pass, and where it drafts nothing.
    #[test]
    fn a_draft_model_follows_the_sequence_and_stays_in_its_context() {
        use crate::inference::tiny_model::{write_gguf, TinySpec};
        let dir = tempfile::tempdir().unwrap();
        let (t, d) = (dir.path().join("target.gguf"), dir.path().join("draft.gguf"));
        write_gguf(&t, &TinySpec::default()).unwrap();
        write_gguf(&d, &TinySpec { seed: 8, layers: 1, context: 64, ..Default::default() }).unwrap();
        let load = |p: &std::path::Path| Model::load(p, tch::Device::Cpu, None).unwrap();
        let target = load(&t);
        let mut drafter = DraftModel::new(load(&d), &target, 256, 8).unwrap();
        assert_eq!(drafter.cache.max_len(), 64, "the draft's own context bounds it");
        let mut tokens: Vec<u32> = (0..20).map(|i| 40 + i).collect();
        let first = drafter.propose(&tokens, 4).unwrap();
        assert_eq!(first.len(), 4);
        // It holds the sequence and the drafts it ran to draft the next (all but the last).
        assert_eq!(drafter.held, [&tokens[..], &first[..3]].concat());
        assert_eq!(drafter.cache.len(0), 23);
        // The target kept two and drew another token: the draft keeps what they share and
        // runs the rest.
        let other = if first[2] == 1 { 2 } else { 1 };
        tokens.extend_from_slice(&[first[0], first[1], other]);
        let second = drafter.propose(&tokens, 2).unwrap();
        assert_eq!(second.len(), 2);
        assert_eq!(drafter.held, [&tokens[..], &second[..1]].concat());
        assert_eq!(drafter.cache.len(0), 24);
        // Up to the end of its context, and not past it.
        let long: Vec<u32> = (0..62).map(|i| 40 + i % 50).collect();
        assert!(drafter.propose(&long, 4).unwrap().is_empty());
        assert_eq!(drafter.propose(&long, 2).unwrap().len(), 2);
        // A token it cannot embed: no draft, and no failure.
        assert!(drafter.propose(&[40, 41, 100_000], 2).unwrap().is_empty());
        assert!(!drafter.stopped());

        // An engine that drafts counts the draft's memory with its own.
        use crate::inference::{Engine, EngineConfig};
        let config = EngineConfig { max_batch: 2, max_context: 128, ..Default::default() };
        let plain = Engine::start(load(&t), config.clone()).unwrap();
        let drafting = EngineConfig {
            speculative: Speculation { draft: Draft::Model, k: 2, timed: true },
            draft_model: Some(d),
            ..config
        };
        let drafting = Engine::start(load(&t), drafting).unwrap();
        assert_eq!(drafting.model_bytes, plain.model_bytes + drafter.model_bytes());
        assert!(drafter.model_bytes() > 0);
        // The engine's draft holds one sequence of 64 tokens, as `drafter` does.
        assert_eq!(drafting.kv_cache_bytes, plain.kv_cache_bytes + drafter.kv_cache_bytes());
    }

    #[test]
    fn the_setting_bounds_the_draft() {
        let s = Speculation { draft: Draft::Ngram, k: 2, timed: true };
        let tokens = [1, 2, 3, 4, 5, 6, 1, 2];
        assert_eq!(s.propose(&tokens, 10), vec![3, 4]);
        assert_eq!(s.propose(&tokens, 1), vec![3], "no more than the sequence may still take");
        assert!(s.propose(&tokens, 0).is_empty());
        assert!(Speculation::OFF.propose(&tokens, 10).is_empty());
        assert!(!Speculation::OFF.enabled() && s.enabled());
        assert!(Speculation { draft: Draft::Ngram, k: 0, timed: true }.validate().is_err());
        assert!(Speculation { draft: Draft::Ngram, k: MAX_DRAFT_TOKENS + 1, timed: true }.validate().is_err());
        assert!(Speculation { draft: Draft::Off, k: 0, timed: true }.validate().is_ok());
        assert_eq!("ngram".parse::<Draft>(), Ok(Draft::Ngram));
        assert!("eagle".parse::<Draft>().unwrap_err().contains("off, ngram or model"));
        assert_eq!("model".parse::<Draft>(), Ok(Draft::Model));
        assert!(
            Speculation { draft: Draft::Model, k: 4, timed: true }.propose(&tokens, 10).is_empty(),
            "the model proposes"
        );
    }
}
