//! The Registry: buffers checked receipts and, on every block tick, commits them to
//! Postgres in one transaction ([`crate::ledger::Store::commit_block`]). After a commit it
//! tells each node's proxy which of its tasks the block holds; the node answers with a
//! signed confirmation, which the Registry records. A failed commit (database down) keeps
//! the receipts and retries on the next tick; nodes keep their receipts until confirmed,
//! so even a crash of this process loses nothing. Proof verdicts are written here too; a
//! verdict the database refuses is written again (backing off, a few minutes at most), and
//! the [`CheckLog`] keeps its check owed until it lands: a restart replays it, and one owed
//! too long is handed to the check backlog. Its task is unpaid meanwhile (a picked task's
//! receipt is recorded `sampled`, paid only once verified). The check of tokens a node
//! delivered and then failed before its proof is recorded here too (`delivery_checks`).

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;

use super::check_log::{CheckKind, CheckLog};
use super::clock::BlockTick;
use super::messages::*;
use crate::ledger::steering::Checked;
use crate::ledger::{CommitOutcome, Receipt, Store};
use crate::protocol::TaskId;

/// Messages that may wait in the mailbox before `send` callers wait.
const MAILBOX_CAPACITY: usize = 65_536;

/// Verdicts waiting to be written again at most; past it one is left to the check log
/// (its check goes to the backlog once overdue, or at the next start).
const MAX_VERDICT_RETRIES: usize = 10_000;

/// Tries of one verdict (about three minutes of backing off) before it is left to the
/// check log the same way.
const MAX_VERDICT_ATTEMPTS: u32 = 8;

/// How long a refused verdict waits before its `attempt`-th try: doubling from 1 s to 60 s.
fn verdict_backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
}

pub struct Registry {
    store: Store,
    /// Marks nodes whose reputation fell below `suspect_below` for checks on every task.
    policy: Option<(std::sync::Arc<crate::proof::policy::Policy>, i32)>,
    /// This server's address, stored with each block it commits.
    server: String,
    max_buffered: usize,
    buffer: Vec<RecordReceipt>,
    committing: bool,
    /// Consecutive failed commits (for the log).
    failures: u32,
    dropped: u64,
    /// The completions this server saw: committed ones are dropped from it.
    completions: Option<std::sync::Arc<super::completion_log::CompletionLog>>,
    /// Told when a node is flagged for steering (the Distributor quarantines it).
    quarantine: Option<Recipient<VerificationDone>>,
    /// The checks owed: settled once their verdict is written, synced before each block.
    checks: Option<std::sync::Arc<CheckLog>>,
    /// Verdicts the database refused, waiting to be written again.
    retrying: usize,
}

impl Registry {
    pub fn new(store: Store, server: String, max_buffered: usize) -> Self {
        Self {
            store,
            policy: None,
            server,
            max_buffered,
            buffer: Vec::new(),
            committing: false,
            failures: 0,
            dropped: 0,
            completions: None,
            quarantine: None,
            checks: None,
            retrying: 0,
        }
    }

    /// With the server's check log (checks leave it once their verdict is written).
    pub fn with_check_log(mut self, checks: std::sync::Arc<CheckLog>) -> Self {
        self.checks = Some(checks);
        self
    }

    /// With a recipient that quarantines nodes flagged for steering.
    pub fn with_quarantine(mut self, quarantine: Recipient<VerificationDone>) -> Self {
        self.quarantine = Some(quarantine);
        self
    }

    /// With the server's completion log (entries leave it once their block commits).
    pub fn with_completion_log(mut self, log: std::sync::Arc<super::completion_log::CompletionLog>) -> Self {
        self.completions = Some(log);
        self
    }

    /// With proof of inference: the sampling policy and the reputation floor for suspects.
    pub fn with_policy(mut self, policy: std::sync::Arc<crate::proof::policy::Policy>, suspect_below: i32) -> Self {
        self.policy = Some((policy, suspect_below));
        self
    }

