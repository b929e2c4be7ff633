//! [`ProofBuilder`] assembles a node's signed [`Proof`] for one task from the engine's
//! hidden states while it generates: the commitments for the rows the challenge selects.
//! The proof itself is a wire value (`protocol::proof`).

use super::commitment::{chunk_offset, prompt_rows, TopK, CHUNK};
use super::format::Format;
use crate::crypto::identity::Identity;
pub use crate::protocol::proof::Proof;

/// Collects the committed rows while a task generates. It learns the prompt's length
/// from the rows it is given, keeping the top-k of the last [`CHUNK`] of them (the
/// committed prompt rows are among those).
pub struct ProofBuilder {
    challenge: [u8; 32],
    top_k: usize,
    prompt_seen: usize,
    window: std::collections::VecDeque<TopK>,
    prompt: Option<Vec<TopK>>,
    /// Top-k of each row of the current chunk, by generated-token index within it.
    current: Vec<TopK>,
    chunks: Vec<TopK>,
    format: Format,
}

impl ProofBuilder {
    pub fn new(challenge: [u8; 32], top_k: usize) -> Self {
        Self {
            challenge,
            top_k,
            prompt_seen: 0,
            window: std::collections::VecDeque::with_capacity(CHUNK),
            prompt: None,
            current: Vec::with_capacity(CHUNK),
            chunks: Vec::new(),
            format: Format::F32,
        }
    }

    /// Records the format the node computes in (f32 records nothing).
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Prompt rows in order (`values` is `[rows, hidden]` flattened).
    pub fn prompt_rows(&mut self, rows: usize, values: &[f32]) {
        let d = values.len() / rows.max(1);
        // Only the last CHUNK rows can be committed: skip the top-k of earlier ones.
        let skip = rows.saturating_sub(CHUNK);
        for r in skip..rows {
            if self.window.len() == CHUNK {
                self.window.pop_front();
            }
            self.window.push_back(TopK::of(&values[r * d..(r + 1) * d], self.top_k));
        }
        self.prompt_seen += rows;
    }

    /// Picks the committed prompt row once the prompt is complete.
    fn settle_prompt(&mut self) {
        if self.prompt.is_some() || self.prompt_seen == 0 {
            return;
        }
        let first_in_window = self.prompt_seen - self.window.len();
        self.prompt = prompt_rows(&self.challenge, self.prompt_seen)
            .into_iter()
            .map(|row| row.checked_sub(first_in_window).and_then(|i| self.window.get(i).cloned()))
            .collect();
    }

    /// The first `rows` prompt positions came from the engine's prefix cache, without
    /// hidden states (never among the committed rows: the engine computes a prompt's last
    /// rows).
    pub fn prompt_cached(&mut self, rows: usize) {
        self.prompt_seen += rows;
    }

    /// Feeds an engine event (prompt rows and token rows; others are ignored).
    pub fn observe(&mut self, event: &crate::inference::Event) {
        match event {
            crate::inference::Event::PromptCached { rows } => self.prompt_cached(*rows),
            crate::inference::Event::PromptHidden { rows, values } => self.prompt_rows(*rows, values),
            crate::inference::Event::Token { hidden: Some(h), .. } => self.token_row(h),
            _ => {}
        }
    }

    /// The hidden state of the row that chose the next generated token.
    pub fn token_row(&mut self, hidden: &[f32]) {
        self.settle_prompt();
        self.current.push(TopK::of(hidden, self.top_k));
        if self.current.len() == CHUNK {
            self.close_chunk();
        }
    }

    fn close_chunk(&mut self) {
        let offset = chunk_offset(&self.challenge, self.chunks.len(), self.current.len());
        let chosen = self.current.swap_remove(offset);
        self.chunks.push(chosen);
        self.current.clear();
    }

    /// Finishes and signs the proof; `None` when the prompt row never came.
    pub fn finish(mut self, identity: &Identity, task: u64, model: &str, completion: &[u32]) -> Option<Proof> {
        self.settle_prompt();
        if !self.current.is_empty() {
            self.close_chunk();
        }
        let prompt = self.prompt.take()?;
        let mut proof = Proof {
            task,
            model: model.to_string(),
            challenge: hex::encode(self.challenge),
            prompt_tokens: self.prompt_seen as u32,
            output_hash: hex::encode(crate::protocol::receipt::output_hash(completion)),
            completion_tokens: completion.len() as u32,
            top_k: self.top_k as u16,
            prompt: prompt.iter().map(|p| hex::encode(p.encode())).collect(),
            chunks: self.chunks.iter().map(|c| hex::encode(c.encode())).collect(),
            quantization: self.format.quantization_field().to_string(),
            dtype: self.format.dtype_field().to_string(),
            signature: String::new(),
        };
        proof.signature = hex::encode(identity.sign(&proof.digest()));
        Some(proof)
    }
}

/// Runs a local generation to its end, feeding `builder`: the completion's token ids
/// (benches, tests and offline tools; the node agent streams instead).
pub fn collect_blocking(
    mut events: tokio::sync::mpsc::UnboundedReceiver<crate::inference::Event>,
    builder: &mut ProofBuilder,
) -> Result<Vec<u32>, String> {
    use crate::inference::Event;
    let mut completion = Vec::new();
    while let Some(event) = events.blocking_recv() {
        builder.observe(&event);
        match event {
            Event::Token { id, .. } => completion.push(id),
            Event::Done(_) => return Ok(completion),
            Event::Error(e) | Event::Rejected(e) => return Err(e),
            Event::PromptHidden { .. } | Event::PromptCached { .. } => {}
        }
    }
    Err("the engine stopped".into())
}
