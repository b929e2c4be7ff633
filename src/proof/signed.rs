//! [`ProofBuilder`] assembles a node's signed [`Proof`] for one task from the engine's
//! hidden states while it generates: the commitments for the rows the challenge selects.
//! The proof itself is a wire value (`protocol::proof`).

use super::commitment::{chunk_offset, prompt_rows, TopK, CHUNK};
use super::format::Format;
use crate::crypto::identity::Identity;
pub use crate::protocol::proof::Proof;

/// Token rows whose top-k a builder keeps (about 512 bytes each), so that a proof can end
/// at any of them: a game that hangs up ends the task where its tokens stopped, behind
/// the node by what was in flight (half a second at 1,000 tokens a second).
pub const KEPT_ROWS: usize = 16 * CHUNK;

/// Collects the committed rows while a task generates. It learns the prompt's length
/// from the rows it is given, keeping the top-k of the last [`CHUNK`] of them (the
/// committed prompt rows are among those), and of the last [`KEPT_ROWS`] token rows.
pub struct ProofBuilder {
    challenge: [u8; 32],
    top_k: usize,
    prompt_seen: usize,
    window: std::collections::VecDeque<TopK>,
    prompt: Option<Vec<TopK>>,
    /// Top-k of the latest token rows, at most [`KEPT_ROWS`].
    recent: std::collections::VecDeque<TopK>,
    /// Token rows seen.
    rows: usize,
    /// The committed row of each whole chunk seen.
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
            recent: std::collections::VecDeque::with_capacity(KEPT_ROWS),
            rows: 0,
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
    /// hidden states (never among the committed rows: the engine sends the hidden states
    /// of a prompt's last `HIDDEN_TAIL_ROWS`, cached or computed).
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
        if self.recent.len() == KEPT_ROWS {
            self.recent.pop_front();
        }
        self.recent.push_back(TopK::of(hidden, self.top_k));
        self.rows += 1;
        if self.rows.is_multiple_of(CHUNK) {
            let offset = chunk_offset(&self.challenge, self.chunks.len(), CHUNK);
            self.chunks.push(self.recent[self.recent.len() - CHUNK + offset].clone());
        }
    }

    /// Signs the proof of `completion`, whose rows the builder saw (more rows seen are
    /// left out: the proof ends where the completion does). `None` when the prompt row
    /// never came, or the completion ends more than [`KEPT_ROWS`] rows before the last
    /// one seen.
    pub fn finish(&mut self, identity: &Identity, task: u64, model: &str, completion: &[u32]) -> Option<Proof> {
        self.settle_prompt();
        let prompt = self.prompt.clone()?;
        let rows = completion.len().min(self.rows);
        let whole = rows / CHUNK;
        let mut chunks = self.chunks[..whole].to_vec();
        if !rows.is_multiple_of(CHUNK) {
            let row = whole * CHUNK + chunk_offset(&self.challenge, whole, rows % CHUNK);
            let first_kept = self.rows - self.recent.len();
            chunks.push(self.recent.get(row.checked_sub(first_kept)?)?.clone());
        }
        let mut proof = Proof {
            task,
            model: model.to_string(),
            challenge: hex::encode(self.challenge),
            prompt_tokens: self.prompt_seen as u32,
            output_hash: hex::encode(crate::protocol::receipt::output_hash(completion)),
            completion_tokens: completion.len() as u32,
            top_k: self.top_k as u16,
            prompt: prompt.iter().map(|p| hex::encode(p.encode())).collect(),
            chunks: chunks.iter().map(|c| hex::encode(c.encode())).collect(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: usize) -> Vec<f32> {
        (0..16).map(|j| ((i * 31 + j * 7) % 23) as f32 - 11.0).collect()
    }

    fn fed(rows: usize) -> ProofBuilder {
        let mut b = ProofBuilder::new([3; 32], 4);
        let prompt: Vec<f32> = (0..40).flat_map(row).collect();
        b.prompt_rows(40, &prompt);
        for i in 0..rows {
            b.token_row(&row(1000 + i));
        }
        b
    }

    /// A proof that ends before the last row seen (a game hung up) is the proof of a
    /// builder that saw only that far, as far back as [`KEPT_ROWS`]; further back, none.
    #[test]
    fn a_proof_can_end_at_any_kept_row() {
        let id = Identity::generate();
        let completion: Vec<u32> = (0..(KEPT_ROWS + 72) as u32).collect();
        let all = completion.len();
        let without_signature = |p: Proof| Proof { signature: String::new(), ..p };
        for end in [all, all - 1, all - 10, all - 40, all - 50, 100, 96] {
            let mut ahead = fed(all);
            let mut exact = fed(end);
            let early = ahead.finish(&id, 1, "m", &completion[..end]).expect("a proof");
            let whole = exact.finish(&id, 1, "m", &completion[..end]).expect("a proof");
            assert_eq!(without_signature(early), without_signature(whole), "ending at {end}");
        }
        // Whole chunks need no kept row; a partial chunk before the kept rows has none.
        assert!(fed(all).finish(&id, 1, "m", &completion[..64]).is_some());
        assert!(fed(all).finish(&id, 1, "m", &completion[..40]).is_none());
        // A builder can sign again: the first proof took nothing from it.
        let mut b = fed(50);
        let first = b.finish(&id, 1, "m", &completion[..50]).map(without_signature);
        assert_eq!(first, b.finish(&id, 1, "m", &completion[..50]).map(without_signature));
    }
}
