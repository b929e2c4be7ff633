//! Node link messages. `ServerMessage` flows distributor → node, `NodeMessage` node →
//! distributor. Prompts travel as chat messages or text; the node renders its model's
//! template and tokenizes, so the server needs no model to route.

use serde::{Deserialize, Serialize};

use super::receipt::{SignedReceipt, TaskTicket};
use crate::books::ConfirmStatus;
pub use crate::task::FinishReason;
use crate::task::{ChatMessage, SamplingParams, TokenLogprobs};

/// A task's id, unique per server process lifetime (and across restarts: it starts from a
/// random base).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(pub u64);

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What to complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskInput {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// One unit of work for a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub id: TaskId,
    pub model: String,
    pub input: TaskInput,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Completion tokens already streamed by a failed node (mid-stream failover): the node
    /// prefills them after the prompt and continues with the same seed schedule.
    pub prefix: Vec<u32>,
    /// The distributor's authenticated statement of what this task is; the node signs
    /// its receipt over it.
    pub ticket: TaskTicket,
    /// A fresh secret (32 bytes, hex) when the distributor wants a proof of inference: it
    /// selects the committed rows (`proof::commitment`).
    #[serde(default)]
    pub challenge: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskUsage {
    pub prompt_tokens: usize,
    /// Tokens this task produced, prefix included.
    pub completion_tokens: usize,
}

/// A node's load, sent with every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    pub running: usize,
    pub waiting: usize,
    pub queued_tokens: usize,
    pub tokens_per_s: f64,
    pub free_memory_bytes: u64,
    /// Weight memory the node's model holds (after quantization); 0 from older nodes.
    #[serde(default)]
    pub model_bytes: u64,
    /// How the node stores its linear layers: none, int8 or int4; empty from older nodes.
    #[serde(default)]
    pub quantization: String,
    /// What its prefix cache holds, for cache-aware routing.
    #[serde(default)]
    pub prefix: PrefixHeld,
    /// What start-up tuning chose and why, in one line (empty: not tuned). Informational:
    /// at most [`MAX_TUNING_CHARS`], shown to the operator, never acted on.
    #[serde(default)]
    pub tuning: String,
    /// Tokens one sequence may hold, prompt and answer together (0: no limit). The server
    /// holds a node to what its joining heartbeat says: an answer that ends before
    /// `max_tokens`, at no end the server's text sees, must have filled this context (with
    /// no limit, it never may). At least [`MIN_CONTEXT`] otherwise.
    #[serde(default)]
    pub context: u32,
}

/// Smallest context a node may report (but 0, no limit): a node that said less could
/// end answers after a token or two at it, and be paid the whole prompt.
pub const MIN_CONTEXT: u32 = 256;

/// Longest tuning line a heartbeat may carry.
pub const MAX_TUNING_CHARS: usize = 400;

/// Block names a heartbeat may carry.
pub const MAX_PREFIX_BLOCKS: usize = 64;

/// A node's prefix cache as its heartbeat reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixHeld {
    /// Tokens per block (0: no prefix cache).
    pub block: u32,
    /// The chunks held, most recently used first, at most [`MAX_PREFIX_BLOCKS`]: the first
    /// 8 bytes of each chunk's name (`inference::prefix_cache::chunk_names`; the chunks
    /// before a persona's end are whole blocks, named as `block_names` names them), hex.
    pub blocks: Vec<String>,
    /// Requests that reused cached blocks, and that found none.
    pub hits: u64,
    pub misses: u64,
    /// Prompt tokens not prefilled thanks to the cache.
    pub tokens_reused: u64,
}

