//! `CheckBacklog`: checks that wait in Postgres for a verifier: proof checks the pool had
//! no room for, and every check of tokens a node delivered without a proof.
//!
//! When the verifier pool has no room for a sampled task, Completion hands it here instead
//! of leaving it unchecked: load that fills the pool (a flood of requests, or plain peak
//! traffic) must not let sampled tasks through unchecked and paid. The task is written to
//! the ledger's backlog and recorded unpaid (`unverifiable`, "deferred") until its verdict.
//! It counts as checked for the policy (a check dropped after its last claim stays counted,
//! its task unpaid). This actor feeds waiting checks to the pool, one per verifier thread at
//! a time, on every server that holds the model's reference; the verdict goes to the
//! Registry as any other, which pays a verified task at the next settlement and
//! quarantines a failed one. A database outage keeps checks here and writes them again on
//! the next ticks (delivered-token checks also run from memory meanwhile: see
//! `run_from_memory`); a full backlog leaves the task unpaid and owed to the policy. Checks in
//! this actor's mailbox or the pool's when the process dies are not lost: the check log
//! (`check_log`) keeps every sampled task's check, and every delivered-token check, until
//! the ledger holds it, and the next start replays them here.
//!
//! A delivered-token check ([`super::delivery_check`]) comes here first whatever the pool's
//! load ([`DeferDelivered`]): nothing is paid for those tokens, so nothing is marked, but
//! the check is in Postgres before it runs (during an outage it runs from memory), and the
//! node's waiting checks are bounded. One that finds no room, is dropped after its last
//! claim, or cannot be read back is recorded `unverifiable`, and its node is checked on
//! every task until one is verified.

use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};

use super::check_log::OwedCheck;
use super::delivery_check::{DeliveredCheck, PER_NODE_QUEUED, PER_NODE_WAITING};
use super::messages::{DeliveryChecked, QuarantineNode, VerificationDone};
use super::verifier::{Verifier, VerifyDelivered, VerifyTask};
use crate::crypto::identity::Address;
use crate::inference::SamplingParams;
use crate::ledger::check_backlog::{CheckKey, CheckKind, Deferred};
use crate::ledger::{LedgerError, Outcome, Store};
use crate::proof::policy::Policy;
use crate::proof::Proof;
use crate::protocol::{TaskId, TaskInput};
use crate::task::TokenLogprobs;

/// How long a claimed check may take before another claim may take it again.
const LEASE: Duration = Duration::from_secs(600);

/// Checks kept in memory while the database refuses them; past this, left to the check
/// log (their tasks unpaid meanwhile), which hands them out again once overdue.
const RETRY_MAX: usize = 10_000;

/// How often the check log is asked for overdue checks.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Checks written to the database at once: each holds one of the pool's connections, which
/// the Registry needs too.
const WRITERS: usize = 2;

/// How long one write may take before it counts as refused (a hung connection must not
/// hold the writers, and with them every check behind).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A sampled task for the backlog, and why it waits there (the unpaid mark's detail).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Defer {
    pub task: VerifyTask,
    pub why: &'static str,
}

/// Why a task the pool had no room for waits.
pub const POOL_FULL: &str = "deferred: the verifier pool was full; checked from the backlog, unpaid until then";

/// Why a check owed from before a restart waits (see `check_log`).
pub const REPLAYED: &str =
    "deferred: the server restarted before its check; checked from the backlog, unpaid until then";

/// Why a check owed too long in a running server waits (its verdict could not be written,
/// or it was dropped with a restarted actor).
pub const OVERDUE: &str = "deferred: its check was lost in the server; checked from the backlog, unpaid until then";

/// Why a task whose quality-check re-run disagreed waits: unpaid from the disagreement on,
/// not only once its verdict lands (it used to stay payable, `unchecked`, until then).
pub const DISAGREED: &str =
    "deferred: a quality-check re-run disagreed with its answer; checked from the backlog, unpaid until then";

