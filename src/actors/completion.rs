//! `Completion`: what happens once a node's part of a task is over, for every node.
//!
//! A [`NodeProxy`] is the link (handshake, writer, dispatch, tokens); when a task ends it
//! hands the job here and forgets it. This actor, on its own thread so that signature checks
//! never run on an HTTP worker, then:
//!
//! - checks the node's receipt against what the server relayed, prices it, writes the
//!   completion ahead in the [`CompletionLog`] and hands it to the Registry;
//! - charges the game's per-minute token budget (for answers and hang-ups alike);
//! - checks every proof's structure (task, challenge, signer, counts) before it pays, and
//!   picks tasks for the reference replay, holds a non-streamed answer until its verdict in
//!   synchronous mode, and has a rejected one produced again elsewhere;
//! - starts quality-check re-runs and compares them with the original;
//! - checks re-sent receipts (paid only when the log witnessed them) and block
//!   confirmations.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;

use super::check_log::CheckKind;
use super::completion_log::CompletionLog;
use super::distributor::Distributor;
use super::messages::*;
use super::registry::Registry;
use crate::crypto::identity::{recover, Address};
use crate::ledger::PriceTable;
use crate::proof::Proof;
use crate::protocol::receipt::{confirmation_message, output_hash, ReceiptError, SignedReceipt};
use crate::protocol::{FinishReason, TaskFailure, TaskId, TaskUsage};

/// What the server needs to have tasks checked.
#[derive(Clone)]
pub struct Verification {
    /// Served models with a reference copy: their tasks carry a challenge.
    pub models: Arc<HashSet<String>>,
    /// Vocabulary size of each reference model: a token id at or above it is refused.
    pub vocab: Arc<HashMap<String, usize>>,
    pub policy: Arc<crate::proof::policy::Policy>,
    pub pool: Addr<super::verifier::Verifier>,
    /// Tasks in the pool now; a sampled task finding `queue` of them is deferred.
    pub load: super::verifier::PoolLoad,
    pub queue: usize,
    /// Where sampled tasks wait when the pool is full (unpaid until checked), and every
    /// check of tokens a node delivered without a proof.
    pub backlog: Addr<super::check_backlog::CheckBacklog>,
    /// Every sampled task's check, written ahead until the ledger holds its verdict.
    pub checks: Arc<super::check_log::CheckLog>,
    /// Who hears each verdict (Registry, Distributor).
    pub report: Vec<Recipient<VerificationDone>>,
    /// Hold non-streamed answers until their proof is checked; re-run them elsewhere
    /// when it fails.
    pub synchronous: bool,
    /// Share of finished tasks re-run on a second node with the same seed and compared.
    pub quality_check_rate: f64,
    /// The internal game quality-check re-runs are billed to (the operator pays).
    pub quality_game: i64,
}

impl std::fmt::Debug for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verification").field("models", &self.models).finish_non_exhaustive()
    }
}

pub struct CompletionConfig {
    /// Authenticates task tickets; shared by every server on the registry database.
    pub ticket_secret: Arc<[u8; 32]>,
    pub prices: Arc<PriceTable>,
    pub registry: Addr<Registry>,
    pub distributor: Addr<Distributor>,
    /// Proof of inference: absent when no reference model is configured.
    pub verification: Option<Verification>,
    /// The Gateway's per-key token budgets.
    pub usage: Recipient<RecordUsage>,
    /// The completions this server saw (a re-sent receipt is paid only if listed there).
    pub completions: Arc<CompletionLog>,
    /// The other servers of the network, told of every completion seen here.
    pub peers: Arc<super::cluster::Peers>,
}

/// A task whose node sent `Done`: the job carries every token the server relayed (the
/// tail of its text already sent to the game).
#[derive(Message)]
#[rtype(result = "()")]
pub struct TaskFinished {
    pub node: NodeId,
    pub address: Address,
    /// Hears which block holds the receipt.
    pub reply_to: Recipient<ReceiptsRecorded>,
    pub job: Job,
    /// The proof-of-inference challenge sent with the task.
    pub challenge: Option<[u8; 32]>,
    /// Tokens the job had emitted on other nodes before this one (failover).
    pub prefix_len: usize,
    pub finish_reason: FinishReason,
    pub receipt: SignedReceipt,
    pub proof: Option<Box<Proof>>,
    pub latency_ms: i32,
    /// What frees the node's slot at the Distributor, released once the proof's structure
    /// is judged: a failed one's quarantine goes first, into the same mailbox, so a queued
    /// job cannot reach a node just caught. (The proxy used to free it on `Done`.)
    pub freed: FreeSlot,
}

/// Frees a node's slot at the Distributor once: when released, or else when dropped (a
/// `TaskFinished` lost to a panic or a closed mailbox still frees its node's slot).
pub struct FreeSlot(Option<(Addr<Distributor>, TaskCompleted)>);

