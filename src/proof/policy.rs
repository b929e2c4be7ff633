//! Which finished tasks get checked: every task of a node's first `first_tasks`, every
//! task of a suspect node (reputation below the configured floor), and otherwise a random
//! `sample_rate` share. Shared by the node proxies; the Registry marks suspects and, when a
//! node joins, restores what the ledger knows of it (its recorded tasks, its reputation),
//! so the policy's state lives in Postgres and survives restarts.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::crypto::identity::Address;

pub struct Policy {
    first_tasks: u64,
    sample_rate: f64,
    seen: Mutex<HashMap<Address, u64>>,
    suspects: Mutex<HashSet<Address>>,
    /// Nodes checked on every task until one is verified, whatever their reputation
    /// (tokens of theirs went unchecked); a reconnect does not clear it, and a restarted
    /// server sets it again from the ledger when the node joins.
    until_verified: Mutex<HashSet<Address>>,
}

impl Policy {
    pub fn new(first_tasks: u64, sample_rate: f64) -> Self {
        Self {
            first_tasks,
            sample_rate,
            seen: Mutex::default(),
            suspects: Mutex::default(),
            until_verified: Mutex::default(),
        }
    }

    /// Counts a finished task of `node` and says whether to check it.
    pub fn should_verify(&self, node: &Address) -> bool {
        let n = {
            let mut seen = self.seen.lock().expect("policy lock");
            let n = seen.entry(*node).or_default();
            *n += 1;
            *n
        };
        n <= self.first_tasks
            || self.suspects.lock().expect("policy lock").contains(node)
            || self.until_verified.lock().expect("policy lock").contains(node)
            || rand::random::<f64>() < self.sample_rate
    }

    /// A task [`Self::should_verify`] picked could not be checked (the verifier pool was
    /// full): it does not count towards the node's first tasks, so load that fills the pool
    /// (a flood of requests, say) cannot walk a new node through them unchecked.
    pub fn not_checked(&self, node: &Address) {
        if let Some(n) = self.seen.lock().expect("policy lock").get_mut(node) {
            *n = n.saturating_sub(1);
        }
    }

    /// What the ledger knows of a node (after a restart, or from another server): tasks it
    /// already did count towards its first ones.
    pub fn restore(&self, node: &Address, tasks: u64) {
        let mut seen = self.seen.lock().expect("policy lock");
        let n = seen.entry(*node).or_default();
        *n = (*n).max(tasks);
    }

    pub fn first_tasks(&self) -> u64 {
        self.first_tasks
    }

    /// Has every task of `node` checked until one is verified ([`Self::verified`]):
    /// neither its reputation nor a reconnect clears it.
    pub fn check_until_verified(&self, node: &Address) {
        self.until_verified.lock().expect("policy lock").insert(*node);
    }

    /// A task of `node` was verified.
    pub fn verified(&self, node: &Address) {
        self.until_verified.lock().expect("policy lock").remove(node);
    }

    pub fn set_suspect(&self, node: &Address, suspect: bool) {
        let mut suspects = self.suspects.lock().expect("policy lock");
        if suspect {
            suspects.insert(*node);
        } else {
            suspects.remove(node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_and_suspect_nodes_are_always_checked_others_sampled() {
        let policy = Policy::new(3, 0.0);
        let (a, b) = (Address([1; 20]), Address([2; 20]));
        assert!((0..3).all(|_| policy.should_verify(&a)));
        assert!(!policy.should_verify(&a), "past its first tasks, a 0 % sample checks nothing");
        policy.set_suspect(&a, true);
        assert!((0..10).all(|_| policy.should_verify(&a)));
        policy.set_suspect(&a, false);
        assert!(!policy.should_verify(&a));
        assert!(policy.should_verify(&b), "counts are per node");
        let always = Policy::new(0, 1.0);
        assert!((0..10).all(|_| always.should_verify(&a)));
        // A picked task that could not be checked leaves the node in its first tasks.
        let busy = Policy::new(2, 0.0);
        let c = Address([3; 20]);
        assert!(busy.should_verify(&c) && busy.should_verify(&c));
        busy.not_checked(&c);
        assert!(busy.should_verify(&c), "the unchecked task is owed");
        assert!(!busy.should_verify(&c));
        busy.not_checked(&Address([4; 20])); // a node never seen: nothing to undo
        assert!(busy.should_verify(&Address([4; 20])));
        // Unchecked tokens: every task checked until one is verified, whatever the suspect
        // marks say meanwhile.
        let owed = Policy::new(0, 0.0);
        owed.check_until_verified(&c);
        owed.set_suspect(&c, false);
        assert!((0..5).all(|_| owed.should_verify(&c)));
        owed.verified(&c);
        assert!(!owed.should_verify(&c));
        // A node the ledger already knows is past its first tasks at once.
        let restored = Policy::new(3, 0.0);
        restored.restore(&b, 5);
        assert!(!restored.should_verify(&b));
    }
}
