//! Tickets, receipts and confirmations: the node link's bookkeeping messages.
//!
//! - A [`TaskTicket`] rides with each task. The distributor authenticates it with a MAC
//!   under a secret shared by every server on the registry database, so a receipt re-sent
//!   after a server crash still proves the task was really given to that node, for that
//!   game, without any per-task database write on the hot path.
//! - A [`SignedReceipt`] is the node's signed statement of a finished task. The node keeps
//!   it in its local log until the registry has recorded and it has confirmed it.
//! - A block confirmation is the node's signature over (block, root of its task ids,
//!   count, disputed ids): see [`confirmation_message`].

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::messages::TaskId;
use crate::crypto::identity::{keccak, recover, Address, Identity};

type HmacSha256 = Hmac<Sha256>;

/// The server's count of a task's prompt tokens, carried (authenticated) in its ticket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptCount {
    pub tokens: u32,
    /// Counted by the server with the model's own tokenizer: a receipt must say exactly
    /// this. Otherwise `tokens` is an upper bound the server computed from the prompt's bytes.
    pub exact: bool,
}

/// What a task is, who runs it and for whom; authenticated by the distributor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTicket {
    pub task: TaskId,
    /// The game's id in the registry.
    pub game: i64,
    pub model: String,
    pub max_tokens: u32,
    /// The prompt tokens the server counted (what is billed), or their bound.
    pub prompt: PromptCount,
    /// Completion tokens another node produced before this one took the task over
    /// (failover): part of the receipt's completion, never billed to this node's account.
    #[serde(default)]
    pub prefix: u32,
    /// The node the task was given to (0x…).
    pub node: String,
    pub issued_unix_ms: u64,
    /// HMAC-SHA256 over the fields above, hex.
    pub mac: String,
}

const TICKET_DOMAIN: &[u8] = b"ludus-ticket-v2";
const RECEIPT_DOMAIN: &[u8] = b"ludus-receipt-v1";

fn ticket_bytes(t: &TaskTicket) -> Vec<u8> {
    let mut out = TICKET_DOMAIN.to_vec();
    out.extend_from_slice(&t.task.0.to_be_bytes());
    out.extend_from_slice(&t.game.to_be_bytes());
    out.extend_from_slice(&(t.model.len() as u32).to_be_bytes());
    out.extend_from_slice(t.model.as_bytes());
    out.extend_from_slice(&t.max_tokens.to_be_bytes());
    out.extend_from_slice(&t.prompt.tokens.to_be_bytes());
    out.push(u8::from(t.prompt.exact));
    out.extend_from_slice(&t.prefix.to_be_bytes());
    out.extend_from_slice(&(t.node.len() as u32).to_be_bytes());
    out.extend_from_slice(t.node.as_bytes());
    out.extend_from_slice(&t.issued_unix_ms.to_be_bytes());
    out
}

fn ticket_mac(secret: &[u8; 32], t: &TaskTicket) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&ticket_bytes(t));
    mac
}

impl TaskTicket {
    /// Issues a ticket (fills in the MAC).
    pub fn issue(
        secret: &[u8; 32],
        task: TaskId,
        game: i64,
        model: &str,
        (max_tokens, prompt): (u32, PromptCount),
        node: &Address,
    ) -> Self {
        let issued_unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut t = TaskTicket {
            task,
            game,
            model: model.to_string(),
            max_tokens,
            prompt,
            prefix: 0,
            node: node.to_string(),
            issued_unix_ms,
            mac: String::new(),
        };
        t.mac = hex::encode(ticket_mac(secret, &t).finalize().into_bytes());
        t
    }

    /// The same ticket for a continuation that starts after `prefix` tokens of another node
    /// (MAC renewed).
    pub fn continuing(mut self, secret: &[u8; 32], prefix: u32) -> Self {
        self.prefix = prefix;
        self.mac = hex::encode(ticket_mac(secret, &self).finalize().into_bytes());
        self
    }

    /// The completion tokens of a receipt that are this node's own work.
    pub fn own_tokens(&self, completion_tokens: u32) -> u32 {
        completion_tokens.saturating_sub(self.prefix)
    }

    /// Whether the MAC is right (constant-time comparison).
    pub fn authentic(&self, secret: &[u8; 32]) -> bool {
        hex::decode(&self.mac).is_ok_and(|m| ticket_mac(secret, self).verify_slice(&m).is_ok())
    }
}

