//! The Distributor: the table of live nodes, per-model queues, node selection
//! ([`super::scheduling`]), retries before the first token and mid-stream failover after
//! it. It never touches tokens: those go from a NodeProxy straight to the job's channel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::cluster::{Outbound, Peers};
use super::error::ServeError;
use super::fair_queue;
use super::messages::*;
use super::node_proxy::NodeProxy;
use super::scheduling::{pick_two, NodeStats, DEFAULT_MS_PER_TOKEN};
use crate::protocol::{FinishReason, NodeLoad, TaskFailure, TaskId, TaskUsage};

/// How often queued jobs are checked for expiry and cancellation.
/// Messages that may wait in the mailbox before `send` callers wait (do_send never does).
const MAILBOX_CAPACITY: usize = 65_536;
const QUEUE_SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// Retry-After suggested when a queue is full.
const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Model names remembered after their nodes left. Nodes choose the names, so the set is
/// bounded: past it, a model whose last node left is a 404 again instead of a 503.
const MAX_SEEN_MODELS: usize = 1024;
/// How long a quality-check re-run may wait for a second node (nobody waits for its answer,
/// and a second node may still be loading its model) when the queue timeout is shorter.
const RERUN_QUEUE_TIMEOUT: Duration = Duration::from_secs(120);
/// Node addresses kept in quarantine at most.
const MAX_QUARANTINED: usize = 100_000;
/// The longest wait between two tries to write a quarantine to a database that refused it.
const QUARANTINE_WRITE_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct DistributorConfig {
    /// Jobs waiting per model before new ones get 429.
    pub queue_capacity: usize,
    /// Longest a job waits for a node before it fails with 503.
    pub queue_timeout: Duration,
    /// Nodes tried per job (first try included).
    pub max_attempts: usize,
    /// Models the network sells; empty = whatever live nodes announce.
    pub catalog: Vec<String>,
    /// How long a node that failed a proof-of-inference check gets no work.
    pub quarantine: Duration,
    /// Cache-aware routing ([`prefix_choice`]); off, the choice is by load only.
    pub prefix_routing: bool,
}

struct NodeEntry {
    proxy: Addr<NodeProxy>,
    address: String,
    models: Vec<String>,
    device: String,
    /// Tokens a sequence holds on the node, as it said on joining (0: no limit).
    context: usize,
    stats: NodeStats,
    load: NodeLoad,
}

impl NodeEntry {
    /// Tokens a sequence holds on the node: 0 (no limit) holds any.
    fn room(&self) -> usize {
        if self.context == 0 {
            usize::MAX
        } else {
            self.context
        }
    }
}

/// Cache-aware routing: among `candidates` (nodes with room for the job), the one whose
/// prefix cache holds the most tokens of the job's prompt's leading blocks, as long as it
/// is not failing lately and runs at most [`PREFIX_AFFINITY_SLACK`] more jobs than the
/// least busy candidate; the cheaper on a tie. `None` when no such node holds the first
/// block, or the server has not the prompt's ids: load-based choice then. The slack
/// bounds what a node can attract by claiming blocks it does not hold.
fn prefix_choice(
    nodes: &HashMap<NodeId, NodeEntry>,
    job: &Job,
    candidates: &[(NodeId, f64)],
    now: Instant,
) -> Option<NodeId> {
    let ids = job.prompt_ids.as_deref()?;
    let least_busy = candidates.iter().filter_map(|(id, _)| nodes.get(id)).map(|n| n.stats.in_flight).min()?;
    let mut names: HashMap<u32, Vec<String>> = HashMap::new();
    let mut best: Option<(usize, f64, NodeId)> = None;
    for &(id, cost) in candidates {
        let Some(node) = nodes.get(&id) else { continue };
        let held = &node.load.prefix;
        let failing =
            node.stats.last_failure.is_some_and(|at| now.saturating_duration_since(at) < PREFIX_FAILURE_PAUSE);
        if held.blocks.is_empty() || failing || node.stats.in_flight > least_busy + PREFIX_AFFINITY_SLACK {
            continue;
        }
        let block = held.block as usize;
        // Only as many blocks as a report can name: the cost of a dispatch is bounded.
        let names = names.entry(held.block).or_insert_with(|| {
            let span = ids.len().min(block * crate::protocol::messages::MAX_PREFIX_BLOCKS);
            crate::inference::prefix_cache::block_names(&ids[..span], block)
                .iter()
                .map(|n| hex::encode(&n[..8]))
                .collect()
        });
        let tokens = names.iter().take_while(|n| held.blocks.contains(n)).count() * block;
        let better = match best {
            None => tokens > 0,
            Some((t, c, _)) => tokens > t || (tokens == t && cost < c),
        };
        if better {
            best = Some((tokens, cost, id));
        }
    }
    best.map(|(_, _, id)| id)
}

/// Jobs a prefix-holding node may run beyond the least busy candidate and still be
/// preferred for its cache.
const PREFIX_AFFINITY_SLACK: usize = 4;

/// How long a node that failed a job is not preferred for its cache.
const PREFIX_FAILURE_PAUSE: Duration = Duration::from_secs(30);

/// How long what a node's session taught about it (latency, failures) outlives the
/// session, for the key's next one; and how many departed keys are remembered at most.
const DEPARTED_MEMORY: Duration = Duration::from_secs(300);
const MAX_DEPARTED: usize = 4096;

/// Where a running job is and what it reserved.
struct Running {
    node: NodeId,
    reserved_tokens: usize,
}