/// Tokens a node delivered without a proof, to queue for their check.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeferDelivered(pub DeliveredCheck);

/// The checks the check log still owes from before this start: queued like deferred ones.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Replay(pub Vec<OwedCheck>);

/// A [`VerifyTask`] as the backlog (and the check log) stores it: everything but who hears
/// the verdict, which is whoever checks it.
#[derive(Serialize)]
struct StoredCheckRef<'a> {
    task: u64,
    node: String,
    model: &'a str,
    input: &'a TaskInput,
    params: &'a SamplingParams,
    prefix: &'a [u32],
    completion: &'a [u32],
    logprobs: &'a [TokenLogprobs],
    challenge: String,
    proof: Option<&'a Proof>,
}

/// What [`StoredCheckRef`] reads back as.
#[derive(Deserialize)]
struct StoredCheck {
    task: u64,
    node: String,
    model: String,
    input: TaskInput,
    params: SamplingParams,
    prefix: Vec<u32>,
    completion: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    challenge: String,
    proof: Option<Box<Proof>>,
}

/// The stored form of a check: one line of JSON.
pub fn encode(t: &VerifyTask) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&StoredCheckRef {
        task: t.task.0,
        node: t.node.to_string(),
        model: &t.model,
        input: &t.input,
        params: &t.params,
        prefix: &t.prefix,
        completion: &t.completion,
        logprobs: &t.logprobs,
        challenge: hex::encode(t.challenge),
        proof: t.proof.as_deref(),
    })
}

/// A stored check read back, its verdict going to `report`; `None` when it is damaged.
pub fn decode(bytes: &[u8], report: Vec<Recipient<VerificationDone>>) -> Option<VerifyTask> {
    serde_json::from_slice::<StoredCheck>(bytes).ok()?.into_task(report)
}

impl StoredCheck {
    fn into_task(self, report: Vec<Recipient<VerificationDone>>) -> Option<VerifyTask> {
        Some(VerifyTask {
            task: TaskId(self.task),
            node: self.node.parse().ok()?,
            model: self.model,
            input: self.input,
            params: self.params,
            prefix: self.prefix,
            completion: self.completion,
            logprobs: self.logprobs,
            challenge: hex::decode(&self.challenge).ok()?.try_into().ok()?,
            proof: self.proof,
            report,
            slot: None,
        })
    }
}

/// What the backlog needs: the ledger, the pool and who hears its verdicts.
#[derive(Clone)]
pub struct BacklogConfig {
    pub store: Store,
    pub pool: Addr<Verifier>,
    /// Who hears each verdict (Registry, Distributor).
    pub report: Vec<Recipient<VerificationDone>>,
    /// Who hears the verdict on delivered tokens (the Registry).
    pub delivered: Recipient<DeliveryChecked>,
    pub policy: std::sync::Arc<Policy>,
    /// The models this server holds a reference of: the only checks it claims.
    pub models: Vec<String>,
    /// Checks the backlog may hold.
    pub max: u64,
    /// How often to look for waiting checks.
    pub poll: Duration,
    /// Drain loops at most (one per verifier thread).
    pub loops: usize,
    /// The checks owed until the ledger holds them (settled once one waits in Postgres).
    pub checks: std::sync::Arc<super::check_log::CheckLog>,
    /// Where a node is held out of work (the Distributor, which tells the other servers).
    pub hold: Recipient<QuarantineNode>,
    /// How long a node whose failed tasks' checks are backed up gets no work.
    pub hold_for: Duration,
}

