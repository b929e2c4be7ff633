//! Constrained decoding: the output must match a grammar, token by token.
//!
//! A grammar is text in llguidance's Lark dialect (JSON schemas go inline as `%json {…}`),
//! compiled against one tokenizer. [`Constraint`] follows one sequence: before each sampled
//! token it gives the tokens the grammar allows next ([`Constraint::mask`]), and it refuses
//! a token the grammar does not ([`Constraint::advance`]). The mask is a pure function of
//! the grammar and the tokens so far, so the node that samples, the server that relays and
//! the verifier that re-checks all apply the same one (docs/architecture.md says why
//! llguidance).

use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use super::tokenizer::Tokenizer;

/// Longest grammar text accepted (a JSON schema or a tool list, after rendering).
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

/// Grammars compiled against one tokenizer (its token trie is built once).
pub struct GrammarCompiler {
    factory: ParserFactory,
    vocab: usize,
    /// End-of-sequence tokens (every stop token).
    eos: Vec<u32>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").field("vocab", &self.vocab).finish_non_exhaustive()
    }
}

/// The tokenizer as llguidance sees it: each token's bytes, control tokens marked as
/// special (text can never spell them), every stop token an end of sequence.
struct TokenBytes {
    trie: TokTrie,
}

impl TokenizerEnv for TokenBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.greedy_tokenize(s)
    }

    /// Greedy tokenization is not the model's own: llguidance must not force tokens.
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// Why a grammar could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    /// The grammar itself is refused: too large, does not compile, allows no output. The
    /// request's fault.
    #[error("{0}")]
    Invalid(String),
    /// The tokenizer cannot carry a grammar (no end-of-sequence token, a vocabulary too
    /// large).
    #[error("{0}")]
    Tokenizer(String),
    /// A token the grammar does not allow where it came.
    #[error("token {0} is not allowed by the grammar here")]
    NotAllowed(u32),
    /// The grammar engine failed (one of its limits, an internal error).
    #[error("the grammar engine failed: {0}")]
    Engine(String),
}

fn engine(e: impl std::fmt::Display) -> GrammarError {
    GrammarError::Engine(e.to_string())
}

impl GrammarCompiler {
    fn new(tokenizer: &Tokenizer) -> Result<Self, GrammarError> {
        let vocab = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_control(id) || tokenizer.stop_tokens.contains(&id) || Some(id) == tokenizer.eos {
                    [&[TokTrie::SPECIAL_TOKEN_MARKER][..], bytes].concat()
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let eos = tokenizer
            .eos
            .or_else(|| tokenizer.stop_tokens.first().copied())
            .ok_or_else(|| GrammarError::Tokenizer("the tokenizer has no end-of-sequence token".into()))?;
        let vocab_u32 = u32::try_from(vocab)
            .map_err(|_| GrammarError::Tokenizer(format!("a vocabulary of {vocab} is too large")))?;
        let info = TokRxInfo::new(vocab_u32, eos);
        let mut stops: Vec<u32> = tokenizer.stop_tokens.clone();
        if !stops.contains(&eos) {
            stops.insert(0, eos);
        }
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&stops);
        let env: TokEnv = Arc::new(TokenBytes { trie });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(engine)?;
        factory.quiet();
        // Bounds on what one request's grammar may cost (llguidance's defaults are sized for
        // large schemas on big servers): ~10 ms of lexer building, ~100 MB of lexer states,
        // short errors that do not echo the grammar or the tokens so far.
        *factory.limits_mut() = ParserLimits {
            initial_lexer_fuel: 500_000,
            max_lexer_states: 50_000,
            max_grammar_size: 100_000,
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Self { factory, vocab, eos: stops })
    }

