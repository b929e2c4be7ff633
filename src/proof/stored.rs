//! A proof kept with everything needed to check it again later, offline
//! (`ludus verify FILE --model PATH`): the task's input and sampling parameters and the
//! completion the game received.

use serde::{Deserialize, Serialize};

use super::signed::Proof;
use crate::inference::{InferError, Model, SamplingParams};
use crate::protocol::TaskInput;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredProof {
    pub proof: Proof,
    pub input: TaskInput,
    pub params: SamplingParams,
    /// Tokens another node produced before this one took the task over (failover): part
    /// of the prompt the proof covers.
    #[serde(default)]
    pub prefix: Vec<u32>,
    pub completion: Vec<u32>,
}

impl StoredProof {
    /// The prompt tokens, rendered and tokenized the way a node does, then the failover
    /// prefix (a continuation's proof covers both as its prompt).
    pub fn prompt(&self, model: &Model) -> Result<Vec<u32>, InferError> {
        let mut prompt = match &self.input {
            TaskInput::Chat(messages) => model.chat_prompt(messages),
            TaskInput::Text(text) => model.completion_prompt(text),
        }?;
        prompt.extend_from_slice(&self.prefix);
        Ok(prompt)
    }
}
