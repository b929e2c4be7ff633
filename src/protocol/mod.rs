//! The node link protocol: the messages the distributor and compute nodes exchange over
//! one websocket, and their framing. Shared by the server's `NodeProxy` actors and the
//! node agent, so both sides always agree. Specified in `docs/protocol.md`.
//!
//! Depends on `crypto` (sealing, signatures) and `task` (what a task asks for) only.

pub mod frame;
pub mod handshake;
pub mod messages;
pub mod proof;
pub mod receipt;

pub use frame::{
    decode_frame, decode_sealed, encode_frame, encode_sealed, FrameError, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
pub use messages::{
    FinishReason, Hello, NodeLoad, NodeMessage, PrefixHeld, ServerMessage, TaskFailure, TaskId, TaskInput, TaskSpec,
    TaskUsage, MAX_TUNING_CHARS, MIN_CONTEXT,
};
pub use proof::Proof;
pub use receipt::{PromptCount, ReceiptError, SignedReceipt, TaskTicket};