pub struct CheckBacklog {
    config: BacklogConfig,
    /// Drain loops running.
    running: usize,
    /// Checks on their way into the database, [`WRITERS`] at a time.
    pending: std::collections::VecDeque<Waiting>,
    /// Writes in flight, by a number of their own: put back in `pending` by a restart,
    /// which drops their futures.
    writing: std::collections::HashMap<u64, Waiting>,
    /// The number of the next write.
    next_write: u64,
    /// Checks the database refused (an outage), written again on the next ticks.
    retry: Vec<Waiting>,
    /// The last write was refused: delivered-token checks skip the database (and the line
    /// of writes before them) and run from memory until a write succeeds again.
    db_down: bool,
    /// Delivered-token checks running straight from memory (the database refused them).
    from_memory: usize,
    /// When the check log was last asked for overdue checks.
    swept: std::time::Instant,
}

impl CheckBacklog {
    pub fn new(config: BacklogConfig) -> Self {
        Self {
            config: BacklogConfig { loops: config.loops.max(1), ..config },
            running: 0,
            pending: std::collections::VecDeque::new(),
            writing: std::collections::HashMap::new(),
            next_write: 0,
            retry: Vec::new(),
            db_down: false,
            from_memory: 0,
            swept: std::time::Instant::now(),
        }
    }

    /// Writes again the checks the database refused, drops checks that ran out of
    /// attempts, and starts drain loops up to one per verifier thread; each claims and
    /// checks until nothing is waiting.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        // Once the last pass is written (or refused): during an outage each write may wait
        // out a connection timeout, and passes must not pile up.
        if self.pending.is_empty() && self.writing.is_empty() && !self.retry.is_empty() {
            // While the database refuses writes, delivered-token checks not yet run stay
            // where they run from memory; the rest (or, with none, the oldest) probe it.
            let db_down = self.db_down;
            let (stay, go): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retry)
                .into_iter()
                .partition(|w| db_down && !w.ran && matches!(w.kind, WaitingKind::Delivered { .. }));
            self.retry = stay;
            self.pending.extend(go);
            if self.pending.is_empty() {
                self.pending.push_back(self.retry.remove(0));
            }
        }
        self.pump(ctx);
        // Delivered-token checks have no block commit to force them to disk.
        self.config.checks.sync();
        // Looked for once a minute (the file is read only when one is due).
        if self.swept.elapsed() >= SWEEP_EVERY {
            self.swept = std::time::Instant::now();
            for owed in self.config.checks.overdue(super::check_log::OVERDUE) {
                tracing::warn!(task = %TaskId(owed.task), "a check owed too long in the check log; handed to the backlog");
                self.take_owed(owed, OVERDUE, ctx);
            }
        }
        {
            let config = self.config.clone();
            actix::spawn(async move {
                match config.store.drop_checks(None).await {
                    Ok(dropped) => {
                        for key in dropped {
                            dropped_check(&config, &key, "it never got its verdict");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "check backlog: could not drop exhausted checks"),
                }
            });
        }
        self.start_draining(ctx);
    }

    /// Starts drain loops up to one per verifier thread.
    fn start_draining(&mut self, ctx: &mut Context<Self>) {
        while self.running < self.config.loops {
            self.running += 1;
            let drain = drain(self.config.clone());
            ctx.spawn(drain.into_actor(self).map(|result, this, _| {
                this.running -= 1;
                match result {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(checked = n, "check backlog: deferred checks handed to the verifier"),
                    Err(e) => tracing::warn!(error = %e, "check backlog: draining stopped; retrying"),
                }
            }));
        }
    }
}

