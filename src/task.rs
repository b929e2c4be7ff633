//! What one generation task asks for and reports, as plain values: the sampling
//! parameters, the chat messages, how a generation ended and each token's log
//! probabilities. A leaf shared by the engine (`inference`), the node link (`protocol`)
//! and the proof (`proof`), so that those three depend on it and not on each other.

use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

/// Most alternatives per position (`top_logprobs`), as OpenAI allows.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One position's log probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// Of the sampled token.
    pub logprob: f32,
    /// The most likely tokens, best first: (token, log probability).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(u32, f32)>,
}

/// Sampling parameters of one sequence (OpenAI semantics where OpenAI defines them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off; divides positive logits (multiplies negative ones) of tokens already seen.
    pub repetition_penalty: f32,
    /// Subtracted once per occurrence in the completion.
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurs in the completion.
    pub presence_penalty: f32,
    pub seed: u64,
    /// The grammar the output must match (`inference::grammar`: llguidance Lark text, JSON
    /// schemas inline). Part of the sampler: masked tokens are never candidates, for the
    /// node and for the verifier alike.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grammar: Option<std::sync::Arc<str>>,
    /// Added to the logits of these tokens before sampling (OpenAI's `logit_bias`: −100
    /// bans a token, +100 all but forces it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each sampled token's log probability, with this many alternatives
    /// (`inference::logprobs`; OpenAI's `logprobs` / `top_logprobs`). Changes no choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<usize>,
}

/// Most `logit_bias` entries a request may carry.
pub const MAX_LOGIT_BIAS: usize = 300;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            grammar: None,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Checks ranges; the error names the offending parameter.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |param: &'static str, message: String| Err(InvalidParam { param, message });
        for (v, name) in [
            (self.temperature, "temperature"),
            (self.top_p, "top_p"),
            (self.min_p, "min_p"),
            (self.repetition_penalty, "repetition_penalty"),
            (self.frequency_penalty, "frequency_penalty"),
            (self.presence_penalty, "presence_penalty"),
        ] {
            if !v.is_finite() {
                return bad(name, format!("{name} must be a finite number"));
            }
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature", "temperature must be between 0 and 2".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "top_p must be in (0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "min_p must be between 0 and 1".into());
        }
        if self.repetition_penalty <= 0.0 {
            return bad("repetition_penalty", "repetition_penalty must be positive".into());
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad("frequency_penalty", "frequency_penalty must be between -2 and 2".into());
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad("presence_penalty", "presence_penalty must be between -2 and 2".into());
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return bad("logit_bias", format!("logit_bias takes at most {MAX_LOGIT_BIAS} tokens"));
        }
        if self.logit_bias.iter().any(|&(_, b)| !(-100.0..=100.0).contains(&b)) {
            return bad("logit_bias", "logit_bias values must be between -100 and 100".into());
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return bad("top_logprobs", format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"));
        }
        Ok(())
    }
}

/// A sampling parameter out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidParam {
    /// The parameter, as OpenAI names it.
    pub param: &'static str,
    pub message: String,
}
