//! The hang-up charges a server waits for. A game left a job this server forwarded; the
//! server that ran it counted the tokens the game received and sends the charge
//! ([`super::wire::Charge`]). Only awaited charges are taken: one per task, from the server
//! the job went to, for the job's key, and at most what the job could count (its prompt and
//! `max_tokens`). So a peer cannot charge a game for anything else: not for a task it never
//! ran, twice, or past what the game asked for (a key's budget can go an hour into debt).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::protocol::TaskId;

/// How long a charge is awaited after the game left.
pub const WAIT: Duration = Duration::from_secs(60);

/// Charges awaited at most; past this (a flood of hang-ups), expired ones are dropped
/// first, then new ones are not awaited (their tokens go uncharged).
const MAX_AWAITED: usize = 100_000;

struct Awaited {
    runner: String,
    key_hash: String,
    /// The most the job could count: its prompt and `max_tokens`.
    bound: u64,
    since: Instant,
}

#[derive(Default)]
pub struct AwaitedCharges {
    awaited: Mutex<HashMap<TaskId, Awaited>>,
}

impl AwaitedCharges {
    /// The game of `task`, forwarded to `runner`, left: its charge is awaited for [`WAIT`].
    /// Returns false when too many are awaited already.
    pub fn expect(&self, task: TaskId, runner: &str, key_hash: &str, bound: u64, now: Instant) -> bool {
        let mut awaited = self.awaited.lock().expect("awaited charges lock");
        if awaited.len() >= MAX_AWAITED {
            awaited.retain(|_, a| now.saturating_duration_since(a.since) < WAIT);
            if awaited.len() >= MAX_AWAITED {
                return false;
            }
        }
        let entry = Awaited { runner: runner.to_string(), key_hash: key_hash.to_string(), bound, since: now };
        awaited.insert(task, entry);
        true
    }

    /// The charge `runner` sends for `task` and `key_hash`: the most it may charge, once,
    /// when it was awaited from that runner for that key and is not too old.
    pub fn take(&self, task: TaskId, runner: &str, key_hash: &str, now: Instant) -> Option<u64> {
        let mut awaited = self.awaited.lock().expect("awaited charges lock");
        let a = awaited.get(&task)?;
        if a.runner != runner || a.key_hash != key_hash {
            return None;
        }
        let a = awaited.remove(&task)?;
        (now.saturating_duration_since(a.since) < WAIT).then_some(a.bound)
    }

    /// The task's answer was charged some other way (its `Done` arrived after all).
    pub fn forget(&self, task: TaskId) {
        self.awaited.lock().expect("awaited charges lock").remove(&task);
    }

    /// Charges awaited now.
    pub fn len(&self) -> usize {
        self.awaited.lock().expect("awaited charges lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_awaited_charge_is_taken_once_from_its_runner_for_its_key_in_time() {
        let charges = AwaitedCharges::default();
        let now = Instant::now();
        let task = TaskId(7);
        assert_eq!(charges.take(task, "b", "k", now), None, "never awaited");
        assert!(charges.expect(task, "b", "k", 120, now));
        assert_eq!(charges.take(task, "c", "k", now), None, "another server");
        assert_eq!(charges.take(task, "b", "other", now), None, "another key");
        assert_eq!(charges.take(task, "b", "k", now), Some(120));
        assert_eq!(charges.take(task, "b", "k", now), None, "once");
        assert!(charges.expect(task, "b", "k", 120, now));
        assert_eq!(charges.take(task, "b", "k", now + WAIT), None, "too late");
        assert!(charges.is_empty());
        assert!(charges.expect(task, "b", "k", 120, now));
        charges.forget(task);
        assert_eq!(charges.take(task, "b", "k", now), None, "charged by its Done");
    }

    #[test]
    fn a_flood_of_hang_ups_is_bounded_and_expired_ones_go_first() {
        let charges = AwaitedCharges::default();
        let now = Instant::now();
        for i in 0..MAX_AWAITED as u64 {
            assert!(charges.expect(TaskId(i), "b", "k", 1, now));
        }
        assert!(!charges.expect(TaskId(u64::MAX), "b", "k", 1, now + Duration::from_secs(1)), "full");
        assert!(charges.expect(TaskId(u64::MAX), "b", "k", 1, now + WAIT), "the expired ones made room");
        assert_eq!(charges.len(), 1);
    }
}