pub struct Distributor {
    config: DistributorConfig,
    /// Tasks completed since the last block tick (for the per-block log line).
    completed_in_block: u64,
    nodes: HashMap<NodeId, NodeEntry>,
    /// Live nodes per model, kept with `nodes` ([`Self::add_node`], [`Self::remove_node`]):
    /// `/v1/models` and `/metrics` (public) and every submitted job read it, and counting
    /// it from the table cost a pass over every node each time.
    served: HashMap<String, usize>,
    queues: HashMap<String, VecDeque<Job>>,
    running: HashMap<TaskId, Running>,
    rng: StdRng,
    draining: bool,
    /// Node addresses that failed a check, until when (survives reconnects).
    quarantined: HashMap<String, Instant>,
    /// Every model a node has served since the start: when its last node leaves, games get
    /// 503 "no node right now" rather than 404 "no such model".
    seen_models: std::collections::HashSet<String>,
    /// Jobs sent where their prompt's prefix was cached (cache-aware routing).
    prefix_routed: u64,
    /// What the queues refused since the start (`/metrics`).
    queue_refusals: QueueRefusals,
    /// The other servers of the network (empty when this one works alone).
    peers: Arc<Peers>,
    /// What sessions that left taught about their node keys, and when they left (a
    /// reconnect must not wipe a failure): for [`DEPARTED_MEMORY`], at most
    /// [`MAX_DEPARTED`] keys.
    departed: HashMap<String, (NodeStats, Instant)>,
    /// The Gateway's per-key token budgets, for answers that end here (a stream whose
    /// node died after its last token); set once the Gateway runs.
    usage: Arc<std::sync::OnceLock<Recipient<RecordUsage>>>,
    /// Where quarantines decided here are written (they outlive this process).
    store: Option<crate::ledger::Store>,
}

impl Distributor {
    /// With the slot the Gateway's budgets will be put in (it starts after this actor).
    pub fn charging(mut self, usage: Arc<std::sync::OnceLock<Recipient<RecordUsage>>>) -> Self {
        self.usage = usage;
        self
    }

    /// Writes the quarantines this server decides to the ledger: a node caught cheating
    /// must not escape them by waiting for a restart, or by moving to a server that did not
    /// hear the notice (each reads them when a node joins).
    pub fn persisting(mut self, store: crate::ledger::Store) -> Self {
        self.store = Some(store);
        self
    }

    pub fn new(config: DistributorConfig, peers: Arc<Peers>) -> Self {
        Self {
            config,
            completed_in_block: 0,
            nodes: HashMap::new(),
            served: HashMap::new(),
            queues: HashMap::new(),
            running: HashMap::new(),
            rng: StdRng::from_os_rng(),
            draining: false,
            quarantined: HashMap::new(),
            seen_models: Default::default(),
            prefix_routed: 0,
            queue_refusals: QueueRefusals::default(),
            peers,
            departed: HashMap::new(),
            usage: Arc::default(),
            store: None,
        }
    }

    /// Hands `job` to the server of the network with the most room for its model, or,
    /// with `anywhere`, to one that serves it at all (to queue there); gives it back when
    /// there is none, this server is alone, or the job came from another server (a job
    /// crosses at most once) or is a quality-check re-run (checked where it was made).
    #[allow(clippy::result_large_err)] // the job comes back whole, by design
    fn forward(&mut self, job: Job, anywhere: bool) -> Result<(), Job> {
        if !forwardable(&job) {
            return Err(job);
        }
        let Some(cluster) = self.peers.cluster() else { return Err(job) };
        let now = Instant::now();
        let to = self
            .peers
            .take_room(&job.model, now)
            .or_else(|| anywhere.then(|| self.peers.serving(&job.model, now)).flatten());
        let Some(to) = to else { return Err(job) };
        self.peers.forwarded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        cluster.do_send(Outbound::Forward { job: Box::new(job), to });
        Ok(())
    }

    /// Takes a node out of rotation for `duration` (kept across its reconnects). At most
    /// [`MAX_QUARANTINED`] are kept (notices come from other servers too): past it, the one
    /// whose quarantine ends first goes.
    fn quarantine(&mut self, address: String, duration: Duration, decided_here: bool) {
        let now = Instant::now();
        let until = now + duration;
        if let (true, Some(store)) = (decided_here, self.store.clone()) {
            actix::spawn(persist_quarantine(store, address.clone(), until));
        }
        if self.quarantined.len() >= MAX_QUARANTINED {
            self.quarantined.retain(|_, until| *until > now);
        }
        if self.quarantined.len() >= MAX_QUARANTINED && !self.quarantined.contains_key(&address) {
            let soonest = self.quarantined.iter().min_by_key(|(_, until)| **until).map(|(a, _)| a.clone());
            if let Some(soonest) = soonest {
                self.quarantined.remove(&soonest);
            }
        }
        let entry = self.quarantined.entry(address).or_insert(until);
        *entry = (*entry).max(until);
    }

    fn is_quarantined(&self, address: &str, now: Instant) -> bool {
        self.quarantined.get(address).is_some_and(|until| *until > now)
    }

    /// Keeps what a session that left taught about its key: for a live newer session of
    /// the same key at once, else for the key's next session.
    fn remember_departed(&mut self, address: String, stats: NodeStats) {
        if let Some(live) = self.nodes.values_mut().find(|n| n.address == address) {
            return live.stats.inherit(&stats);
        }
        let now = Instant::now();
        if self.departed.len() >= MAX_DEPARTED {
            self.departed.retain(|_, (_, left)| now.duration_since(*left) < DEPARTED_MEMORY);
        }
        if self.departed.len() >= MAX_DEPARTED {
            // The oldest goes: throwaway keys must not push a real key's record out.
            let oldest = self.departed.iter().min_by_key(|(_, (_, left))| *left).map(|(a, _)| a.clone());
            if let Some(oldest) = oldest {
                self.departed.remove(&oldest);
            }
        }
        self.departed.insert(address, (stats, now));
    }

