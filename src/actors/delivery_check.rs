//! Hands the tokens a node delivered without a proof to the verifier pool
//! ([`crate::proof::delivered`]): those of a task it failed before its `Done` (a streamed
//! answer's game has read them), and those of a hang-up it never proved. Failures are in
//! the node's hands, so these checks have a budget of their own: at most `[verifier]
//! queue` of them (but [`MIN_IN_POOL`]) in the pool at once, and [`PER_NODE_PER_MINUTE`]
//! per node. Past it a check is not run, and the node is checked on every task until one
//! is verified (`Policy::check_until_verified`; a reconnect does not clear it); the
//! skipped check is recorded `unverifiable` with the reason.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::completion::Verification;
use super::messages::{DeliveryChecked, Job};
use super::verifier::{PoolLoad, VerifyDelivered};
use crate::crypto::identity::Address;
use crate::ledger::Outcome;
use crate::proof::Format;

/// Delivered-token checks the pool may hold at once, whatever the node, at least.
pub const MIN_IN_POOL: usize = 4;
/// Delivered-token checks one node gets per minute.
pub const PER_NODE_PER_MINUTE: u32 = 16;
/// Nodes whose minute is remembered at most (older windows are forgotten first).
const MAX_NODES: usize = 10_000;

/// The budget of delivered-token checks, shared by every node proxy of a server.
#[derive(Clone)]
pub struct DeliveryBudget {
    load: PoolLoad,
    max_in_pool: usize,
    windows: Arc<Mutex<HashMap<Address, (Instant, u32)>>>,
}

impl DeliveryBudget {
    /// At most `max_in_pool` checks in the pool at once (the pool's `queue`), but
    /// [`MIN_IN_POOL`].
    pub fn new(max_in_pool: usize) -> Self {
        Self { load: PoolLoad::default(), max_in_pool: max_in_pool.max(MIN_IN_POOL), windows: Arc::default() }
    }

    /// Takes one check for `node` now, or says why there is no room.
    fn take(&self, node: Address, now: Instant) -> Result<(), String> {
        if self.load.get() >= self.max_in_pool {
            return Err(format!("{} such checks are in the verifier pool already", self.max_in_pool));
        }
        let mut windows = self.windows.lock().expect("delivery budget lock");
        if windows.len() >= MAX_NODES && !windows.contains_key(&node) {
            windows.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        let window = windows.entry(node).or_insert((now, 0));
        if now.duration_since(window.0) >= Duration::from_secs(60) {
            *window = (now, 0);
        }
        if window.1 >= PER_NODE_PER_MINUTE {
            return Err(format!("over {PER_NODE_PER_MINUTE} such checks of this node in a minute"));
        }
        window.1 += 1;
        Ok(())
    }
}

/// Sends `job`'s tokens `own` (those before it other nodes made; those after it the game
/// never read) to the verifier pool as `node`'s, when the model has a reference. `format`
/// is the one the node's proofs declared on its link, if any: the check is then held to
/// it alone.
pub fn check_delivered(v: &Verification, node: Address, job: &Job, own: Range<usize>, format: Option<Format>) {
    let own = own.start..own.end.min(job.emitted.len());
    if own.is_empty() || !v.models.contains(&job.model) {
        return;
    }
    let prefix = job.emitted[..own.start].to_vec();
    let delivered = job.emitted[own].to_vec();
    if let Err(why) = v.delivery.take(node, Instant::now()) {
        tracing::warn!(task = %job.id, %node, tokens = delivered.len(), %why,
            "a node's delivered tokens not checked; the node is checked on every task until verified");
        v.policy.check_until_verified(&node);
        v.delivered.do_send(DeliveryChecked {
            task: job.id,
            node,
            tokens: delivered.len(),
            outcome: Outcome::Unverifiable,
            detail: format!("not checked: {why}"),
        });
        return;
    }
    v.pool.do_send(VerifyDelivered {
        task: job.id,
        node,
        model: job.model.clone(),
        input: job.input.clone(),
        params: job.params.clone(),
        prefix,
        delivered,
        format,
        report: v.delivered.clone(),
        slot: v.delivery.load.enter(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node gets its minute's checks and no more; another node is not held back by it,
    /// and a new minute gives the first one room again.
    #[test]
    fn each_node_gets_its_checks_per_minute_and_no_more() {
        let budget = DeliveryBudget::new(16);
        let (a, b) = (Address([1; 20]), Address([2; 20]));
        let now = Instant::now();
        for _ in 0..PER_NODE_PER_MINUTE {
            budget.take(a, now).unwrap();
        }
        assert!(budget.take(a, now).unwrap_err().contains("in a minute"));
        budget.take(b, now).unwrap();
        budget.take(a, now + Duration::from_secs(61)).unwrap();
    }

    /// The pool's share is bounded whoever asks.
    #[test]
    fn the_pool_holds_a_bounded_number_of_them() {
        let budget = DeliveryBudget::new(0);
        assert_eq!(budget.max_in_pool, MIN_IN_POOL, "a pool with no queue still takes a few");
        let slots: Vec<_> = (0..MIN_IN_POOL).map(|_| budget.load.enter()).collect();
        assert!(budget.take(Address([3; 20]), Instant::now()).unwrap_err().contains("verifier pool"));
        drop(slots);
        budget.take(Address([3; 20]), Instant::now()).unwrap();
    }
}
