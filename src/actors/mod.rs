//! The actors of `ludus serve`, one actix System in one process:
//!
//! ```text
//! HTTP handler ──Admit──▶ Gateway ──Submit──▶ Distributor ──Dispatch──▶ NodeProxy ══ws══▶ node
//!      ▲                  (keys,              (node table,               (one per node
//!      │                   limits)             queues, P2C,               websocket)
//!      │                                       retries, failover)            │
//!      └────────────────────── JobEvent channel (tokens) ◀────────────────────┘
//! ```
//!
//! Tokens flow from a `NodeProxy` straight into the job's channel, never through the
//! Distributor's mailbox; the channel bounds what the game leaves unread ([`job_events`]). When a node's part of a task is over, its proxy hands the job to
//! [`completion::Completion`] (one actor, its own thread): receipt check and pricing, the
//! game's usage, verification sampling (a task the busy verifier pool cannot take waits in
//! the [`check_backlog`]), the synchronous hold, quality checks. Tokens a node delivered
//! without a proof (it failed first, or never proved a hang-up) are checked too
//! ([`delivery_check`]). The Clock fires block and
//! epoch ticks; the Registry commits receipts per block and Settlement posts each epoch on
//! chain ([`settler`] holds its state machine). They run under actix's `Supervisor`. With
//! NATS configured, [`cluster`] joins several servers into one network (adverts, forwarded
//! jobs, shared quarantines).

pub mod catalog;
pub mod check_backlog;
pub mod check_log;
pub mod clock;
pub mod cluster;
pub mod completion;
pub mod completion_log;
pub mod delivery_check;
pub mod distributor;
pub mod error;
pub mod fair_queue;
pub mod gateway;
pub mod job_events;
pub mod load_pacer;
pub mod messages;
pub mod node_proxy;
pub mod rate_limit;
pub mod registry;
pub mod scheduling;
pub mod sessions;
pub mod settlement;
pub mod settler;
pub mod supervisor;
pub mod verifier;

pub use clock::Clock;
pub use distributor::Distributor;
pub use error::ServeError;
pub use gateway::Gateway;
pub use messages::{Job, JobEvent};
pub use node_proxy::NodeProxy;
pub use registry::Registry;
pub use settlement::Settlement;
