//! Proof of inference: how a node shows that its output came from the model it was paid
//! to run, at a fraction of the cost of running it again.
//!
//! - [`commitment`]: top-k commitments of final hidden states at challenge-drawn rows.
//! - [`format`]: the number format a node declares, and the tie margin it is given.
//! - [`signed`]: the signed proof and the builder a node fills while generating.
//! - [`logprob_check`]: the log probabilities a node reported, against the reference.
//! - [`policy`]: which finished tasks get checked.
//! - [`stored`]: a proof with its task, for offline checks (`ludus verify`).
//! - [`structure`]: the checks that need no model (task, challenge, signer, counts), run
//!   on every task before it is paid.
//! - [`verify`]: the reference check — one prefill, commitments within tolerances, every
//!   token against the seeded sampler (near-ties forgiven, and kept).
//! - [`delivered`]: tokens a node delivered and then failed before its proof, checked
//!   without one against each format's reference.
//! - [`steering`]: whether a node's forgiven near-ties, summed over its tasks, are
//!   improbable for an honest node.
//!
//! Knows the inference engine's model and sampler; nothing of actors or HTTP.

pub mod commitment;
pub mod delivered;
pub mod format;
pub mod logprob_check;
pub mod nucleus;
pub mod policy;
pub mod signed;
pub mod steering;
pub mod stored;
pub mod structure;
pub mod verify;

pub use format::{Format, UnknownFormat};
pub use signed::{Proof, ProofBuilder};
pub use stored::StoredProof;
pub use verify::{verify, Deviation, Limits, Tolerances, Verdict};
