//! `LedgerError`: why the registry's store could not do something, with what to do next.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LedgerError {
    /// The database could not be reached or a statement failed; retrying may help.
    #[error("database: {0}")]
    Database(String),
    /// The private Postgres cluster could not be created or started.
    #[error("private Postgres cluster: {0}")]
    Cluster(String),
    #[error("a game named `{0}` already exists")]
    GameExists(String),
    #[error("invalid game name `{0}`: use 1-64 letters, digits, '-' or '_'")]
    BadGameName(String),
    #[error("no game named `{0}` (`ludus games list` shows them)")]
    NoSuchGame(String),
    #[error("`{0}` is not a wallet address: give 0x followed by 40 hex digits")]
    BadWallet(String),
    #[error("the wallet {0} already belongs to another game")]
    WalletTaken(String),
    #[error("`{0}` is an internal game (the operator's own tasks): it takes no API key")]
    InternalGame(String),
    #[error("`{0}` names no key: give the key itself, or 8 to 64 hex digits of its id (`ludus games keys NAME`)")]
    BadKeyId(String),
    #[error("game `{game}` has no key with id {id} (`ludus games keys {game}` lists them)")]
    NoSuchKey { game: String, id: String },
    #[error("{count} keys have an id starting with {id}: give more of its digits")]
    AmbiguousKey { id: String, count: usize },
    #[error("key {id} was revoked already, at {at}")]
    KeyRevoked { id: String, at: String },
    #[error("bad data in the database: {0}")]
    Corrupt(String),
}

impl From<tokio_postgres::Error> for LedgerError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's message (with detail) is more useful than the driver's summary.
        match e.as_db_error() {
            Some(db) => LedgerError::Database(format!(
                "{}{}",
                db.message(),
                db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
            )),
            None => LedgerError::Database(e.to_string()),
        }
    }
}
