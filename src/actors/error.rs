//! `ServeError`: why the network could not serve a request. The HTTP layer maps each to
//! an OpenAI-style error with a stable status, type and code (`crate::http::errors`).

use std::time::Duration;

/// Serializable: a server relays another's errors to its games unchanged (`cluster`).
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServeError {
    #[error("invalid API key: pass `Authorization: Bearer <key>` with a key from `ludus games add`")]
    Unauthorized,
    #[error("the game `{game}` is suspended: {reason}")]
    Suspended { game: String, reason: String },
    /// Suspended by settlement until the game's escrow covers its charges.
    #[error("the game `{game}` is suspended: {reason}")]
    EscrowShort { game: String, reason: String },
    #[error("the registry database is unreachable ({0}); retry shortly")]
    Unavailable(String),
    #[error(
        "admin endpoints need `Authorization: Bearer <admin token>` (server.admin_token, or data_dir/admin-token)"
    )]
    AdminUnauthorized,
    #[error("{0} not found")]
    NotFound(String),
    #[error("rate limit reached: {what}; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited { what: String, retry_after: Duration },
    #[error("the model `{0}` does not exist (GET /v1/models lists the served models)")]
    UnknownModel(String),
    #[error("no compute node is serving `{0}` right now; retry later")]
    NoNode(String),
    #[error("the queue for `{model}` is full; retry in {} s", retry_after.as_secs().max(1))]
    QueueFull { model: String, retry_after: Duration },
    #[error("timed out after {} s waiting for a node to serve `{model}`", waited.as_secs())]
    QueueTimeout { model: String, waited: Duration },
    #[error("the request cannot be served: {0}")]
    Rejected(String),
    /// The prompt leaves no room in the model's context (OpenAI's `context_length_exceeded`).
    #[error("the prompt is {prompt} tokens, and `{model}` holds {context} tokens in all, prompt and answer: shorten the prompt")]
    ContextLengthExceeded { model: String, prompt: usize, context: usize },
    #[error("the request is too large to send to a node ({0} bytes)")]
    TooLarge(usize),
    #[error("the task failed on every node tried: {0}")]
    NodeFailed(String),
    /// The game stopped reading its stream: more than `limit_kib` of tokens waited unread,
    /// so the answer was ended as if it had hung up (`actors::job_events`).
    #[error(
        "the stream was not read: more than {limit_kib} KiB of its tokens waited unread \
         (server.stream_unread_kib), so the answer was ended; the tokens made until then are billed"
    )]
    NotRead { limit_kib: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}