    /// The compiler for `tokenizer`, built on first use and kept with it.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Result<Arc<Self>, GrammarError> {
        tokenizer.grammar_compiler.get_or_init(|| Self::new(tokenizer).map(Arc::new)).clone()
    }

    /// Compiles `grammar` (Lark text) for one sequence. The message says what is wrong.
    pub fn compile(&self, grammar: &str) -> Result<Constraint, GrammarError> {
        if grammar.len() > MAX_GRAMMAR_BYTES {
            return Err(GrammarError::Invalid(format!(
                "the grammar is {} bytes; at most {MAX_GRAMMAR_BYTES} are accepted",
                grammar.len()
            )));
        }
        let top = TopLevelGrammar::from_lark(grammar.to_string());
        let invalid = |e: String| GrammarError::Invalid(e);
        let parser = self.factory.create_parser(top).map_err(|e| invalid(e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        // A grammar that allows nothing at all is an error, not an empty answer.
        let first = matcher.compute_mask().map_err(|e| invalid(e.to_string()))?;
        if first.is_zero() {
            return Err(invalid("the grammar allows no output".into()));
        }
        Ok(Constraint { matcher, vocab: self.vocab, eos: self.eos.clone(), next: Some(first) })
    }
}

/// Why [`Constraint::check`] refused a token.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The grammar does not allow it: whoever produced the token left the grammar.
    NotAllowed(String),
    /// The grammar engine failed (a limit reached): nobody's fault, the answer cannot go on.
    Broken(String),
}

/// One sequence's place in its grammar.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
    eos: Vec<u32>,
    /// The mask for the next token, when already computed.
    next: Option<llguidance::toktrie::SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets every token the grammar does not allow next to −∞ (ids past the tokenizer's
    /// vocabulary too). When the grammar is complete only end-of-sequence tokens remain.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let allowed = match self.next.take() {
            Some(mask) => mask,
            None => self.matcher.compute_mask_or_eos().map_err(engine)?,
        };
        for (id, l) in logits.iter_mut().enumerate() {
            if id >= self.vocab || !allowed.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        self.next = Some(allowed);
        Ok(())
    }

    /// Computes the mask for the next token now, so that [`Self::mask`] finds it ready.
    /// The engine runs this on another thread while the model computes the logits it will
    /// mask. An error is left for `mask` to report.
    pub fn prepare(&mut self) {
        if self.next.is_none() {
            self.next = self.matcher.compute_mask_or_eos().ok();
        }
    }

    /// Whether the mask for the next token still has to be computed.
    pub fn needs_mask(&self) -> bool {
        self.next.is_none()
    }

    /// Whether `token` may come next.
    pub fn allows(&mut self, token: u32) -> Result<bool, GrammarError> {
        if token as usize >= self.vocab {
            return Ok(false);
        }
        if self.next.is_none() {
            self.next = Some(self.matcher.compute_mask_or_eos().map_err(engine)?);
        }
        Ok(self.next.as_ref().is_some_and(|m| m.is_allowed(token)))
    }

    /// Moves past `token`; an error when the grammar does not allow it (the constraint is
    /// then unusable).
    pub fn advance(&mut self, token: u32) -> Result<(), GrammarError> {
        if !self.allows(token)? {
            return Err(GrammarError::NotAllowed(token));
        }
        self.next = None;
        if self.matcher.is_stopped() {
            // Past the end: only the end-of-sequence token was allowed, and it ends the answer.
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(engine)
    }

    /// Checks one token and moves past it, without computing a whole mask (the server's
    /// check of what a node sends: far cheaper than [`Self::mask`] per token). Tells a token
    /// the grammar does not allow from a failure of the grammar engine itself.
    pub fn check(&mut self, token: u32) -> Result<(), Refusal> {
        let broken = |e: anyhow::Error| Refusal::Broken(e.to_string());
        if self.matcher.is_error() {
            return Err(Refusal::Broken(self.matcher.get_error().unwrap_or_default()));
        }
        self.next = None;
        if token as usize >= self.vocab {
            return Err(Refusal::NotAllowed(format!("token {token} is outside the vocabulary")));
        }
        if self.eos.contains(&token) {
            // An end of sequence ends a complete match only.
            if self.matcher.is_stopped() {
                return Ok(());
            }
            if !self.matcher.is_accepting().map_err(broken)? {
                return Err(Refusal::NotAllowed(format!(
                    "end-of-sequence token {token} before the answer is complete"
                )));
            }
            return self.matcher.consume_token(token).map_err(broken);
        }
        if self.matcher.is_stopped() {
            return Err(Refusal::NotAllowed(format!("token {token} after the answer is complete")));
        }
        match self.matcher.try_consume_tokens(&[token]).map_err(broken)? {
            1 => Ok(()),
            _ => Err(Refusal::NotAllowed(format!("token {token} is not allowed by the grammar here"))),
        }
    }

    /// Whether the output so far is a complete match.
    pub fn is_complete(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}
