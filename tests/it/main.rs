//! Integration tests: one binary, one module per subsystem.

mod helpers;
mod inference_engine;
mod inference_errors;
mod inference_tiny;
mod smollm2_reference;
