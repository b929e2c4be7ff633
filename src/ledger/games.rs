//! Games and their API keys. Keys are random, shown once, and stored only as SHA-256
//! hashes; each belongs to one game and carries its own per-minute limits.

use sha2::{Digest, Sha256};

use super::error::LedgerError;
use super::store::Store;
use crate::books::Units;

/// Whether a game is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GameStatus {
    Active,
    /// Refused with 403 (or 402 when settlement found its escrow short) until resumed.
    Suspended,
    Removed,
}

impl GameStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GameStatus::Active => "active",
            GameStatus::Suspended => "suspended",
            GameStatus::Removed => "removed",
        }
    }

    pub(super) fn parse(s: &str) -> Result<Self, LedgerError> {
        match s {
            "active" => Ok(GameStatus::Active),
            "suspended" => Ok(GameStatus::Suspended),
            "removed" => Ok(GameStatus::Removed),
            other => Err(LedgerError::Corrupt(format!("game status `{other}`"))),
        }
    }
}

impl std::fmt::Display for GameStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who suspended a game.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendedBy {
    /// `ludus games suspend`: lifted only by `ludus games resume`.
    Operator,
    /// Settlement found its escrow short: lifted by settlement once it is covered.
    Escrow,
}

impl SuspendedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            SuspendedBy::Operator => "operator",
            SuspendedBy::Escrow => "escrow",
        }
    }

    pub(super) fn parse(s: Option<&str>) -> Result<Option<Self>, LedgerError> {
        match s {
            None => Ok(None),
            Some("operator") => Ok(Some(SuspendedBy::Operator)),
            Some("escrow") => Ok(Some(SuspendedBy::Escrow)),
            Some(other) => Err(LedgerError::Corrupt(format!("suspended by `{other}`"))),
        }
    }
}

/// What a presented key resolves to.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyInfo {
    pub game_id: i64,
    pub game: String,
    pub hash: String,
    pub status: GameStatus,
    pub status_reason: Option<String>,
    /// Who suspended it, when suspended.
    pub suspended_by: Option<SuspendedBy>,
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
}

/// A game as `ludus games list` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GameSummary {
    pub id: i64,
    pub name: String,
    pub status: GameStatus,
    /// Escrow settlement last saw on chain (available: less pending withdrawals).
    pub escrow: Units,
    pub keys: i64,
    /// Where the game keeps escrow on chain, `0x…` lower case.
    pub wallet: Option<String>,
    pub status_reason: Option<String>,
}

/// Parses an Ethereum address into the ledger's form (`0x` + 40 lower-case hex digits).
pub fn normalize_wallet(wallet: &str) -> Result<String, LedgerError> {
    let w = wallet.trim();
    let hex_part = w.strip_prefix("0x").or_else(|| w.strip_prefix("0X")).unwrap_or(w);
    if hex_part.len() != 40 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(LedgerError::BadWallet(wallet.to_string()));
    }
    Ok(format!("0x{}", hex_part.to_ascii_lowercase()))
}

/// SHA-256 of a key, hex.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn to_i32(v: u32) -> i32 {
    v.min(i32::MAX as u32) as i32
}

impl Store {
    /// Creates a game with one key; returns the game id and the key (shown once).
    pub async fn add_game(&self, name: &str, rpm: u32, tpm: u32) -> Result<(i64, String), LedgerError> {
        if !valid_name(name) {
            return Err(LedgerError::BadGameName(name.to_string()));
        }
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let row = tx
            .query_opt("INSERT INTO games (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id", &[&name])
            .await?;
        let Some(row) = row else { return Err(LedgerError::GameExists(name.to_string())) };
        let id: i64 = row.get(0);
        let key = super::api_keys::new_key();
        tx.execute(
            "INSERT INTO api_keys (hash, game_id, requests_per_minute, tokens_per_minute) VALUES ($1, $2, $3, $4)",
            &[&hash_key(&key), &id, &to_i32(rpm), &to_i32(tpm)],
        )
        .await?;
        tx.commit().await?;
        Ok((id, key))
    }

