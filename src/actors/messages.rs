//! Every message the actors exchange, as small named structs, and the `Job` that travels
//! from the Gateway to a NodeProxy.

use std::time::{Duration, Instant};

use std::sync::Arc;

use actix::prelude::*;

use super::catalog::JobText;
use super::error::ServeError;
use super::node_proxy::NodeProxy;
use crate::crypto::identity::Address;
use crate::inference::SamplingParams;
use crate::ledger::{ConfirmStatus, Outcome, Receipt};
use crate::protocol::{
    FinishReason, NodeLoad, PromptCount, TaskFailure, TaskId, TaskInput, TaskSpec, TaskTicket, TaskUsage,
};

/// A node's session id on this server.
pub type NodeId = u64;

/// What the HTTP handler receives for its job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Text(String),
    /// The next token's log probabilities (when asked for), sent before the text that
    /// token releases.
    Logprobs(super::catalog::TokenLogprob),
    /// Forget the text so far: the answer is being produced again (its first version
    /// failed a synchronous proof check, or its node failed before finishing it). Only
    /// non-streamed jobs receive it.
    Reset,
    Done {
        finish_reason: FinishReason,
        usage: TaskUsage,
        /// The task billed for the answer: the admitted one, or the re-run's when the
        /// answer was produced again after its node failed a check (the id a game audits).
        task: TaskId,
    },
    Failed(ServeError),
}

/// A request on its way through the network.
#[derive(Debug)]
pub struct Job {
    pub id: TaskId,
    pub game: String,
    /// The game's id in the registry (billing).
    pub game_id: i64,
    pub key_hash: String,
    pub model: String,
    pub input: TaskInput,
    /// The prompt tokens the server counted (billed), or their bound for a model it holds
    /// no tokenizer of.
    pub prompt: PromptCount,
    /// The prompt's token ids as the server rendered them (accounted models): what
    /// cache-aware routing matches against the nodes' prefix caches.
    pub prompt_ids: Option<Arc<[u32]>>,
    /// The text the game reads, made here from the ids nodes return (accounted models).
    pub text: Option<JobText>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub events: super::job_events::EventSender,
    pub received: Instant,
    /// When the job last entered a queue (queue timeouts count from here).
    pub queued_at: Instant,
    /// Addresses of the nodes that failed this job: never chosen again for it, even on a
    /// new connection (a node that fails and reconnects is a new session, the same key).
    pub failed_nodes: Vec<String>,
    /// The game streams the answer (synchronous verification applies only when not).
    pub stream: bool,
    /// Set on a quality-check re-run: the original task, to compare with.
    pub shadow_of: Option<Box<ShadowOf>>,
    /// Completion tokens already delivered to the game (mid-stream failover prefix).
    pub emitted: Vec<u32>,
    /// The nodes' log probabilities of `emitted`, when the request asked for them.
    pub emitted_logprobs: Vec<crate::inference::logprobs::TokenLogprobs>,
    /// The server of the network (`cluster`) that forwarded it here, where the game is
    /// connected and its budget charged; `None` for a job admitted here. A forwarded job
    /// is never forwarded again.
    pub origin: Option<String>,
}

/// The task a quality check re-runs on a second node (same input, same seed; a failover
/// continuation's re-run continues after the same prefix).
#[derive(Debug)]
pub struct ShadowOf {
    pub task: TaskId,
    pub node: Address,
    /// Every token of the original answer, the prefix earlier nodes made included.
    pub completion: Vec<u32>,
    /// How many of them earlier nodes made (0 but for a failover continuation).
    pub prefix_len: usize,
    /// Addresses the re-run never goes to besides the original's node: those that failed
    /// the original (a continuation's prefix came from them).
    pub avoid: Vec<String>,
    pub challenge: Option<[u8; 32]>,
    pub proof: Option<Box<crate::proof::Proof>>,
}

/// Who a job is billed to.
#[derive(Debug, Clone)]
pub struct Billing {
    pub game: String,
    /// The game's id in the registry.
    pub game_id: i64,
    /// The API key's hash (its per-minute budgets); empty for the server's own jobs.
    pub key_hash: String,
}

/// What a job asks a node to do.
#[derive(Debug)]
pub struct JobRequest {
    pub model: String,
    pub input: TaskInput,
    pub prompt: PromptCount,
    pub prompt_ids: Option<Arc<[u32]>>,
    pub text: Option<JobText>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stream: bool,
}

