//! The node's link to a distributor: connect, handshake, run tasks, stream tokens,
//! heartbeat; on any failure reconnect with jittered exponential backoff.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use awc::ws;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::backend::Backend;
use super::error::LinkError;
use super::finished::Finished;
use super::link::{join, Announce, Link};
use super::receipts::ReceiptLog;
use crate::books::ConfirmStatus;
use crate::crypto::identity::{Address, Identity};
use crate::crypto::merkle::task_root;
use crate::inference::Event;
use crate::proof::commitment::DEFAULT_TOP_K;
use crate::proof::ProofBuilder;
use crate::protocol::handshake::{open_message, seal_message};
use crate::protocol::receipt::confirmation_message;
use crate::protocol::SignedReceipt;
use crate::protocol::{NodeMessage, ServerMessage, TaskFailure, TaskId, TaskSpec, TaskUsage};

const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Receipts per re-send frame (well under the frame size limit).
const RECEIPTS_PER_FRAME: usize = 500;

/// The receipt log, shared by the session loop and its task runners (one thread).
type SharedLog = Rc<RefCell<ReceiptLog>>;

#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// ws://host:port/ws/node, or several servers of one network separated by commas: the
    /// node joins the first that answers and moves to the next when its link drops.
    pub connect: String,
    pub key: PathBuf,
    /// Sequences announced to the distributor (0 = the backend's own capacity).
    pub capacity: usize,
    /// Only join a distributor whose key has this address (`--distributor-address`).
    pub distributor_address: Option<Address>,
    /// The local receipt log (default: next to the key, `<key>.receipts`).
    pub receipts: Option<PathBuf>,
}

impl NodeOptions {
    pub fn receipts_path(&self) -> PathBuf {
        self.receipts.clone().unwrap_or_else(|| {
            let mut name = self.key.file_name().map(|n| n.to_os_string()).unwrap_or_default();
            name.push(".receipts");
            self.key.with_file_name(name)
        })
    }
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// The handshake completed before the link dropped: reconnect quickly.
    AfterWelcome(LinkError),
    BeforeWelcome(LinkError),
}

/// What a node serves: a loaded backend, or a protected bundle loaded (in memory) with the
/// key the distributor sends inside the sealed session.
pub enum NodeModel {
    Ready(Arc<Backend>),
    Bundle {
        name: String,
        key_id: String,
        capacity: usize,
        load: Arc<dyn Fn([u8; 32]) -> anyhow::Result<Backend> + Send + Sync>,
    },
}