    fn serves(&self, model: &str) -> bool {
        self.served.contains_key(model)
    }

    /// Puts a node in the table, counting its models.
    fn add_node(&mut self, id: NodeId, entry: NodeEntry) {
        for model in &entry.models {
            *self.served.entry(model.clone()).or_default() += 1;
        }
        if let Some(earlier) = self.nodes.insert(id, entry) {
            self.uncount(&earlier.models);
        }
    }

    /// Takes a node out of the table, uncounting its models.
    fn remove_node(&mut self, id: NodeId) -> Option<NodeEntry> {
        let entry = self.nodes.remove(&id)?;
        self.uncount(&entry.models);
        Some(entry)
    }

    fn uncount(&mut self, models: &[String]) {
        for model in models {
            if let Some(n) = self.served.get_mut(model) {
                *n -= 1;
                if *n == 0 {
                    self.served.remove(model);
                }
            }
        }
    }

    /// Remembers the models a joining node serves, up to [`MAX_SEEN_MODELS`].
    fn remember_models(&mut self, models: &[String]) {
        for model in models {
            if self.seen_models.len() >= MAX_SEEN_MODELS {
                return;
            }
            self.seen_models.insert(model.clone());
        }
    }

    fn known(&self, model: &str) -> bool {
        self.config.catalog.iter().any(|m| m == model)
            || self.seen_models.contains(model)
            || self.serves(model)
            || self.peers.served(model)
    }

    /// Sends `job` to the best node with room, or gives it back.
    #[allow(clippy::result_large_err)] // the job comes back whole, by design
    fn try_dispatch(&mut self, mut job: Job) -> Result<(), Job> {
        loop {
            match self.dispatch_once(job) {
                Ok(()) => return Ok(()),
                Err((job_back, false)) => return Err(job_back),
                // The chosen proxy had already stopped: never pick it again, try another.
                Err((job_back, true)) => job = job_back,
            }
        }
    }