    /// The id of an internal game (created on first use, with no key): what the operator's
    /// own tasks, such as quality-check re-runs, are billed to.
    pub async fn internal_game(&self, name: &str) -> Result<i64, LedgerError> {
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO games (name, internal) VALUES ($1, true) ON CONFLICT (name) DO UPDATE SET internal = true",
            &[&name],
        )
        .await?;
        Ok(conn.query_one("SELECT id FROM games WHERE name = $1", &[&name]).await?.get(0))
    }

    /// Resolves a key hash (revoked keys resolve to nothing).
    pub async fn lookup_key(&self, hash: &str) -> Result<Option<KeyInfo>, LedgerError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT g.id, g.name, k.hash, g.status, g.status_reason, k.requests_per_minute, k.tokens_per_minute,
                        g.suspended_by
                 FROM api_keys k JOIN games g ON g.id = k.game_id
                 WHERE k.hash = $1 AND k.revoked_at IS NULL",
                &[&hash],
            )
            .await?;
        row.map(|r| {
            Ok(KeyInfo {
                game_id: r.get(0),
                game: r.get(1),
                hash: r.get(2),
                status: GameStatus::parse(r.get(3))?,
                status_reason: r.get(4),
                requests_per_minute: r.get::<_, i32>(5).max(0) as u32,
                tokens_per_minute: r.get::<_, i32>(6).max(0) as u32,
                suspended_by: SuspendedBy::parse(r.get(7))?,
            })
        })
        .transpose()
    }

    pub async fn list_games(&self) -> Result<Vec<GameSummary>, LedgerError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT g.id, g.name, g.status, g.escrow_units::text,
                        (SELECT count(*) FROM api_keys k WHERE k.game_id = g.id AND k.revoked_at IS NULL),
                        g.wallet, g.status_reason
                 FROM games g ORDER BY g.id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let escrow: String = r.get(3);
                Ok(GameSummary {
                    id: r.get(0),
                    name: r.get(1),
                    status: GameStatus::parse(r.get(2))?,
                    escrow: escrow.parse().map_err(|e| LedgerError::Corrupt(format!("escrow: {e}")))?,
                    keys: r.get(4),
                    wallet: r.get(5),
                    status_reason: r.get(6),
                })
            })
            .collect()
    }

    /// Suspends (with a reason) or reactivates a game by name, as the operator.
    pub async fn set_game_status(
        &self,
        name: &str,
        status: GameStatus,
        reason: Option<&str>,
    ) -> Result<(), LedgerError> {
        let conn = self.conn().await?;
        let by = (status != GameStatus::Active).then_some(SuspendedBy::Operator.as_str());
        let status = status.as_str();
        let n = conn
            .execute(
                "UPDATE games SET status = $2, status_reason = $3, suspended_by = $4 WHERE name = $1",
                &[&name, &status, &reason, &by],
            )
            .await?;
        if n == 0 {
            return Err(LedgerError::NoSuchGame(name.to_string()));
        }
        Ok(())
    }

    /// Sets the wallet a game keeps its escrow in (`ludus games add --wallet`,
    /// `ludus games set-wallet`). One wallet serves one game.
    pub async fn set_game_wallet(&self, name: &str, wallet: &str) -> Result<String, LedgerError> {
        let wallet = normalize_wallet(wallet)?;
        let conn = self.conn().await?;
        let n =
            conn.execute("UPDATE games SET wallet = $2 WHERE name = $1", &[&name, &wallet]).await.map_err(
                |e| match e.code() {
                    Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                        LedgerError::WalletTaken(wallet.clone())
                    }
                    _ => LedgerError::from(e),
                },
            )?;
        if n == 0 {
            return Err(LedgerError::NoSuchGame(name.to_string()));
        }
        Ok(wallet)
    }
}