/// Runs the node until the process is stopped: connects, serves, reconnects.
pub async fn run_node(model: impl Into<NodeModel>, options: NodeOptions) -> anyhow::Result<()> {
    let model = model.into();
    let identity = Arc::new(Identity::load_or_create(&options.key)?);
    let address = identity.address;
    let log: SharedLog = Rc::new(RefCell::new(ReceiptLog::open(&options.receipts_path())?));
    if log.borrow().pending() > 0 {
        tracing::info!(pending = log.borrow().pending(), "unconfirmed receipts from an earlier run will be re-sent");
    }
    let mut loaded = match &model {
        NodeModel::Ready(b) => Some(b.clone()),
        NodeModel::Bundle { .. } => None,
    };
    match &loaded {
        Some(b) => tracing::info!(%address, models = ?b.models(), device = %b.device(), "node starting"),
        None => tracing::info!(%address, "node starting; its protected model loads once the distributor sends the key"),
    }
    let servers = server_urls(&options.connect)?;
    let mut backoff = MIN_BACKOFF;
    // Unpinned, the node trusts the first distributor it joins, and only that one for the
    // rest of the run: a reconnect cannot be steered to another key. The servers of one
    // network share one distributor key, so a node moves between them under its pin.
    let mut pin = options.distributor_address;
    let mut next = 0;
    loop {
        let url = servers[next % servers.len()];
        match session(url, &model, &mut loaded, &options, &mut pin, &identity, &log).await {
            SessionEnd::AfterWelcome(reason) => {
                tracing::warn!(%reason, %url, "link to the distributor lost; reconnecting");
                backoff = MIN_BACKOFF;
            }
            SessionEnd::BeforeWelcome(reason) => {
                tracing::warn!(%reason, %url, retry_in_ms = backoff.as_millis() as u64, "could not join the distributor")
            }
        }
        // With several servers, the next one is tried after the shortest wait; the wait
        // grows only once every server has been tried.
        next += 1;
        let round_done = next % servers.len() == 0;
        let wait = if servers.len() > 1 && !round_done { MIN_BACKOFF } else { backoff };
        let jitter = rand::rng().random_range(0.5..1.5);
        actix_web::rt::time::sleep(wait.mul_f64(jitter)).await;
        if round_done {
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// The servers `--connect` names (comma-separated), at least one.
fn server_urls(connect: &str) -> anyhow::Result<Vec<&str>> {
    let urls: Vec<&str> = connect.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    anyhow::ensure!(
        !urls.is_empty(),
        "--connect needs a server URL (ws://host:port/ws/node), or several separated by commas"
    );
    Ok(urls)
}

/// What the writer task sends: messages (sealed on the way out) and pongs.
enum Outgoing {
    Message(NodeMessage),
    Pong(actix_web::web::Bytes),
}

impl From<Arc<Backend>> for NodeModel {
    fn from(b: Arc<Backend>) -> Self {
        Self::Ready(b)
    }
}

/// One session with the distributor: join, unlock a bundle if the node serves one, then
/// serve tasks and heartbeats until the link ends.
async fn session(
    url: &str,
    model: &NodeModel,
    loaded: &mut Option<Arc<Backend>>,
    options: &NodeOptions,
    pin: &mut Option<Address>,
    identity: &Arc<Identity>,
    log: &SharedLog,
) -> SessionEnd {
    let link = match join(url, identity, announce(model, loaded.as_ref(), options), *pin).await {
        Ok(link) => link,
        Err(e) => return SessionEnd::BeforeWelcome(e),
    };
    if pin.is_none() {
        tracing::info!(distributor = %link.distributor, "trusting this distributor for the rest of the run");
        *pin = Some(link.distributor);
    }
    tracing::info!(session_id = link.session_id, distributor = %link.distributor, "joined the distributor; session sealed");
    if let Err(e) = unlock_bundle(model, loaded, &link).await {
        return SessionEnd::BeforeWelcome(e);
    }
    let Link { sink, mut stream, sealer, mut opener, heartbeat_interval, .. } = link;
    let (out, writer) = spawn_writer(sink, sealer);
    let serving = Serving {
        backend: loaded.clone().expect("loaded above"),
        identity: identity.clone(),
        log: log.clone(),
        out,
        tasks: Rc::default(),
        finished: Rc::default(),
    };
    // Whatever the registry has not confirmed goes again: it may have crashed.
    resend(log, &serving.out, true);
    let mut heartbeat = actix_web::rt::time::interval(heartbeat_interval);
    let mut rate = TokenRate::new(serving.backend.load().1);
    let end = loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(ws::Frame::Binary(bytes))) => match open_message::<ServerMessage>(&mut opener, &bytes) {
                    Ok(message) => {
                        if let Err(end) = serving.on_message(message) {
                            break end;
                        }
                    }
                    Err(e) => break LinkError::Protocol(format!("bad frame from the distributor: {e}")),
                },
                Some(Ok(ws::Frame::Ping(p))) => { let _ = serving.out.send(Outgoing::Pong(p)); }
                Some(Ok(ws::Frame::Close(reason))) => break LinkError::Closed(format!("closed by the distributor: {reason:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => break LinkError::Closed(format!("websocket error: {e}")),
                None => break LinkError::Closed("connection closed".to_string()),
            },
            _ = heartbeat.tick() => {
                if let Err(end) = serving.heartbeat(&mut rate) {
                    break end;
                }
            }
        }
    };
    for (_, running) in serving.tasks.borrow_mut().drain() {
        running.handle.abort();
    }
    writer.abort();
    if let Err(e) = log.borrow().sync() {
        tracing::warn!(error = %e, "could not sync the receipt log");
    }
    SessionEnd::AfterWelcome(end)
}

/// What the node tells the distributor it serves: its models, capacity and device (a
/// bundle not yet unlocked announces its name and key id).
fn announce(model: &NodeModel, loaded: Option<&Arc<Backend>>, options: &NodeOptions) -> Announce {
    let (models, own_capacity, device, bundles) = match (loaded, model) {
        (Some(b), _) => (b.models(), b.capacity(), b.device(), Vec::new()),
        (None, NodeModel::Bundle { name, key_id, capacity, .. }) => {
            (vec![name.clone()], *capacity, "loading".to_string(), vec![key_id.clone()])
        }
        (None, NodeModel::Ready(_)) => unreachable!("a ready model is always loaded"),
    };
    let capacity = if options.capacity > 0 { options.capacity } else { own_capacity };
    Announce { models, capacity, device, bundles }
}

/// Loads a protected bundle with the key the distributor sent inside the sealed session
/// (once per run; the key lives only in the loader's closure).
async fn unlock_bundle(model: &NodeModel, loaded: &mut Option<Arc<Backend>>, link: &Link) -> Result<(), LinkError> {
    let (None, NodeModel::Bundle { key_id, load, .. }) = (loaded.as_ref(), model) else { return Ok(()) };
    let Some(key) =
        link.model_keys.get(key_id).and_then(|k| hex::decode(k).ok()).and_then(|k| <[u8; 32]>::try_from(k).ok())
    else {
        return Err(LinkError::Protocol(format!("the distributor sent no key for bundle {key_id}")));
    };
    let load = load.clone();
    // Decrypt and load off the event loop.
    match actix_web::rt::task::spawn_blocking(move || load(key)).await {
        Ok(Ok(backend)) => *loaded = Some(Arc::new(backend)),
        Ok(Err(e)) => return Err(LinkError::Local(format!("loading the protected model failed: {e:#}"))),
        Err(e) => return Err(LinkError::Local(format!("model loader panicked: {e}"))),
    }
    tracing::info!("protected model loaded in memory");
    Ok(())
}

/// The session's one writer, which keeps frames in order: tasks and heartbeats feed it
/// through the returned sender.
fn spawn_writer(
    mut sink: super::link::FrameSink,
    mut sealer: crate::crypto::session::Sealer,
) -> (UnboundedSender<Outgoing>, actix_web::rt::task::JoinHandle<()>) {
    let (out, mut out_rx) = unbounded_channel::<Outgoing>();
    let writer = actix_web::rt::spawn(async move {
        // Everything queued goes out in one flush: fewer small TCP segments for Nagle's
        // algorithm to hold back behind a delayed ACK.
        let mut seal = move |item: Outgoing| match item {
            Outgoing::Message(message) => ws::Message::Binary(seal_message(&mut sealer, &message).into()),
            Outgoing::Pong(p) => ws::Message::Pong(p),
        };
        while let Some(item) = out_rx.recv().await {
            if sink.feed(seal(item)).await.is_err() {
                return;
            }
            while let Ok(item) = out_rx.try_recv() {
                if sink.feed(seal(item)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    (out, writer)
}

/// Tokens generated since the last heartbeat, for the load report.
struct TokenRate {
    count: u64,
    at: Instant,
}

impl TokenRate {
    fn new(count: u64) -> Self {
        Self { count, at: Instant::now() }
    }

    /// Tokens per second since the last call, given the backend's running count.
    fn update(&mut self, count: u64) -> f64 {
        let dt = self.at.elapsed().as_secs_f64().max(1e-3);
        let rate = count.saturating_sub(self.count) as f64 / dt;
        (self.count, self.at) = (count, Instant::now());
        rate
    }
}

/// A joined session's serving side: the backend, the receipt log, the writer, the
/// running tasks and the ones finished lately.
struct Serving {
    backend: Arc<Backend>,
    identity: Arc<Identity>,
    log: SharedLog,
    out: UnboundedSender<Outgoing>,
    tasks: Tasks,
    finished: FinishedTasks,
}

impl Serving {
    /// Handles one message from the distributor; `Err` ends the session with the reason.
    fn on_message(&self, message: ServerMessage) -> Result<(), LinkError> {
        match message {
            ServerMessage::Task(spec) => {
                let id = spec.id;
                tracing::info!(task = %id, model = %spec.model, prefix = spec.prefix.len(), "task started");
                let progress: Rc<RefCell<Progress>> = Rc::default();
                let runner = TaskRunner {
                    identity: self.identity.clone(),
                    log: self.log.clone(),
                    out: self.out.clone(),
                    tasks: self.tasks.clone(),
                    finished: self.finished.clone(),
                    progress: progress.clone(),
                };
                let ticket = spec.ticket.clone();
                let handle = actix_web::rt::spawn(run_task(self.backend.clone(), *spec, runner));
                self.tasks.borrow_mut().insert(id, Running { handle, ticket, progress });
            }
            ServerMessage::Cancel { id, delivered } => {
                let running = self.tasks.borrow_mut().remove(&id);
                let ended = match running {
                    Some(running) => {
                        running.handle.abort(); // drops the engine's receiver: the slot frees next step
                        Some((running.ticket, running.progress))
                    }
                    // Finished already: the cancel crossed our Done, which the server drops.
                    None => self.finished.borrow_mut().take(id),
                };
                if let (Some((ticket, progress)), Some(delivered)) = (ended, delivered) {
                    partial_receipt(&self.identity, &self.log, &self.out, id, &ticket, &progress, delivered as usize);
                }
            }
            ServerMessage::Recorded { block, tasks } => {
                confirm(&self.identity, &self.log, &self.out, block, &tasks)
                    .map_err(|e| LinkError::Local(format!("receipt log: {e:#}")))?;
            }
            ServerMessage::Confirmed { block, status } => {
                if status != ConfirmStatus::Matched {
                    tracing::warn!(
                        block,
                        status = status.as_str(),
                        "the registry does not agree with our confirmation"
                    );
                }
                self.log.borrow_mut().confirmed(block).map_err(|e| LinkError::Local(format!("receipt log: {e:#}")))?;
            }
            ServerMessage::Goodbye { reason } => return Err(LinkError::Refused(reason)),
            ServerMessage::Welcome { .. } | ServerMessage::Challenge { .. } => {
                return Err(LinkError::Protocol("unexpected handshake message".to_string()))
            }
        }
        Ok(())
    }

    /// The periodic heartbeat (load and token rate), and re-sends of receipts unanswered
    /// for a while.
    fn heartbeat(&self, rate: &mut TokenRate) -> Result<(), LinkError> {
        let (mut load, count) = self.backend.load();
        load.tokens_per_s = rate.update(count);
        self.out
            .send(Outgoing::Message(NodeMessage::Heartbeat(load)))
            .map_err(|_| LinkError::Closed("writer stopped".to_string()))?;
        resend(&self.log, &self.out, false);
        Ok(())
    }
}

/// Sends unconfirmed receipts again: all of them (`all`, after a reconnect) or the ones
/// unanswered for a while.
fn resend(log: &SharedLog, out: &UnboundedSender<Outgoing>, all: bool) {
    let due = log.borrow_mut().due(all);
    if due.is_empty() {
        return;
    }
    tracing::info!(receipts = due.len(), "sending unconfirmed receipts again");
    for chunk in due.chunks(RECEIPTS_PER_FRAME) {
        let _ = out.send(Outgoing::Message(NodeMessage::Receipts { receipts: chunk.to_vec() }));
    }
}

/// Answers the registry's list of our tasks in `block` with a signed confirmation of the
/// ones we hold receipts for (the rest disputed).
fn confirm(
    identity: &Identity,
    log: &SharedLog,
    out: &UnboundedSender<Outgoing>,
    block: u64,
    tasks: &[TaskId],
) -> anyhow::Result<()> {
    let (agreed, disputed) = log.borrow_mut().recorded(block, tasks)?;
    if !disputed.is_empty() {
        tracing::warn!(block, disputed = disputed.len(), "the registry lists tasks this node did not run");
    }
    let root = task_root(&agreed.iter().map(|t| t.0).collect::<Vec<_>>());
    let count = agreed.len() as u32;
    let signature = hex::encode(identity.sign(&confirmation_message(block, &root, count, &disputed)));
    let _ = out.send(Outgoing::Message(NodeMessage::Confirm {
        block,
        root: hex::encode(root),
        count,
        disputed,
        signature,
    }));
    Ok(())
}

/// A task of this session: its runner, its ticket and what it produced so far.
struct Running {
    handle: actix_web::rt::task::JoinHandle<()>,
    ticket: crate::protocol::TaskTicket,
    progress: Rc<RefCell<Progress>>,
}

/// What a running task has produced: the completion (prefix included) and, once the
/// backend tokenized it, the prompt's length.
#[derive(Default)]
struct Progress {
    completion: Vec<u32>,
    prompt_tokens: Option<usize>,
    /// Tokens of the completion other nodes made (a failover continuation).
    prefix: usize,
    /// The proof being built, when the task carried a challenge (a game that hangs up
    /// gets a proof of what it received).
    prover: Option<ProofBuilder>,
}

type Tasks = Rc<RefCell<HashMap<TaskId, Running>>>;

/// Tasks of this session finished lately: their ticket and what they produced.
type FinishedTasks = Rc<RefCell<Finished<(crate::protocol::TaskTicket, Rc<RefCell<Progress>>)>>>;

/// What a task runner needs besides the backend and the task.
struct TaskRunner {
    identity: Arc<Identity>,
    log: SharedLog,
    out: UnboundedSender<Outgoing>,
    tasks: Tasks,
    finished: FinishedTasks,
    progress: Rc<RefCell<Progress>>,
}

/// The game left after `delivered` tokens reached it: a receipt for exactly those, logged
/// and sent like any re-sent receipt (the server wrote them ahead, so it is paid).
fn partial_receipt(
    identity: &Identity,
    log: &SharedLog,
    out: &UnboundedSender<Outgoing>,
    id: TaskId,
    ticket: &crate::protocol::TaskTicket,
    progress: &RefCell<Progress>,
    delivered: usize,
) {
    let mut progress = progress.borrow_mut();
    let (Some(prompt_tokens), true) = (progress.prompt_tokens, delivered <= progress.completion.len()) else {
        tracing::warn!(task = %id, delivered, produced = progress.completion.len(), "no receipt for a cancelled task: the server counts tokens this node did not produce");
        return;
    };
    let prompt_tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
    let delivered_tokens = progress.completion[..delivered].to_vec();
    let receipt = SignedReceipt::sign(identity, ticket.clone(), prompt_tokens, &delivered_tokens);
    if let Err(e) = log.borrow_mut().add(&receipt) {
        tracing::error!(task = %id, error = %e, "could not log a receipt");
    }
    // A continuation's proof covers its own tokens (the prefix ends its prompt).
    let own = &delivered_tokens[progress.prefix.min(delivered)..];
    let model = ticket.model.clone();
    let proof = progress.prover.as_mut().and_then(|p| p.finish(identity, id.0, &model, own)).map(Box::new);
    if progress.prover.is_some() && proof.is_none() {
        tracing::warn!(task = %id, delivered, produced = progress.completion.len(), "no proof for the delivered tokens: too far behind the last one generated");
    }
    tracing::info!(task = %id, delivered, "the game left; receipt for the tokens it received");
    let _ = out.send(Outgoing::Message(NodeMessage::Cancelled { id, receipt, proof }));
}

/// Runs one task on the backend and streams its events as frames; on completion, signs
/// the receipt and logs it before reporting the task done.
async fn run_task(backend: Arc<Backend>, spec: TaskSpec, runner: TaskRunner) {
    let TaskRunner { identity, log, out, tasks, finished, progress } = runner;
    let id = spec.id;
    let challenge =
        spec.challenge.as_deref().and_then(|c| hex::decode(c).ok()).and_then(|c| <[u8; 32]>::try_from(c).ok());
    {
        let mut progress = progress.borrow_mut();
        progress.completion = spec.prefix.clone();
        progress.prefix = spec.prefix.len();
        progress.prover = challenge.map(|c| ProofBuilder::new(c, DEFAULT_TOP_K).format(backend.format()));
    }
    match backend.start(&spec) {
        Err(error) => {
            let _ = out.send(Outgoing::Message(NodeMessage::Failed { id, failure: TaskFailure::Request(error) }));
        }
        Ok((mut events, prompt_tokens)) => {
            progress.borrow_mut().prompt_tokens = Some(prompt_tokens);
            task_events(&mut events, &spec, &identity, &log, &out, &progress).await;
        }
    }
    // Kept a while: a cancel may have crossed the end on the wire.
    let running = tasks.borrow_mut().remove(&id);
    if let Some(running) = running {
        finished.borrow_mut().keep(id, (running.ticket, running.progress));
    }
}

/// Streams one task's engine events as frames until it ends.
async fn task_events(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    spec: &TaskSpec,
    identity: &Identity,
    log: &SharedLog,
    out: &UnboundedSender<Outgoing>,
    progress: &RefCell<Progress>,
) {
    let id = spec.id;
    loop {
        match events.recv().await {
            Some(Event::Token { id: token, text, hidden, logprobs }) => {
                let index = {
                    let mut progress = progress.borrow_mut();
                    if let (Some(p), Some(h)) = (progress.prover.as_mut(), hidden.as_deref()) {
                        p.token_row(h); // the row whose logits chose this token
                    }
                    progress.completion.push(token);
                    progress.completion.len() - 1
                };
                let _ = out.send(Outgoing::Message(NodeMessage::Token { id, index, token, text, logprobs }));
            }
            Some(Event::Done(done)) => {
                let completion = progress.borrow().completion.clone();
                let prompt_tokens = u32::try_from(done.prompt_tokens).unwrap_or(u32::MAX);
                let receipt = SignedReceipt::sign(identity, spec.ticket.clone(), prompt_tokens, &completion);
                if let Err(e) = log.borrow_mut().add(&receipt) {
                    // Still report the task: the game is waiting. The receipt is only
                    // at risk if the server crashes before committing it.
                    tracing::error!(task = %id, error = %e, "could not log a receipt");
                }
                let usage = TaskUsage { prompt_tokens: done.prompt_tokens, completion_tokens: done.completion_tokens };
                // A continuation's proof covers its own tokens (the prefix ends its prompt).
                let own = &completion[spec.prefix.len().min(completion.len())..];
                // The prover stays: a cancel that crossed this Done asks for a shorter proof.
                let proof =
                    progress.borrow_mut().prover.as_mut().and_then(|p| p.finish(identity, id.0, &spec.model, own));
                let proof = proof.map(Box::new);
                let message =
                    NodeMessage::Done { id, finish_reason: done.reason, usage, tail: done.tail, receipt, proof };
                let _ = out.send(Outgoing::Message(message));
                tracing::info!(task = %id, tokens = completion.len(), "task done");
                break;
            }
            Some(Event::Rejected(error)) => {
                let _ = out.send(Outgoing::Message(NodeMessage::Failed { id, failure: TaskFailure::Request(error) }));
                break;
            }
            Some(Event::Error(error)) => {
                let _ = out.send(Outgoing::Message(NodeMessage::Failed { id, failure: TaskFailure::Node(error) }));
                break;
            }
            Some(Event::PromptCached { rows }) => {
                if let Some(p) = progress.borrow_mut().prover.as_mut() {
                    p.prompt_cached(rows);
                }
            }
            Some(Event::PromptHidden { rows, values }) => {
                if let Some(p) = progress.borrow_mut().prover.as_mut() {
                    p.prompt_rows(rows, &values);
                }
            }
            None => {
                let failure = TaskFailure::Node("the engine stopped".into());
                let _ = out.send(Outgoing::Message(NodeMessage::Failed { id, failure }));
                break;
            }
        }
    }
}
