//! The registry's ledger: Postgres, and nothing else. Knows nothing of actors or HTTP.
//!
//! - [`store`]: the database handle (pool + migrations from `migrations/*.sql`).
//! - [`games`]: games and hashed API keys.
//! - [`api_keys`]: a game's further keys: added, listed, revoked (rotation).
//! - [`receipts`]: block commits (existing tasks looked up, the new ones COPYed in, Merkle
//!   root) and node confirmations.
//! - [`copy_binary`]: Postgres binary COPY rows, for block commits.
//! - [`reports`]: usage by day, block and node views.
//! - [`epochs`]: settlement's epochs (planning, posting state, payout proofs).
//! - [`anchors`]: batches of block roots posted on chain between epochs, and the
//!   proof that ties one receipt to the chain.
//! - [`check_backlog`]: sampled tasks waiting for a verifier, unpaid until checked.
//! - [`delivery_checks`]: checks of tokens a node delivered and then failed before its
//!   proof; a failure costs reputation like a failed proof.
//! - [`escrow`]: games' debts against their on-chain escrow; suspension.
//! - [`undelivered`]: answers the network failed to deliver (a forwarded job given up),
//!   neither charged nor paid.
//! - [`cluster`]: a private Postgres cluster when no `database.url` is configured.

pub mod anchors;
pub mod api_keys;
pub mod check_backlog;
pub mod cluster;
pub mod copy_binary;
pub mod delivery_checks;
pub mod epochs;
pub mod error;
pub mod escrow;
pub mod games;
pub mod migrate;
pub mod pool;
pub mod receipts;
pub mod reports;
pub mod steering;
pub mod store;
pub mod undelivered;
pub mod verifications;

pub use crate::books::{Price, PriceTable, Units};
pub use error::LedgerError;
pub use games::{hash_key, KeyInfo};
pub use receipts::{BlockAck, CommitOutcome, ConfirmStatus, Receipt};
pub use store::Store;
pub use verifications::Outcome;
