//! Sealed sessions (DESIGN.md §4): X25519 ephemeral key agreement, HKDF-SHA256 (salted
//! with the distributor's handshake nonce) into two AES-256-GCM-SIV keys — one per
//! direction — and frames sealed with AAD = (session id, direction, sequence number).
//! Sequence numbers strictly increase, so replayed, reordered or cross-session frames fail.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use super::error::CryptoError;

/// Bytes AES-GCM-SIV adds to every sealed frame.
pub const TAG_BYTES: usize = 16;
const HKDF_INFO: &[u8] = b"ludus/v1 session keys";

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToNode = 0,
    ToDistributor = 1,
}

/// Which end of the link we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Node,
    Distributor,
}

/// HKDF-SHA256 extract-and-expand (RFC 5869).
pub fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    Hkdf::<Sha256>::new(Some(salt), ikm).expand(info, &mut out).expect("HKDF output length is at most 255 hashes");
    out
}

/// AES-256-GCM-SIV seal (RFC 8452): ciphertext followed by the 16-byte tag.
pub fn aes256gcmsiv_seal(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    Aes256GcmSiv::new(key.into())
        .encrypt(Nonce::from_slice(nonce), Payload { msg: plaintext, aad })
        .expect("AES-GCM-SIV encryption of in-memory data cannot fail")
}

/// AES-256-GCM-SIV open; fails on any tampering.
pub fn aes256gcmsiv_open(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < TAG_BYTES {
        return Err(CryptoError::Truncated(sealed.len()));
    }
    Aes256GcmSiv::new(key.into())
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .map_err(|_| CryptoError::Unauthentic)
}

/// One side's ephemeral X25519 key for a handshake.
pub struct KeyExchange {
    secret: StaticSecret,
    pub public: [u8; 32],
}

impl Default for KeyExchange {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyExchange {
    pub fn new() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    /// Derives the session from the peer's public key. `nonce` is the distributor's
    /// challenge; both public keys enter the HKDF info, so a man in the middle who swaps
    /// either key derives different keys.
    pub fn finish(
        self,
        role: Role,
        peer_public: &[u8; 32],
        nonce: &[u8],
        session_id: u64,
    ) -> Result<Session, CryptoError> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return Err(CryptoError::InvalidKey("the peer's X25519 key is a low-order point".into()));
        }
        let (node_pub, dist_pub) = match role {
            Role::Node => (self.public, *peer_public),
            Role::Distributor => (*peer_public, self.public),
        };
        let info = [HKDF_INFO, &node_pub, &dist_pub].concat();
        let okm = hkdf_sha256(nonce, shared.as_bytes(), &info, 64);
        let to_node: [u8; 32] = okm[..32].try_into().expect("64-byte output");
        let to_distributor: [u8; 32] = okm[32..].try_into().expect("64-byte output");
        let (seal_key, seal_dir, open_key, open_dir) = match role {
            Role::Node => (to_distributor, Direction::ToDistributor, to_node, Direction::ToNode),
            Role::Distributor => (to_node, Direction::ToNode, to_distributor, Direction::ToDistributor),
        };
        Ok(Session {
            sealer: Sealer { key: seal_key, session_id, direction: seal_dir, next_seq: 1 },
            opener: Opener { key: open_key, session_id, direction: open_dir, last_seq: 0 },
        })
    }
}

fn nonce_for(seq: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&seq.to_le_bytes());
    nonce
}

fn aad_for(session_id: u64, direction: Direction, seq: u64) -> [u8; 17] {
    let mut aad = [0u8; 17];
    aad[..8].copy_from_slice(&session_id.to_le_bytes());
    aad[8] = direction as u8;
    aad[9..].copy_from_slice(&seq.to_le_bytes());
    aad
}

/// Seals outgoing frames.
pub struct Sealer {
    key: [u8; 32],
    session_id: u64,
    direction: Direction,
    next_seq: u64,
}

impl Sealer {
    /// Seals one frame; returns its sequence number and ciphertext.
    pub fn seal(&mut self, plaintext: &[u8]) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let sealed =
            aes256gcmsiv_seal(&self.key, &nonce_for(seq), &aad_for(self.session_id, self.direction, seq), plaintext);
        (seq, sealed)
    }
}

/// Opens incoming frames, accepting only strictly increasing sequence numbers.
pub struct Opener {
    key: [u8; 32],
    session_id: u64,
    direction: Direction,
    last_seq: u64,
}