impl Job {
    /// The one way a job is made, for games and the server's own re-runs alike.
    pub fn new(id: TaskId, billing: Billing, request: JobRequest, events: super::job_events::EventSender) -> Self {
        let Billing { game, game_id, key_hash } = billing;
        let JobRequest { model, input, prompt, prompt_ids, text, params, max_tokens, stop, stream } = request;
        let now = Instant::now();
        Job {
            id,
            game,
            game_id,
            key_hash,
            model,
            input,
            prompt,
            prompt_ids,
            text,
            params,
            max_tokens,
            stop,
            events,
            received: now,
            queued_at: now,
            failed_nodes: Vec::new(),
            stream,
            shadow_of: None,
            emitted: Vec::new(),
            emitted_logprobs: Vec::new(),
            origin: None,
        }
    }

    /// Forgets what nodes produced so far, and has the game forget it too: the answer is
    /// produced again from its start.
    pub fn restart(&mut self) {
        let _ = self.events.send(JobEvent::Reset);
        self.emitted.clear();
        self.emitted_logprobs.clear();
        self.text = self.text.as_ref().map(JobText::restarted);
    }

    /// Starts this job after `prefix` (tokens earlier nodes made, with their log
    /// probabilities when kept), as a failover continuation does: the next node continues
    /// after them, and the server's text has read them.
    pub fn continue_after(&mut self, prefix: &[u32], logprobs: &[crate::inference::logprobs::TokenLogprobs]) {
        if let Some(text) = self.text.as_mut() {
            for &token in prefix {
                let _ = text.push(token);
            }
        }
        self.emitted = prefix.to_vec();
        self.emitted_logprobs = logprobs.to_vec();
    }

    /// The same request again from its start (a quality-check re-run; streamed, since
    /// nobody waits for it whole).
    pub fn request(&self) -> JobRequest {
        JobRequest {
            model: self.model.clone(),
            input: self.input.clone(),
            prompt: self.prompt,
            prompt_ids: self.prompt_ids.clone(),
            text: self.text.as_ref().map(JobText::restarted),
            params: self.params.clone(),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            stream: true,
        }
    }

    /// The task a node runs for this job (with the failover prefix, if any).
    pub fn spec(&self, ticket: TaskTicket, challenge: Option<[u8; 32]>) -> TaskSpec {
        TaskSpec {
            id: self.id,
            model: self.model.clone(),
            input: self.input.clone(),
            params: self.params.clone(),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            prefix: self.emitted.clone(),
            ticket,
            challenge: challenge.map(hex::encode),
        }
    }

    pub fn cancelled(&self) -> bool {
        self.events.is_closed()
    }
}

// ---- Distributor -------------------------------------------------------------------

/// A new job from the Gateway: dispatched now, queued, or refused.
#[derive(Message)]
#[rtype(result = "Result<(), ServeError>")]
pub struct Submit(pub Job);

/// This server's room per model, for the cluster's adverts.
#[derive(Message)]
#[rtype(result = "Vec<super::cluster::wire::ModelRoom>")]
pub struct LocalRoom;

/// Give a node no work for `duration` (a failed check here or, from the cluster, on
/// another server); `announce` tells the other servers too.
#[derive(Message)]
#[rtype(result = "()")]
pub struct QuarantineNode {
    pub address: String,
    pub duration: Duration,
    pub announce: bool,
}

/// A node finished its handshake.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeConnected {
    pub id: NodeId,
    pub proxy: Addr<NodeProxy>,
    pub address: String,
    pub models: Vec<String>,
    pub capacity: usize,
    /// What the node says it runs on (`Cpu/Float/int8`, `Cuda(0)/BFloat16/int4`, ...).
    pub device: String,
    /// Tokens one sequence holds on the node, prompt and answer (0: no limit).
    pub context: usize,
}

/// A node's websocket closed or timed out; its unfinished jobs come back separately.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeDisconnected {
    pub id: NodeId,
    pub reason: String,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeHeartbeat {
    pub id: NodeId,
    pub load: NodeLoad,
}

/// A job finished on a node: its slot is free. Sent by Completion once it has judged the
/// proof's structure (see `completion::TaskFinished::freed`).
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct TaskCompleted {
    pub node: NodeId,
    pub task: TaskId,
    pub completion_tokens: usize,
    pub time_to_first_token: Option<Duration>,
    pub duration: Duration,
}

