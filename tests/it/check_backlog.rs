//! The check backlog's ledger rules, on a real Postgres: deferring marks a task unpaid and
//! stops at the backlog's bound (and at another node's verdict), a claim is a lease, a real verdict takes the check out (an
//! `unverifiable` one does not), and a check that never gets a verdict is dropped after
//! its last claim, its task still unpaid.

use std::time::Duration;

use ludus::ledger::check_backlog::{Deferred, MAX_ATTEMPTS};
use ludus::ledger::Outcome;

use super::database::{block_on, fresh_database, numbers, open};

const NODE: &str = "0x00000000000000000000000000000000000000aa";

#[test]
fn a_deferred_check_is_leased_replaced_by_its_verdict_or_dropped_after_its_last_claim() {
    let store = open(&fresh_database());
    let count = |sql: &str| numbers(&store, sql)[0];
    let defer =
        |task: u64| block_on(store.defer_check(task, NODE, "m", b"{\"x\":1}", Some(2), "deferred: test")).unwrap();
    assert_eq!(defer(1), Deferred::Queued);
    assert_eq!(defer(2), Deferred::Queued);
    assert_eq!(defer(3), Deferred::Full, "the backlog holds two");
    assert_eq!(count("SELECT count(*) FROM check_backlog"), 2);
    assert_eq!(count("SELECT count(*) FROM verifications WHERE outcome = 'unverifiable'"), 2, "unpaid until checked");
    assert_eq!(count("SELECT count(*) FROM verifications WHERE task_id = 3"), 0, "nothing written for a refused one");

    let lease = Duration::from_secs(600);
    // A lease running out, without waiting for it.
    let expire = || count("UPDATE check_backlog SET claimed_until = now() - interval '1 second' RETURNING task_id");
    let claim = |models: &[&str]| {
        let models: Vec<String> = models.iter().map(|m| m.to_string()).collect();
        block_on(store.claim_check(&models, lease)).unwrap()
    };
    assert!(claim(&["other"]).is_none(), "a server claims only the models it holds a reference of");
    let first = claim(&["m"]).expect("the oldest check");
    assert_eq!((first.task, first.node.as_str(), first.attempts), (1, NODE, 1));
    assert_eq!(first.check, b"{\"x\":1}");
    assert_eq!(claim(&["m"]).map(|c| c.task), Some(2));
    assert!(claim(&["m"]).is_none(), "both are leased");

    // A real verdict pays the task and takes its check out; an unverifiable one does neither.
    block_on(store.record_verification(1, NODE, Outcome::Verified, "ok")).unwrap();
    block_on(store.record_verification(2, NODE, Outcome::Unverifiable, "verifier error")).unwrap();
    assert_eq!(count("SELECT count(*) FROM check_backlog"), 1);
    assert_eq!(count("SELECT count(*) FROM verifications WHERE task_id = 1 AND outcome = 'verified'"), 1);
    assert_eq!(defer(1), Deferred::AlreadyChecked, "a checked task is not queued again");
    assert_eq!(count("SELECT count(*) FROM check_backlog WHERE task_id = 1"), 0);
    // A failover's other node holds task 9's verdict: this node's check is not queued
    // (and its receipt not marked) under a verdict it could never replace.
    block_on(store.record_verification(9, "0x00000000000000000000000000000000000000bb", Outcome::Verified, "ok"))
        .unwrap();
    assert_eq!(
        block_on(store.defer_check(9, NODE, "m", b"{}", Some(5), "deferred: test")).unwrap(),
        Deferred::OtherNode
    );
    assert_eq!(count("SELECT count(*) FROM check_backlog WHERE task_id = 9"), 0);

    // Task 2's verdict never lands: it is claimed again after each lease, then dropped.
    for attempt in 2..=MAX_ATTEMPTS {
        assert!(claim(&["m"]).is_none(), "still leased");
        expire();
        let again = claim(&["m"]).expect("claimed again once the lease ran out");
        assert_eq!((again.task, again.attempts), (2, attempt));
    }
    assert_eq!(block_on(store.drop_checks(None)).unwrap(), vec![], "its last claim is still running");
    expire();
    assert!(claim(&["m"]).is_none(), "no claim past the last attempt");
    assert_eq!(block_on(store.drop_checks(None)).unwrap(), vec![(2, NODE.to_string())]);
    assert_eq!(count("SELECT count(*) FROM check_backlog"), 0);
    assert_eq!(count("SELECT count(*) FROM verifications WHERE task_id = 2 AND outcome = 'unverifiable'"), 1);
    assert_eq!(block_on(store.backlog_len()).unwrap(), 0);
}
