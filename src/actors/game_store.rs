//! Games and their API keys. Keys are stored only as SHA-256 hashes, each bound to one
//! game with its own per-minute limits. The store is a JSON file in the data directory,
//! written atomically (temp file + rename) and re-read when it changes on disk, so
//! `ludus games add` works while the server runs.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyRecord {
    pub hash: String,
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    pub created_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GameRecord {
    pub name: String,
    pub suspended: bool,
    pub keys: Vec<KeyRecord>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreFile {
    games: Vec<GameRecord>,
}

/// What a valid key resolves to.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyInfo {
    pub game: String,
    pub hash: String,
    pub suspended: bool,
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("game store {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("a game named `{0}` already exists")]
    Exists(String),
    #[error("invalid game name `{0}`: use 1-64 letters, digits, '-' or '_'")]
    BadName(String),
}

pub struct GameStore {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Vec<GameRecord>)>,
}

/// SHA-256 of a key, hex.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl GameStore {
    /// Opens (without creating) the store at `path`.
    pub fn open(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), cache: Mutex::new((None, Vec::new())) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io { path: self.path.clone(), message: e.to_string() }
    }

    fn read(&self) -> Result<Vec<GameRecord>, StoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(serde_json::from_slice::<StoreFile>(&bytes).map_err(|e| self.io(e))?.games),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.io(e)),
        }
    }

    fn write(&self, games: &[GameRecord]) -> Result<(), StoreError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&StoreFile { games: games.to_vec() }).map_err(|e| self.io(e))?;
        std::fs::write(&tmp, body).map_err(|e| self.io(e))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))
    }

    /// Creates a game with one key and returns the key (shown once, stored hashed).
    pub fn add_game(&self, name: &str, requests_per_minute: u32, tokens_per_minute: u32) -> Result<String, StoreError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(StoreError::BadName(name.to_string()));
        }
        let mut games = self.read()?;
        if games.iter().any(|g| g.name == name) {
            return Err(StoreError::Exists(name.to_string()));
        }
        let mut secret = [0u8; 24];
        rand::rng().fill_bytes(&mut secret);
        let key = format!("ludus-{}", hex::encode(secret));
        let created_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        games.push(GameRecord {
            name: name.to_string(),
            suspended: false,
            keys: vec![KeyRecord { hash: hash_key(&key), requests_per_minute, tokens_per_minute, created_unix }],
        });
        self.write(&games)?;
        Ok(key)
    }

    /// Resolves a presented key, re-reading the file when it changed.
    pub fn lookup(&self, key: &str) -> Result<Option<KeyInfo>, StoreError> {
        let hash = hash_key(key);
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut cache = self.cache.lock().map_err(|_| self.io("lock poisoned"))?;
        if cache.0 != modified || modified.is_none() {
            *cache = (modified, self.read()?);
        }
        Ok(cache.1.iter().find_map(|g| {
            g.keys.iter().find(|k| k.hash == hash).map(|k| KeyInfo {
                game: g.name.clone(),
                hash: k.hash.clone(),
                suspended: g.suspended,
                requests_per_minute: k.requests_per_minute,
                tokens_per_minute: k.tokens_per_minute,
            })
        }))
    }

    pub fn games(&self) -> Result<Vec<GameRecord>, StoreError> {
        self.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_hashed_and_resolve_to_their_game() {
        let dir = tempfile::tempdir().unwrap();
        let store = GameStore::open(dir.path().join("games.json"));
        let key = store.add_game("orc-wars", 60, 10_000).unwrap();
        let raw = std::fs::read_to_string(store.path()).unwrap();
        assert!(!raw.contains(&key), "the key itself is never written");
        let info = store.lookup(&key).unwrap().unwrap();
        assert_eq!((info.game.as_str(), info.requests_per_minute), ("orc-wars", 60));
        assert!(store.lookup("ludus-wrong").unwrap().is_none());
        assert!(matches!(store.add_game("orc-wars", 1, 1), Err(StoreError::Exists(_))));
        assert!(matches!(store.add_game("bad name!", 1, 1), Err(StoreError::BadName(_))));
        // A second store on the same file (another process) sees new games.
        let other = GameStore::open(dir.path().join("games.json"));
        let key2 = other.add_game("elf-farm", 1, 1).unwrap();
        assert_eq!(store.lookup(&key2).unwrap().unwrap().game, "elf-farm");
    }
}
