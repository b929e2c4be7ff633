//! The check backlog's ledger rules, on a real Postgres: deferring marks a task unpaid and
//! stops at the backlog's bound (and at another node's verdict), a claim is a lease, a real
//! verdict takes the check out (an `unverifiable` one does not), and a check that never gets
//! a verdict is dropped after its last claim, its task still unpaid. Checks of tokens a
//! node delivered without a proof wait beside a task's proof check, bounded per node.

use std::time::Duration;

use ludus::ledger::check_backlog::{CheckKey, CheckKind, Deferred, MAX_ATTEMPTS};
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
        block_on(store.claim_check(&models, lease, CheckKind::Proof)).unwrap()
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
    let dropped = CheckKey { task: 2, node: NODE.to_string(), kind: CheckKind::Proof };
    assert_eq!(block_on(store.drop_checks(None)).unwrap(), vec![dropped]);
    assert_eq!(count("SELECT count(*) FROM check_backlog"), 0);
    assert_eq!(count("SELECT count(*) FROM verifications WHERE task_id = 2 AND outcome = 'unverifiable'"), 1);
    assert_eq!(block_on(store.backlog_len()).unwrap(), 0);
}

/// A node reaching its hold mark of waiting delivered-token checks is told so (the server
/// holds it out of work), and its checks still queue up to their bound.
#[test]
fn a_node_at_its_hold_mark_is_told_and_its_checks_still_queue() {
    let store = open(&fresh_database());
    let defer = |task: u64| block_on(store.defer_delivered(task, NODE, "m", b"{}", 100, 3, 2)).unwrap();
    assert_eq!(defer(1), Deferred::Queued, "one waiting");
    assert_eq!(defer(2), Deferred::QueuedAtHold, "two waiting: hold the node");
    assert_eq!(defer(3), Deferred::QueuedAtHold, "queued while held, up to the bound");
    assert_eq!(defer(4), Deferred::NodeFull);
    assert_eq!(numbers(&store, "SELECT count(*) FROM check_backlog WHERE kind = 'delivered'"), vec![3]);
}

/// Delivered-token checks take at most half the backlog: failures are in strangers' hands
/// (fresh keys are free), and the proof checks that hold honest nodes' pay keep the other
/// half. Throwaway keys failing task after task used to fill it all, and every sampled task
/// the pool had no room for was then left unpaid for good.
#[test]
fn delivered_token_checks_take_at_most_half_the_backlog() {
    let store = open(&fresh_database());
    let node = |i: u64| format!("0x{i:040x}");
    let delivered =
        |task: u64, i: u64| block_on(store.defer_delivered(task, &node(i), "m", b"{\"d\":1}", 4, 2, u64::MAX)).unwrap();
    let proof = |task: u64| block_on(store.defer_check(task, &node(9), "m", b"{}", Some(4), "deferred: test")).unwrap();
    assert_eq!(delivered(1, 1), Deferred::Queued);
    assert_eq!(delivered(2, 2), Deferred::Queued);
    assert_eq!(delivered(3, 3), Deferred::Full, "delivered-token checks hold half of the four places");
    assert_eq!((proof(4), proof(5)), (Deferred::Queued, Deferred::Queued), "proof checks have the rest");
    assert_eq!(proof(6), Deferred::Full, "the backlog holds four");
}

