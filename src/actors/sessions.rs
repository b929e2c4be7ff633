//! One key, one session: on this server and across the network of servers.
//!
//! Quality re-runs, receipts, quarantine and the verification policy all count per node
//! key, so a key must never hold two slots at once. On one server, a newer session
//! replaces the older one (a node that reconnects before its old link timed out). With
//! `[cluster]`, every session that opens is claimed on NATS with the time it opened; a
//! server that holds the same key closes its own session when it is the older one, and
//! answers with its own claim when it is the newer, so the pair settles on one session
//! after a single exchange whatever the servers' clocks say.
//!
//! While NATS is down, claims are not heard: a key may then hold one session on each
//! side of the split until one of them reconnects.

use std::collections::HashMap;
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

/// The live session of each node key on this server.
#[derive(Default)]
pub struct Sessions {
    table: Mutex<HashMap<Address, Session>>,
    /// The Cluster actor, when this server is part of a network.
    network: OnceLock<Recipient<Outbound>>,
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

    /// Connects the Cluster actor (once): from then on every session is claimed network-wide.
    pub fn join(&self, cluster: Recipient<Outbound>) {
        let _ = self.network.set(cluster);
    }

    /// Session `proxy` of node `address` authenticated: it replaces an older one here and
    /// is claimed on the other servers.
    pub fn open(&self, address: Address, proxy: Addr<NodeProxy>) {
        let since_ms = {
            let mut table = self.table();
            // Strictly after the one it replaces, even within a millisecond.
            let since_ms = table.get(&address).map_or(0, |s| s.since_ms + 1).max(now_ms());
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