/// A node's signed statement that it finished a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    pub ticket: TaskTicket,
    pub prompt_tokens: u32,
    /// Completion tokens, failover prefix included.
    pub completion_tokens: u32,
    /// Keccak-256 of the completion token ids (u32 big-endian), hex.
    pub output_hash: String,
    /// 65-byte recoverable secp256k1 signature over [`SignedReceipt::hash`], hex.
    pub signature: String,
}

/// Why a receipt was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("the ticket's MAC is wrong (not issued by this network)")]
    ForgedTicket,
    #[error("the ticket was issued to {ticket}, not to {sender}")]
    WrongNode { ticket: String, sender: String },
    #[error("the signature is not {0}'s")]
    BadSignature(String),
    #[error("{completion} completion tokens exceed the ticket's max_tokens {max}")]
    TooManyTokens { completion: u32, max: u32 },
    #[error("it claims {claimed} prompt tokens; the server counted {counted}")]
    PromptTokens { claimed: u32, counted: u32 },
    #[error("malformed receipt: {0}")]
    Malformed(String),
}

/// Keccak-256 of a completion's token ids.
pub fn output_hash(tokens: &[u32]) -> [u8; 32] {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_be_bytes()).collect();
    keccak(&bytes)
}

impl SignedReceipt {
    /// Signs a receipt for `ticket` with the node's key.
    pub fn sign(identity: &Identity, ticket: TaskTicket, prompt_tokens: u32, completion: &[u32]) -> Self {
        let mut r = SignedReceipt {
            ticket,
            prompt_tokens,
            completion_tokens: completion.len() as u32,
            output_hash: hex::encode(output_hash(completion)),
            signature: String::new(),
        };
        r.signature = hex::encode(identity.sign(&r.hash()));
        r
    }

    /// The 32 bytes the node signs and the block's Merkle tree commits to: the keccak of
    /// [`SignedReceipt::signed_bytes`].
    pub fn hash(&self) -> [u8; 32] {
        keccak(&self.signed_bytes())
    }

    /// The exact bytes whose hash the node signs. The registry stores them, so anyone can
    /// recompute a receipt's hash (and read what it says) from what the operator publishes.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = RECEIPT_DOMAIN.to_vec();
        bytes.extend_from_slice(&ticket_bytes(&self.ticket));
        bytes.extend_from_slice(self.ticket.mac.as_bytes());
        bytes.extend_from_slice(&self.prompt_tokens.to_be_bytes());
        bytes.extend_from_slice(&self.completion_tokens.to_be_bytes());
        bytes.extend_from_slice(self.output_hash.as_bytes());
        bytes
    }

    /// A receipt back from its [`SignedReceipt::signed_bytes`] and signature (hex); the
    /// inverse of `signed_bytes`, so `from_signed_bytes(r.signed_bytes(), ..).hash() ==
    /// r.hash()`. Refuses anything that is not exactly that layout.
    pub fn from_signed_bytes(bytes: &[u8], signature: &str) -> Result<Self, ReceiptError> {
        let mut r = Reader { bytes, at: 0 };
        r.expect(RECEIPT_DOMAIN)?;
        r.expect(TICKET_DOMAIN)?;
        let task = TaskId(r.u64()?);
        let game = r.u64()? as i64;
        let model = r.text()?;
        let max_tokens = r.u32()?;
        let prompt = PromptCount { tokens: r.u32()?, exact: r.flag()? };
        let prefix = r.u32()?;
        let node = r.text()?;
        let issued_unix_ms = r.u64()?;
        let mac = r.hex64()?;
        let prompt_tokens = r.u32()?;
        let completion_tokens = r.u32()?;
        let output_hash = r.hex64()?;
        if r.at != bytes.len() {
            return Err(ReceiptError::Malformed(format!("{} bytes after the receipt", bytes.len() - r.at)));
        }
        let ticket = TaskTicket { task, game, model, max_tokens, prompt, prefix, node, issued_unix_ms, mac };
        Ok(SignedReceipt { ticket, prompt_tokens, completion_tokens, output_hash, signature: signature.to_string() })
    }

    /// Whether the signature is `signer`'s over this receipt's hash (no ticket check: that
    /// needs the network's secret).
    pub fn signed_by(&self, signer: &Address) -> bool {
        hex::decode(&self.signature).is_ok_and(|s| recover(&self.hash(), &s).is_ok_and(|a| a == *signer))
    }

    /// Checks everything a registry can check without the output: the ticket is ours and
    /// was issued to `sender`, the signature is `sender`'s, the counts fit the ticket.
    pub fn check(&self, secret: &[u8; 32], sender: &Address) -> Result<(), ReceiptError> {
        if !self.ticket.authentic(secret) {
            return Err(ReceiptError::ForgedTicket);
        }
        if self.ticket.node != sender.to_string() {
            return Err(ReceiptError::WrongNode { ticket: self.ticket.node.clone(), sender: sender.to_string() });
        }
        if self.completion_tokens < self.ticket.prefix {
            return Err(ReceiptError::Malformed("fewer completion tokens than the failover prefix".into()));
        }
        if self.completion_tokens > self.ticket.max_tokens {
            return Err(ReceiptError::TooManyTokens {
                completion: self.completion_tokens,
                max: self.ticket.max_tokens,
            });
        }
        let prompt = self.ticket.prompt;
        if (prompt.exact && self.prompt_tokens != prompt.tokens) || self.prompt_tokens > prompt.tokens {
            return Err(ReceiptError::PromptTokens { claimed: self.prompt_tokens, counted: prompt.tokens });
        }
        if hex::decode(&self.output_hash).map(|h| h.len()) != Ok(32) {
            return Err(ReceiptError::Malformed("output_hash is not 32 bytes of hex".into()));
        }
        let signature = hex::decode(&self.signature).map_err(|e| ReceiptError::Malformed(format!("signature: {e}")))?;
        match recover(&self.hash(), &signature) {
            Ok(signer) if signer == *sender => Ok(()),
            _ => Err(ReceiptError::BadSignature(sender.to_string())),
        }
    }
}

