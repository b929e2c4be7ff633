//! Framing: every websocket message is one binary frame `[version: u8][JSON body]`.
//! The size limit is checked before anything is decoded.

use serde::{de::DeserializeOwned, Serialize};

/// Version of the node link protocol.
pub const PROTOCOL_VERSION: u8 = 3;
/// Largest accepted frame (a task with a long conversation fits comfortably).
pub const MAX_FRAME_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("protocol version {0} is not supported (this side speaks {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A sealed frame that does not open: another key, a replayed or reordered sequence
    /// number, tampered bytes.
    #[error("the sealed frame does not open: {0}")]
    Unsealed(#[from] crate::crypto::CryptoError),
}

/// Marker byte after the version that says "sealed" (a JSON body starts with `{`).
const SEALED: u8 = 0;
/// Version + marker + sequence number.
const SEALED_HEADER: usize = 10;

/// A sealed frame: `[version][0][seq: u64 LE][ciphertext]`.
pub fn encode_sealed(seq: u64, ciphertext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEALED_HEADER + ciphertext.len());
    out.push(PROTOCOL_VERSION);
    out.push(SEALED);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(ciphertext);
    out
}

/// Splits a sealed frame into its sequence number and ciphertext (checked before any
/// decryption is attempted).
pub fn decode_sealed(bytes: &[u8]) -> Result<(u64, &[u8]), FrameError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    let (&version, rest) = bytes.split_first().ok_or(FrameError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    if rest.first() != Some(&SEALED) || bytes.len() < SEALED_HEADER {
        return Err(FrameError::Malformed("expected a sealed frame".into()));
    }
    let seq = u64::from_le_bytes(bytes[2..SEALED_HEADER].try_into().expect("8 bytes"));
    Ok((seq, &bytes[SEALED_HEADER..]))
}

pub fn encode_frame<T: Serialize>(message: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(PROTOCOL_VERSION);
    serde_json::to_writer(&mut out, message).expect("protocol messages always serialize");
    out
}

pub fn decode_frame<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    let (&version, body) = bytes.split_first().ok_or(FrameError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{NodeMessage, TaskId};

    #[test]
    fn frames_round_trip_and_reject_bad_input() {
        let msg = NodeMessage::Token { id: TaskId(7), index: 3, token: 42, text: "hé".into(), logprobs: None };
        let bytes = encode_frame(&msg);
        assert_eq!(decode_frame::<NodeMessage>(&bytes).unwrap(), msg);
        let mut wrong = bytes.clone();
        wrong[0] = 9;
        assert_eq!(decode_frame::<NodeMessage>(&wrong), Err(FrameError::Version(9)));
        assert!(matches!(decode_frame::<NodeMessage>(&bytes[..bytes.len() - 2]), Err(FrameError::Malformed(_))));
        assert_eq!(decode_frame::<NodeMessage>(&[]), Err(FrameError::Empty));
        assert!(matches!(decode_frame::<NodeMessage>(&vec![1u8; MAX_FRAME_BYTES + 1]), Err(FrameError::TooLarge(_))));
    }
}