impl FreeSlot {
    pub fn new(distributor: Addr<Distributor>, completed: TaskCompleted) -> Self {
        Self(Some((distributor, completed)))
    }

    /// A slot freed already (a task without a challenge: no proof to judge first).
    pub fn freed() -> Self {
        Self(None)
    }

    pub fn release(&mut self) {
        if let Some((distributor, completed)) = self.0.take() {
            distributor.do_send(completed);
        }
    }
}

impl Drop for FreeSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// The game left mid-stream after `delivered` tokens reached it: those are charged to its
/// budget, and billed and paid with the node's receipt for them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TaskAbandoned {
    pub address: Address,
    pub task: TaskId,
    pub key_hash: String,
    pub prompt_tokens: usize,
    pub delivered: Vec<u32>,
    /// Write the tokens ahead as witnessed, so that the node's receipt is paid on its own
    /// (a task without a challenge, and tokens of the node's own). A task with one is paid
    /// only with its proof ([`HangUpProved`]); a hang-up within a continuation's prefix only
    /// charges the game's budget.
    pub witness: bool,
    /// The server that forwarded the job here (`Job::origin`): the game's budget is
    /// charged there, where it was admitted and is counted.
    pub origin: Option<String>,
}

/// The node's receipt and proof for the tokens a game received before it left: checked
/// like a completion of exactly those, and paid with the same proof rules.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HangUpProved {
    pub address: Address,
    pub reply_to: Recipient<ReceiptsRecorded>,
    /// `emitted` holds exactly the delivered tokens.
    pub job: Job,
    pub challenge: [u8; 32],
    pub prefix_len: usize,
    pub receipt: SignedReceipt,
    pub proof: Option<Box<Proof>>,
    pub latency_ms: i32,
    /// The format the node's proofs declared for this model on its link (what its tokens
    /// are held to if they are checked without a proof).
    pub format: Option<crate::proof::Format>,
}

/// A finished job whose completion the other servers now know of: the game hears Done.
/// Sent to this actor's own mailbox, which survives a restart (a future spawned on its
/// context would not).
#[derive(Message)]
#[rtype(result = "()")]
struct Deliver {
    job: Job,
    finish_reason: FinishReason,
    usage: TaskUsage,
}

/// Receipts a node re-sent after a reconnect (already bounded per frame and per second by
/// its proxy).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReceiptsResent {
    pub address: Address,
    pub receipts: Vec<SignedReceipt>,
    pub reply_to: Recipient<ReceiptsRecorded>,
}

/// A non-streamed answer held until its proof is checked.
struct Held {
    node: NodeId,
    job: Job,
    finish_reason: FinishReason,
    usage: TaskUsage,
    /// The other servers being told of the completion: an accepted answer waits for it
    /// too, so a node's re-sent receipt can be paid elsewhere whatever came first.
    told: Option<Told>,
}

/// Why a receipt is not paid; `lie` when an honest node could not have signed it.
struct Refusal {
    reason: String,
    lie: bool,
}

/// Telling the other servers of a completion, awaited by whoever needs it done.
type Told = futures_util::future::Shared<futures_util::future::LocalBoxFuture<'static, ()>>;

pub struct Completion {
    config: CompletionConfig,
    held: HashMap<TaskId, Held>,
}

impl Completion {
    pub fn new(config: CompletionConfig) -> Self {
        Self { config, held: HashMap::new() }
    }

