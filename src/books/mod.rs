//! The books' values, shared by the ledger (which stores them), the chain (which posts
//! and checks them), the settler (which joins the two) and the API (which serves them). A
//! leaf: it knows no database, no contract and no actor, so neither `ledger` nor `chain`
//! needs the other.
//!
//! - [`money`]: integer base units and per-model prices.
//! - [`records`]: posting states and signed transactions, payout claims, receipt proofs.

pub mod money;
pub mod records;

pub use money::{MoneyError, Price, PriceTable, Units};
pub use records::{AnchorProof, ConfirmStatus, EpochStatus, PayoutClaim, ReceiptProof, SentTx};
