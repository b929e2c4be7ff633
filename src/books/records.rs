//! The records settlement passes between the ledger (which stores them), the chain
//! (which posts and checks them) and the API (which serves them): a posting's state and
//! its signed transaction, a node's payout claim, a receipt's proof, how a node's
//! confirmation of a block came out.

use super::money::Units;

/// Where a posting (an epoch's or an anchor's) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EpochStatus {
    Planned,
    Sent,
    Confirmed,
}

impl EpochStatus {
    /// The status stored as `s`, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "planned" => Some(EpochStatus::Planned),
            "sent" => Some(EpochStatus::Sent),
            "confirmed" => Some(EpochStatus::Confirmed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EpochStatus::Planned => "planned",
            EpochStatus::Sent => "sent",
            EpochStatus::Confirmed => "confirmed",
        }
    }
}

/// The transaction that posts an epoch, as stored before it is broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentTx {
    pub hash: [u8; 32],
    pub raw: Vec<u8>,
    pub nonce: u64,
}

/// A node's claim for one epoch: amount and Merkle proof against the posted root.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PayoutClaim {
    pub epoch: u64,
    pub amount: Units,
    /// Sibling hashes, `0x…`.
    pub proof: Vec<String>,
}

/// Everything needed to check one receipt against the chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiptProof {
    pub task: u64,
    /// What the registry recorded (billing values computed by the server).
    pub game_id: i64,
    pub node: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub price_units: String,
    pub block: u64,
    /// The bytes the node signed (hex, `0x…`); null for receipts recorded before they
    /// were kept.
    pub signed_bytes: Option<String>,
    /// The node's signature over keccak(signed_bytes).
    pub signature: String,
    pub receipt_hash: String,
    /// Sibling hashes from the receipt's hash to the block root.
    pub receipt_path: Vec<String>,
    pub block_root: String,
    /// Null until the block is anchored on chain.
    pub anchor: Option<AnchorProof>,
    /// Why the answer was written off, when it was: it never reached its game whole (a
    /// job lost between servers), so it is neither charged nor paid whatever its price.
    /// Absent otherwise (a write-off after the receipt was settled included: it was
    /// charged and paid), and from servers before write-offs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_off: Option<String>,
}

/// A block's place in its anchor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AnchorProof {
    /// The contract's anchor id.
    pub id: u64,
    pub first_block: u64,
    pub last_block: u64,
    pub root: String,
    /// Sibling hashes from `block_leaf(block, block_root)` to the anchor's root.
    pub block_path: Vec<String>,
    pub status: EpochStatus,
    pub contract: String,
    pub tx_hash: Option<String>,
    pub chain_block: Option<u64>,
}

/// How a node's confirmation of a block came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfirmStatus {
    /// Root and count agree: the agreed receipts are now payable.
    Matched,
    /// Recorded, visible to the operator; nothing became payable.
    Mismatch,
    /// The block holds no task of this node: nothing recorded.
    NothingToConfirm,
}

impl ConfirmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConfirmStatus::Matched => "matched",
            ConfirmStatus::Mismatch => "mismatch",
            ConfirmStatus::NothingToConfirm => "nothing_to_confirm",
        }
    }
}