    /// One pick and send; `Err((job, true))` when the picked node's proxy is gone.
    #[allow(clippy::result_large_err)] // the job comes back whole, by design
    fn dispatch_once(&mut self, job: Job) -> Result<(), (Job, bool)> {
        let now = Instant::now();
        let known: Vec<f64> = self.nodes.values().filter_map(|n| n.stats.latency_ms).collect();
        let default_latency =
            if known.is_empty() { DEFAULT_MS_PER_TOKEN } else { known.iter().sum::<f64>() / known.len() as f64 };
        // A quality-check re-run never goes to the key that produced the original, whatever
        // session it holds now.
        // Nor to a node that made a continuation's prefix: it could vouch for its partner.
        let original = job.shadow_of.as_ref().map(|s| s.node.to_string());
        let avoid: &[String] = job.shadow_of.as_ref().map_or(&[], |s| &s.avoid);
        let eligible = |n: &NodeEntry| {
            n.models.contains(&job.model)
                && !job.failed_nodes.contains(&n.address)
                && original.as_ref() != Some(&n.address)
                && !avoid.contains(&n.address)
                && !self.is_quarantined(&n.address, now)
        };
        // A node whose context cannot hold the whole answer (prompt and max_tokens) would
        // end it early: it gets the job only when no node here can hold it, busy or not,
        // and then only if no node holds more (a node cannot say its context is small to
        // end answers after a token).
        let whole = tokens_needed(&job);
        let largest = self.nodes.values().filter(|n| eligible(n)).map(NodeEntry::room).max().unwrap_or(0);
        let needed = whole.min(largest);
        let costs: Vec<(NodeId, f64)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.stats.has_room() && eligible(n) && n.room() >= needed)
            .map(|(&id, n)| (id, n.stats.cost(default_latency, now)))
            .collect();
        // A re-run is never steered by what nodes say they hold: a colluder could draw it.
        let by_prefix = if self.config.prefix_routing && job.shadow_of.is_none() {
            prefix_choice(&self.nodes, &job, &costs, now)
        } else {
            None
        };
        let Some(id) = by_prefix.or_else(|| pick_two(&costs, &mut self.rng)) else {
            return Err((job, false));
        };
        let node = self.nodes.get_mut(&id).expect("picked from the table");
        let reserved_tokens = job.max_tokens.saturating_sub(job.emitted.len());
        let task = job.id;
        match node.proxy.try_send(Dispatch(job)) {
            Ok(()) => {}
            Err(SendError::Full(dispatch)) => node.proxy.do_send(dispatch),
            Err(SendError::Closed(Dispatch(mut job))) => {
                let gone = self.remove_node(id).expect("picked from the table");
                job.failed_nodes.push(gone.address);
                return Err((job, true));
            }
        }
        node.stats.in_flight += 1;
        node.stats.outstanding_tokens += reserved_tokens;
        self.prefix_routed += by_prefix.is_some() as u64;
        self.running.insert(task, Running { node: id, reserved_tokens });
        Ok(())
    }

    /// Puts a job in its model's queue (front for retries), stamping when it entered.
    fn enqueue(&mut self, mut job: Job, front: bool) {
        job.queued_at = Instant::now();
        let queue = self.queues.entry(job.model.clone()).or_default();
        if front {
            queue.push_front(job);
        } else {
            queue.push_back(job);
        }
    }

    /// Frees what a finished, cancelled or returned job reserved on its node.
    fn release(&mut self, task: TaskId) -> Option<NodeId> {
        let run = self.running.remove(&task)?;
        if let Some(node) = self.nodes.get_mut(&run.node) {
            node.stats.in_flight = node.stats.in_flight.saturating_sub(1);
            node.stats.outstanding_tokens = node.stats.outstanding_tokens.saturating_sub(run.reserved_tokens);
        }
        Some(run.node)
    }

    /// Moves queued jobs onto nodes with room, oldest first.
    fn drain_queues(&mut self) {
        let models: Vec<String> = self.queues.keys().cloned().collect();
        for model in models {
            self.drain_queue(&model);
        }
    }

    /// [`Self::drain_queues`] for one model's queue, games taking turns
    /// ([`fair_queue::take_turns`]).
    fn drain_queue(&mut self, model: &str) {
        // A retried job may only fit on some nodes: keep scanning past it, in order.
        let Some(queue) = self.queues.remove(model) else { return };
        let queue = fair_queue::take_turns(queue, |job| job.game_id);
        let mut kept = VecDeque::with_capacity(queue.len());
        let mut room = true;
        let mut misses = PlainMisses::default();
        let now = Instant::now();
        for job in queue {
            if job.cancelled() {
                continue;
            }
            // Room only shrinks during a drain: once no node that may take work has any, the
            // rest of the queue stays as it is without a check each. (A quarantined node with
            // free slots used to count, and every queued job then cost a scan of every node,
            // on every event.)
            room = room
                && self.nodes.values().any(|n| {
                    n.stats.has_room() && n.models.iter().any(|m| m == model) && !self.is_quarantined(&n.address, now)
                });
            let plain = job.failed_nodes.is_empty() && job.shadow_of.is_none();
            let needed = tokens_needed(&job);
            if !room || misses.skips(plain, needed) {
                kept.push_back(job);
                continue;
            }
            if let Err(job) = self.try_dispatch(job) {
                misses.missed(plain, needed);
                kept.push_back(job);
            }
        }
        if !kept.is_empty() {
            self.queues.insert(model.to_string(), kept);
        }
    }

    /// Queued jobs go to servers that have room now (oldest first): a queue here is only
    /// offered its own nodes otherwise, and a burst that found the others' room taken
    /// until their next advert waited out the queue here while they sat idle.
    fn offer_queues_to_peers(&mut self) {
        if self.peers.cluster().is_none() || self.queues.is_empty() {
            return;
        }
        let models: Vec<String> = self.queues.keys().cloned().collect();
        for model in models {
            self.offer_queue_to_peers(&model);
        }
    }

    /// [`Distributor::offer_queues_to_peers`] for one model's queue: nothing to do (and no
    /// job touched) while no other server has room for it.
    fn offer_queue_to_peers(&mut self, model: &str) {
        if !self.peers.has_room(model, Instant::now()) {
            return;
        }
        let Some(mut queue) = self.queues.remove(model) else { return };
        // Jobs that stay (another server's, re-runs, continuations), in their order.
        let mut staying = VecDeque::new();
        while let Some(job) = queue.pop_front() {
            if job.cancelled() {
                continue;
            }
            if !forwardable(&job) {
                staying.push_back(job);
                continue;
            }
            if let Err(job) = self.forward(job, false) {
                // No more room anywhere: the rest stays as it is.
                queue.push_front(job);
                break;
            }
        }
        staying.append(&mut queue);
        if !staying.is_empty() {
            self.queues.insert(model.to_string(), staying);
        }
    }

    fn sweep_queues(&mut self) {
        let timeout = self.config.queue_timeout;
        let mut timed_out = 0;
        for queue in self.queues.values_mut() {
            queue.retain(|job| {
                if job.cancelled() {
                    return false;
                }
                let waited = job.queued_at.elapsed();
                let patience = if job.shadow_of.is_some() { timeout.max(RERUN_QUEUE_TIMEOUT) } else { timeout };
                if waited > patience {
                    timed_out += 1;
                    let _ = job
                        .events
                        .send(JobEvent::Failed(ServeError::QueueTimeout { model: job.model.clone(), waited }));
                    return false;
                }
                true
            });
        }
        self.queue_refusals.timed_out += timed_out;
        self.queues.retain(|_, q| !q.is_empty());
        // What waited past its time has failed above: only jobs still in time move on.
        self.offer_queues_to_peers();
        // A quarantine that ran out gives its node back to the queued work (nothing else
        // would wake the queue if that node is the only one serving the model).
        let now = Instant::now();
        let quarantined = self.quarantined.len();
        self.quarantined.retain(|_, until| *until > now);
        if self.quarantined.len() < quarantined {
            self.drain_queues();
        }
    }

    /// During a graceful shutdown, once no job runs, tell every node goodbye so the HTTP
    /// server is not kept waiting on their websockets.
    fn maybe_release_nodes(&mut self) {
        if self.draining && self.running.is_empty() {
            for node in self.nodes.values() {
                node.proxy.do_send(Disconnect("the server is shutting down".into()));
            }
        }
    }

    pub fn queued(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }
}

/// What the queues refused since the start.
#[derive(Debug, Default)]
struct QueueRefusals {
    /// 429 `queue_full` to a new job.
    full: u64,
    /// Places given to another game's job in a full queue.
    gave_way: u64,
    /// Jobs that waited out the queue timeout.
    timed_out: u64,
}

/// The tokens a job's sequence holds on its node: its prompt and the answer it may get.
fn tokens_needed(job: &Job) -> usize {
    (job.prompt.tokens as usize).saturating_add(job.max_tokens)
}

