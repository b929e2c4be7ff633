//! The handshake transcript both sides sign (DESIGN.md §4), and sealing of messages over
//! an established [`Session`]. Binding both X25519 keys, the nonce, the session id and
//! the node's address into one transcript means a signature cannot be replayed into
//! another session and a man in the middle cannot swap keys.

use serde::{de::DeserializeOwned, Serialize};

use super::frame::{decode_sealed, encode_sealed, FrameError};
use crate::crypto::identity::Address;
use crate::crypto::session::{Opener, Sealer};

const NODE_DOMAIN: &[u8] = b"ludus/v1 node auth";
const DISTRIBUTOR_DOMAIN: &[u8] = b"ludus/v1 distributor challenge";

/// The bytes both sides commit to.
pub fn transcript(
    session_id: u64,
    nonce: &[u8; 32],
    node_x25519: &[u8; 32],
    distributor_x25519: &[u8; 32],
    node: &Address,
) -> Vec<u8> {
    [&session_id.to_le_bytes()[..], nonce, node_x25519, distributor_x25519, &node.0].concat()
}

/// What the node signs.
pub fn node_auth_message(transcript: &[u8]) -> Vec<u8> {
    [NODE_DOMAIN, transcript].concat()
}

/// What the distributor signs.
pub fn distributor_challenge_message(transcript: &[u8]) -> Vec<u8> {
    [DISTRIBUTOR_DOMAIN, transcript].concat()
}

/// Parses a 32-byte hex value.
pub fn hex32(s: &str) -> Result<[u8; 32], FrameError> {
    hex::decode(s)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| FrameError::Malformed("expected 32 bytes of hex".into()))
}

/// Seals one message into a frame.
pub fn seal_message<T: Serialize>(sealer: &mut Sealer, message: &T) -> Vec<u8> {
    let plain = serde_json::to_vec(message).expect("protocol messages always serialize");
    let (seq, ciphertext) = sealer.seal(&plain);
    encode_sealed(seq, &ciphertext)
}

/// Opens one sealed frame into a message.
pub fn open_message<T: DeserializeOwned>(opener: &mut Opener, frame: &[u8]) -> Result<T, FrameError> {
    let (seq, ciphertext) = decode_sealed(frame)?;
    let plain = opener.open(seq, ciphertext)?;
    serde_json::from_slice(&plain).map_err(|e| FrameError::Malformed(format!("sealed message: {e}")))
}