    /// Starts committing the buffer, unless a commit is running or there is nothing to do.
    fn commit(&mut self, ctx: &mut Context<Self>) {
        if self.committing || self.buffer.is_empty() {
            return;
        }
        self.committing = true;
        // A sampled task's check is on disk before its receipt can be paid.
        if let Some(checks) = &self.checks {
            checks.sync();
        }
        let batch = std::mem::take(&mut self.buffer);
        let receipts: Vec<Receipt> = batch.iter().map(|r| r.receipt.clone()).collect();
        let (store, server) = (self.store.clone(), self.server.clone());
        let started = std::time::Instant::now();
        async move { store.commit_block(&receipts, &server).await }
            .into_actor(self)
            .map(move |result, this, _| {
                this.committing = false;
                match result {
                    Ok(outcome) => {
                        // Before the completions are forced to disk: a completion on disk
                        // whose check is not would be paid unchecked after a power loss.
                        if let Some(checks) = &this.checks {
                            checks.sync();
                        }
                        if let Some(log) = &this.completions {
                            log.committed(batch.iter().filter(|r| r.receipt.witnessed).map(|r| r.receipt.task));
                        }
                        if this.failures > 0 {
                            tracing::info!(after_failures = this.failures, "registry commits resumed");
                        }
                        this.failures = 0;
                        tracing::info!(
                            block = ?outcome.block,
                            recorded = outcome.recorded,
                            duplicates = outcome.duplicates,
                            refused = outcome.refused,
                            ms = started.elapsed().as_millis() as u64,
                            "block committed"
                        );
                        acknowledge(&batch, outcome);
                    }
                    Err(e) => {
                        this.failures += 1;
                        tracing::warn!(error = %e, receipts = batch.len(), failures = this.failures,
                            "block commit failed; keeping the receipts for the next block");
                        let newer = std::mem::replace(&mut this.buffer, batch);
                        this.buffer.extend(newer);
                    }
                }
            })
            .spawn(ctx);
    }
}