/// A failed node's delivered tokens wait beside the task's proof check (the finisher's),
/// neither marking anything unpaid nor taking the other's place; a node has at most its
/// bound of them waiting, other nodes unaffected; each verdict takes out its own check
/// only, and an `unverifiable` one leaves it waiting and is replaced by the real verdict.
#[test]
fn delivered_token_checks_wait_beside_proof_checks_bounded_per_node() {
    let store = open(&fresh_database());
    let count = |sql: &str| numbers(&store, sql)[0];
    const OTHER: &str = "0x00000000000000000000000000000000000000bb";
    let delivered = |task: u64, node: &str, max: u64| {
        block_on(store.defer_delivered(task, node, "m", b"{\"d\":1}", max, 2, u64::MAX)).unwrap()
    };
    // Task 1: NODE streamed and failed, OTHER finished it and its proof check waits too.
    assert_eq!(delivered(1, NODE, 10), Deferred::Queued);
    assert_eq!(
        block_on(store.defer_check(1, OTHER, "m", b"{}", Some(10), "deferred: test")).unwrap(),
        Deferred::Queued
    );
    assert_eq!(delivered(1, NODE, 10), Deferred::Queued, "queued again: nothing changes");
    assert_eq!(count("SELECT count(*) FROM check_backlog WHERE task_id = 1"), 2);
    assert_eq!(
        count("SELECT count(*) FROM verifications WHERE node_address = '0x00000000000000000000000000000000000000aa'"),
        0,
        "delivered tokens are not paid: nothing is marked"
    );
    assert_eq!(delivered(2, NODE, 10), Deferred::Queued);
    assert_eq!(delivered(3, NODE, 10), Deferred::NodeFull, "the node has two waiting");
    assert_eq!(delivered(3, OTHER, 10), Deferred::Queued, "another node is not held back");
    assert_eq!(delivered(4, OTHER, 4), Deferred::Full, "the backlog holds four");
    assert_eq!(block_on(store.delivered_waiting(NODE)).unwrap(), 2);

    // Each claim takes the oldest of the kind asked for first, else the oldest of any.
    let claimed: Vec<(u64, String, CheckKind)> =
        [CheckKind::Proof, CheckKind::Delivered, CheckKind::Proof, CheckKind::Delivered]
            .into_iter()
            .map(|first| {
                let lease = Duration::from_secs(600);
                let c = block_on(store.claim_check(&["m".to_string()], lease, first)).unwrap().unwrap();
                (c.task, c.node, c.kind)
            })
            .collect();
    let want = [
        (1, OTHER.to_string(), CheckKind::Proof),
        (1, NODE.to_string(), CheckKind::Delivered),
        (2, NODE.to_string(), CheckKind::Delivered),
        (3, OTHER.to_string(), CheckKind::Delivered),
    ];
    assert_eq!(claimed, want);

    // Each verdict takes out its own check only.
    block_on(store.record_delivery_check(1, NODE, 2, Outcome::Verified, "fits")).unwrap();
    assert_eq!(count("SELECT count(*) FROM check_backlog WHERE task_id = 1 AND kind = 'proof'"), 1);
    assert_eq!(count("SELECT count(*) FROM check_backlog WHERE task_id = 1"), 1);
    assert_eq!(delivered(1, NODE, 10), Deferred::AlreadyChecked, "a checked one is not queued again");
    block_on(store.record_verification(1, OTHER, Outcome::Verified, "ok")).unwrap();
    assert_eq!(count("SELECT count(*) FROM check_backlog WHERE task_id = 1"), 0);

    // A check that could not run leaves its row to be claimed again; the real verdict
    // replaces the unverifiable one, and a failure costs reputation once.
    block_on(store.record_delivery_check(2, NODE, 3, Outcome::Unverifiable, "verifier error")).unwrap();
    assert_eq!(count("SELECT count(*) FROM check_backlog WHERE task_id = 2"), 1);
    let reputation = block_on(store.record_delivery_check(2, NODE, 3, Outcome::Failed, "edited")).unwrap();
    assert_eq!(reputation, 7_500);
    assert_eq!(block_on(store.record_delivery_check(2, NODE, 3, Outcome::Failed, "edited")).unwrap(), 7_500);
    assert_eq!(count("SELECT count(*) FROM delivery_checks WHERE task_id = 2 AND outcome = 'failed'"), 1);
    assert_eq!(count("SELECT count(*) FROM check_backlog WHERE task_id = 2"), 0);
    assert_eq!(block_on(store.delivered_waiting(NODE)).unwrap(), 0);
    assert_eq!(delivered(5, NODE, 10), Deferred::Queued, "room again once its checks are done");

    // A delivered check that never gets its verdict is dropped with its kind.
    let (expire, key) = (
        "UPDATE check_backlog SET attempts = 99, claimed_until = now() - interval '1 second' WHERE task_id = 3",
        CheckKey { task: 3, node: OTHER.to_string(), kind: CheckKind::Delivered },
    );
    numbers(&store, &format!("{expire} RETURNING task_id"));
    assert_eq!(block_on(store.drop_checks(None)).unwrap(), vec![key]);
}