    /// Starts the actor on a thread of its own, supervised.
    pub fn start_on_own_thread(config: CompletionConfig) -> Addr<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let arbiter = Arbiter::new();
        arbiter.spawn_fn(move || {
            let addr = super::supervisor::start("completion", move |_| Completion::new(config));
            let _ = tx.send(addr);
        });
        rx.recv().expect("the completion thread starts")
    }

    /// Whether `receipt` is refused ([`refusal`](Self::refusal)): then logged, and neither
    /// billed nor paid. `job` is the live task it closes (none for a receipt re-sent after
    /// a reconnect).
    fn refused(&self, address: Address, receipt: &SignedReceipt, job: Option<&Job>) -> bool {
        let Some(Refusal { reason, .. }) = self.refusal(address, receipt, job) else { return false };
        tracing::warn!(%address, task = %receipt.ticket.task, %reason, "receipt refused");
        true
    }

    /// Hands a receipt [`refusal`](Self::refusal) found nothing against to the Registry,
    /// priced, with what the server saw of it; false if it cannot be priced. `live` is the
    /// job it closes (absent for receipts re-sent after a reconnect) and the latency
    /// observed at the proxy; `picked`, whether the policy picked it for a check (for a
    /// re-sent receipt, the completion log says): it is then paid only with its verdict.
    fn write(
        &self,
        address: Address,
        receipt: SignedReceipt,
        live: Option<(&Job, i32)>,
        reply_to: Recipient<ReceiptsRecorded>,
        picked: bool,
    ) -> bool {
        let task = receipt.ticket.task;
        // Checked against the ticket: the server's count, or within its bound.
        let prompt_tokens = receipt.prompt_tokens;
        // A continuation is paid for its own tokens, not the failed node's before it: no
        // token is paid twice.
        let own_tokens = receipt.ticket.own_tokens(receipt.completion_tokens);
        let price = self.config.prices.for_model(&receipt.ticket.model);
        let Ok(price) = price.charge(prompt_tokens as u64, own_tokens as u64) else {
            tracing::warn!(task = %task, "receipt price overflows; refused");
            return false;
        };
        let output_hash: [u8; 32] =
            hex::decode(&receipt.output_hash).ok().and_then(|h| h.try_into().ok()).expect("checked: 32 bytes of hex");
        // Paid only for work the server saw: a live completion is written ahead (before the
        // game hears Done); a re-sent receipt must match one, or already be on the books.
        let log = &self.config.completions;
        // The pick is written with it: a re-sent receipt of a picked task is paid only once
        // verified, by this server or another one of the network.
        let seen = if live.is_some() {
            log.record(task.0, address.0, receipt.completion_tokens, output_hash, picked);
            Some(picked)
        } else {
            log.seen(task.0, address.0, receipt.completion_tokens, output_hash)
        };
        let (witnessed, sampled) = (seen.is_some(), seen == Some(true));
        let ledger_receipt = crate::ledger::Receipt {
            task: task.0,
            game_id: receipt.ticket.game,
            node: address.to_string(),
            model: receipt.ticket.model.clone(),
            prompt_tokens,
            completion_tokens: own_tokens,
            price,
            latency_ms: live.map_or(-1, |(_, ms)| ms),
            output_hash,
            receipt_hash: receipt.hash(),
            signature: hex::decode(&receipt.signature).unwrap_or_default(),
            signed_bytes: receipt.signed_bytes(),
            witnessed,
            sampled,
        };
        self.config.registry.do_send(RecordReceipt { receipt: ledger_receipt, reply_to });
        true
    }

    /// Why `receipt`, signed by `address`, is not paid: a signature or ticket that does not
    /// hold, or, for the live task `job`, figures other than the server's.
    fn refusal(&self, address: Address, receipt: &SignedReceipt, job: Option<&Job>) -> Option<Refusal> {
        let task = receipt.ticket.task;
        // Figures other than those of the tokens the server relayed: the receipt (and the
        // block's Merkle root over it) names the output the game received, not another.
        let other = job.and_then(|job| {
            if receipt.ticket.task != job.id {
                Some(format!("it names task {task}, not {}", job.id))
            } else if receipt.completion_tokens as usize != job.emitted.len() {
                Some(format!(
                    "it claims {} completion tokens; {} arrived",
                    receipt.completion_tokens,
                    job.emitted.len()
                ))
            } else if receipt.output_hash != hex::encode(output_hash(&job.emitted)) {
                Some("its output hash is not that of the tokens the server relayed".to_string())
            } else {
                None
            }
        });
        match (receipt.check(&self.config.ticket_secret, &address), other) {
            (Ok(()), None) => None,
            // The prompt is counted with the node's own file and template: an honest node of
            // another version, or past the bound the server guessed for a model it holds no
            // tokenizer of, counts otherwise. Not paid, but no lie when the rest is the
            // node's own.
            (Err(e @ ReceiptError::PromptTokens { .. }), None) => {
                let own = receipt.ticket.authentic(&self.config.ticket_secret)
                    && receipt.ticket.node == address.to_string()
                    && receipt.signed_by(&address);
                Some(Refusal { reason: e.to_string(), lie: !own })
            }
            (_, Some(reason)) => Some(Refusal { reason, lie: true }),
            (Err(e), None) => Some(Refusal { reason: e.to_string(), lie: true }),
        }
    }

    /// A task whose proof failed its structural checks, or whose receipt lies: the node is
    /// judged as for a failed replay (the Registry lowers its reputation, the Distributor
    /// quarantines it), and the task is not paid.
    fn reject(&self, address: Address, task: TaskId, what: &str, fault: &str) {
        tracing::warn!(%address, task = %task, %fault, "{what} REJECTED before payment; unpaid");
        let Some(v) = &self.config.verification else { return };
        for r in &v.report {
            r.do_send(VerificationDone {
                task,
                node: address,
                outcome: crate::ledger::Outcome::Failed,
                detail: fault.to_string(),
                evidence: None,
            });
        }
    }

    /// A non-streamed answer the game must not read (its node failed a check): produced
    /// again from its start, on another node.
    fn produce_again(&self, node: NodeId, address: Address, mut job: Job, why: String) {
        job.restart();
        // A new task id for the re-run, so the honest node's receipt is not taken for a
        // duplicate of the failed one (the game's answer is named by the re-run's).
        job.id = TaskId(rand::random());
        let failure = TaskFailure::Node(why);
        self.config.distributor.do_send(TaskReturned { node, address: address.to_string(), job, failure });
    }

    /// Charges `tokens` to the game's per-minute budget.
    fn charge(&self, key_hash: &str, tokens: usize) {
        if !key_hash.is_empty() {
            self.config.usage.do_send(RecordUsage { key_hash: key_hash.to_string(), tokens });
        }
    }

    /// Tells the other servers of the network that `node` finished `task` with this output
    /// (so that its receipt is paid by any of them); `None` when there are none. The
    /// future ends once NATS has it.
    fn tell_peers(
        &self,
        task: TaskId,
        node: Address,
        completion_tokens: u32,
        output_hash: [u8; 32],
        sampled: bool,
    ) -> Option<impl std::future::Future<Output = ()>> {
        let cluster = self.config.peers.cluster()?.clone();
        if self.config.peers.servers(std::time::Instant::now()) < 2 {
            return None;
        }
        let witness =
            super::cluster::Outbound::Witness { task: task.0, node: node.0, completion_tokens, output_hash, sampled };
        Some(async move {
            let _ = cluster.send(witness).await;
        })
    }

    /// The game hears its answer is complete, and its budget is charged for it (by the
    /// server that admitted it: for a job another server forwarded, that one, with the
    /// `Done` it relays; when that server's game left just before, with a charge).
    fn deliver(&self, job: &Job, finish_reason: FinishReason, usage: TaskUsage) {
        let tokens = usage.prompt_tokens.saturating_add(usage.completion_tokens);
        if job.origin.is_none() {
            self.charge(&job.key_hash, tokens);
        }
        let relayed = job.events.send(JobEvent::Done { finish_reason, usage, task: job.id }).is_ok();
        if let (false, Some(origin)) = (relayed, &job.origin) {
            self.charge_origin(origin, job.id, &job.key_hash, tokens);
        }
    }

    /// Charges `tokens` of `task`, a job `origin` forwarded here whose game left, to the
    /// key's budget at `origin`, where it was admitted (this Gateway holds none of it).
    fn charge_origin(&self, origin: &str, task: TaskId, key_hash: &str, tokens: usize) {
        if key_hash.is_empty() {
            return;
        }
        match self.config.peers.cluster() {
            Some(cluster) => cluster.do_send(super::cluster::Outbound::Charge {
                origin: origin.to_string(),
                task,
                key_hash: key_hash.to_string(),
                tokens,
            }),
            None => tracing::warn!(%task, %origin, tokens, "a forwarded hang-up's charge lost: no cluster"),
        }
    }

    /// Now and then re-runs a finished task on another node with the same seed.
    fn maybe_quality_check(&self, done: &TaskFinished) {
        let Some(v) = &self.config.verification else { return };
        // Only a task with a challenge (of a model the verifiers hold) can be judged when its
        // re-run disagrees; without one, the re-run would be paid from the operator's escrow
        // and could change nothing (honest nodes of other formats disagree too).
        if done.challenge.is_none() {
            return;
        }
        if rand::random::<f64>() >= v.quality_check_rate {
            return;
        }
        // Nobody waits for the re-run's text: drain it.
        let (events, mut rx) = super::job_events::unlimited();
        actix::spawn(async move { while rx.recv().await.is_some() {} });
        let original = &done.job;
        let billing = Billing { game: "quality-checks".into(), game_id: v.quality_game, key_hash: String::new() };
        let mut job = Job::new(TaskId(rand::random()), billing, original.request(), events);
        // A failover continuation is re-run after the same prefix: the node is answerable
        // for its own tokens only (the prefix's nodes have their own checks).
        let prefix_len = done.prefix_len.min(original.emitted.len());
        if prefix_len > 0 {
            let kept = original.emitted_logprobs.len().min(prefix_len);
            if original.params.logprobs.is_some() && kept < prefix_len {
                return; // the prefix's log probabilities were not all kept: no aligned re-run
            }
            job.continue_after(&original.emitted[..prefix_len], &original.emitted_logprobs[..kept]);
        }
        job.failed_nodes = vec![done.address.to_string()];
        job.shadow_of = Some(Box::new(ShadowOf {
            task: original.id,
            node: done.address,
            completion: original.emitted.clone(),
            prefix_len,
            avoid: original.failed_nodes.clone(),
            challenge: done.challenge,
            proof: done.proof.clone(),
        }));
        tracing::info!(task = %original.id, rerun = %job.id, "quality check: re-running on another node");
        self.config.distributor.do_send(Submit(job));
    }

    /// A quality-check re-run finished: compare with the original; on disagreement, have
    /// the original checked against the reference model. The check goes through the
    /// backlog, whose write marks the original's receipt unpaid in the same transaction:
    /// its receipt was recorded `unchecked` (payable), and must not stay so while a
    /// cheater's verdict is on its way.
    fn compare_quality(&self, shadow: &ShadowOf, rerun: &Job) {
        if rerun.emitted == shadow.completion {
            tracing::info!(task = %shadow.task, node = %shadow.node, "quality check agreed");
            return;
        }
        let first_difference = rerun.emitted.iter().zip(&shadow.completion).take_while(|(a, b)| a == b).count();
        tracing::warn!(task = %shadow.task, node = %shadow.node, first_difference, "quality check disagreed; verifying the original");
        let (Some(v), Some(challenge)) = (&self.config.verification, shadow.challenge) else { return };
        let task = super::verifier::VerifyTask {
            task: shadow.task,
            node: shadow.node,
            model: rerun.model.clone(),
            input: rerun.input.clone(),
            // The original's log probabilities are not kept for a re-run's comparison.
            params: crate::inference::SamplingParams { logprobs: None, ..rerun.params.clone() },
            prefix: shadow.completion[..shadow.prefix_len].to_vec(),
            completion: shadow.completion[shadow.prefix_len..].to_vec(),
            logprobs: Vec::new(),
            challenge,
            proof: shadow.proof.clone(),
            report: v.report.clone(),
            slot: None,
        };
        owe(v, &task);
        v.backlog.do_send(super::check_backlog::Defer { task, why: super::check_backlog::DISAGREED });
    }

    /// The check of a finished task when the policy picks it (always, for a non-streamed
    /// job in synchronous mode, and always for a quality-check re-run), written ahead in
    /// the check log; and whether the job must wait for the verdict before the game hears
    /// Done. Called before the completion is written ahead, so that a completion on disk
    /// has its check there too. A re-run is checked itself because its comparison trusts
    /// it: a second identity of a cheater that draws the re-run (it can tell one by its
    /// input and seed) would agree with the lie, and one that answers garbage would have
    /// the honest original checked while going unjudged. Re-runs are few
    /// (`quality_check_rate`).
    fn pick(&self, ctx: &mut Context<Self>, done: &TaskFinished) -> Option<(super::verifier::VerifyTask, bool)> {
        let (Some(v), Some(challenge)) = (&self.config.verification, done.challenge) else {
            return None;
        };
        let synchronous = v.synchronous && !done.job.stream;
        let rerun = done.job.shadow_of.is_some();
        if !rerun && !v.policy.should_verify(&done.address) && !synchronous {
            return None;
        }
        let mut report = v.report.clone();
        if synchronous {
            report.push(ctx.address().recipient());
        }
        let task = verify_task(done.address, &done.job, done.prefix_len, challenge, done.proof.clone(), report);
        owe(v, &task);
        Some((task, synchronous))
    }

    /// Sends a picked task to the verifier pool (or the backlog). Returns whether the job
    /// must wait for the verdict before the game hears Done.
    fn dispatch(
        &self,
        ctx: &mut Context<Self>,
        done: &TaskFinished,
        task: super::verifier::VerifyTask,
        synchronous: bool,
    ) -> bool {
        let Some(v) = &self.config.verification else { return false };
        if !synchronous {
            check_or_defer(v, task);
            return false;
        }
        let task = super::verifier::VerifyTask { slot: Some(v.load.enter()), ..task };
        match v.pool.try_send(task) {
            Ok(()) => synchronous,
            Err(SendError::Full(task)) => {
                // The game reads this answer only once it is checked: it waits for room in
                // the pool rather than going out unchecked.
                tracing::warn!(task = %done.job.id, "verifier pool saturated; the answer waits for its check");
                let (pool, me, id, node) = (v.pool.clone(), ctx.address(), done.job.id, done.address);
                let report = v.report.clone();
                actix::spawn(async move {
                    if let Err(e) = pool.send(task).await {
                        unverifiable(&me, &report, id, node, format!("the verifier is unavailable: {e}"));
                    }
                });
                true
            }
            Err(SendError::Closed(_)) => {
                // No verifier to check it: the answer is produced again, never passed.
                let detail = "the verifier is unavailable".to_string();
                unverifiable(&ctx.address(), &v.report, done.job.id, done.address, detail);
                true
            }
        }
    }
}

