//! Why a node's link to its distributor failed or ended ([`LinkError`]). The agent logs
//! it and reconnects; nothing here is the game's business.

/// A failure of the node link: joining, talking, or keeping it.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The websocket could not be opened.
    #[error("connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The distributor said goodbye (a refusal at the handshake, or later).
    #[error("refused: {0}")]
    Refused(String),
    /// The distributor is not who the node trusts, or could not prove who it is.
    #[error("{0}")]
    Untrusted(String),
    /// A frame that is malformed, unreadable, or not the one expected now.
    #[error("{0}")]
    Protocol(String),
    /// The connection dropped or the websocket failed.
    #[error("{0}")]
    Closed(String),
    /// The distributor did not answer in time.
    #[error("no answer within the timeout")]
    Timeout,
    /// Something on the node's side: its receipt log, its protected model.
    #[error("{0}")]
    Local(String),
}