/// What one drain of a queue learnt about plain jobs (no node to avoid, no re-run): they
/// differ only in the room they need, and room only shrinks during a drain, so once one
/// needing `n` tokens found no node, any needing as many finds none either. A node with
/// free slots and too small a context (a stranger may claim 4,096 slots of 256 tokens)
/// used to cost every queued job a scan of every node, on every event.
#[derive(Debug, Default)]
struct PlainMisses {
    /// The fewest tokens a plain job needed and found no node for.
    from: Option<usize>,
}

impl PlainMisses {
    /// Whether a job is known to find no node without trying.
    fn skips(&self, plain: bool, needed: usize) -> bool {
        plain && self.from.is_some_and(|from| needed >= from)
    }

    /// A job that needed `needed` tokens found no node.
    fn missed(&mut self, plain: bool, needed: usize) {
        if plain {
            self.from = Some(self.from.map_or(needed, |from| from.min(needed)));
        }
    }
}

/// Whether `job` may go to another server: a job of this server's own, as the game sent
/// it (not one another server forwarded here, a quality re-run, or a continuation).
fn forwardable(job: &Job) -> bool {
    job.origin.is_none() && job.shadow_of.is_none() && job.emitted.is_empty()
}

impl Actor for Distributor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        ctx.run_interval(QUEUE_SWEEP_INTERVAL, |this, _| this.sweep_queues());
    }
}

impl Supervised for Distributor {
    fn restarting(&mut self, _: &mut Self::Context) {
        // Queued jobs fail cleanly (their games get an error, not a hang); the node table
        // is kept: the nodes are still connected, and running jobs finish on them.
        let queued = self.queued();
        for (_, queue) in self.queues.drain() {
            for job in queue {
                let _ = job.events.send(JobEvent::Failed(ServeError::Internal(
                    "the distributor restarted; retry the request".into(),
                )));
            }
        }
        tracing::warn!(nodes = self.nodes.len(), queued, "distributor restarting; queued jobs failed, node table kept");
    }
}

impl Handler<Submit> for Distributor {
    type Result = Result<(), ServeError>;

    /// Dispatches a new job now, queues it, or refuses it (404 / 503 / 429).
    fn handle(&mut self, Submit(job): Submit, _: &mut Self::Context) -> Self::Result {
        if self.draining {
            return Err(ServeError::ShuttingDown);
        }
        let outside_catalog = !self.config.catalog.is_empty() && !self.config.catalog.contains(&job.model);
        if outside_catalog || !self.known(&job.model) {
            return Err(ServeError::UnknownModel(job.model));
        }
        let model = job.model.clone();
        if !self.serves(&job.model) {
            // No node here: another server's, if one serves the model.
            return self.forward(job, true).map_err(|_| ServeError::NoNode(model));
        }
        // Older jobs go first. What stays queued after that cannot use any node with room
        // (a retry or a quality-check re-run excludes some nodes), so the new job may take
        // one: behind a re-run waiting for a second node, it would otherwise wait for
        // nothing until the queue timeout.
        if self.queues.get(&model).is_some_and(|q| !q.is_empty()) {
            self.drain_queue(&model);
        }
        let job = match self.try_dispatch(job) {
            Ok(()) => return Ok(()),
            Err(job) => job,
        };
        // Every node here is busy: a server with room takes it rather than the queue, unless
        // jobs wait here already: they go first (newest-first would starve them whenever
        // requests come oftener than the queue is offered).
        let waiting = self.queues.get(&model).is_some_and(|q| !q.is_empty());
        let job = match waiting {
            true => job,
            false => match self.forward(job, false) {
                Ok(()) => return Ok(()),
                Err(job) => job,
            },
        };
        if let Some(queue) = self.queues.get_mut(&model).filter(|q| q.len() >= self.config.queue_capacity) {
            // Full: a game holding far fewer places than another takes that one's newest
            // (only a game's own first try gives its place: not a retry, a re-run or a job
            // another server forwarded).
            let plain = |j: &Job| j.failed_nodes.is_empty() && j.shadow_of.is_none() && j.origin.is_none();
            let full = || ServeError::QueueFull { model: model.clone(), retry_after: QUEUE_FULL_RETRY_AFTER };
            let Some(gave_way) = fair_queue::make_room(queue, &job.game_id, |j| j.game_id, plain) else {
                self.queue_refusals.full += 1;
                return Err(full());
            };
            self.queue_refusals.gave_way += 1;
            tracing::info!(task = %gave_way.id, game = %gave_way.game, to = %job.game, model = %model, "queue full: a job gave its place to another game's");
            let _ = gave_way.events.send(JobEvent::Failed(full()));
        }
        self.enqueue(job, false);
        if waiting {
            self.offer_queue_to_peers(&model);
        }
        Ok(())
    }
}

impl Handler<NodeConnected> for Distributor {
    type Result = ();

    /// Adds a node to the table and gives it queued work.
    fn handle(&mut self, msg: NodeConnected, _: &mut Self::Context) {
        tracing::info!(node = msg.id, address = %msg.address, models = ?msg.models, capacity = msg.capacity, "node joined");
        let now = Instant::now();
        let mut stats = NodeStats::new(msg.capacity, now);
        if let Some((earlier, left)) = self.departed.remove(&msg.address) {
            if now.duration_since(left) < DEPARTED_MEMORY {
                stats.inherit(&earlier);
            }
        }
        self.remember_models(&msg.models);
        self.add_node(
            msg.id,
            NodeEntry {
                proxy: msg.proxy,
                address: msg.address,
                models: msg.models,
                device: msg.device,
                context: msg.context,
                stats,
                load: NodeLoad::default(),
            },
        );
        self.drain_queues();
    }
}