/// A held answer's check could not run: the answer is produced again under a new task id
/// (`me`), and the Registry (with `report`'s others) records the original `unverifiable`,
/// never paid. Told to Completion alone, the original stayed `sampled` and owed in the
/// check log, whose replay later verified it: the game paid for both answers.
fn unverifiable(
    me: &Addr<Completion>,
    report: &[Recipient<VerificationDone>],
    task: TaskId,
    node: Address,
    detail: String,
) {
    let verdict = || VerificationDone {
        task,
        node,
        outcome: crate::ledger::Outcome::Unverifiable,
        detail: detail.clone(),
        evidence: None,
    };
    for r in report {
        r.do_send(verdict());
    }
    me.do_send(verdict());
}

/// Hands a picked task to the verifier pool when it holds fewer than `[verifier] queue`
/// tasks and has room, else to the check backlog, where it waits unpaid: a busy pool no
/// longer lets sampled tasks through unchecked (and the check log keeps it across a crash).
fn check_or_defer(v: &Verification, task: super::verifier::VerifyTask) {
    let task = if v.load.get() < v.queue {
        match v.pool.try_send(super::verifier::VerifyTask { slot: Some(v.load.enter()), ..task }) {
            Ok(()) => return,
            Err(SendError::Full(task) | SendError::Closed(task)) => super::verifier::VerifyTask { slot: None, ..task },
        }
    } else {
        task
    };
    v.backlog.do_send(super::check_backlog::Defer { task, why: super::check_backlog::POOL_FULL });
}

