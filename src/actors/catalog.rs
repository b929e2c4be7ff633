//! The server's own accounting of what a task is: for every model it holds the text side of
//! (`[distributor] model_files`, and the verifier's reference models), it renders and
//! tokenizes each prompt itself — the prompt tokens billed are the ones it counted — and
//! makes the text a game reads from the token ids nodes return ([`JobText`]), never from
//! a node's own text. Models without one (test doubles such as `--fake-engine`) get a
//! prompt-token bound computed from the prompt's bytes, and their nodes' text.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use super::error::ServeError;
use crate::inference::grammar::{Constraint, Refusal};
use crate::inference::logprobs::TokenLogprobs;
use crate::inference::text_stream::TextStream;
use crate::inference::ModelText;
use crate::protocol::{PromptCount, TaskInput};

/// Prompt tokens allowed per byte of an unaccounted prompt, plus the template's overhead:
/// a byte-level BPE token covers at least one byte.
const TEMPLATE_TOKENS_PER_MESSAGE: u32 = 16;
const TEMPLATE_TOKENS: u32 = 64;

/// Text sides of the models this server accounts for, by served name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: HashMap<String, Arc<ModelText>>,
}

impl Catalog {
    /// Reads the tokenizer and template of every listed model (not its weights).
    pub fn load(files: &BTreeMap<String, PathBuf>) -> anyhow::Result<Self> {
        let mut models = HashMap::new();
        for (name, path) in files {
            let text = ModelText::load(path)
                .map_err(|e| anyhow::anyhow!("model {name}: cannot read its tokenizer from {}: {e}", path.display()))?;
            models.insert(name.clone(), Arc::new(text));
        }
        Ok(Self { models })
    }

    pub fn get(&self, model: &str) -> Option<&Arc<ModelText>> {
        self.models.get(model)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.models.keys().map(String::as_str).collect();
        names.sort();
        names
    }

    /// The server's count of a prompt's tokens: exact for an accounted model (with the
    /// ids it counted), else a bound.
    pub fn count(&self, model: &str, input: &TaskInput) -> Result<Counted, ServeError> {
        let Some(text) = self.models.get(model) else {
            return Ok((PromptCount { tokens: byte_bound(input), exact: false }, None));
        };
        let ids = match input {
            TaskInput::Chat(messages) => text.chat_prompt(messages),
            TaskInput::Text(prompt) => text.completion_prompt(prompt),
        }
        .map_err(|e| ServeError::Rejected(format!("the prompt cannot be rendered for `{model}`: {e}")))?;
        let tokens = u32::try_from(ids.len()).map_err(|_| ServeError::Rejected("the prompt is too long".into()))?;
        Ok((PromptCount { tokens, exact: true }, Some(ids.into())))
    }
}

impl Catalog {
    /// The `max_tokens` a job is sent with: the game's, cut to the room its prompt leaves in
    /// the model's context where this server knows that context (accounted models). An
    /// honest node ends the answer there anyway (`length`); a node claiming a larger
    /// context must not be sent further, where its proof could not be checked. A prompt
    /// that leaves no room is refused.
    pub fn fit(&self, model: &str, prompt: PromptCount, max_tokens: usize) -> Result<usize, ServeError> {
        let Some(context) = self.models.get(model).and_then(|m| m.context) else { return Ok(max_tokens) };
        let prompt = prompt.tokens as usize;
        if prompt >= context {
            return Err(ServeError::ContextLengthExceeded { model: model.to_string(), prompt, context });
        }
        Ok(max_tokens.min(context - prompt))
    }
}

/// Why the text of a request cannot be made: the request field at fault, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct TextRefusal {
    pub field: &'static str,
    pub message: String,
}

impl Catalog {
    /// The text the game will read for a request on `model`, with its grammar compiled
    /// against the model's tokenizer (milliseconds for a big schema: call it off async
    /// threads when `params.grammar` is set). A grammar or logprobs need a model this
    /// server accounts for: it checks every token of the answer against the grammar and
    /// names tokens itself. `grammar_field` is the request field the grammar came from.
    pub fn job_text(
        &self,
        model: &str,
        params: &crate::task::SamplingParams,
        stop: &[String],
        grammar_field: &'static str,
    ) -> Result<Option<JobText>, TextRefusal> {
        let Some(text) = self.models.get(model).cloned() else {
            let needs = |field: &'static str| TextRefusal {
                field,
                message: format!("`{field}` needs a model whose tokenizer this server holds; `{model}` is not one"),
            };
            return match (&params.logprobs, &params.grammar) {
                (Some(_), _) => Err(needs("logprobs")),
                (_, Some(_)) => Err(needs(grammar_field)),
                _ => Ok(None),
            };
        };
        let vocab = text.tokenizer.vocab_size();
        if let Some(&(id, _)) = params.logit_bias.iter().find(|&&(id, _)| id as usize >= vocab) {
            return Err(TextRefusal {
                field: "logit_bias",
                message: format!("`logit_bias`: token id {id} is outside the model's vocabulary of {vocab}"),
            });
        }
        let Some(grammar) = params.grammar.as_deref() else { return Ok(Some(JobText::new(text, stop, None))) };
        let constraint = crate::inference::grammar::GrammarCompiler::for_tokenizer(&text.tokenizer)
            .and_then(|compiler| compiler.compile(grammar))
            .map_err(|e| TextRefusal {
                field: grammar_field,
                message: format!("`{grammar_field}` cannot be compiled into a grammar: {e}"),
            })?;
        Ok(Some(JobText::new(text, stop, Some((constraint, grammar_field)))))
    }
}