/// The game went away; the node was told to stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TaskCancelled {
    pub node: NodeId,
    pub task: TaskId,
}

/// A node could not finish a job (failure or disconnect): retry or fail over.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TaskReturned {
    pub node: NodeId,
    /// The node's address (the job never goes back to it, whatever session it holds).
    pub address: String,
    pub job: Job,
    /// A request's own fault fails the job (no retry, no penalty for the node); a node's
    /// sends it elsewhere.
    pub failure: TaskFailure,
}

/// The prefix caches of the live nodes, summed, and cache-aware routing's count.
#[derive(Message)]
#[rtype(result = "PrefixTotals")]
pub struct PrefixCounters;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefixTotals {
    /// Requests the live nodes served with cached blocks, and without.
    pub hits: u64,
    pub misses: u64,
    /// Prompt tokens they did not prefill thanks to the cache.
    pub tokens_reused: u64,
    /// Jobs this server sent to a node because it held their prefix.
    pub routed: u64,
}

/// The per-model queues as they stand, and what they refused since the start.
#[derive(Message)]
#[rtype(result = "QueueTotals")]
pub struct QueueCounters;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QueueTotals {
    /// Each model with queued jobs, by name.
    pub models: Vec<ModelQueue>,
    /// Jobs running on this server's nodes (not those forwarded to another server).
    pub running: usize,
    /// New jobs refused with 429 `queue_full` (another server's forwarded ones too).
    pub refused_full: u64,
    /// Queued jobs that gave their place in a full queue to another game's (they get that
    /// 429 too).
    pub gave_way: u64,
    /// Jobs that waited out their time in the queue (`queue_timeout_ms`; longer for a
    /// quality-check re-run).
    pub timed_out: u64,
}

/// One model's queue.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelQueue {
    pub model: String,
    /// Jobs waiting, and how many games they belong to.
    pub jobs: usize,
    pub games: usize,
    /// How long its oldest job has waited, in seconds.
    pub oldest_wait_s: f64,
}

/// Models with at least one live node, with their node counts.
#[derive(Message)]
#[rtype(result = "Vec<(String, usize)>")]
pub struct ListModels;

/// The live node table, for the operator's dashboard.
#[derive(Message)]
#[rtype(result = "Vec<LiveNode>")]
pub struct ListNodes;

/// One live node as the distributor sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveNode {
    pub id: u64,
    pub address: String,
    pub models: Vec<String>,
    pub device: String,
    pub capacity: usize,
    pub in_flight: usize,
    /// Peak-EWMA milliseconds per generated token (None before its first task).
    pub latency_ms_per_token: Option<f64>,
    /// The node's own decode rate, from its last heartbeat.
    pub tokens_per_s: f64,
    pub completed: u64,
    pub failed: u64,
    pub model_bytes: u64,
    /// What the node's start-up tuning chose, as its heartbeat says (bounded).
    pub tuning: String,
    pub quarantined: bool,
}

/// Stop accepting work (graceful shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

// ---- NodeProxy ---------------------------------------------------------------------

/// Run this job on the proxy's node.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Dispatch(pub Job);

/// Close the link with a reason.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect(pub String);

// ---- Registry ----------------------------------------------------------------------

/// A checked, priced receipt for the next block; `reply_to` hears when it is recorded.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordReceipt {
    pub receipt: Receipt,
    pub reply_to: Recipient<ReceiptsRecorded>,
}

/// To a node's proxy: `block` holds these tasks of the node (all of them).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ReceiptsRecorded {
    pub block: u64,
    pub tasks: Vec<TaskId>,
}

/// A node's confirmation of a block announced to it: to Completion, which checks its
/// signature, then to the Registry.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConfirmBlock {
    pub node: Address,
    pub block: u64,
    pub root: [u8; 32],
    pub count: u32,
    pub disputed: Vec<TaskId>,
    pub signature: Vec<u8>,
    pub reply_to: Recipient<BlockConfirmed>,
}

/// To a node's proxy: the registry stored the node's confirmation of `block`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct BlockConfirmed {
    pub block: u64,
    pub status: ConfirmStatus,
}