/// Claims waiting checks one by one and has each checked (waiting for pool room and the
/// check itself); returns how many went to the verifier.
async fn drain(config: BacklogConfig) -> Result<usize, String> {
    let (store, pool) = (&config.store, &config.pool);
    let mut checked = 0;
    let mut first = CheckKind::Delivered;
    while let Some(claimed) = store.claim_check(&config.models, LEASE, first).await.map_err(|e| e.to_string())? {
        first = match first {
            CheckKind::Delivered => CheckKind::Proof,
            CheckKind::Proof => CheckKind::Delivered,
        };
        tracing::debug!(task = %TaskId(claimed.task), kind = claimed.kind.as_str(), attempt = claimed.attempts, "checking a waiting check");
        let sent = match claimed.kind {
            CheckKind::Proof => match decode(&claimed.check, config.report.clone()) {
                Some(task) => Some(pool.send(task).await),
                None => None,
            },
            CheckKind::Delivered => match super::delivery_check::decode(&claimed.check) {
                Some(check) => Some(pool.send(VerifyDelivered { check, report: config.delivered.clone() }).await),
                None => None,
            },
        };
        let Some(sent) = sent else {
            let key = CheckKey { task: claimed.task, node: claimed.node, kind: claimed.kind };
            tracing::error!(task = %TaskId(key.task), node = %key.node, kind = key.kind.as_str(), "an unreadable waiting check");
            store.drop_checks(Some(&key)).await.map_err(|e| e.to_string())?;
            dropped_check(&config, &key, "it could not be read back");
            continue;
        };
        sent.map_err(|e| format!("the verifier pool: {e}"))?;
        checked += 1;
    }
    Ok(checked)
}

/// A waiting check taken out of the backlog without a verdict (`why`): a proof check's task
/// stays unpaid; delivered tokens are recorded unchecked, their node checked on every task
/// until one is verified.
fn dropped_check(config: &BacklogConfig, key: &CheckKey, why: &str) {
    let task = TaskId(key.task);
    match key.kind {
        CheckKind::Proof => {
            tracing::warn!(%task, node = %key.node, why, "a deferred check was dropped; the task stays unpaid");
        }
        CheckKind::Delivered => {
            let Ok(node) = key.node.parse::<Address>() else {
                tracing::error!(%task, node = %key.node, "a waiting delivered-token check names no node address");
                return;
            };
            delivered_unchecked(config, task, node, 0, format!("not checked: {why}"));
        }
    }
}

/// A node whose failed tasks' delivered tokens wait for more checks than one node may
/// have waiting gets no work, on any server, for [`BacklogConfig::hold_for`]. The cap
/// bounds what a node's failures cost the verifiers; without the hold it was a switch the
/// node controlled: with enough honest failures waiting, the next tasks it streamed wrong
/// text on and failed went unchecked, and "checked on every task until verified" never
/// caught it, since it never finished one.
fn hold_out(config: &BacklogConfig, node: Address, why: &str) {
    tracing::warn!(%node, %why, hold_s = config.hold_for.as_secs(),
        "a node's failed tasks wait for too many checks: no work for it for a while");
    config.hold.do_send(QuarantineNode { address: node.to_string(), duration: config.hold_for, announce: true });
}

/// Tokens a node delivered that will not be checked: recorded `unverifiable` with the
/// reason, and the node is checked on every task until one is verified.
fn delivered_unchecked(config: &BacklogConfig, task: TaskId, node: Address, tokens: usize, detail: String) {
    tracing::warn!(%task, %node, tokens, %detail,
        "a node's delivered tokens not checked; the node is checked on every task until verified");
    config.policy.check_until_verified(&node);
    config.delivered.do_send(DeliveryChecked {
        task,
        node,
        tokens,
        outcome: Outcome::Unverifiable,
        detail,
        evidence: None,
    });
}

impl Actor for CheckBacklog {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Checks deferred before a restart (or by another server) start at once.
        self.tick(ctx);
        ctx.run_interval(self.config.poll, |this, ctx| this.tick(ctx));
    }
}

impl Supervised for CheckBacklog {
    /// A restart drops the running drain loops with the old context; their claims come
    /// back when their leases run out.
    /// Writes in flight are put back in line; delivered-token checks that were running from
    /// memory are written once the database takes them, and run then.
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.running = 0;
        let mut interrupted: Vec<(u64, Waiting)> = self.writing.drain().collect();
        interrupted.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        for (_, waiting) in interrupted {
            self.pending.push_front(waiting);
        }
        self.from_memory = 0;
    }
}

impl Handler<Defer> for CheckBacklog {
    type Result = ();