/// A prompt's count, and its ids when the server rendered them.
pub type Counted = (PromptCount, Option<Arc<[u32]>>);

/// At most one token per byte, plus the chat template's own tokens.
fn byte_bound(input: &TaskInput) -> u32 {
    let tokens = match input {
        TaskInput::Chat(messages) => messages
            .iter()
            .map(|m| m.content.len() + m.role.len() + TEMPLATE_TOKENS_PER_MESSAGE as usize)
            .sum::<usize>(),
        TaskInput::Text(prompt) => prompt.len(),
    };
    u32::try_from(tokens).unwrap_or(u32::MAX).saturating_add(TEMPLATE_TOKENS)
}

/// One position's log probabilities as a game reads them (OpenAI's `logprobs.content[]`).
/// Every completion token has one, the end-of-sequence token included, so a game counts
/// as many entries as `usage.completion_tokens`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    /// What the token adds to the text; empty for a token that adds nothing (an end of
    /// sequence, a control token), which the API writes as OpenAI's `"bytes": null`.
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// (token, bytes, log probability), best first.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// The text of one job, made by the server from the ids its nodes return. It travels with
/// the job, so a failover continuation extends the same text. With a grammar (structured
/// output, tools) every id is checked against it here, on every task: a node that leaves
/// the grammar never gets a token past the server.
#[derive(Debug, Clone)]
pub struct JobText {
    pub model: Arc<ModelText>,
    pub stream: TextStream,
    grammar: Option<JobGrammar>,
}

#[derive(Debug, Clone)]
struct JobGrammar {
    /// At the start, for an answer produced again.
    start: Constraint,
    current: Constraint,
    /// The request field it came from (`response_format` or `tools`).
    field: &'static str,
}

impl JobText {
    /// `grammar`: the job's constraint and the request field it came from.
    pub fn new(model: Arc<ModelText>, stop: &[String], grammar: Option<(Constraint, &'static str)>) -> Self {
        let grammar = grammar.map(|(start, field)| JobGrammar { current: start.clone(), start, field });
        Self { model, stream: TextStream::new(stop), grammar }
    }

    /// The request field the job's grammar came from, if it has one.
    pub fn grammar_field(&self) -> Option<&'static str> {
        self.grammar.as_ref().map(|g| g.field)
    }

    /// Adds a token; the text it releases and whether a stop sequence ends the answer, or
    /// why the token is refused (it leaves the job's grammar, or the grammar broke).
    pub fn push(&mut self, token: u32) -> Result<(String, bool), Refusal> {
        if let Some(g) = self.grammar.as_mut() {
            g.current.check(token).map_err(|r| match r {
                Refusal::NotAllowed(e) => Refusal::NotAllowed(format!("the answer leaves its grammar: {e}")),
                broken => broken,
            })?;
        }
        Ok(self.stream.push(&self.model.tokenizer, token))
    }

    /// Whether the answer has a grammar it does not complete yet.
    pub fn grammar_incomplete(&mut self) -> bool {
        self.grammar.as_mut().is_some_and(|g| !g.current.is_complete())
    }

    /// Whether `token` ends a sequence (its text is nothing a game reads).
    pub fn is_stop_token(&self, token: u32) -> bool {
        self.model.tokenizer.stop_tokens.contains(&token) || self.model.tokenizer.eos == Some(token)
    }

    /// The text held back until the end.
    pub fn finish(&mut self) -> String {
        self.stream.finish()
    }

    /// The same model, stop sequences and grammar, from the start (an answer produced again).
    pub fn restarted(&self) -> Self {
        let grammar = self.grammar.as_ref().map(|g| JobGrammar {
            start: g.start.clone(),
            current: g.start.clone(),
            field: g.field,
        });
        Self { model: self.model.clone(), stream: self.stream.restarted(), grammar }
    }

    /// A token's log probabilities as the game reads them: each token as the server's own
    /// text and bytes. A token that adds nothing to the text (end of sequence, control) is
    /// named by its written form (`<|im_end|>`), so a game sees where the model wanted to
    /// stop, with no bytes: the entries' bytes, joined, are the text.
    pub fn describe(&self, token: u32, lp: &TokenLogprobs) -> TokenLogprob {
        let tokenizer = &self.model.tokenizer;
        let piece = |t: u32| {
            let written = tokenizer.token_bytes(t);
            let adds_nothing = self.is_stop_token(t) || tokenizer.is_control(t);
            let bytes = if adds_nothing { Vec::new() } else { written.to_vec() };
            (String::from_utf8_lossy(written).into_owned(), bytes)
        };
        let (text, bytes) = piece(token);
        let top = lp
            .top
            .iter()
            .map(|&(t, logprob)| {
                let (text, bytes) = piece(t);
                (text, bytes, logprob)
            })
            .collect();
        TokenLogprob { token: text, bytes, logprob: lp.logprob, top }
    }

    /// Vocabulary size: ids at or above it are refused.
    pub fn vocab_size(&self) -> usize {
        self.model.tokenizer.vocab_size()
    }
}