/// Servers deferring one node's delivered-token checks at the same moment cannot together
/// go past its bound: they take turns on a per-node lock (counting, then inserting, at READ
/// COMMITTED let each one see room). Another node's checks are counted apart.
#[test]
fn racing_servers_keep_a_nodes_delivered_checks_within_its_bound() {
    const RACERS: u64 = 16;
    const BOUND: u64 = 3;
    let url = fresh_database();
    let store = block_on(ludus::ledger::Store::open(&url, RACERS as usize)).unwrap();
    block_on(async {
        // Every racer starts on an open connection.
        let conns = futures_util::future::join_all((0..RACERS).map(|_| store.conn())).await;
        assert!(conns.iter().all(|c| c.is_ok()));
    });
    let outcomes =
        block_on(futures_util::future::join_all(
            (0..RACERS).map(|task| {
                let store = store.clone();
                async move {
                    store.defer_delivered(task + 1, NODE, "m", b"{\"d\":1}", 1_000, BOUND, u64::MAX).await.unwrap()
                }
            }),
        ));
    let queued = outcomes.iter().filter(|d| **d == Deferred::Queued).count() as u64;
    assert_eq!(queued, BOUND, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|d| **d == Deferred::NodeFull).count() as u64, RACERS - BOUND);
    assert_eq!(block_on(store.delivered_waiting(NODE)).unwrap(), BOUND);
    const OTHER: &str = "0x00000000000000000000000000000000000000cc";
    assert_eq!(
        block_on(store.defer_delivered(1, OTHER, "m", b"{}", 1_000, BOUND, u64::MAX)).unwrap(),
        Deferred::Queued
    );
}

/// A node whose delivered tokens were recorded unchecked is checked on every task until one
/// is verified; that mark lived in one server's memory and a restart cleared it. The ledger
/// now answers it when the node joins: owed from an `unverifiable` delivered-token check on,
/// cleared by a later verified task or by a real verdict on those tokens; a failed check
/// (a quarantine) or another node's verified task does not set or clear it.
#[test]
fn unchecked_delivered_tokens_are_owed_a_verified_task_in_the_ledger() {
    let store = open(&fresh_database());
    const OTHER: &str = "0x00000000000000000000000000000000000000bb";
    let owes = |node: &str| block_on(store.owes_a_verified_task(node)).unwrap();
    assert!(!owes(NODE), "a node never seen");
    block_on(store.record_verification(1, NODE, Outcome::Verified, "ok")).unwrap();
    assert!(!owes(NODE), "verified, nothing unchecked");

    block_on(store.record_delivery_check(10, NODE, 3, Outcome::Unverifiable, "not checked: backlog full")).unwrap();
    assert!(owes(NODE), "unchecked tokens after its last verified task");
    block_on(store.record_verification(2, OTHER, Outcome::Verified, "ok")).unwrap();
    assert!(owes(NODE), "another node's verified task clears nothing");
    block_on(store.record_verification(3, NODE, Outcome::Failed, "edited")).unwrap();
    assert!(owes(NODE), "a failed task is not a verified one");
    block_on(store.record_verification(4, NODE, Outcome::Verified, "ok")).unwrap();
    assert!(!owes(NODE), "a verified task clears it");

    block_on(store.record_delivery_check(11, NODE, 2, Outcome::Unverifiable, "not checked: dropped")).unwrap();
    assert!(owes(NODE));
    block_on(store.record_delivery_check(11, NODE, 2, Outcome::Verified, "fits")).unwrap();
    assert!(!owes(NODE), "the tokens were checked after all");

    block_on(store.record_delivery_check(12, OTHER, 2, Outcome::Failed, "edited")).unwrap();
    assert!(!owes(OTHER), "a failure quarantines; it is not this mark");
}