    fn handle(&mut self, Defer { task, why }: Defer, ctx: &mut Context<Self>) {
        let (id, node, model) = (task.task, task.node, task.model.clone());
        match encode(&task) {
            Ok(check) => self.write(Waiting { id, node, model, check, kind: WaitingKind::Proof(why), ran: false }, ctx),
            Err(e) => self.leave_unpaid(id, node, format!("not checked: the check could not be stored: {e}")),
        }
    }
}

impl Handler<DeferDelivered> for CheckBacklog {
    type Result = ();

    fn handle(&mut self, DeferDelivered(check): DeferDelivered, ctx: &mut Context<Self>) {
        self.defer_delivered(check, ctx);
    }
}

impl CheckBacklog {
    /// Queues a delivered-token check (already written ahead to the check log).
    fn defer_delivered(&mut self, check: DeliveredCheck, ctx: &mut Context<Self>) {
        let (id, node, model, tokens) = (check.task, check.node, check.model.clone(), check.delivered.len());
        match super::delivery_check::encode(&check) {
            Ok(bytes) => {
                let kind = WaitingKind::Delivered { tokens };
                let waiting = Waiting { id, node, model, check: bytes, kind, ran: false };
                if self.db_down {
                    // Not behind a line of writes that each wait out a timeout.
                    let refused = LedgerError::Database("the last write to the check backlog was refused".into());
                    self.delivered_written(Err(refused), waiting, tokens, ctx);
                } else {
                    self.write(waiting, ctx);
                }
            }
            Err(e) => delivered_unchecked(&self.config, id, node, tokens, format!("not checked: not stored: {e}")),
        }
    }
}

impl Handler<Replay> for CheckBacklog {
    type Result = ();

    fn handle(&mut self, Replay(owed): Replay, ctx: &mut Context<Self>) {
        for check in owed {
            self.take_owed(check, REPLAYED, ctx);
        }
    }
}

/// A check on its way into the backlog.
#[derive(Clone)]
struct Waiting {
    id: TaskId,
    node: Address,
    model: String,
    check: Vec<u8>,
    kind: WaitingKind,
    /// A delivered-token check already run from memory while the database refused it: not
    /// run so again (it is still written, and a recorded verdict makes that a no-op).
    ran: bool,
}

/// What a [`Waiting`] check checks.
#[derive(Clone, Copy, PartialEq)]
enum WaitingKind {
    /// A sampled task's proof, and why it waits (its unpaid mark's detail).
    Proof(&'static str),
    /// Tokens a node delivered without a proof: how many.
    Delivered { tokens: usize },
}

impl CheckBacklog {
    /// Writes a check to the backlog, [`WRITERS`] at a time. A database error keeps it here
    /// to retry on the next ticks.
    fn write(&mut self, waiting: Waiting, ctx: &mut Context<Self>) {
        self.pending.push_back(waiting);
        self.pump(ctx);
    }