/// Reads [`SignedReceipt::signed_bytes`] back, field by field.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ReceiptError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| ReceiptError::Malformed(format!("receipt bytes end early at {}", self.at)))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn expect(&mut self, tag: &[u8]) -> Result<(), ReceiptError> {
        if self.take(tag.len())? != tag {
            return Err(ReceiptError::Malformed(format!("expected `{}`", String::from_utf8_lossy(tag))));
        }
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, ReceiptError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, ReceiptError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn flag(&mut self) -> Result<bool, ReceiptError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(ReceiptError::Malformed(format!("flag byte {other}"))),
        }
    }

    fn text(&mut self) -> Result<String, ReceiptError> {
        let len = self.u32()? as usize;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| ReceiptError::Malformed("text is not UTF-8".into()))
    }

    /// 32 bytes written as 64 hex digits.
    fn hex64(&mut self) -> Result<String, ReceiptError> {
        let raw = self.take(64)?;
        let text = std::str::from_utf8(raw).map_err(|_| ReceiptError::Malformed("hash is not hex".into()))?;
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReceiptError::Malformed(format!("`{text}` is not hex")));
        }
        Ok(text.to_string())
    }
}

/// The bytes a node signs to ask for the proof of one of its own tasks
/// (`GET /v1/receipts/{task}/proof` with `X-Ludus-Node`, `X-Ludus-Time`, `X-Ludus-Signature`).
pub fn proof_request_message(task: u64, unix_s: u64) -> Vec<u8> {
    let mut bytes = b"ludus-proof-request-v1".to_vec();
    bytes.extend_from_slice(&task.to_be_bytes());
    bytes.extend_from_slice(&unix_s.to_be_bytes());
    bytes
}

