//! What servers say to each other over NATS, and on which subjects. JSON, like the node
//! protocol: small, readable with `nats sub`, and versioned by adding fields.
//!
//! - `ludus.advert` — every server, every `advert_interval_ms`: its name and, per model, the
//!   nodes serving it and the sequences they could start now.
//! - `ludus.job.<server>` — a job forwarded to `<server>`; its events come back on the
//!   job's `reply` subject, `ludus.reply.<origin>.<task>`, in order.
//! - `ludus.cancel.<task>` — the game that asked went away: stop the job.
//! - `ludus.quarantine` — a node failed a proof check here: no server gives it work.
//! - `ludus.witness` — a node finished a task here with this output (before the game is
//!   answered): if this server dies, the node's re-sent receipt is paid by another.

use serde::{Deserialize, Serialize};

use crate::actors::catalog::TokenLogprob;
use crate::actors::error::ServeError;
use crate::actors::messages::JobEvent;
use crate::protocol::{FinishReason, TaskId, TaskInput, TaskUsage};
use crate::task::SamplingParams;

pub const ADVERT_SUBJECT: &str = "ludus.advert";
pub const QUARANTINE_SUBJECT: &str = "ludus.quarantine";
pub const WITNESS_SUBJECT: &str = "ludus.witness";

/// Models one advert may name (a server's nodes choose model names: bounded).
pub const MAX_ADVERT_MODELS: usize = 1024;
/// Longest server name (it is part of subjects).
pub const MAX_NAME_LEN: usize = 64;

/// The subject `server` takes forwarded jobs on.
pub fn job_subject(server: &str) -> String {
    format!("ludus.job.{server}")
}

/// Where the events of a job forwarded by `origin` come back.
pub fn reply_subject(origin: &str, task: TaskId) -> String {
    format!("ludus.reply.{origin}.{:016x}", task.0)
}

/// Where a forwarded job's cancellation goes.
pub fn cancel_subject(task: TaskId) -> String {
    format!("ludus.cancel.{:016x}", task.0)
}

/// A server name is one NATS subject token: letters, digits, `-` and `_`, at most
/// [`MAX_NAME_LEN`] of them.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One server's room, per model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advert {
    pub server: String,
    /// Random per process: two servers given one name are told apart (and reported).
    pub instance: u64,
    pub models: Vec<ModelRoom>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRoom {
    pub model: String,
    /// Live nodes serving it.
    pub nodes: usize,
    /// Sequences they could start now (free slots less the jobs already queued).
    pub free: usize,
}

/// A job one server hands to another: the request as the first one validated it, and who
/// pays. The receiving server counts the prompt, makes the text, checks the proof and
/// bills, exactly as for a request of its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardedJob {
    pub task: TaskId,
    pub origin: String,
    pub reply: String,
    pub game: String,
    pub game_id: i64,
    pub key_hash: String,
    pub model: String,
    pub input: TaskInput,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stream: bool,
}

/// A node that failed a check somewhere, and for how long nobody gives it work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quarantine {
    pub address: String,
    pub seconds: u64,
}

/// A completion a server saw: what a re-sent receipt must match to be paid elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Witness {
    pub server: String,
    pub task: u64,
    /// The node's address, hex.
    pub node: String,
    pub completion_tokens: u32,
    /// Hex of the output hash.
    pub output_hash: String,
}

/// A [`JobEvent`] on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteEvent {
    Text(String),
    Logprobs(TokenLogprob),
    Reset,
    Done { finish_reason: FinishReason, usage: TaskUsage },
    Failed(ServeError),
}

impl RemoteEvent {
    /// The last event of a job.
    pub fn ends(&self) -> bool {
        matches!(self, Self::Done { .. } | Self::Failed(_))
    }
}

impl From<JobEvent> for RemoteEvent {
    fn from(event: JobEvent) -> Self {
        match event {
            JobEvent::Text(t) => Self::Text(t),
            JobEvent::Logprobs(l) => Self::Logprobs(l),
            JobEvent::Reset => Self::Reset,
            JobEvent::Done { finish_reason, usage } => Self::Done { finish_reason, usage },
            JobEvent::Failed(e) => Self::Failed(e),
        }
    }
}

impl From<RemoteEvent> for JobEvent {
    fn from(event: RemoteEvent) -> Self {
        match event {
            RemoteEvent::Text(t) => Self::Text(t),
            RemoteEvent::Logprobs(l) => Self::Logprobs(l),
            RemoteEvent::Reset => Self::Reset,
            RemoteEvent::Done { finish_reason, usage } => Self::Done { finish_reason, usage },
            RemoteEvent::Failed(e) => Self::Failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn events_survive_the_wire_and_names_are_subject_tokens() {
        let events = [
            RemoteEvent::Text("héllo".into()),
            RemoteEvent::Done {
                finish_reason: FinishReason::Length,
                usage: TaskUsage { prompt_tokens: 3, completion_tokens: 4 },
            },
            RemoteEvent::Failed(ServeError::QueueFull { model: "m".into(), retry_after: Duration::from_millis(1500) }),
        ];
        for event in events {
            let back: RemoteEvent = serde_json::from_slice(&serde_json::to_vec(&event).unwrap()).unwrap();
            assert_eq!(back, event);
        }
        assert!(valid_name("eu-west_1"));
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?} must be refused");
        }
        assert_eq!(reply_subject("a", TaskId(255)), "ludus.reply.a.00000000000000ff");
    }
}