    /// Starts writes of pending checks up to [`WRITERS`] in flight.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        while self.writing.len() < WRITERS {
            let Some(waiting) = self.pending.pop_front() else { return };
            let number = self.next_write;
            self.next_write += 1;
            self.writing.insert(number, waiting.clone());
            let store = self.config.store.clone();
            let max = self.config.max;
            let write = async move {
                let node = waiting.node.to_string();
                let (task, model, check) = (waiting.id.0, &waiting.model, &waiting.check);
                match waiting.kind {
                    WaitingKind::Proof(why) => {
                        // A quality check's disagreement is checked however full the backlog
                        // is: it is rare (`quality_check_rate`), and left unchecked the
                        // cheater would go unjudged.
                        let max = (why != DISAGREED).then_some(max);
                        store.defer_check(task, &node, model, check, max, why).await
                    }
                    WaitingKind::Delivered { .. } => {
                        store.defer_delivered(task, &node, model, check, max, PER_NODE_QUEUED, PER_NODE_WAITING).await
                    }
                }
            };
            async move {
                tokio::time::timeout(WRITE_TIMEOUT, write).await.unwrap_or_else(|_| {
                    Err(LedgerError::Database(format!("no answer within {} s", WRITE_TIMEOUT.as_secs())))
                })
            }
            .into_actor(self)
            .map(move |result, this, ctx| {
                let Some(waiting) = this.writing.remove(&number) else { return };
                this.db_down = result.is_err();
                match waiting.kind {
                    WaitingKind::Proof(why) => this.proof_written(result, waiting, why),
                    WaitingKind::Delivered { tokens } => this.delivered_written(result, waiting, tokens, ctx),
                }
                this.pump(ctx);
            })
            .spawn(ctx);
        }
    }

    /// What writing a sampled task's proof check did.
    fn proof_written(&mut self, result: Result<Deferred, LedgerError>, waiting: Waiting, why: &'static str) {
        let (id, node) = (waiting.id, waiting.node);
        match result {
            // (`QueuedAtHold` is for delivered-token checks only.)
            Ok(Deferred::Queued | Deferred::QueuedAtHold) => {
                // In Postgres now: a crash no longer loses it.
                self.config.checks.settle(CheckKind::Proof, id.0, node.0);
                tracing::info!(task = %id, %node, why, "task deferred to the check backlog (unpaid until checked)");
            }
            Ok(Deferred::AlreadyChecked) => self.config.checks.settle(CheckKind::Proof, id.0, node.0),
            Ok(Deferred::OtherNode | Deferred::NodeFull) => {
                // The verdict table holds one verdict per task; a failover's other node has it.
                tracing::warn!(task = %id, %node, "a deferred check's task already has another node's verdict; not queued");
                self.config.checks.settle(CheckKind::Proof, id.0, node.0);
                self.config.policy.not_checked(&node);
            }
            Ok(Deferred::Full) => {
                let max = self.config.max;
                self.leave_unpaid(
                    id,
                    node,
                    format!("not checked: the verifier pool and its backlog ({max} checks) are full"),
                );
            }
            Err(e) => {
                if !self.keep_for_retry(waiting, &e) {
                    // Not left `unverifiable` for good: the check log still owes it, and it is
                    // handed out again once overdue. Its task stays unpaid (`sampled`)
                    // meanwhile, but for a quality check's disagreement, whose receipt stays
                    // `unchecked` until then: the write that marks it failed with the rest.
                    tracing::error!(task = %id, %node, error = %e,
                        "the check backlog could not take a check, and too many wait; left to the check log");
                }
            }
        }
    }

    /// What writing a delivered-token check did: a queued one is drained at once.
    fn delivered_written(
        &mut self,
        result: Result<Deferred, LedgerError>,
        waiting: Waiting,
        tokens: usize,
        ctx: &mut Context<Self>,
    ) {
        let (id, node, ran) = (waiting.id, waiting.node, waiting.ran);
        // In Postgres now (the check, or its verdict): a crash no longer loses it. The
        // others settle once the Registry records their verdict (`unverifiable` here).
        if matches!(
            result,
            Ok(Deferred::Queued | Deferred::QueuedAtHold | Deferred::AlreadyChecked | Deferred::OtherNode)
        ) {
            self.config.checks.settle(CheckKind::Delivered, id.0, node.0);
        }
        let why = match result {
            Ok(held @ (Deferred::Queued | Deferred::QueuedAtHold)) => {
                if held == Deferred::QueuedAtHold {
                    hold_out(&self.config, node, &format!("{PER_NODE_WAITING} such checks of this node wait"));
                }
                tracing::info!(task = %id, %node, tokens, "a node's delivered tokens queued for their check");
                self.start_draining(ctx);
                return;
            }
            Ok(Deferred::AlreadyChecked) => {
                tracing::info!(task = %id, %node, "a delivered-token check written late: its verdict is recorded already");
                return;
            }
            Ok(Deferred::OtherNode) => return,
            Ok(Deferred::NodeFull) => {
                let why = format!("{PER_NODE_QUEUED} such checks of this node wait already");
                hold_out(&self.config, node, &why);
                why
            }
            Ok(Deferred::Full) => {
                // A node whose failures cannot be checked gets no more work for a while:
                // with the backlog full (throwaway keys can fill its delivered half), it
                // could otherwise stream wrong text and fail task after task, unchecked.
                let why =
                    format!("the check backlog's room for these checks is full ({} checks in all)", self.config.max);
                hold_out(&self.config, node, &why);
                why
            }
            Err(e) => {
                let node_full = self.delivered_in_retry(node) >= PER_NODE_WAITING;
                if self.keep_for_retry(waiting, &e) {
                    self.run_from_memory(ctx);
                    return;
                }
                let why = format!("the check backlog could not take it, and too many wait: {e}");
                if node_full {
                    hold_out(&self.config, node, &why);
                }
                why
            }
        };
        if ran {
            // Its verdict came from memory already: only the write is skipped.
            tracing::warn!(task = %id, %node, %why, "a delivered-token check that ran from memory was not written");
            return;
        }
        delivered_unchecked(&self.config, id, node, tokens, format!("not checked: {why}"));
    }

    /// Keeps a check the database refused, to write again on the next ticks, unless too
    /// many wait already (`false`).
    fn keep_for_retry(&mut self, waiting: Waiting, e: &LedgerError) -> bool {
        // The overdue sweep may hand out a check that already waits here, or is on its way
        // to the database again.
        let same = |w: &&Waiting| {
            (w.id, w.node) == (waiting.id, waiting.node)
                && matches!(w.kind, WaitingKind::Proof(_)) == matches!(waiting.kind, WaitingKind::Proof(_))
        };
        if self.retry.iter().chain(&self.pending).chain(self.writing.values()).any(|w| same(&w)) {
            return true;
        }
        if self.retry.len() >= RETRY_MAX {
            return false;
        }
        // A node's delivered-token checks are bounded here as in the database.
        if matches!(waiting.kind, WaitingKind::Delivered { .. })
            && !waiting.ran
            && self.delivered_in_retry(waiting.node) >= PER_NODE_WAITING
        {
            return false;
        }
        tracing::warn!(task = %waiting.id, node = %waiting.node, error = %e, "the check backlog could not take a check; retrying");
        self.retry.push(waiting);
        true
    }

    /// `node`'s delivered-token checks waiting here for the database (one already run from
    /// memory only waits to be written: not counted).
    fn delivered_in_retry(&self, node: Address) -> u64 {
        let delivered = |w: &&Waiting| w.node == node && !w.ran && matches!(w.kind, WaitingKind::Delivered { .. });
        self.retry.iter().filter(delivered).count() as u64
    }

    /// Runs delivered-token checks the database refused straight from memory, up to one
    /// per verifier thread at a time (the drain loops stop while it refuses): a node that
    /// streamed a game wrong text is quarantined during an outage too. Each stays in
    /// `retry`, written once the database is back; its verdict, recorded by then, makes
    /// that write a no-op (or, recorded later, the check runs once more and counts once).
    /// A crash before the write or the verdict is recorded loses nothing: the check log
    /// owes the check until then, and the next start replays it.
    fn run_from_memory(&mut self, ctx: &mut Context<Self>) {
        while self.from_memory < self.config.loops {
            let next = self.retry.iter_mut().find(|w| !w.ran && matches!(w.kind, WaitingKind::Delivered { .. }));
            let Some(waiting) = next else { return };
            waiting.ran = true;
            let (id, node) = (waiting.id, waiting.node);
            let Some(check) = super::delivery_check::decode(&waiting.check) else {
                // Not expected: it was encoded by this process.
                tracing::error!(task = %id, %node, "a delivered-token check could not be read back from memory");
                continue;
            };
            tracing::warn!(task = %id, %node, "the database refused a delivered-token check; running it from memory");
            self.from_memory += 1;
            let checked = self.config.pool.send(VerifyDelivered { check, report: self.config.delivered.clone() });
            checked
                .into_actor(self)
                .map(move |sent, this, ctx| {
                    this.from_memory -= 1;
                    if let Err(e) = sent {
                        tracing::error!(task = %id, %node, error = %e, "the verifier pool did not take a delivered-token check");
                    }
                    this.run_from_memory(ctx);
                })
                .spawn(ctx);
        }
    }

    /// Queues a check the check log owes. One that cannot be read back (not expected: the
    /// log keeps whole lines only) is left unpaid (a proof check) or recorded unchecked (a
    /// delivered-token check), which settles it.
    fn take_owed(&mut self, owed: OwedCheck, why: &'static str, ctx: &mut Context<Self>) {
        let (id, node) = (TaskId(owed.task), Address(owed.node));
        if owed.kind == CheckKind::Delivered {
            match super::delivery_check::decode(&owed.check) {
                Some(check) if (check.task, check.node) == (id, node) => self.defer_delivered(check, ctx),
                _ => delivered_unchecked(
                    &self.config,
                    id,
                    node,
                    0,
                    "not checked: its written-ahead check could not be read back".into(),
                ),
            }
            return;
        }
        match decode(&owed.check, Vec::new()) {
            Some(task) => {
                let kind = WaitingKind::Proof(why);
                self.write(Waiting { id, node, model: task.model, check: owed.check, kind, ran: false }, ctx)
            }
            None => self.leave_unpaid(id, node, "not checked: its written-ahead check could not be read back".into()),
        }
    }

    /// A sampled task that cannot be checked: unpaid, and owed to the policy.
    fn leave_unpaid(&self, task: TaskId, node: Address, reason: String) {
        tracing::warn!(%task, %node, %reason, "a sampled task left unpaid");
        self.config.policy.not_checked(&node);
        unpaid(&self.config.report, task, node, reason);
    }
}

