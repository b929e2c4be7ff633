//! The compute node agent (`ludus node`): a websocket client around the inference engine.
//! It connects to a distributor, says Hello, runs the tasks it is sent and streams tokens
//! back, sends heartbeats with its load, and reconnects with jittered exponential backoff.

pub mod agent;
pub mod backend;
pub mod error;
pub mod finished;
pub mod link;
pub mod receipts;

pub use agent::{run_node, NodeModel, NodeOptions};
pub use backend::{Backend, FakeSpec};
pub use error::LinkError;
