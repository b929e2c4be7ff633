//! A node's proof for one task: the commitments for the rows the challenge selects, bound
//! to the task, the challenge and the completion (by its hash), signed by the node's key.
//! [`ProofBuilder`] assembles it from the engine's hidden states while generating.

use serde::{Deserialize, Serialize};

use super::commitment::{chunk_offset, prompt_rows, TopK, CHUNK};
use super::format::Format;
use crate::crypto::identity::{keccak, recover, Address, Identity};

/// A signed proof of inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proof {
    pub task: u64,
    pub model: String,
    /// The distributor's secret challenge for this task, hex.
    pub challenge: String,
    pub prompt_tokens: u32,
    /// Keccak-256 of the completion token ids (as in the receipt), hex.
    pub output_hash: String,
    pub completion_tokens: u32,
    pub top_k: u16,
    /// Commitments for the prompt rows (ascending), hex.
    pub prompt: Vec<String>,
    /// One commitment per chunk of generated tokens, hex.
    pub chunks: Vec<String>,
    /// How the node stored its weights (`int8`, `int4`; empty = unquantized): the
    /// verifier recomputes with the same quantization. Signed, so a node cannot claim a
    /// cheaper format than it ran.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub quantization: String,
    /// The dtype of an unquantized node (`bf16`, `f16`; empty = f32): with
    /// `quantization`, the [`Format`] that fixes the verifier's tie margin. Signed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dtype: String,
    /// The node's signature over [`Proof::digest`], hex.
    pub signature: String,
}

impl Proof {
    /// What the node signs: every field but the signature.
    pub fn digest(&self) -> [u8; 32] {
        let mut b = b"ludus-proof-v1".to_vec();
        b.extend_from_slice(&self.task.to_be_bytes());
        b.extend_from_slice(&(self.model.len() as u32).to_be_bytes());
        b.extend_from_slice(self.model.as_bytes());
        b.extend_from_slice(self.challenge.as_bytes());
        b.extend_from_slice(&self.prompt_tokens.to_be_bytes());
        b.extend_from_slice(self.output_hash.as_bytes());
        b.extend_from_slice(&self.completion_tokens.to_be_bytes());
        b.extend_from_slice(&self.top_k.to_be_bytes());
        for p in &self.prompt {
            b.push(b'^');
            b.extend_from_slice(p.as_bytes());
        }
        for c in &self.chunks {
            b.push(b'|');
            b.extend_from_slice(c.as_bytes());
        }
        // Absent for unquantized proofs, so their digests are unchanged.
        if !self.quantization.is_empty() {
            b.push(b'#');
            b.extend_from_slice(self.quantization.as_bytes());
        }
        if !self.dtype.is_empty() {
            b.push(b'~');
            b.extend_from_slice(self.dtype.as_bytes());
        }
        keccak(&b)
    }

    /// The format the node declares (and the verifier holds it to).
    pub fn format(&self) -> Result<Format, String> {
        Format::declared(&self.quantization, &self.dtype)
    }

    /// The address that signed it.
    pub fn signer(&self) -> Result<Address, String> {
        let sig = hex::decode(&self.signature).map_err(|e| format!("signature: {e}"))?;
        recover(&self.digest(), &sig).map_err(|e| e.to_string())
    }

    /// Bytes of commitments per chunk of 32 tokens, as encoded (not hex).
    pub fn bytes_per_chunk(&self) -> usize {
        self.chunks.first().map_or(0, |c| c.len() / 2)
    }

    pub fn challenge_bytes(&self) -> Result<[u8; 32], String> {
        hex::decode(&self.challenge)
            .ok()
            .and_then(|c| c.try_into().ok())
            .ok_or("the challenge is not 32 bytes of hex".into())
    }
}

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

    /// Feeds an engine event (prompt rows and token rows; others are ignored).
    pub fn observe(&mut self, event: &crate::inference::Event) {
        match event {
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
            Event::PromptHidden { .. } => {}
        }
    }
    Err("the engine stopped".into())
}
