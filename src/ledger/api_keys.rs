//! A game's API keys past the first: a game may hold several at once, so a key is rotated
//! without downtime (add the new one, deploy it, revoke the old) and a leaked one is
//! revoked at once. Only SHA-256 hashes are stored; a key is named by its id, the first
//! [`KEY_ID_LEN`] hex digits of its hash, which the game can compute from the key and the
//! operator reads in `ludus games keys`. Servers drop a revoked key within their key cache
//! time (`actors::gateway::KEY_CACHE_TTL`).

use rand::RngCore;

use super::error::LedgerError;
use super::games::hash_key;
use super::store::Store;

/// Hex digits of a key's hash that name it.
pub const KEY_ID_LEN: usize = 16;
/// Fewest hex digits of an id that name a key to revoke (within its game).
pub const MIN_KEY_ID_DIGITS: usize = 8;

/// A new random key: `ludus-` and 48 hex digits.
pub(super) fn new_key() -> String {
    let mut secret = [0u8; 24];
    rand::rng().fill_bytes(&mut secret);
    format!("ludus-{}", hex::encode(secret))
}

/// The id that names the key whose hash is `hash`.
pub fn key_id(hash: &str) -> &str {
    hash.get(..KEY_ID_LEN).unwrap_or(hash)
}

/// One of a game's keys, as `ludus games keys` lists it (never the key).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeySummary {
    pub id: String,
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    /// UTC, RFC 3339.
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// A key revoked, and how many keys its game still holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Revoked {
    pub id: String,
    pub active_left: i64,
}

/// How a key to revoke is named: the key itself, or 8 to 64 hex digits of its hash.
fn hash_prefix(key_or_id: &str) -> Result<String, LedgerError> {
    let given = key_or_id.trim();
    if given.starts_with("ludus-") {
        return Ok(hash_key(given));
    }
    let id = given.to_ascii_lowercase();
    let hex = id.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex || id.len() < MIN_KEY_ID_DIGITS || id.len() > 64 {
        return Err(LedgerError::BadKeyId(given.chars().take(80).collect()));
    }
    Ok(id)
}

const RFC3339_UTC: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS"Z"'"#;

impl Store {
    /// Adds a key to game `name` with its own limits; returns the key (shown once) and its
    /// id. An internal game (the operator's own tasks) takes no key.
    pub async fn add_key(&self, name: &str, rpm: u32, tpm: u32) -> Result<(String, String), LedgerError> {
        let conn = self.conn().await?;
        let game = conn.query_opt("SELECT id, internal FROM games WHERE name = $1", &[&name]).await?;
        let Some(game) = game else { return Err(LedgerError::NoSuchGame(name.to_string())) };
        if game.get::<_, bool>(1) {
            return Err(LedgerError::InternalGame(name.to_string()));
        }
        let (key, id): (String, i64) = (new_key(), game.get(0));
        let hash = hash_key(&key);
        let limit = |v: u32| v.min(i32::MAX as u32) as i32;
        conn.execute(
            "INSERT INTO api_keys (hash, game_id, requests_per_minute, tokens_per_minute) VALUES ($1, $2, $3, $4)",
            &[&hash, &id, &limit(rpm), &limit(tpm)],
        )
        .await?;
        Ok((key, key_id(&hash).to_string()))
    }

    /// Game `name`'s keys, oldest first, revoked ones included.
    pub async fn list_keys(&self, name: &str) -> Result<Vec<KeySummary>, LedgerError> {
        let conn = self.conn().await?;
        let game = conn.query_opt("SELECT id FROM games WHERE name = $1", &[&name]).await?;
        let Some(game) = game else { return Err(LedgerError::NoSuchGame(name.to_string())) };
        let sql = format!(
            "SELECT hash, requests_per_minute, tokens_per_minute,
                    to_char(created_at AT TIME ZONE 'UTC', {RFC3339_UTC}),
                    to_char(revoked_at AT TIME ZONE 'UTC', {RFC3339_UTC})
             FROM api_keys WHERE game_id = $1 ORDER BY created_at, hash"
        );
        let rows = conn.query(&sql, &[&game.get::<_, i64>(0)]).await?;
        Ok(rows
            .iter()
            .map(|r| KeySummary {
                id: key_id(r.get(0)).to_string(),
                requests_per_minute: r.get::<_, i32>(1).max(0) as u32,
                tokens_per_minute: r.get::<_, i32>(2).max(0) as u32,
                created_at: r.get(3),
                revoked_at: r.get(4),
            })
            .collect())
    }

    /// Revokes game `name`'s key named by `key_or_id` (the key, or at least
    /// [`MIN_KEY_ID_DIGITS`] hex digits of its id): refused when no key of that game
    /// matches, when several do, or when it is revoked already.
    pub async fn revoke_key(&self, name: &str, key_or_id: &str) -> Result<Revoked, LedgerError> {
        let prefix = hash_prefix(key_or_id)?;
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let game = tx.query_opt("SELECT id FROM games WHERE name = $1", &[&name]).await?;
        let Some(game) = game else { return Err(LedgerError::NoSuchGame(name.to_string())) };
        let game: i64 = game.get(0);
        // Locked: two revocations of one key cannot both succeed.
        let sql = format!(
            "SELECT hash, to_char(revoked_at AT TIME ZONE 'UTC', {RFC3339_UTC}) FROM api_keys
             WHERE game_id = $1 AND left(hash, $3) = $2 FOR UPDATE"
        );
        let matches = tx.query(&sql, &[&game, &prefix, &(prefix.len() as i32)]).await?;
        let shown = || key_id(&prefix).to_string();
        let (hash, revoked_at): (String, Option<String>) = match matches.as_slice() {
            [] => return Err(LedgerError::NoSuchKey { game: name.to_string(), id: shown() }),
            [one] => (one.get(0), one.get(1)),
            many => return Err(LedgerError::AmbiguousKey { id: shown(), count: many.len() }),
        };
        if let Some(at) = revoked_at {
            return Err(LedgerError::KeyRevoked { id: key_id(&hash).to_string(), at });
        }
        tx.execute("UPDATE api_keys SET revoked_at = now() WHERE hash = $1", &[&hash]).await?;
        let left = tx
            .query_one("SELECT count(*) FROM api_keys WHERE game_id = $1 AND revoked_at IS NULL", &[&game])
            .await?
            .get(0);
        tx.commit().await?;
        Ok(Revoked { id: key_id(&hash).to_string(), active_left: left })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_named_by_its_id_or_itself_and_bad_names_are_refused() {
        let key = new_key();
        assert!(key.starts_with("ludus-") && key.len() == 6 + 48, "{key}");
        assert_ne!(key, new_key(), "random");
        let hash = hash_key(&key);
        assert_eq!(key_id(&hash).len(), KEY_ID_LEN);
        assert_eq!(hash_prefix(&key).unwrap(), hash, "the key itself names its whole hash");
        assert_eq!(hash_prefix(&key_id(&hash).to_ascii_uppercase()).unwrap(), key_id(&hash), "case does not matter");
        assert_eq!(hash_prefix(&hash[..MIN_KEY_ID_DIGITS]).unwrap(), &hash[..MIN_KEY_ID_DIGITS]);
        for bad in ["", "abc", &hash[..MIN_KEY_ID_DIGITS - 1], "zzzzzzzzzz", "12345678%", &"a".repeat(65)] {
            assert!(matches!(hash_prefix(bad), Err(LedgerError::BadKeyId(_))), "{bad:?} must be refused");
        }
    }
}