impl Opener {
    pub fn open(&mut self, seq: u64, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if seq <= self.last_seq {
            return Err(CryptoError::Replay { got: seq, last: self.last_seq });
        }
        let plain =
            aes256gcmsiv_open(&self.key, &nonce_for(seq), &aad_for(self.session_id, self.direction, seq), sealed)?;
        self.last_seq = seq;
        Ok(plain)
    }
}

/// Both directions of an established session.
pub struct Session {
    pub sealer: Sealer,
    pub opener: Opener,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 5869, test case 1 (SHA-256).
    #[test]
    fn hkdf_matches_rfc5869() {
        let okm = hkdf_sha256(&hex("000102030405060708090a0b0c"), &[0x0b; 22], &hex("f0f1f2f3f4f5f6f7f8f9"), 42);
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    /// RFC 8452, appendix C.2 (AES-256-GCM-SIV): the first two vectors.
    #[test]
    fn aes_gcm_siv_matches_rfc8452() {
        let mut key = [0u8; 32];
        key[0] = 1;
        let mut nonce = [0u8; 12];
        nonce[0] = 3;
        assert_eq!(hex::encode(aes256gcmsiv_seal(&key, &nonce, b"", b"")), "07f5f4169bbf55a8400cd47ea6fd400f");
        let plain = hex("0100000000000000");
        let sealed = aes256gcmsiv_seal(&key, &nonce, b"", &plain);
        assert_eq!(hex::encode(&sealed), "c2ef328e5c71c83b843122130f7364b761e0b97427e3df28");
        assert_eq!(aes256gcmsiv_open(&key, &nonce, b"", &sealed).unwrap(), plain);
    }

    fn pair(session_id: u64) -> (Session, Session) {
        let node = KeyExchange::new();
        let dist = KeyExchange::new();
        let (np, dp) = (node.public, dist.public);
        let nonce = b"challenge nonce";
        (
            node.finish(Role::Node, &dp, nonce, session_id).unwrap(),
            dist.finish(Role::Distributor, &np, nonce, session_id).unwrap(),
        )
    }

    #[test]
    fn both_ends_agree_and_frames_round_trip_each_way() {
        let (mut node, mut dist) = pair(7);
        let (seq, sealed) = dist.sealer.seal(b"prompt: hello");
        assert!(!sealed.windows(5).any(|w| w == b"hello"), "ciphertext must not contain the plaintext");
        assert_eq!(node.opener.open(seq, &sealed).unwrap(), b"prompt: hello");
        let (seq, sealed) = node.sealer.seal(b"token");
        assert_eq!(dist.opener.open(seq, &sealed).unwrap(), b"token");
    }

    #[test]
    fn replayed_reordered_tampered_truncated_and_foreign_frames_are_rejected() {
        let (mut node, mut dist) = pair(1);
        let (s1, f1) = dist.sealer.seal(b"one");
        let (s2, f2) = dist.sealer.seal(b"two");
        assert!(node.opener.open(s2, &f2).is_ok());
        assert!(matches!(node.opener.open(s1, &f1), Err(CryptoError::Replay { .. })), "reordered");
        assert!(matches!(node.opener.open(s2, &f2), Err(CryptoError::Replay { .. })), "replayed");
        let (s3, mut f3) = dist.sealer.seal(b"three");
        f3[0] ^= 1;
        assert_eq!(node.opener.open(s3, &f3), Err(CryptoError::Unauthentic), "tampered");
        assert_eq!(node.opener.open(s3 + 1, &f3[..10]), Err(CryptoError::Truncated(10)));
        // A frame with a forged (higher) sequence number fails: the seq is in nonce and AAD.
        let (s4, f4) = dist.sealer.seal(b"four");
        assert_eq!(node.opener.open(s4 + 5, &f4), Err(CryptoError::Unauthentic));
        // A frame from another session (different keys and id) never opens here.
        let (_, mut other_dist) = pair(2);
        let (s, f) = other_dist.sealer.seal(b"x");
        assert!(node.opener.open(s + 100, &f).is_err());
        // Our own sealed frame sent back to us (reflection) fails: directions differ.
        let (s, f) = node.sealer.seal(b"reflect");
        assert!(node.opener.open(s + 200, &f).is_err());
    }

    #[test]
    fn a_low_order_peer_key_is_refused() {
        let zero = [0u8; 32];
        assert!(KeyExchange::new().finish(Role::Node, &zero, b"n", 1).is_err());
    }
}