/// Writes a picked task's check ahead (see [`super::check_log`]): a crash before its
/// verdict is in the ledger replays it instead of leaving the task payable unchecked.
fn owe(v: &Verification, task: &super::verifier::VerifyTask) {
    match super::check_backlog::encode(task) {
        Ok(check) => v.checks.owe(CheckKind::Proof, task.task.0, task.node.0, &check),
        // Not expected (plain data); the check still runs, only a crash would lose it.
        Err(e) => tracing::error!(task = %task.task, error = %e, "a check could not be written ahead"),
    }
}

/// What the verifier checks of `job`'s tokens on `node`: its own, after the first
/// `prefix_len` other nodes made.
fn verify_task(
    node: Address,
    job: &Job,
    prefix_len: usize,
    challenge: [u8; 32],
    proof: Option<Box<Proof>>,
    report: Vec<Recipient<VerificationDone>>,
) -> super::verifier::VerifyTask {
    super::verifier::VerifyTask {
        task: job.id,
        node,
        model: job.model.clone(),
        input: job.input.clone(),
        params: job.params.clone(),
        prefix: job.emitted[..prefix_len].to_vec(),
        completion: job.emitted[prefix_len..].to_vec(),
        logprobs: job.emitted_logprobs.get(prefix_len..).map(<[_]>::to_vec).unwrap_or_default(),
        challenge,
        proof,
        report,
        slot: None,
    }
}