/// A proof-of-inference verdict (to the Registry and the Distributor).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct VerificationDone {
    pub task: TaskId,
    pub node: Address,
    pub outcome: Outcome,
    pub detail: String,
    /// A verified task's forgiven near-ties, for the node's steering record.
    pub evidence: Option<std::sync::Arc<crate::proof::steering::Evidence>>,
}

impl VerificationDone {
    /// Only a verified proof lets an answer count; a check that could not run never does.
    pub fn accepted(&self) -> bool {
        self.outcome == Outcome::Verified
    }
}

/// The check of tokens a node delivered and then failed before its proof
/// ([`crate::proof::delivered`]): recorded per (task, node), apart from the task's proof
/// verdict (the node that finished the task has its own); a failure quarantines the node.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct DeliveryChecked {
    pub task: TaskId,
    pub node: Address,
    /// How many of the node's own tokens were checked.
    pub tokens: usize,
    pub outcome: Outcome,
    pub detail: String,
    /// The near-ties a `verified` check forgave: they add to the node's steering record.
    pub evidence: Option<std::sync::Arc<crate::proof::steering::Evidence>>,
}

/// A node joined: restore the verification policy's state of it from the ledger; answers
/// how long its quarantine has left (`None`: none, or the ledger could not be read).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Option<std::time::Duration>")]
pub struct NodeJoined {
    pub node: Address,
}

/// Commit what is buffered now (if no commit runs); answers (still buffered, committing).
#[derive(Message)]
#[rtype(result = "(usize, bool)")]
pub struct FlushReceipts;

// ---- Gateway -----------------------------------------------------------------------

/// An authenticated, validated request to admit.
#[derive(Message)]
#[rtype(result = "Result<Admitted, ServeError>")]
pub struct Admit {
    /// The key, as `Authenticate` resolved it before the body was read (resolved once).
    pub key: crate::ledger::KeyInfo,
    pub stream: bool,
    pub model: String,
    pub input: TaskInput,
    /// The server's count of the prompt (see `catalog::Catalog::count`).
    pub prompt: PromptCount,
    /// The prompt's ids, when the server rendered them (cache-aware routing).
    pub prompt_ids: Option<Arc<[u32]>>,
    /// The text the game will read, made here from the ids (when the server holds the
    /// model's text side), with the job's grammar.
    pub text: Option<JobText>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// The request's first choice: counted as a request when its key was authenticated
    /// ([`CountAs::Completion`]), and admitted while its key's tokens per minute are not
    /// spent; its other choices go with it (the request counted once).
    pub first_choice: bool,
}

/// Tokens a finished job used, for the per-key token limits.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordUsage {
    pub key_hash: String,
    pub tokens: usize,
}

/// Resolve a bearer key to its game, and count the request against its limits.
#[derive(Message)]
#[rtype(result = "Result<crate::ledger::KeyInfo, ServeError>")]
pub struct Authenticate {
    pub bearer: Option<String>,
    pub count: CountAs,
}

/// What a request authenticated by [`Authenticate`] counts as, against its key's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountAs {
    /// Nothing (the asker is throttled by other means).
    Nothing,
    /// One request per minute (a report such as `/v1/usage`).
    Read,
    /// A completion: one request per minute, refused while the key's game is not served or
    /// its tokens per minute are spent (its `n` choices beyond the first count at
    /// admission).
    Completion,
}

/// A job the Gateway accepted: its id, the key it counts against, and its events.
#[derive(Debug)]
pub struct Admitted {
    pub id: TaskId,
    pub key_hash: String,
    pub events: super::job_events::EventReceiver,
    /// The tokens the job may use (prompt and max_tokens), held from the key's per-minute
    /// budget while the game waits for it, given back when this drops.
    pub reservation: TokenReservation,
}

/// Tokens held from a key's per-minute budget for a job admitted and not yet answered;
/// given back to it when dropped (the job's real usage is charged by `RecordUsage`).
pub struct TokenReservation {
    pub key_hash: String,
    pub tokens: usize,
    pub release: Recipient<ReleaseTokens>,
}

impl std::fmt::Debug for TokenReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReservation").field("tokens", &self.tokens).finish()
    }
}

impl Drop for TokenReservation {
    fn drop(&mut self) {
        self.release.do_send(ReleaseTokens { key_hash: std::mem::take(&mut self.key_hash), tokens: self.tokens });
    }
}

/// Gives back tokens a [`TokenReservation`] held.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseTokens {
    pub key_hash: String,
    pub tokens: usize,
}