impl Handler<NodeDisconnected> for Distributor {
    type Result = ();

    /// Removes a node; its unfinished jobs arrive as `TaskReturned` from its proxy.
    fn handle(&mut self, msg: NodeDisconnected, _: &mut Self::Context) {
        if let Some(node) = self.remove_node(msg.id) {
            tracing::warn!(node = msg.id, address = %node.address, reason = %msg.reason, "node left");
            self.remember_departed(node.address, node.stats);
        }
        self.running.retain(|_, r| r.node != msg.id);
        self.maybe_release_nodes();
        // Queued jobs for a model nobody serves any more fail now rather than time out.
        let orphaned: Vec<String> = self.queues.keys().filter(|m| !self.serves(m)).cloned().collect();
        for model in orphaned {
            for job in self.queues.remove(&model).into_iter().flatten() {
                let _ = job.events.send(JobEvent::Failed(ServeError::NoNode(model.clone())));
            }
        }
    }
}

impl Handler<NodeHeartbeat> for Distributor {
    type Result = ();

    fn handle(&mut self, msg: NodeHeartbeat, _: &mut Self::Context) {
        if let Some(node) = self.nodes.get_mut(&msg.id) {
            node.load = msg.load;
        }
    }
}

impl Handler<TaskCompleted> for Distributor {
    type Result = ();

    /// Updates the node's latency estimate and frees its slot.
    fn handle(&mut self, msg: TaskCompleted, _: &mut Self::Context) {
        self.release(msg.task);
        self.completed_in_block += 1;
        if let Some(node) = self.nodes.get_mut(&msg.node) {
            node.stats.completed += 1;
            if msg.completion_tokens > 0 {
                let ms = msg.duration.as_secs_f64() * 1e3 / msg.completion_tokens as f64;
                node.stats.observe_latency(ms, Instant::now());
            }
        }
        self.drain_queues();
        self.maybe_release_nodes();
    }
}

impl Handler<TaskCancelled> for Distributor {
    type Result = ();

    fn handle(&mut self, msg: TaskCancelled, _: &mut Self::Context) {
        self.release(msg.task);
        self.drain_queues();
        self.maybe_release_nodes();
    }
}

impl Handler<TaskReturned> for Distributor {
    type Result = ();

    /// A node failed a job: try another node (with the tokens already sent as prefix),
    /// queue it at the front, or fail it when no node is left.
    fn handle(&mut self, msg: TaskReturned, _: &mut Self::Context) {
        let TaskReturned { node, address, job, failure } = msg;
        self.release(job.id);
        self.retry(node, address, job, failure);
        self.drain_queues();
        self.maybe_release_nodes();
    }
}

impl Distributor {
    /// Decides what happens to a returned job (see `Handler<TaskReturned>`).
    fn retry(&mut self, node: NodeId, address: String, mut job: Job, failure: TaskFailure) {
        let reason = match failure {
            TaskFailure::Request(reason) => {
                let _ = job.events.send(JobEvent::Failed(ServeError::Rejected(reason)));
                return;
            }
            TaskFailure::Node(reason) => reason,
        };
        if let Some(entry) = self.nodes.get_mut(&node) {
            entry.stats.record_failure(Instant::now());
        }
        if job.cancelled() {
            return;
        }
        if !job.stream && !job.emitted.is_empty() {
            // The game reads a non-streamed answer whole, and only once a node has finished
            // it (its receipt, its proof): a failed node's tokens are dropped and the answer
            // produced again from its start. Continued, they would reach the game unchecked:
            // the next node's proof takes them as prompt.
            job.restart();
        }
        // A stream's game read every token already. The node died after the last one but
        // before saying so: the answer is whole. An answer that ended (end-of-sequence
        // token, stop sequence) must not go on elsewhere either: the next node's first
        // token would come after the end, and be cut for it.
        let ended = job.text.as_ref().is_some_and(|t| t.stream.stopped());
        if ended || job.emitted.len() >= job.max_tokens {
            if let Some(tail) = job.text.as_mut().map(|t| t.finish()).filter(|t| !t.is_empty()) {
                let _ = job.events.send_last_text(tail);
            }
            let usage = TaskUsage { prompt_tokens: job.prompt.tokens as usize, completion_tokens: job.emitted.len() };
            // Charged to the game's budget like any answer (by the server that admitted
            // it); no node is paid for tokens without their receipt and proof.
            if let (Some(budgets), false, false) = (self.usage.get(), job.key_hash.is_empty(), job.origin.is_some()) {
                let tokens = usage.prompt_tokens.saturating_add(usage.completion_tokens);
                budgets.do_send(RecordUsage { key_hash: job.key_hash.clone(), tokens });
            }
            let finish_reason = if ended { FinishReason::Stop } else { FinishReason::Length };
            let _ = job.events.send(JobEvent::Done { finish_reason, usage, task: job.id });
            return;
        }
        tracing::warn!(task = %job.id, node, %address, emitted = job.emitted.len(), %reason, "task returned; retrying elsewhere");
        if !job.failed_nodes.contains(&address) {
            job.failed_nodes.push(address);
        }
        if job.failed_nodes.len() >= self.config.max_attempts {
            let _ = job.events.send(JobEvent::Failed(ServeError::NodeFailed(reason)));
            return;
        }
        let alternatives =
            self.nodes.values().any(|n| n.models.contains(&job.model) && !job.failed_nodes.contains(&n.address));
        if !alternatives {
            let _ = job.events.send(JobEvent::Failed(ServeError::NodeFailed(reason)));
            return;
        }
        if let Err(job) = self.try_dispatch(job) {
            self.enqueue(job, true);
        }
    }
}