/// Why `proof` cannot be the proof of `job`'s tokens on `node` (its own, after the first
/// `prefix_len`), by the checks that need no model ([`crate::proof::structure`]).
fn proof_fault(
    node: Address,
    job: &Job,
    prefix_len: usize,
    challenge: [u8; 32],
    proof: Option<&Proof>,
) -> Option<String> {
    let expected = crate::proof::structure::Expected {
        task: job.id.0,
        node,
        challenge: &challenge,
        model: &job.model,
        // A continuation's prompt ends with the prefix earlier nodes made.
        prompt_tokens: job.prompt.exact.then(|| job.prompt.tokens as usize + prefix_len),
        completion: job.emitted.get(prefix_len..).unwrap_or_default(),
    };
    crate::proof::structure::fault(proof, &expected)
}

impl Actor for Completion {
    type Context = Context<Self>;
}

impl Supervised for Completion {
    fn restarting(&mut self, _: &mut Self::Context) {
        // Held answers are lost with the panic: their games get an error, never a wrong answer.
        tracing::warn!(held = self.held.len(), "completion restarting");
        self.held.clear();
    }
}

impl Handler<TaskFinished> for Completion {
    type Result = ();

    fn handle(&mut self, mut done: TaskFinished, ctx: &mut Self::Context) {
        // Usage the game is billed on: completion tokens are what the server saw arrive,
        // prompt tokens what it counted (or, for a model it holds no tokenizer of, the
        // node's signed word within the server's bound: the receipt's figure, the one
        // priced when the receipt is accepted, so that the usage the game reads is the
        // usage it pays for; a refused receipt bills nothing).
        let prompt = done.job.prompt;
        let prompt_tokens =
            if prompt.exact { prompt.tokens as usize } else { done.receipt.prompt_tokens.min(prompt.tokens) as usize };
        let usage = TaskUsage { prompt_tokens, completion_tokens: done.job.emitted.len() };
        // Sampled or not, a task that carried a challenge is paid only with a proof that
        // is about it: else a node could skip its proofs and be paid whenever the sampler
        // looks away. An honest node always has one at its Done.
        let proof = done.proof.as_deref();
        // A receipt whose figures are not the server's is never paid nor told to the other
        // servers (one of them would pay it, re-sent there, for the node's count); one that
        // lies (not merely a prompt counted otherwise) has its node judged like one whose
        // proof failed.
        let refused = self.refusal(done.address, &done.receipt, Some(&done.job));
        let fault = done
            .challenge
            .and_then(|c| proof_fault(done.address, &done.job, done.prefix_len, c, proof))
            .map(|fault| ("proof", format!("the node's proof failed its checks: {fault}")))
            .or_else(|| {
                let lie = refused.as_ref().filter(|r| r.lie);
                lie.map(|r| ("receipt", format!("the node's receipt was refused: {}", r.reason)))
            });
        if let Some((what, fault)) = fault {
            // The quarantine first, then the free slot: both into the Distributor's mailbox.
            self.reject(done.address, done.job.id, what, &fault);
            done.freed.release();
            let TaskFinished { node, address, job, finish_reason, .. } = done;
            if job.stream {
                // The game read every token already; they are charged to its budget, and
                // nobody is paid for them.
                self.deliver(&job, finish_reason, usage);
            } else {
                self.produce_again(node, address, job, fault);
            }
            return;
        }
        done.freed.release();
        // The check first, then the completion, both written ahead before the game hears Done.
        let picked = self.pick(ctx, &done);
        let live = Some((&done.job, done.latency_ms));
        let recorded = match &refused {
            Some(Refusal { reason, .. }) => {
                tracing::warn!(address = %done.address, task = %done.job.id, %reason, "receipt refused");
                false
            }
            None => self.write(done.address, done.receipt.clone(), live, done.reply_to.clone(), picked.is_some()),
        };
        if let Some(shadow) = done.job.shadow_of.as_deref() {
            self.compare_quality(shadow, &done.job);
        } else {
            self.maybe_quality_check(&done);
        }
        // Only a receipt on the books, with the server's own count (the receipt's, once
        // accepted): no number of the node's reaches the other servers' books.
        let told = recorded
            .then(|| {
                let (task, tokens, hash) = (done.job.id, done.job.emitted.len() as u32, output_hash(&done.job.emitted));
                self.tell_peers(task, done.address, tokens, hash, picked.is_some())
            })
            .flatten();
        if picked.is_some_and(|(task, synchronous)| self.dispatch(ctx, &done, task, synchronous)) {
            // Synchronous: the game hears Done only with an accepted proof, and once the
            // other servers have been told.
            let told = told.map(|told| {
                let told = futures_util::FutureExt::shared(
                    Box::pin(told) as futures_util::future::LocalBoxFuture<'static, ()>
                );
                actix::spawn(told.clone());
                told
            });
            let held = Held { node: done.node, job: done.job, finish_reason: done.finish_reason, usage, told };
            self.held.insert(held.job.id, held);
            return;
        }
        match told {
            // In a network, the game hears Done once every server could pay the receipt.
            Some(told) => {
                let (job, finish_reason, me) = (done.job, done.finish_reason, ctx.address());
                actix::spawn(async move {
                    told.await;
                    me.do_send(Deliver { job, finish_reason, usage });
                });
            }
            None => self.deliver(&done.job, done.finish_reason, usage),
        }
    }
}