/// The bytes a node signs to confirm its tasks in a block.
pub fn confirmation_message(block: u64, root: &[u8; 32], count: u32, disputed: &[TaskId]) -> Vec<u8> {
    let mut bytes = b"ludus-confirm-v1".to_vec();
    bytes.extend_from_slice(&block.to_be_bytes());
    bytes.extend_from_slice(root);
    bytes.extend_from_slice(&count.to_be_bytes());
    for t in disputed {
        bytes.extend_from_slice(&t.0.to_be_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_check_ticket_node_signature_and_counts() {
        let secret = [7u8; 32];
        let node = Identity::generate();
        let other = Identity::generate();
        let ticket =
            TaskTicket::issue(&secret, TaskId(42), 3, "m", (16, PromptCount { tokens: 5, exact: true }), &node.address);
        let receipt = SignedReceipt::sign(&node, ticket.clone(), 5, &[1, 2, 3]);
        receipt.check(&secret, &node.address).unwrap();
        // Another node presenting it, or a ticket from another network: refused.
        assert!(matches!(receipt.check(&secret, &other.address), Err(ReceiptError::WrongNode { .. })));
        assert_eq!(receipt.check(&[8u8; 32], &node.address), Err(ReceiptError::ForgedTicket));
        // Signed by another key: refused.
        let forged = SignedReceipt::sign(&other, ticket.clone(), 5, &[1, 2, 3]);
        assert!(matches!(forged.check(&secret, &node.address), Err(ReceiptError::BadSignature(_))));
        // Any edit after signing breaks the signature; a ticket edit breaks the MAC.
        let mut edited = receipt.clone();
        edited.completion_tokens += 1;
        assert!(matches!(edited.check(&secret, &node.address), Err(ReceiptError::BadSignature(_))));
        let mut regamed = receipt.clone();
        regamed.ticket.game = 4;
        assert_eq!(regamed.check(&secret, &node.address), Err(ReceiptError::ForgedTicket));
        let long = SignedReceipt::sign(&node, ticket.clone(), 5, &[0; 17]);
        assert!(matches!(long.check(&secret, &node.address), Err(ReceiptError::TooManyTokens { .. })));
        // The prompt count is the server's: a signed receipt claiming more (or, for an exact
        // count, anything else) is refused.
        for claimed in [4, 6, 10_000_000] {
            let inflated = SignedReceipt::sign(&node, ticket.clone(), claimed, &[1]);
            let refused = inflated.check(&secret, &node.address);
            assert_eq!(refused, Err(ReceiptError::PromptTokens { claimed, counted: 5 }));
        }
        let bound = PromptCount { tokens: 40, exact: false };
        let ticket = TaskTicket::issue(&secret, TaskId(43), 3, "m", (16, bound), &node.address);
        SignedReceipt::sign(&node, ticket.clone(), 12, &[1]).check(&secret, &node.address).unwrap();
        assert!(SignedReceipt::sign(&node, ticket.clone(), 41, &[1]).check(&secret, &node.address).is_err());
        // A continuation after 3 tokens of another node: its own work is the rest.
        let continued = ticket.continuing(&secret, 3);
        let receipt = SignedReceipt::sign(&node, continued.clone(), 12, &[1, 2, 3, 4, 5]);
        receipt.check(&secret, &node.address).unwrap();
        assert_eq!(continued.own_tokens(receipt.completion_tokens), 2);
        let short = SignedReceipt::sign(&node, continued, 12, &[1, 2]);
        assert!(matches!(short.check(&secret, &node.address), Err(ReceiptError::Malformed(_))));
    }

    #[test]
    fn signed_bytes_read_back_into_the_same_receipt_and_nothing_else_does() {
        let secret = [7u8; 32];
        let node = Identity::generate();
        let count = PromptCount { tokens: 9, exact: true };
        let ticket = TaskTicket::issue(&secret, TaskId(u64::MAX - 3), -2, "smöl", (64, count), &node.address)
            .continuing(&secret, 2);
        let receipt = SignedReceipt::sign(&node, ticket, 9, &[5, 6, 7]);
        let bytes = receipt.signed_bytes();
        let back = SignedReceipt::from_signed_bytes(&bytes, &receipt.signature).unwrap();
        assert_eq!(back, receipt);
        assert_eq!(back.hash(), receipt.hash());
        assert!(back.signed_by(&node.address));
        assert!(!back.signed_by(&Identity::generate().address));
        back.check(&secret, &node.address).unwrap();
        // Cut short, one byte more, or a flag that is not 0/1: refused, never misread.
        for cut in [0, 10, bytes.len() - 1] {
            assert!(SignedReceipt::from_signed_bytes(&bytes[..cut], "").is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SignedReceipt::from_signed_bytes(&longer, "").is_err());
        let mut domain = bytes.clone();
        domain[0] ^= 1;
        assert!(SignedReceipt::from_signed_bytes(&domain, "").is_err());
        // An edited field reads back as another receipt, whose signature no longer holds.
        let mut edited = bytes.clone();
        let at = bytes.len() - 64 - 1;
        edited[at] ^= 1;
        let forged = SignedReceipt::from_signed_bytes(&edited, &receipt.signature).unwrap();
        assert_ne!(forged.completion_tokens, receipt.completion_tokens);
        assert!(!forged.signed_by(&node.address));
    }
}