impl Handler<super::clock::BlockTick> for Distributor {
    type Result = ();

    /// One log line per block with the traffic it saw.
    fn handle(&mut self, tick: super::clock::BlockTick, _: &mut Self::Context) {
        let completed = std::mem::take(&mut self.completed_in_block);
        if completed > 0 || !self.running.is_empty() {
            tracing::info!(
                block = tick.number,
                completed,
                running = self.running.len(),
                queued = self.queued(),
                nodes = self.nodes.len(),
                "block"
            );
        }
    }
}

impl Handler<VerificationDone> for Distributor {
    type Result = ();

    /// A failed proof-of-inference check takes the node out of rotation for a while (a
    /// check that could not run is no fault of the node).
    fn handle(&mut self, msg: VerificationDone, _: &mut Self::Context) {
        if msg.outcome != crate::ledger::Outcome::Failed {
            return;
        }
        let address = msg.node.to_string();
        tracing::warn!(node = %address, task = %msg.task, detail = %msg.detail,
            quarantine_s = self.config.quarantine.as_secs(), "node quarantined: proof of inference failed");
        self.quarantine(address.clone(), self.config.quarantine, true);
        if let Some(cluster) = self.peers.cluster() {
            cluster.do_send(Outbound::Quarantine { address, duration: self.config.quarantine });
        }
    }
}

impl Handler<QuarantineNode> for Distributor {
    type Result = ();

    /// A quarantine another server announced (`announce: false`), or one decided here (a
    /// hold of the check backlog), which is announced to the others.
    fn handle(&mut self, msg: QuarantineNode, _: &mut Self::Context) {
        let quarantine_s = msg.duration.as_secs();
        if msg.announce {
            tracing::warn!(node = %msg.address, quarantine_s, "node quarantined by this server (told to the cluster)");
        } else {
            tracing::warn!(node = %msg.address, quarantine_s, "node quarantined by the cluster (or the ledger, on joining)");
        }
        if msg.announce {
            if let Some(cluster) = self.peers.cluster() {
                cluster.do_send(Outbound::Quarantine { address: msg.address.clone(), duration: msg.duration });
            }
        }
        self.quarantine(msg.address, msg.duration, msg.announce);
    }
}

impl Handler<LocalRoom> for Distributor {
    type Result = Vec<super::cluster::wire::ModelRoom>;

    /// Per model: this server's live nodes serving it and the sequences they could start
    /// now, less the jobs already waiting for them (quarantined nodes have no room); none
    /// while the server drains.
    fn handle(&mut self, _: LocalRoom, _: &mut Self::Context) -> Self::Result {
        // Draining: no room to offer (its nodes stay only to finish what runs). Not even a
        // model with none free: another server would still send a job it cannot queue
        // here, and its game would get a 503 "shutting down" it could have been spared.
        if self.draining {
            return Vec::new();
        }
        let now = Instant::now();
        let mut rooms: HashMap<String, super::cluster::wire::ModelRoom> = HashMap::new();
        for node in self.nodes.values() {
            let free = if self.is_quarantined(&node.address, now) {
                0
            } else {
                node.stats.capacity.saturating_sub(node.stats.in_flight)
            };
            for model in &node.models {
                let room = rooms.entry(model.clone()).or_insert_with(|| super::cluster::wire::ModelRoom {
                    model: model.clone(),
                    nodes: 0,
                    free: 0,
                });
                room.nodes += 1;
                room.free += free;
            }
        }
        for (model, queue) in &self.queues {
            if let Some(room) = rooms.get_mut(model) {
                room.free = room.free.saturating_sub(queue.len());
            }
        }
        let mut out: Vec<_> = rooms.into_values().collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }
}

impl Handler<PrefixCounters> for Distributor {
    type Result = MessageResult<PrefixCounters>;

    /// The live nodes' prefix caches summed, and the jobs routed to a cached prefix.
    fn handle(&mut self, _: PrefixCounters, _: &mut Self::Context) -> Self::Result {
        let mut totals = PrefixTotals { routed: self.prefix_routed, ..PrefixTotals::default() };
        for node in self.nodes.values() {
            let p = &node.load.prefix;
            // Node-reported: summed without overflow, whatever a node claims.
            totals.hits = totals.hits.saturating_add(p.hits);
            totals.misses = totals.misses.saturating_add(p.misses);
            totals.tokens_reused = totals.tokens_reused.saturating_add(p.tokens_reused);
        }
        MessageResult(totals)
    }
}

impl Handler<QueueCounters> for Distributor {
    type Result = MessageResult<QueueCounters>;

    /// Each model's queue (jobs, games, oldest wait), and what the queues refused.
    fn handle(&mut self, _: QueueCounters, _: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let mut models: Vec<ModelQueue> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(model, q)| {
                let games: std::collections::HashSet<_> = q.iter().map(|j| j.game_id).collect();
                let oldest = q.iter().map(|j| now.saturating_duration_since(j.queued_at)).max().unwrap_or_default();
                ModelQueue {
                    model: model.clone(),
                    jobs: q.len(),
                    games: games.len(),
                    oldest_wait_s: oldest.as_secs_f64(),
                }
            })
            .collect();
        models.sort_by(|a, b| a.model.cmp(&b.model));
        let r = &self.queue_refusals;
        MessageResult(QueueTotals {
            models,
            running: self.running.len(),
            refused_full: r.full,
            gave_way: r.gave_way,
            timed_out: r.timed_out,
        })
    }
}