impl Handler<Deliver> for Completion {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) {
        self.deliver(&msg.job, msg.finish_reason, msg.usage);
    }
}

impl Handler<TaskAbandoned> for Completion {
    type Result = ();

    /// Written ahead like a completion, so that the node's receipt for exactly the
    /// delivered tokens (asked for by its proxy) is paid; the game's budget is charged.
    fn handle(&mut self, msg: TaskAbandoned, _: &mut Self::Context) {
        if msg.witness {
            let hash = output_hash(&msg.delivered);
            // Witnessed only for a task without a challenge: never picked.
            self.config.completions.record(msg.task.0, msg.address.0, msg.delivered.len() as u32, hash, false);
            if let Some(told) = self.tell_peers(msg.task, msg.address, msg.delivered.len() as u32, hash, false) {
                actix::spawn(told);
            }
        }
        let tokens = msg.prompt_tokens.saturating_add(msg.delivered.len());
        match &msg.origin {
            // This server never admitted the game: its Gateway holds no budget of the key.
            Some(origin) => self.charge_origin(origin, msg.task, &msg.key_hash, tokens),
            None => self.charge(&msg.key_hash, tokens),
        }
    }
}

impl Handler<HangUpProved> for Completion {
    type Result = ();

    /// A hang-up's receipt with its proof: recorded like a completion of the delivered
    /// tokens (written ahead, so that a re-send of it is paid too), and checked when the
    /// policy picks it. Without a proof it is not paid: the task carried a challenge. A
    /// proof that fails its structural checks, or a receipt that lies, has its node judged
    /// as on a finished task.
    fn handle(&mut self, msg: HangUpProved, _: &mut Self::Context) {
        let HangUpProved { address, reply_to, job, challenge, prefix_len, receipt, proof, latency_ms, format } = msg;
        // A receipt that lies (another count or output than the delivered tokens, another
        // node's ticket) is judged as on a finished task: the server's cancel named the
        // count, and an honest node signs exactly the tokens it sent.
        let refusal = self.refusal(address, &receipt, Some(&job));
        if let Some(Refusal { reason, .. }) = refusal.as_ref().filter(|r| r.lie) {
            self.reject(address, job.id, "receipt", &format!("the node's receipt was refused: {reason}"));
            return;
        }
        // The game read those tokens: whatever keeps them from being paid, they are checked
        // without a proof.
        let check_delivered = |why: &str| {
            tracing::warn!(%address, task = %job.id, "{why}; unpaid");
            if let Some(v) = &self.config.verification {
                super::delivery_check::check_delivered(v, address, &job, prefix_len..job.emitted.len(), format);
            }
        };
        if proof.is_none() {
            // No penalty: an honest node has none when the game's last token lies too far
            // behind the last one it generated (`proof::signed::KEPT_ROWS`).
            return check_delivered("a hang-up's receipt without the proof its challenge asks for");
        }
        if let Some(fault) = proof_fault(address, &job, prefix_len, challenge, proof.as_deref()) {
            self.reject(address, job.id, "proof", &fault);
            return;
        }
        // Refused for its prompt count alone: no lie, and its proof is not judged.
        if let Some(Refusal { reason, .. }) = &refusal {
            return check_delivered(&format!("a hang-up's receipt refused: {reason}"));
        }
        let completion_tokens = receipt.completion_tokens;
        // The check is written ahead before the completion, as for a finished task.
        let picked = self.config.verification.as_ref().filter(|v| v.policy.should_verify(&address)).map(|v| {
            let task = verify_task(address, &job, prefix_len, challenge, proof, v.report.clone());
            owe(v, &task);
            (v, task)
        });
        if !self.write(address, receipt, Some((&job, latency_ms)), reply_to, picked.is_some()) {
            // Nothing recorded, nothing to pay, nothing to check against it.
            if let Some((v, task)) = picked {
                v.checks.settle(CheckKind::Proof, task.task.0, task.node.0);
                v.policy.not_checked(&address);
            }
            return check_delivered("a hang-up's receipt could not be priced");
        }
        let sampled = picked.is_some();
        if let Some(told) = self.tell_peers(job.id, address, completion_tokens, output_hash(&job.emitted), sampled) {
            actix::spawn(told);
        }
        if let Some((v, task)) = picked {
            check_or_defer(v, task);
        }
    }
}

