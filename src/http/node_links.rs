//! How many node links one client address holds at once. Node identities are free and an
//! authenticated node may stay silent for minutes while it "loads its model": without a
//! cap, one address could open links at the handshake rate and keep thousands in the
//! Distributor's table, which every job's choice scans. Each link holds a [`LinkSlot`]
//! for its life; IPv6 clients are counted by /64, like the throttles.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::actors::ServeError;

/// Live links per client address, at most `per_address` each (0: no limit).
#[derive(Debug)]
pub struct NodeLinks {
    per_address: u32,
    live: Mutex<HashMap<IpAddr, u32>>,
}

impl NodeLinks {
    pub fn new(per_address: u32) -> Arc<Self> {
        Arc::new(Self { per_address, live: Mutex::new(HashMap::new()) })
    }

    /// A slot for one more link from `ip`, or a 429 when it holds `per_address` already.
    pub fn open(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<LinkSlot, ServeError> {
        let Some(ip) = ip.map(super::auth_throttle::client_key).filter(|_| self.per_address > 0) else {
            return Ok(LinkSlot { links: self.clone(), ip: None });
        };
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let held = live.entry(ip).or_default();
        if *held >= self.per_address {
            return Err(ServeError::RateLimited {
                what: format!("{} node links open from {ip} (the most one address may hold)", self.per_address),
                retry_after: Duration::from_secs(60),
            });
        }
        *held += 1;
        Ok(LinkSlot { links: self.clone(), ip: Some(ip) })
    }

    /// Links `ip` holds now.
    pub fn held(&self, ip: IpAddr) -> u32 {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(&super::auth_throttle::client_key(ip)).copied().unwrap_or(0)
    }
}

/// One link's place in its address's count, given back when dropped (with its actor).
#[derive(Debug)]
pub struct LinkSlot {
    links: Arc<NodeLinks>,
    ip: Option<IpAddr>,
}

impl Drop for LinkSlot {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut live = self.links.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = live.get_mut(&ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                live.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_links_and_gets_them_back() {
        let links = NodeLinks::new(2);
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let a = links.open(Some(ip)).unwrap();
        let b = links.open(Some("2001:db8::1".parse().unwrap())).unwrap();
        let c = links.open(Some(ip)).unwrap();
        assert!(matches!(links.open(Some(ip)), Err(ServeError::RateLimited { .. })));
        assert!(links.open(Some("10.0.0.8".parse().unwrap())).is_ok(), "another address");
        drop(a);
        let d = links.open(Some(ip)).expect("a slot given back");
        assert_eq!(links.held(ip), 2);
        drop((b, c, d));
        assert_eq!(links.held(ip), 0);
        assert!(links.live.lock().unwrap().is_empty(), "nothing kept for addresses without links");
        // No limit, or no address: always a slot.
        assert!(NodeLinks::new(0).open(Some(ip)).is_ok());
        assert!(links.open(None).is_ok());
    }
}