impl Handler<ListModels> for Distributor {
    type Result = Vec<(String, usize)>;

    fn handle(&mut self, _: ListModels, _: &mut Self::Context) -> Self::Result {
        // The other servers' nodes count too: their models are served here as well.
        let mut counts = self.peers.models(Instant::now());
        for (model, n) in &self.served {
            *counts.entry(model.clone()).or_default() += n;
        }
        let mut out: Vec<(String, usize)> = counts.into_iter().collect();
        out.sort();
        out
    }
}

impl Handler<super::messages::ListNodes> for Distributor {
    type Result = Vec<super::messages::LiveNode>;

    fn handle(&mut self, _: super::messages::ListNodes, _: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let mut out: Vec<_> = self
            .nodes
            .iter()
            .map(|(&id, n)| super::messages::LiveNode {
                id,
                address: n.address.clone(),
                models: n.models.clone(),
                device: n.device.clone(),
                capacity: n.stats.capacity,
                in_flight: n.stats.in_flight,
                latency_ms_per_token: n.stats.latency_ms,
                tokens_per_s: n.load.tokens_per_s,
                completed: n.stats.completed,
                failed: n.stats.failed,
                model_bytes: n.load.model_bytes,
                tuning: n.load.tuning.clone(),
                quarantined: self.is_quarantined(&n.address, now),
            })
            .collect();
        out.sort_by_key(|n| n.id);
        out
    }
}

impl Handler<Drain> for Distributor {
    type Result = ();

    /// Graceful shutdown: refuse new jobs, fail the queued ones; running ones finish.
    fn handle(&mut self, _: Drain, _: &mut Self::Context) {
        self.draining = true;
        for job in self.queues.drain().flat_map(|(_, q)| q) {
            let _ = job.events.send(JobEvent::Failed(ServeError::ShuttingDown));
        }
        self.maybe_release_nodes();
    }
}

impl Handler<super::supervisor::InjectPanic> for Distributor {
    type Result = ();

    fn handle(&mut self, _: super::supervisor::InjectPanic, _: &mut Self::Context) {
        panic!("fault injection: Distributor told to panic");
    }
}

/// Writes a quarantine decided here to the ledger, again and again while the database
/// cannot take it (an outage must not let a node caught cheating escape it by moving to
/// another server or waiting for a restart), until written or over.
async fn persist_quarantine(store: crate::ledger::Store, node: String, until: Instant) {
    let mut wait = Duration::from_secs(1);
    let mut failures = 0u32;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!(%node, failures, "a quarantine ended before the ledger could take it");
            return;
        }
        match store.record_quarantine(&node, left).await {
            Ok(()) if failures > 0 => {
                return tracing::info!(%node, failures, "quarantine written to the ledger after all");
            }
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(%node, error = %e, "could not write a quarantine to the ledger (it holds on this server); retrying");
                }
                actix::clock::sleep(wait).await;
                wait = (wait * 2).min(QUARANTINE_WRITE_RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Distributor with no nodes and no actors around it.
    fn bare_distributor() -> Distributor {
        let config = DistributorConfig {
            queue_capacity: 1,
            queue_timeout: Duration::from_secs(1),
            max_attempts: 1,
            catalog: vec![],
            quarantine: Duration::from_secs(1),
            prefix_routing: true,
        };
        Distributor::new(config, Peers::new(Duration::from_secs(3)))
    }

    #[test]
    fn the_quarantine_table_is_bounded_and_keeps_the_longest() {
        let mut distributor = bare_distributor();
        distributor.quarantine("0xlong".into(), Duration::from_secs(86_400), false);
        for i in 0..MAX_QUARANTINED + 10 {
            distributor.quarantine(format!("0x{i:040x}"), Duration::from_secs(600 + i as u64), false);
        }
        assert_eq!(distributor.quarantined.len(), MAX_QUARANTINED);
        let now = Instant::now();
        assert!(distributor.is_quarantined("0xlong", now), "the longest quarantine stays");
        assert!(!distributor.is_quarantined(&format!("0x{:040x}", 0), now), "the soonest to end went");
        assert!(distributor.is_quarantined(&format!("0x{:040x}", MAX_QUARANTINED + 9), now));
    }

    #[test]
    fn a_plain_job_that_found_no_room_spares_the_larger_ones_the_search() {
        let mut misses = PlainMisses::default();
        assert!(!misses.skips(true, 1_000), "nothing is known before a miss");
        misses.missed(true, 1_000);
        assert!(misses.skips(true, 1_000) && misses.skips(true, 5_000));
        assert!(!misses.skips(true, 999), "a smaller job may still fit");
        assert!(!misses.skips(false, 5_000), "a retry or re-run avoids nodes: it is tried");
        misses.missed(false, 10);
        assert!(!misses.skips(true, 999), "a retry's miss says nothing of plain jobs");
        misses.missed(true, 300);
        assert!(misses.skips(true, 300) && !misses.skips(true, 299));
    }

    #[test]
    fn names_nodes_announce_are_remembered_up_to_a_bound() {
        let mut distributor = bare_distributor();
        for batch in 0..100 {
            let names: Vec<String> = (0..16).map(|i| format!("rogue-{batch}-{i}")).collect();
            distributor.remember_models(&names);
        }
        assert_eq!(distributor.seen_models.len(), MAX_SEEN_MODELS);
        assert!(distributor.known("rogue-0-0"), "the first names are kept");
        assert!(!distributor.known("rogue-99-15"), "past the bound, names are not remembered");
    }
}
