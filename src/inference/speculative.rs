//! Exact speculative decoding for a sequence decoded alone: a draft of the next few tokens
//! is checked by the target model in one pass over its weights (the last token and the
//! draft, as a short prefill chunk), and each drafted token is kept exactly when it equals
//! what the sampler draws from the target's own logits at that position. The seeded
//! sampler is a pure function of (logits, seed, position), so the tokens are the target's
//! own, drafted or not; a pass always yields at least one token (the one drawn where the
//! draft parted, or after the whole draft).
//!
//! The drafter here needs no model: prompt lookup (n-gram) drafting proposes the tokens
//! that followed the latest earlier occurrence of the sequence's last few tokens, in the
//! prompt or in what it already generated. It costs a scan of the sequence per step and
//! pays where answers quote their prompt (names, lore, rules) or repeat themselves.

use serde::Deserialize;

/// Where drafts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Draft {
    /// No speculation: one token per step.
    #[default]
    Off,
    /// Prompt lookup: the continuation of an earlier occurrence of the last n-gram.
    Ngram,
}

impl std::str::FromStr for Draft {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" => Ok(Self::Off),
            "ngram" => Ok(Self::Ngram),
            other => Err(format!("unknown draft {other:?}: off or ngram")),
        }
    }
}

impl std::fmt::Display for Draft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Ngram => "ngram",
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
}

/// Most tokens one pass may draft (a pass of more rows costs like a prefill chunk).
pub const MAX_DRAFT_TOKENS: usize = 16;

/// The longest and shortest n-grams looked up, longest first: a longer match predicts
/// better; a single token matches too often to be worth a pass of extra rows.
const MAX_NGRAM: usize = 4;
const MIN_NGRAM: usize = 2;

impl Speculation {
    pub const OFF: Self = Self { draft: Draft::Off, k: 0 };

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
    /// worth a pass.
    pub fn propose(&self, tokens: &[u32], limit: usize) -> Vec<u32> {
        let k = self.k.min(limit);
        match self.draft {
            Draft::Off => Vec::new(),
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

    #[test]
    fn the_setting_bounds_the_draft() {
        let s = Speculation { draft: Draft::Ngram, k: 2 };
        let tokens = [1, 2, 3, 4, 5, 6, 1, 2];
        assert_eq!(s.propose(&tokens, 10), vec![3, 4]);
        assert_eq!(s.propose(&tokens, 1), vec![3], "no more than the sequence may still take");
        assert!(s.propose(&tokens, 0).is_empty());
        assert!(Speculation::OFF.propose(&tokens, 10).is_empty());
        assert!(!Speculation::OFF.enabled() && s.enabled());
        assert!(Speculation { draft: Draft::Ngram, k: 0 }.validate().is_err());
        assert!(Speculation { draft: Draft::Ngram, k: MAX_DRAFT_TOKENS + 1 }.validate().is_err());
        assert!(Speculation { draft: Draft::Off, k: 0 }.validate().is_ok());
        assert_eq!("ngram".parse::<Draft>(), Ok(Draft::Ngram));
        assert!("eagle".parse::<Draft>().unwrap_err().contains("off or ngram"));
    }
}
