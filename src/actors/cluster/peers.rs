//! The other servers of the network as this one last heard of them: per model, the nodes
//! each serves and the sequences they could start. Shared (behind a mutex held for
//! microseconds) by the Distributor, which forwards jobs by it, the Gateway, which sizes
//! its share of each game's limits by the number of live servers, and the Cluster actor,
//! which fills it from adverts. Without NATS it stays empty: one server, alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use actix::Recipient;

use super::wire::{Advert, ModelRoom, MAX_ADVERT_MODELS};
use super::Outbound;

/// Servers remembered at most (adverts come from the operator's own servers; bounded all
/// the same).
const MAX_PEERS: usize = 256;

struct Peer {
    rooms: HashMap<String, ModelRoom>,
    heard: Instant,
    /// The process the server runs as (random per start): one restarted under its name
    /// faster than the timeout is another process, whose jobs are not the dead one's.
    instance: u64,
    /// It says every second that it still holds a job forwarded to it (an older server
    /// does not: its silence is no loss).
    keepalive: bool,
}

pub struct Peers {
    table: Mutex<HashMap<String, Peer>>,
    /// Every model another server has served since the start (bounded): when those
    /// servers become unreachable, games get 503 "no node right now", not 404.
    seen: Mutex<std::collections::HashSet<String>>,
    timeout: Duration,
    /// The Cluster actor, once it runs (jobs to forward, quarantines to announce).
    cluster: OnceLock<Recipient<Outbound>>,
    /// NATS is unreachable: no server is offered work or counted until it is back (the
    /// table is kept, so jobs in flight survive a blip shorter than the timeout).
    link_down: std::sync::atomic::AtomicBool,
    /// Servers counted when the link went down: each keeps its share of a game's limits
    /// meanwhile (else every server would admit the whole limit, the network N times it).
    servers_at_loss: std::sync::atomic::AtomicUsize,
    /// When the link last came back: until the others' adverts are heard again (a peer
    /// timeout), the count at the loss still stands.
    restored_at: Mutex<Option<Instant>>,
    /// Jobs this server sent to another one (`/metrics`).
    pub forwarded: std::sync::atomic::AtomicU64,
    /// Jobs this server ran for another one (`/metrics`).
    pub served_for_others: std::sync::atomic::AtomicU64,
    /// Forwarded jobs this server wrote off, not billed (`/metrics`): sent to another
    /// server and given up before their answer came back whole, or run here for a server
    /// that went away.
    pub undelivered: std::sync::atomic::AtomicU64,
}

