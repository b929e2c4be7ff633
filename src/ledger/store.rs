//! `Store`: the registry's Postgres database. Opening it connects the pool and applies
//! the migrations; the operations live next to their tables in [`super::games`],
//! [`super::receipts`] and [`super::reports`].

use rand::RngCore;

use super::error::LedgerError;
use super::migrate::migrate;
use super::pool::{Conn, Pool};

/// The shared registry database.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Connects to `url` (pool of `pool_size`) and brings the schema up to date.
    pub async fn open(url: &str, pool_size: usize) -> Result<Self, LedgerError> {
        let store = Store { pool: Pool::new(url, pool_size) };
        let mut conn = store.conn().await?;
        migrate(&mut conn).await?;
        Ok(store)
    }

    pub async fn conn(&self) -> Result<Conn, LedgerError> {
        self.pool.get().await
    }

    /// A connection outside the pool, for session state such as an advisory lock held
    /// for as long as the connection lives.
    pub async fn dedicated_conn(&self) -> Result<Conn, LedgerError> {
        Pool::new(self.pool.url(), 1).get().await
    }

    /// A 32-byte secret shared by every server on this database (created by the first),
    /// e.g. the key that authenticates task tickets.
    pub async fn shared_secret(&self, name: &str) -> Result<[u8; 32], LedgerError> {
        let conn = self.conn().await?;
        let mut fresh = [0u8; 32];
        rand::rng().fill_bytes(&mut fresh);
        conn.execute(
            "INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&name, &fresh.as_slice()],
        )
        .await?;
        let value: Vec<u8> = conn.query_one("SELECT value FROM server_secrets WHERE name = $1", &[&name]).await?.get(0);
        value.try_into().map_err(|_| LedgerError::Corrupt(format!("server secret `{name}` is not 32 bytes")))
    }
}
