//! Node and distributor identities: secp256k1 keys (Ethereum's curve), stored as hex in
//! files created with mode 0600. The address is the last 20 bytes of Keccak-256 of the
//! uncompressed public key, so it is also where on-chain payouts go.

use std::path::Path;

use k256::ecdsa::{RecoveryId, Signature, SigningKey, VerifyingKey};
use rand::RngCore;
use sha3::{Digest, Keccak256};

use super::error::CryptoError;

/// A 20-byte Ethereum address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 20]);

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

impl std::str::FromStr for Address {
    type Err = CryptoError;
    fn from_str(s: &str) -> Result<Self, CryptoError> {
        let hex_part = s.strip_prefix("0x").unwrap_or(s);
        let bytes = hex::decode(hex_part).map_err(|e| CryptoError::InvalidKey(format!("address `{s}`: {e}")))?;
        let array: [u8; 20] =
            bytes.try_into().map_err(|_| CryptoError::InvalidKey(format!("address `{s}` is not 20 bytes")))?;
        Ok(Self(array))
    }
}

/// A secp256k1 signing key and its address.
pub struct Identity {
    key: SigningKey,
    pub address: Address,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("Identity").field("address", &self.address.to_string()).finish_non_exhaustive()
    }
}

/// The address of a public key.
pub fn address_of(key: &VerifyingKey) -> Address {
    let point = key.to_encoded_point(false);
    let hash = Keccak256::digest(&point.as_bytes()[1..]);
    let mut out = [0u8; 20];
    out.copy_from_slice(&hash[12..]);
    Address(out)
}

/// Keccak-256 of `message` (what signatures are made over).
pub fn keccak(message: &[u8]) -> [u8; 32] {
    Keccak256::digest(message).into()
}

impl Identity {
    /// A fresh random key.
    pub fn generate() -> Self {
        loop {
            let mut secret = [0u8; 32];
            rand::rng().fill_bytes(&mut secret);
            if let Ok(identity) = Self::from_secret(&secret) {
                return identity;
            }
        }
    }

    pub fn from_secret(secret: &[u8]) -> Result<Self, CryptoError> {
        let key = SigningKey::from_slice(secret).map_err(|e| CryptoError::InvalidKey(e.to_string()))?;
        let address = address_of(key.verifying_key());
        Ok(Self { key, address })
    }

    /// The secp256k1 key itself, for signers that need it (chain transactions).
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Loads a hex key file.
    pub fn load(path: &Path) -> Result<Self, CryptoError> {
        let err = |reason: String| CryptoError::KeyFile { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let secret = hex::decode(text.trim().trim_start_matches("0x")).map_err(|e| err(format!("not hex: {e}")))?;
        Self::from_secret(&secret).map_err(|e| err(e.to_string()))
    }

    /// Writes a new key file (mode 0600, never overwriting) and returns the identity.
    pub fn create(path: &Path) -> Result<Self, CryptoError> {
        use std::io::Write;
        let identity = Self::generate();
        let err = |reason: String| CryptoError::KeyFile { path: path.display().to_string(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|e| err(e.to_string()))?;
        file.write_all(format!("{}\n", hex::encode(identity.key.to_bytes())).as_bytes())
            .map_err(|e| err(e.to_string()))?;
        Ok(identity)
    }

    /// Loads `path`, creating it when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, CryptoError> {
        if path.exists() {
            Self::load(path)
        } else {
            Self::create(path)
        }
    }

    /// A 65-byte recoverable signature (r, s, v) over Keccak-256 of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 65] {
        let digest = keccak(message);
        let (signature, recovery) =
            self.key.sign_prehash_recoverable(&digest).expect("signing a 32-byte prehash cannot fail");
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&signature.to_bytes());
        out[64] = recovery.to_byte();
        out
    }
}

/// Recovers the signer's address of a signature made by [`Identity::sign`].
pub fn recover(message: &[u8], signature: &[u8]) -> Result<Address, CryptoError> {
    if signature.len() != 65 {
        return Err(CryptoError::BadSignature(format!("{} bytes, expected 65", signature.len())));
    }
    let sig = Signature::from_slice(&signature[..64]).map_err(|e| CryptoError::BadSignature(e.to_string()))?;
    let recovery =
        RecoveryId::from_byte(signature[64]).ok_or_else(|| CryptoError::BadSignature("bad recovery id".into()))?;
    let key = VerifyingKey::recover_from_prehash(&keccak(message), &sig, recovery)
        .map_err(|e| CryptoError::BadSignature(e.to_string()))?;
    Ok(address_of(&key))
}

/// Checks that `signature` over `message` was made by `claimed`.
pub fn verify(message: &[u8], signature: &[u8], claimed: &Address) -> Result<(), CryptoError> {
    let recovered = recover(message, signature)?;
    if &recovered != claimed {
        return Err(CryptoError::WrongSigner { claimed: claimed.to_string(), recovered: recovered.to_string() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_of_a_known_key_matches_ethereum() {
        // Private key 1: its address is the well-known 0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf.
        let mut secret = [0u8; 32];
        secret[31] = 1;
        let id = Identity::from_secret(&secret).unwrap();
        assert_eq!(id.address.to_string(), "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf");
    }

    #[test]
    fn signatures_recover_their_signer_and_reject_others() {
        let a = Identity::generate();
        let b = Identity::generate();
        let sig = a.sign(b"nonce and keys");
        assert_eq!(recover(b"nonce and keys", &sig).unwrap(), a.address);
        assert!(verify(b"nonce and keys", &sig, &a.address).is_ok());
        assert!(matches!(verify(b"nonce and keys", &sig, &b.address), Err(CryptoError::WrongSigner { .. })));
        assert!(matches!(
            verify(b"other message", &sig, &a.address),
            Err(CryptoError::WrongSigner { .. }) | Err(CryptoError::BadSignature(_))
        ));
        assert!(recover(b"x", &sig[..64]).is_err());
    }

    #[test]
    fn key_files_are_private_and_reload_to_the_same_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let created = Identity::create(&path).unwrap();
        assert!(Identity::create(&path).is_err(), "never overwrite a key");
        assert_eq!(Identity::load(&path).unwrap().address, created.address);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(!format!("{created:?}").contains(&hex::encode(created.key.to_bytes())));
        std::fs::write(dir.path().join("bad.key"), "nothex").unwrap();
        assert!(matches!(Identity::load(&dir.path().join("bad.key")), Err(CryptoError::KeyFile { .. })));
    }
}