/// Tells the Registry (and Distributor) that `task` could not be checked: never paid.
fn unpaid(report: &[Recipient<VerificationDone>], task: TaskId, node: Address, detail: String) {
    for r in report {
        r.do_send(VerificationDone {
            task,
            node,
            outcome: Outcome::Unverifiable,
            detail: detail.clone(),
            evidence: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(challenge: [u8; 32]) -> VerifyTask {
        VerifyTask {
            task: TaskId(7),
            node: Address([9; 20]),
            model: "m".into(),
            input: TaskInput::Text("Once\nupon".into()),
            params: SamplingParams { temperature: 0.5, seed: 3, ..Default::default() },
            prefix: vec![4],
            completion: vec![5, 6],
            logprobs: Vec::new(),
            challenge,
            proof: None,
            report: Vec::new(),
            slot: None,
        }
    }

    #[test]
    fn a_stored_check_reads_back_as_the_same_task_and_a_damaged_one_not_at_all() {
        let bytes = encode(&task([1; 32])).unwrap();
        assert!(!bytes.contains(&b'\n'), "one line of the check log");
        let back = decode(&bytes, Vec::new()).unwrap();
        let want = task([1; 32]);
        assert_eq!((back.task, back.node, back.model.as_str()), (want.task, want.node, "m"));
        assert_eq!((back.prefix, back.completion, back.challenge), (want.prefix, want.completion, want.challenge));
        assert_eq!(back.params, want.params);
        assert!(matches!(back.input, TaskInput::Text(t) if t == "Once\nupon"));
        let mut damaged: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        damaged["challenge"] = "abcd".into();
        let damaged = serde_json::from_value::<StoredCheck>(damaged).unwrap();
        assert!(damaged.into_task(Vec::new()).is_none(), "a short challenge");
    }
}
