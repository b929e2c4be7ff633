//! The HTTP face of `ludus serve`: the OpenAI-compatible API, the node websocket upgrade
//! and health. Routes are registered by one [`routes::configure`], used by the server and
//! by tests alike; errors become OpenAI-style JSON in one place ([`errors`]).

pub mod answer_json;
pub mod auth_throttle;
pub mod chaos_api;
pub mod client_addr;
pub mod dashboard;
pub mod disconnect;
pub mod errors;
pub mod metrics;
pub mod node_links;
pub mod node_ws;
pub mod openai;
pub mod registry_api;
pub mod routes;
pub mod server;
pub mod settlement_api;
pub mod sse;
pub mod structured;