/// Distributor → node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Handshake step 2 (clear): the distributor's ephemeral X25519 key and a fresh nonce,
    /// signed by the distributor's secp256k1 key over the transcript.
    Challenge {
        session_id: u64,
        /// 32 bytes, hex.
        nonce: String,
        /// 32 bytes, hex.
        x25519_public: String,
        distributor_address: String,
        /// 65-byte recoverable signature, hex.
        signature: String,
    },
    /// Handshake step 4 (sealed): the session is up. Carries the keys of the protected
    /// model bundles the node asked for: they exist on the node only in memory.
    Welcome {
        session_id: u64,
        heartbeat_interval_ms: u64,
        /// key id → 32-byte key, hex.
        #[serde(default)]
        model_keys: std::collections::BTreeMap<String, String>,
    },
    Task(Box<TaskSpec>),
    /// The game went away: stop generating and free the slot. `delivered` (when some
    /// tokens reached the game) asks for a receipt covering the first `delivered` tokens of
    /// the completion (prefix included), and their proof (`Cancelled`): they are billed
    /// and paid.
    Cancel {
        id: TaskId,
        #[serde(default)]
        delivered: Option<u32>,
    },
    /// Refusal or shutdown, with the reason; the link closes after it.
    Goodbye {
        reason: String,
    },
    /// The registry committed receipts of this node: `tasks` is every task of this node
    /// that `block` holds. The node answers with a `Confirm`.
    Recorded {
        block: u64,
        tasks: Vec<TaskId>,
    },
    /// The registry stored the node's confirmation of `block` (`matched` or `mismatch`):
    /// the node may forget those receipts.
    Confirmed {
        block: u64,
        status: ConfirmStatus,
    },
}

/// Handshake step 1 (clear): who the node is and what it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    /// The node's payout address (0x…, 20 bytes hex).
    pub node_address: String,
    pub models: Vec<String>,
    /// Sequences it runs at once.
    pub capacity: usize,
    pub device: String,
    /// The node's ephemeral X25519 key, 32 bytes hex.
    pub x25519_public: String,
    /// Key ids of the protected bundles it needs keys for.
    #[serde(default)]
    pub bundles: Vec<String>,
}

/// Node → distributor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeMessage {
    Hello(Hello),
    /// Handshake step 3 (clear): the node's signature over the transcript, proving it holds
    /// the key of `node_address`.
    Auth {
        /// 65-byte recoverable signature, hex.
        signature: String,
    },
    Heartbeat(NodeLoad),
    /// One completion token: `index` counts from 0 over the whole completion (prefix
    /// included), so the receiver can detect gaps and duplicates.
    Token {
        id: TaskId,
        index: usize,
        token: u32,
        text: String,
        /// When the task asked for them (`params.logprobs`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logprobs: Option<TokenLogprobs>,
    },
    Done {
        id: TaskId,
        finish_reason: FinishReason,
        usage: TaskUsage,
        tail: String,
        /// The node's signed receipt (also kept in its local log until confirmed).
        receipt: SignedReceipt,
        /// The proof of inference, when the task carried a challenge.
        #[serde(default)]
        proof: Option<Box<super::proof::Proof>>,
    },
    /// The answer to `Cancel { delivered: Some(k) }`: the receipt for the first `k` tokens,
    /// and, when the task carried a challenge, the proof of inference of exactly those
    /// (without it the receipt is not paid).
    Cancelled {
        id: TaskId,
        receipt: SignedReceipt,
        #[serde(default)]
        proof: Option<Box<super::proof::Proof>>,
    },
    /// Receipts not yet confirmed, sent again after a reconnect or when unanswered.
    Receipts {
        receipts: Vec<SignedReceipt>,
    },
    /// The node's signed confirmation of its tasks in a block (answer to `Recorded`).
    Confirm {
        block: u64,
        /// Merkle root over the agreed task ids (all listed minus `disputed`), hex.
        root: String,
        count: u32,
        /// Listed tasks the node has no receipt for.
        disputed: Vec<TaskId>,
        /// Signature over `receipt::confirmation_message`, hex.
        signature: String,
    },
    Failed {
        id: TaskId,
        failure: TaskFailure,
    },
}

/// Why a task did not finish, and whose fault that is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskFailure {
    /// The request itself cannot run (too long, invalid): retrying elsewhere is futile
    /// and the node is not at fault.
    Request(String),
    /// The node (its engine, its link, its answer) failed: the task goes to another node.
    Node(String),
}

impl TaskFailure {
    pub fn reason(&self) -> &str {
        match self {
            TaskFailure::Request(r) | TaskFailure::Node(r) => r,
        }
    }
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}