impl Handler<ReceiptsResent> for Completion {
    type Result = ();

    fn handle(&mut self, msg: ReceiptsResent, _: &mut Self::Context) {
        for receipt in msg.receipts {
            if !self.refused(msg.address, &receipt, None) {
                self.write(msg.address, receipt, None, msg.reply_to.clone(), false);
            }
        }
    }
}

impl Handler<ConfirmBlock> for Completion {
    type Result = ();

    /// Checks the confirmation's signature, then passes it to the Registry.
    fn handle(&mut self, confirm: ConfirmBlock, _: &mut Self::Context) {
        let message = confirmation_message(confirm.block, &confirm.root, confirm.count, &confirm.disputed);
        match recover(&message, &confirm.signature) {
            Ok(signer) if signer == confirm.node => self.config.registry.do_send(confirm),
            _ => {
                tracing::warn!(node = %confirm.node, block = confirm.block, "confirmation not signed by the node; ignored")
            }
        }
    }
}

impl Handler<VerificationDone> for Completion {
    type Result = ();

    /// A synchronous verdict: release the held answer, or have it produced again elsewhere.
    fn handle(&mut self, msg: VerificationDone, ctx: &mut Self::Context) {
        let Some(Held { node, job, finish_reason, usage, told }) = self.held.remove(&msg.task) else { return };
        if msg.accepted() {
            match told {
                Some(told) => {
                    let me = ctx.address();
                    actix::spawn(async move {
                        told.await;
                        me.do_send(Deliver { job, finish_reason, usage });
                    });
                }
                None => self.deliver(&job, finish_reason, usage),
            }
            return;
        }
        self.produce_again(node, msg.node, job, format!("the node's answer failed verification: {}", msg.detail));
    }
}
