//! The node's key file and payout address. Until secp256k1 identities land (issue 4),
//! the key file holds 32 random bytes (hex) and the address is the first 20 bytes of
//! their SHA-256 — stable across restarts, written with mode 0600.

use std::path::Path;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Loads the key at `path`, creating it when missing; returns the 0x address.
pub fn load_or_create(path: &Path) -> anyhow::Result<String> {
    let secret = match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes =
                hex::decode(text.trim()).map_err(|e| anyhow::anyhow!("{}: not a hex key: {e}", path.display()))?;
            anyhow::ensure!(bytes.len() == 32, "{}: a key is 32 bytes, this one has {}", path.display(), bytes.len());
            bytes
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = vec![0u8; 32];
            rand::rng().fill_bytes(&mut secret);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            write_private(path, &hex::encode(&secret))?;
            tracing::info!(path = %path.display(), "created a new node key");
            secret
        }
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    Ok(format!("0x{}", hex::encode(&Sha256::digest(&secret)[..20])))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_address_is_stable_and_the_file_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let a = super::load_or_create(&path).unwrap();
        let b = super::load_or_create(&path).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 42);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(dir.path().join("bad.key"), "zz").unwrap();
        assert!(super::load_or_create(&dir.path().join("bad.key")).is_err());
    }
}