/// Tells each node's proxy what the block holds of its tasks.
fn acknowledge(batch: &[RecordReceipt], outcome: CommitOutcome) {
    let mut proxies: HashMap<&str, &Recipient<ReceiptsRecorded>> = HashMap::new();
    for r in batch {
        proxies.insert(r.receipt.node.as_str(), &r.reply_to);
    }
    for ack in outcome.acks {
        if let Some(proxy) = proxies.get(ack.node.as_str()) {
            proxy.do_send(ReceiptsRecorded { block: ack.block, tasks: ack.tasks.into_iter().map(TaskId).collect() });
        }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

impl Supervised for Registry {
    fn restarting(&mut self, _: &mut Self::Context) {
        // The buffer survives a restart (the struct is kept); a commit in flight is lost
        // with the old context, and its receipts come back when the nodes re-send them.
        // Verdicts waiting to be written again are lost with it: their checks stay owed in
        // the check log, and the next start replays them.
        self.committing = false;
        self.retrying = 0;
        tracing::warn!(buffered = self.buffer.len(), "registry restarting");
    }
}

impl Handler<RecordReceipt> for Registry {
    type Result = ();

    /// Buffers a receipt for the next block (dropped, and re-sent later by its node, when
    /// the buffer is full because the database has been down for long).
    fn handle(&mut self, msg: RecordReceipt, _: &mut Self::Context) {
        if self.buffer.len() >= self.max_buffered {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(dropped = self.dropped, "receipt buffer full; nodes will re-send the dropped receipts");
            }
            return;
        }
        self.buffer.push(msg);
    }
}

impl Handler<BlockTick> for Registry {
    type Result = ();

    /// Commits the block's receipts.
    fn handle(&mut self, _: BlockTick, ctx: &mut Self::Context) {
        self.commit(ctx);
    }
}

impl Handler<FlushReceipts> for Registry {
    type Result = MessageResult<FlushReceipts>;

    fn handle(&mut self, _: FlushReceipts, ctx: &mut Self::Context) -> Self::Result {
        self.commit(ctx);
        MessageResult((self.buffer.len(), self.committing))
    }
}

impl Handler<ConfirmBlock> for Registry {
    type Result = ();

    /// Records a node's confirmation and tells its proxy the outcome.
    fn handle(&mut self, msg: ConfirmBlock, ctx: &mut Self::Context) {
        let store = self.store.clone();
        let node = msg.node.to_string();
        let disputed: Vec<u64> = msg.disputed.iter().map(|t| t.0).collect();
        async move { store.confirm_block(&node, msg.block, msg.root, msg.count, &disputed, &msg.signature).await }
            .into_actor(self)
            .map(move |result, _, _| match result {
                Ok(status) => {
                    if status != crate::ledger::ConfirmStatus::Matched {
                        tracing::warn!(node = %msg.node, block = msg.block, status = status.as_str(), "block confirmation does not match");
                    }
                    msg.reply_to.do_send(BlockConfirmed { block: msg.block, status });
                }
                Err(e) => tracing::warn!(node = %msg.node, block = msg.block, error = %e,
                    "could not record a confirmation; the node will confirm again"),
            })
            .spawn(ctx);
    }
}

impl Handler<VerificationDone> for Registry {
    type Result = ();

    /// Records a verdict: the receipt's verification state and the node's reputation; for
    /// a verified task, its forgiven near-ties, and the steering judgement over the node's
    /// record (a flagged node is quarantined like one that failed a proof).
    fn handle(&mut self, msg: VerificationDone, ctx: &mut Self::Context) {
        self.record_verdict(msg, 0, ctx);
    }
}

impl Handler<DeliveryChecked> for Registry {
    type Result = ();

    /// Records the check of tokens a node delivered and then failed before its proof. A
    /// failure quarantines the node at once (the write may wait for the database) and
    /// costs reputation like a failed proof; a node below the floor is checked on every
    /// task.
    fn handle(&mut self, msg: DeliveryChecked, ctx: &mut Self::Context) {
        if msg.outcome == crate::ledger::Outcome::Failed {
            if let Some(quarantine) = &self.quarantine {
                quarantine.do_send(VerificationDone {
                    task: msg.task,
                    node: msg.node,
                    outcome: crate::ledger::Outcome::Failed,
                    detail: format!("tokens it delivered before failing the task: {}", msg.detail),
                    evidence: None,
                });
            }
        }
        self.record_delivery_check(msg, 0, ctx);
    }
}

impl Registry {
    /// Writes a delivered-token check (its `attempt`-th try); a refused one is tried again
    /// later, backing off as for a verdict.
    fn record_delivery_check(&mut self, msg: DeliveryChecked, attempt: u32, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let node = msg.node.to_string();
        let (task, tokens, outcome, detail) = (msg.task.0, msg.tokens, msg.outcome, msg.detail.clone());
        let steering =
            msg.evidence.as_deref().filter(|_| outcome == crate::ledger::Outcome::Verified).map(task_steering);
        async move {
            let reputation = store.record_delivery_check(task, &node, tokens, outcome, &detail).await?;
            judge_steering(&store, task, &node, steering, Checked::Delivered, reputation).await
        }
        .into_actor(self)
        .map(move |result, this, ctx| match result {
            Ok((reputation, flagged)) => {
                // The ledger holds its verdict: a crash no longer loses the check.
                if let Some(checks) = &this.checks {
                    checks.settle(CheckKind::Delivered, msg.task.0, msg.node.0);
                }
                if let Some((policy, floor)) = &this.policy {
                    if reputation < *floor || flagged.is_some() {
                        policy.set_suspect(&msg.node, true);
                    }
                }
                if let Some(reason) = flagged {
                    this.flagged_for_steering(msg.task, msg.node, reason);
                }
            }
            Err(e) => {
                let (task, node) = (msg.task, msg.node);
                match this.retry_later(attempt, ctx, move |this, ctx| this.record_delivery_check(msg, attempt + 1, ctx))
                {
                    Some(wait) => tracing::warn!(%task, %node, error = %e, retry_in_s = wait.as_secs(),
                            "could not record the check of a node's delivered tokens; retrying"),
                    None => tracing::error!(%task, %node, error = %e, attempt,
                            "could not record the check of a node's delivered tokens; given up (the quarantine stands, \
                             and the check waits in the backlog, or the check log, to run again)"),
                }
            }
        })
        .spawn(ctx);
    }
}

impl Registry {
    /// Writes a verdict (its `attempt`-th try); a refused one is tried again later.
    fn record_verdict(&mut self, msg: VerificationDone, attempt: u32, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let node = msg.node.to_string();
        let detail = msg.detail.clone();
        let steering = msg.evidence.as_deref().map(task_steering);
        let task = msg.task.0;
        async move {
            let reputation = store.record_verification(task, &node, msg.outcome, &detail).await?;
            judge_steering(&store, task, &node, steering, Checked::Proof, reputation).await
        }
        .into_actor(self)
        .map(move |result, this, ctx| match result {
            Ok((reputation, flagged)) => {
                if let Some(checks) = &this.checks {
                    checks.settle(CheckKind::Proof, msg.task.0, msg.node.0);
                }
                if let Some((policy, floor)) = &this.policy {
                    policy.set_suspect(&msg.node, reputation < *floor || flagged.is_some());
                    if msg.outcome == crate::ledger::Outcome::Verified {
                        policy.verified(&msg.node);
                    }
                }
                if let Some(reason) = flagged {
                    this.flagged_for_steering(msg.task, msg.node, reason);
                }
            }
            Err(e) => {
                let (task, node) = (msg.task, msg.node);
                match this.retry_later(attempt, ctx, move |this, ctx| this.record_verdict(msg, attempt + 1, ctx)) {
                    Some(wait) => tracing::warn!(%task, %node, error = %e, retry_in_s = wait.as_secs(),
                        "could not record a verification; retrying"),
                    None => tracing::error!(%task, %node, error = %e, attempt,
                        "could not record a verification; given up: the task stays unpaid and its check owed in the check log"),
                }
            }
        })
        .spawn(ctx);
    }

    /// A node whose near-ties became improbable for an honest one with `task`'s check:
    /// quarantined on every server.
    fn flagged_for_steering(&self, task: TaskId, node: crate::crypto::identity::Address, reason: String) {
        tracing::warn!(%node, %task, %reason, "node flagged for steering");
        if let Some(quarantine) = &self.quarantine {
            quarantine.do_send(VerificationDone {
                task,
                node,
                outcome: crate::ledger::Outcome::Failed,
                detail: reason,
                evidence: None,
            });
        }
    }

    /// Runs `again` after the backoff of a write's `attempt`-th refusal, unless it was the
    /// last attempt or too many writes wait already (`None`: given up).
    fn retry_later(
        &mut self,
        attempt: u32,
        ctx: &mut Context<Self>,
        again: impl FnOnce(&mut Self, &mut Context<Self>) + 'static,
    ) -> Option<Duration> {
        if self.retrying >= MAX_VERDICT_RETRIES || attempt + 1 >= MAX_VERDICT_ATTEMPTS {
            return None;
        }
        let wait = verdict_backoff(attempt);
        self.retrying += 1;
        ctx.run_later(wait, move |this, ctx| {
            this.retrying = this.retrying.saturating_sub(1);
            again(this, ctx);
        });
        Some(wait)
    }
}

/// Adds a verified check's near-ties (if any) to its node's record and judges the record.
/// Answers the node's reputation (`reputation` before), and the reason when this check
/// made the record improbable for an honest node: flagged now, once, the penalty taken.
async fn judge_steering(
    store: &crate::ledger::Store,
    task: u64,
    node: &str,
    steering: Option<crate::ledger::steering::TaskSteering>,
    checked: Checked,
    reputation: i32,
) -> Result<(i32, Option<String>), crate::ledger::LedgerError> {
    let unflagged = Ok((reputation, None));
    let Some(steering) = steering else { return unflagged };
    let sums = match store.record_steering(task, node, &steering, checked).await? {
        Some(sums) => sums,
        // Added before: this verdict is written again because a write after that failed
        // (the flag's, maybe). The record as it stands is judged again; a flag is given once.
        None => match store.node_steering(node).await? {
            Some(sums) if sums.tasks > 0 => sums,
            _ => return unflagged,
        },
    };
    let record = crate::proof::steering::NodeDeviations {
        tasks: sums.tasks as u64,
        tokens: sums.tokens as u64,
        wide: sums.wide as u64,
        expected_wide: sums.expected_wide,
        ends_passed: sums.ends_passed as u64,
        expected_ends_passed: sums.expected_ends_passed,
    };
    let Some(reason) = crate::proof::steering::judge(&record).filter(|_| !sums.flagged) else { return unflagged };
    Ok(match store.flag_steering(node, &reason).await? {
        Some(after) => (after, Some(reason)),
        None => (reputation, None),
    })
}

/// The ledger's row form of a verified task's near-tie evidence.
fn task_steering(e: &crate::proof::steering::Evidence) -> crate::ledger::steering::TaskSteering {
    let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    crate::ledger::steering::TaskSteering {
        format: e.format.to_string(),
        tokens: clamp(e.task.tokens),
        wide: clamp(e.task.wide),
        ends_passed: clamp(e.task.ends_passed),
        expected_wide: e.task.expected_wide,
        expected_ends_passed: e.task.expected_ends_passed,
        tokens_past_end: clamp(e.task.tokens_past_end),
        forgiven: e
            .deviations
            .iter()
            .map(|d| crate::ledger::steering::ForgivenRow {
                token_index: clamp(d.index),
                gap: d.gap,
                rank: clamp(d.rank),
                reference_token: clamp(d.reference_token),
                node_token: clamp(d.node_token),
                passed_end: d.passed_end,
                took_end: d.took_end,
            })
            .collect(),
    }
}

impl Handler<NodeJoined> for Registry {
    type Result = ResponseActFuture<Self, Option<std::time::Duration>>;

    /// Restores the policy's state of a node from the ledger: its tasks count towards its
    /// first ones, a low reputation makes it a suspect again, and delivered tokens left
    /// unchecked since its last verified task have every task checked again, whatever
    /// restarted. Answers the quarantine the ledger holds for it, which its proxy applies
    /// before the node enters the table.
    fn handle(&mut self, msg: NodeJoined, _: &mut Self::Context) -> Self::Result {
        let policy = self.policy.clone();
        let store = self.store.clone();
        Box::pin(
            async move {
                let node = msg.node.to_string();
                // Read apart: a standing the ledger cannot give must not lose a quarantine
                // it did give.
                let quarantine = store.quarantine_left(&node).await;
                let standing = async {
                    let Some((policy, _)) = &policy else { return Ok(None) };
                    let up_to = i64::try_from(policy.first_tasks()).unwrap_or(i64::MAX);
                    let (tasks, reputation) = store.node_standing(&node, up_to).await?;
                    Ok::<_, crate::ledger::LedgerError>(Some((tasks, reputation, store.owes_a_verified_task(&node).await?)))
                }
                .await;
                (quarantine, standing)
            }
            .into_actor(self)
            .map(move |(quarantine, standing), this, _| {
                let policy = this.policy.as_ref().map(|(policy, floor)| (policy, *floor));
                match (standing, policy) {
                    (Ok(Some((tasks, reputation, owes))), Some((policy, floor))) => {
                        policy.restore(&msg.node, tasks);
                        policy.set_suspect(&msg.node, reputation < floor);
                        if owes {
                            policy.check_until_verified(&msg.node);
                        }
                    }
                    (Err(e), Some((policy, _))) => {
                        // Unknown (the database is out): every task is checked until one
                        // is verified.
                        tracing::warn!(node = %msg.node, error = %e, "could not restore a node's standing; checking its every task until one is verified");
                        policy.check_until_verified(&msg.node);
                    }
                    _ => {}
                }
                quarantine.unwrap_or_else(|e| {
                    // Whether it is quarantined is unknown: it gets work, every task checked
                    // until one is verified.
                    tracing::warn!(node = %msg.node, error = %e, "could not read whether a joining node is quarantined; checking its every task until one is verified");
                    if let Some((policy, _)) = &this.policy {
                        policy.check_until_verified(&msg.node);
                    }
                    None
                })
            }),
        )
    }
}

impl Handler<super::supervisor::InjectPanic> for Registry {
    type Result = ();

    fn handle(&mut self, _: super::supervisor::InjectPanic, _: &mut Self::Context) {
        panic!("fault injection: Registry told to panic");
    }
}
