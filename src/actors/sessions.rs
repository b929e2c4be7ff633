//! One key, one session: on this server and across the network of servers.
//!
//! Quality re-runs, receipts, quarantine and the verification policy all count per node
//! key, so a key must never hold two slots at once. On one server, a newer session
//! replaces the older one (a node that reconnects before its old link timed out). With
//! `[cluster]`, every session that opens is claimed on NATS with the time it opened; a
//! server that holds the same key closes its own session when it is the older one, and
//! answers with its own claim when it is the newer, so the pair settles on one session
//! after a single exchange (both sides order claims the same way: time, then server name).
//!
//! **Times are a logical clock**: a session opens after every claim this server has heard
//! (Lamport), so a session that opens after another server's claim wins even when that
//! server's wall clock runs ahead. A claim from further than [`FUTURE_ALLOWANCE_MS`] ahead
//! counts as that far ahead, so no claim can push the clock arbitrarily far.
//!
//! Claims made while NATS is down are not heard: every live session is claimed again
//! when this server joins the network, when its NATS link comes back, and when the
//! Cluster actor restarts, so a key that held one session on each side of a split is
//! back to one within an exchange of the link returning.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use actix::{Addr, Recipient};

use super::cluster::Outbound;
use super::messages::Disconnect;
use super::node_proxy::NodeProxy;
use crate::crypto::identity::Address;

/// A live session of one node key.
#[derive(Clone)]
struct Session {
    proxy: Addr<NodeProxy>,
    /// When it opened (milliseconds since the Unix epoch): the newest session wins.
    since_ms: u64,
}

/// How far ahead of this server's clock another server's claim may count (10 minutes:
/// clocks kept by NTP are well within it).
pub const FUTURE_ALLOWANCE_MS: u64 = 600_000;

/// The live session of each node key on this server.
#[derive(Default)]
pub struct Sessions {
    table: Mutex<HashMap<Address, Session>>,
    /// The Cluster actor, when this server is part of a network.
    network: OnceLock<Recipient<Outbound>>,
    /// The latest time this server has given a session or heard in a claim.
    clock: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("live", &self.table().len()).finish()
    }
}

impl Sessions {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn table(&self) -> MutexGuard<'_, HashMap<Address, Session>> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Connects the Cluster actor (once): from then on every session is claimed
    /// network-wide, those already open included.
    pub fn join(&self, cluster: Recipient<Outbound>) {
        let _ = self.network.set(cluster);
        self.claim_all();
    }

    /// Claims every live session again (after the link to the other servers was down, or
    /// the Cluster actor restarted: claims made meanwhile may not have been heard).
    pub fn claim_all(&self) {
        let Some(network) = self.network.get() else { return };
        let live: Vec<(Address, u64)> = self.table().iter().map(|(a, s)| (*a, s.since_ms)).collect();
        for (address, since_ms) in live {
            network.do_send(Outbound::Claim { address, since_ms });
        }
    }

    /// A time after every session opened and every claim heard here.
    fn tick(&self) -> u64 {
        let now = now_ms();
        let mut seen = self.clock.load(Ordering::Relaxed);
        loop {
            let t = now.max(seen.saturating_add(1));
            match self.clock.compare_exchange_weak(seen, t, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return t,
                Err(current) => seen = current,
            }
        }
    }

    /// Another server's claim time, as it counts here (at most [`FUTURE_ALLOWANCE_MS`]
    /// ahead); sessions opened from now on come after it.
    fn heard(&self, since_ms: u64) -> u64 {
        let since_ms = since_ms.min(now_ms().saturating_add(FUTURE_ALLOWANCE_MS));
        self.clock.fetch_max(since_ms, Ordering::Relaxed);
        since_ms
    }

    /// Session `proxy` of node `address` authenticated: it replaces an older one here and
    /// is claimed on the other servers.
    pub fn open(&self, address: Address, proxy: Addr<NodeProxy>) {
        let since_ms = {
            let mut table = self.table();
            // After the one it replaces (even within a millisecond) and every claim heard.
            let since_ms = self.tick();
            let previous = table.insert(address, Session { proxy: proxy.clone(), since_ms });
            if let Some(old) = previous.filter(|old| old.proxy != proxy) {
                old.proxy.do_send(Disconnect(format!("a newer session of node {address} replaced this one")));
            }
            since_ms
        };
        if let Some(network) = self.network.get() {
            network.do_send(Outbound::Claim { address, since_ms });
        }
    }

    /// Session `proxy` ended (only its own entry goes: a newer one may have replaced it).
    pub fn close(&self, address: Address, proxy: &Addr<NodeProxy>) {
        let mut table = self.table();
        if table.get(&address).is_some_and(|s| s.proxy == *proxy) {
            table.remove(&address);
        }
    }

    /// Server `server` holds a session of `address` opened at `since_ms`. When this
    /// server's session of that key is the older one (ties go by server name), it is
    /// closed; when it is the newer, its opening time is returned so it can be claimed
    /// again and the other server closes its own.
    pub fn claimed_elsewhere(&self, address: Address, since_ms: u64, server: &str, me: &str) -> Option<u64> {
        let since_ms = self.heard(since_ms);
        let mut table = self.table();
        let local = table.get(&address)?.clone();
        if (local.since_ms, me) < (since_ms, server) {
            table.remove(&address);
            local.proxy.do_send(Disconnect(format!(
                "a newer session of node {address} on server `{server}` replaced this one"
            )));
            None
        } else {
            Some(local.since_ms)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session opened after hearing a claim from a server whose clock runs ahead still
    /// comes after it; a claim from far in the future counts only so far; times only grow.
    #[test]
    fn the_clock_orders_sessions_after_every_claim_heard_and_bounds_the_future() {
        let sessions = Sessions::new();
        let first = sessions.tick();
        assert!(sessions.tick() > first, "strictly increasing, even within a millisecond");
        let ahead = now_ms() + 30_000;
        assert_eq!(sessions.heard(ahead), ahead, "30 s ahead is within the allowance");
        assert!(sessions.tick() > ahead, "a session opened after the claim comes after it");
        let capped = sessions.heard(u64::MAX);
        assert!(capped <= now_ms() + FUTURE_ALLOWANCE_MS, "u64::MAX counts as the allowance at most");
        assert!(sessions.tick() > capped, "and the clock still moves on");
        // No session of that key here: nothing to close, nothing to claim back.
        let address = Address([7; 20]);
        assert_eq!(sessions.claimed_elsewhere(address, now_ms(), "b", "a"), None);
    }
}
