//! Integration tests: one binary, one module per subsystem.

mod build_linkage;
mod cluster;
mod configuration;
mod dashboard;
mod database;
mod distill;
mod faults;
mod guides;
mod helpers;
mod inference_engine;
mod inference_errors;
mod inference_tiny;
mod network_api;
mod network_crypto;
mod network_proof;
mod network_routing;
mod observability;
mod proof;
mod properties;
mod protect;
mod quantization;
mod registry;
mod rogue_nodes;
mod settlement;
mod smollm2_reference;
mod soak;