impl Peers {
    /// A table forgetting a server not heard from for `timeout`.
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::default(),
            seen: Mutex::default(),
            timeout,
            cluster: OnceLock::new(),
            link_down: Default::default(),
            servers_at_loss: std::sync::atomic::AtomicUsize::new(1),
            restored_at: Mutex::new(None),
            forwarded: Default::default(),
            served_for_others: Default::default(),
            undelivered: Default::default(),
        })
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Peer>> {
        // Nothing is left half-written under this lock: a panic elsewhere cannot spoil it.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Heard lately, and reachable now.
    fn fresh(&self, peer: &Peer, now: Instant) -> bool {
        !self.link_down.load(std::sync::atomic::Ordering::Relaxed) && self.heard_lately(peer, now)
    }

    fn heard_lately(&self, peer: &Peer, now: Instant) -> bool {
        now.saturating_duration_since(peer.heard) < self.timeout
    }

    /// How long a silent server is still counted.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Records an advert (its room replaces the last one).
    pub fn heard(&self, advert: Advert, now: Instant) {
        let mut table = self.table();
        table.retain(|_, p| now.saturating_duration_since(p.heard) < self.timeout);
        if table.len() >= MAX_PEERS && !table.contains_key(&advert.server) {
            return;
        }
        let rooms: HashMap<String, ModelRoom> =
            advert.models.into_iter().take(MAX_ADVERT_MODELS).map(|r| (r.model.clone(), r)).collect();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for model in rooms.values().filter(|r| r.nodes > 0).map(|r| &r.model) {
                if seen.len() < MAX_ADVERT_MODELS && !seen.contains(model) {
                    seen.insert(model.clone());
                }
            }
        }
        let (instance, keepalive) = (advert.instance, advert.keepalive);
        table.insert(advert.server, Peer { rooms, heard: now, instance, keepalive });
    }

    /// Whether another server has served `model` since the start.
    pub fn served(&self, model: &str) -> bool {
        self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(model)
    }

    /// The link to NATS is down: no other server is offered work or counted (jobs already
    /// crossing are given the timeout: NATS may be back before it).
    pub fn link_lost(&self) {
        let counted = self.limit_share(Instant::now());
        if !self.link_down.swap(true, std::sync::atomic::Ordering::Relaxed) {
            self.servers_at_loss.store(counted, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The link to NATS is back; the others count again as their adverts arrive.
    pub fn link_restored(&self) {
        *self.restored_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
        self.link_down.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `server` was heard from within the timeout (a NATS blip shorter than that
    /// does not make it dead).
    pub fn alive(&self, server: &str, now: Instant) -> bool {
        self.table().get(server).is_some_and(|p| self.heard_lately(p, now))
    }

    /// Whether `server` says every second that it still holds the jobs sent to it.
    pub fn keeps_alive(&self, server: &str) -> bool {
        self.table().get(server).is_some_and(|p| p.keepalive)
    }

    /// The process `server` runs as, as last heard (`None`: not heard from).
    pub fn instance(&self, server: &str) -> Option<u64> {
        self.table().get(server).map(|p| p.instance)
    }

    /// Whether `server` was heard, after `since`, running as another process than
    /// `instance`: it restarted under its name (a crash and a quick restart, faster than
    /// the timeout), and what the process before it held is gone. An advert heard before
    /// `since` says nothing: it may come from before a restart whose adverts are on their way.
    pub fn restarted(&self, server: &str, instance: u64, since: Instant) -> bool {
        self.table().get(server).is_some_and(|p| p.instance != instance && p.heard > since)
    }

    /// Servers in the network, this one included.
    pub fn servers(&self, now: Instant) -> usize {
        1 + self.table().values().filter(|p| self.fresh(p, now)).count()
    }

    /// How many servers share a game's limits: the servers of the network, or while NATS is
    /// down, as many as there were when it went (the others most likely still serve their
    /// share of the games behind the balancer: counting this one alone would let each of
    /// them admit the whole limit).
    pub fn limit_share(&self, now: Instant) -> usize {
        let at_loss = self.servers_at_loss.load(std::sync::atomic::Ordering::Relaxed).max(1);
        if self.link_down.load(std::sync::atomic::Ordering::Relaxed) {
            return at_loss;
        }
        let restored = *self.restored_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if restored.is_some_and(|at| now.saturating_duration_since(at) < self.timeout) {
            // Back, the others not all heard yet.
            return at_loss.max(self.servers(now));
        }
        self.servers(now)
    }

    /// Whether a live server has nodes serving `model`.
    pub fn serve(&self, model: &str, now: Instant) -> bool {
        self.table().values().any(|p| self.fresh(p, now) && p.rooms.get(model).is_some_and(|r| r.nodes > 0))
    }

    /// Whether a live server has room for `model` now.
    pub fn has_room(&self, model: &str, now: Instant) -> bool {
        !self.link_down.load(std::sync::atomic::Ordering::Relaxed)
            && self.table().values().any(|p| {
                now.saturating_duration_since(p.heard) < self.timeout && p.rooms.get(model).is_some_and(|r| r.free > 0)
            })
    }

    /// The live server with the most room for `model`, its room then counted one less
    /// (a burst between two adverts does not all go to one server); `None` when no server
    /// has room.
    pub fn take_room(&self, model: &str, now: Instant) -> Option<String> {
        if self.link_down.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let mut table = self.table();
        let (name, peer) = table
            .iter_mut()
            .filter(|(_, p)| now.saturating_duration_since(p.heard) < self.timeout)
            .filter(|(_, p)| p.rooms.get(model).is_some_and(|r| r.free > 0))
            .max_by_key(|(name, p)| (p.rooms[model].free, std::cmp::Reverse((*name).clone())))?;
        if let Some(room) = peer.rooms.get_mut(model) {
            room.free -= 1;
        }
        Some(name.clone())
    }

    /// The live server with the most nodes serving `model`, room or not (a job then waits
    /// in its queue).
    pub fn serving(&self, model: &str, now: Instant) -> Option<String> {
        self.table()
            .iter()
            .filter(|(_, p)| self.fresh(p, now))
            .filter_map(|(name, p)| p.rooms.get(model).filter(|r| r.nodes > 0).map(|r| (r.nodes, name)))
            .max_by_key(|&(nodes, name)| (nodes, std::cmp::Reverse(name.clone())))
            .map(|(_, name)| name.clone())
    }

    /// Live nodes per model on the other servers.
    pub fn models(&self, now: Instant) -> HashMap<String, usize> {
        let mut out: HashMap<String, usize> = HashMap::new();
        for peer in self.table().values().filter(|p| self.fresh(p, now)) {
            for room in peer.rooms.values().filter(|r| r.nodes > 0) {
                *out.entry(room.model.clone()).or_default() += room.nodes;
            }
        }
        out
    }

    /// Connects the Cluster actor (once).
    pub fn join(&self, cluster: Recipient<Outbound>) {
        let _ = self.cluster.set(cluster);
    }

    /// The Cluster actor, when this server is part of a network.
    pub fn cluster(&self) -> Option<&Recipient<Outbound>> {
        self.cluster.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert(server: &str, model: &str, nodes: usize, free: usize) -> Advert {
        let models = vec![ModelRoom { model: model.into(), nodes, free }];
        Advert { server: server.into(), instance: 1, keepalive: true, models }
    }

    #[test]
    fn a_server_heard_as_another_process_after_a_moment_restarted_since() {
        let peers = Peers::new(Duration::from_secs(3));
        let t0 = Instant::now();
        peers.heard(advert("b", "m", 1, 1), t0);
        assert_eq!(peers.instance("b"), Some(1));
        let since = t0 + Duration::from_millis(100);
        assert!(!peers.restarted("b", 1, since), "the same process");
        assert!(!peers.restarted("b", 2, since), "heard before `since`: not yet its new adverts");
        let again = Advert { instance: 2, ..advert("b", "m", 1, 1) };
        peers.heard(again, since + Duration::from_millis(100));
        assert!(peers.restarted("b", 1, since), "another process since");
        assert!(!peers.restarted("b", 2, since));
        assert!(!peers.restarted("c", 1, since), "never heard: no word of a restart");
    }

    #[test]
    fn room_is_taken_from_the_freest_live_server_and_silent_servers_are_gone() {
        let peers = Peers::new(Duration::from_secs(3));
        let t0 = Instant::now();
        assert_eq!(peers.servers(t0), 1, "alone, the network is this server");
        peers.heard(advert("b", "m", 1, 2), t0);
        peers.heard(advert("c", "m", 1, 1), t0);
        assert_eq!(peers.servers(t0), 3);
        assert!(peers.serve("m", t0) && !peers.serve("other", t0));
        assert_eq!(peers.take_room("m", t0).as_deref(), Some("b"));
        // b and c have one each now: either, then the other, then none.
        let (x, y) = (peers.take_room("m", t0).unwrap(), peers.take_room("m", t0).unwrap());
        assert_ne!(x, y);
        assert_eq!(peers.take_room("m", t0), None, "no room left until the next adverts");
        assert!(peers.serving("m", t0).is_some() && peers.serving("other", t0).is_none());
        assert!(peers.serve("m", t0), "full servers still serve the model (its requests queue there)");
        let later = t0 + Duration::from_secs(4);
        peers.heard(advert("c", "m", 1, 1), later);
        assert!(!peers.alive("b", later) && peers.alive("c", later));
        assert_eq!(peers.servers(later), 2);
        assert_eq!(peers.take_room("m", later).as_deref(), Some("c"));
        assert_eq!(peers.models(later).get("m"), Some(&1));
        peers.heard(advert("c", "m", 1, 1), later);
        peers.link_lost();
        assert_eq!(peers.servers(later), 1, "NATS down: alone");
        let much_later = later + Duration::from_secs(600);
        assert_eq!(peers.limit_share(much_later), 2, "limits stay shared as when NATS went");
        peers.link_lost(); // told twice: the count at the first loss stays
        assert!(!peers.serve("m", later) && peers.served("m"), "unreachable, but remembered as a model of the network");
        assert_eq!(peers.take_room("m", later), None);
        assert!(peers.alive("c", later), "jobs crossing to c are given the timeout");
        assert_eq!(peers.limit_share(much_later), 2);
        peers.link_restored();
        let back = Instant::now();
        assert_eq!(peers.servers(later), 2);
        assert_eq!(peers.limit_share(back), 2, "back, the others not heard yet: the share stands");
        // Lost again before any advert: still the count of the first loss, not 1.
        peers.link_lost();
        assert_eq!(peers.limit_share(back), 2);
        peers.link_restored();
        let beyond = Instant::now() + Duration::from_secs(10);
        assert_eq!(peers.limit_share(beyond), 1, "back for a peer timeout, and nobody else heard");
        assert_eq!(peers.take_room("m", later).as_deref(), Some("c"), "its room was kept for when NATS is back");
    }
}
