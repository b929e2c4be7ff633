//! `NodeProxy`: one actor per node websocket — the link alone. It runs the handshake,
//! writes frames with back-pressure, turns jobs into task frames, checks and forwards each
//! token into its job's channel, notices cancelled games, stalled tasks and dead nodes, and
//! hands unfinished jobs back to the Distributor. What happens once a task is over
//! (receipts, pricing, usage, verification, quality checks) is the [`Completion`] actor's.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::web::Bytes;
use actix_ws::{Message as WsMessage, ProtocolError, Session};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::catalog::JobText;
use super::completion::{
    Completion, FreeSlot, HangUpProved, ReceiptsResent, TaskAbandoned, TaskFinished, Verification,
};
use super::distributor::Distributor;
use super::error::ServeError;
use super::load_pacer::{LoadPacer, Paced};
use super::messages::*;
use super::registry::Registry;
use super::sessions::Sessions;
use crate::crypto::identity::{verify, Address, Identity};
use crate::crypto::session::{KeyExchange, Opener, Role, Sealer};
use crate::inference::grammar::Refusal;
use crate::inference::logprobs::{check_shape, TokenLogprobs};
use crate::proof::Proof;
use crate::protocol::handshake::{
    distributor_challenge_message, hex32, node_auth_message, open_message, seal_message, transcript,
};
use crate::protocol::receipt::TaskTicket;
use crate::protocol::{
    decode_frame, encode_frame, messages::FinishReason, messages::MAX_PREFIX_BLOCKS, Hello, NodeLoad, NodeMessage,
    PrefixHeld, ServerMessage, SignedReceipt, TaskFailure, TaskId, MAX_FRAME_BYTES, MAX_TUNING_CHARS, MIN_CONTEXT,
    PROTOCOL_VERSION,
};

/// A node must say Hello within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an authenticated node may take to load its model before its first heartbeat.
const MODEL_LOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// Most sequences one node may claim to run at once.
const MAX_CAPACITY: usize = 4096;
/// Models one node may announce, and the longest name.
const MAX_MODELS_PER_NODE: usize = 16;
const MAX_MODEL_NAME_BYTES: usize = 128;
/// Largest context a node may report (tokens per sequence).
const MAX_CONTEXT: usize = 1 << 24;
/// How long, and for how many tasks at once, the proxy waits for the receipt and proof
/// of a task whose game left (`Cancelled`); later, the receipt is not paid.
const ABANDONED_WAIT: Duration = Duration::from_secs(60);
const MAX_ABANDONED: usize = 64;
/// Most receipts one `Receipts` frame may carry (nodes send 500).
const MAX_RECEIPTS_PER_FRAME: usize = 512;
/// Re-sent receipts checked per node per second (a secp256k1 recovery each, on the HTTP
/// worker); the rest of a burst is left for the node to send again (it does, after
/// `node::receipts::RESEND_AFTER`), so a reconnect after a long outage drains at this pace.
const RECEIPT_CHECKS_PER_S: usize = 1024;
/// A receipt re-sent again within this time of its last check on the link is dropped
/// unchecked (an honest node re-sends a receipt every 20 s at most, or once after a
/// reconnect, which is a new link): one real receipt sent over and over used to cost a
/// signature recovery on the Completion thread each time, and a row in the block buffer.
const RESENT_MEMORY: Duration = Duration::from_secs(10);
/// Blocks announced to a node and not yet confirmed that the proxy remembers.
const MAX_ANNOUNCED_BLOCKS: usize = 1024;
/// Most bytes of text one token frame may carry (a token's text is a few bytes; a
/// stop-sequence hold-back released at once is at most a few hundred).
const MAX_TOKEN_TEXT_BYTES: usize = 1024;
/// Characters of a node's own reason for failing a task that reach a game's error.
const MAX_REASON_CHARS: usize = 200;
/// Characters of a reason the server closes a link for, logged and sent in `Goodbye`: the
/// server writes them, but may quote what the node sent (an address, a parse error).
const MAX_CLOSE_REASON_CHARS: usize = 300;
/// A handshake frame (Hello, Auth) is small: 16 model names and bundle ids of 128 bytes.
/// Larger ones are refused before they are parsed, from anyone who can connect.
const MAX_HANDSHAKE_FRAME_BYTES: usize = 16 * 1024;
/// How the node's storage format (`NodeLoad::quantization`, shown to operators) is bounded.
const MAX_QUANTIZATION_CHARS: usize = 16;
/// Text a task may carry in all, per token it may produce, plus [`TASK_TEXT_ALLOWANCE`].
const MAX_TEXT_BYTES_PER_TOKEN: usize = 256;
const TASK_TEXT_ALLOWANCE: usize = 4096;
/// Slowest average a task may keep: past `task_stall_timeout + max_tokens × this`, it is
/// taken away even if tokens trickle in (each token used to reset the stall timer).
const SLOWEST_TOKEN: Duration = Duration::from_secs(1);
/// Token frames one sequence may honestly send per second; with the node's capacity, it
/// bounds all frames a node may send (tokens included).
const MAX_TOKENS_PER_S_PER_SEQUENCE: u32 = 1000;

static NEXT_NODE_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone)]
pub struct NodeProxyConfig {
    /// How often nodes send heartbeats.
    pub heartbeat_interval: Duration,
    /// A node silent for this long is considered dead.
    pub node_timeout: Duration,
    /// The distributor's key: it signs every handshake challenge.
    pub identity: Arc<Identity>,
    /// Node addresses refused at the handshake.
    pub banned: Arc<HashSet<Address>>,
    /// Keys of protected model bundles, by key id (`data_dir/model-keys/*.key`).
    pub model_keys: Arc<std::collections::BTreeMap<String, String>>,
    /// Who may receive each bundle key: key id → (the key file's name, allowed addresses).
    pub bundle_nodes: Arc<HashMap<String, (String, HashSet<Address>)>>,
    /// Authenticates task tickets; shared by every server on the registry database.
    pub ticket_secret: Arc<[u8; 32]>,
    pub registry: Addr<Registry>,
    /// Where finished tasks, re-sent receipts and confirmations go.
    pub completion: Addr<Completion>,
    /// Proof of inference: absent when no reference model is configured.
    pub verification: Option<Verification>,
    /// Frames a node may send per second that the server did not ask for (anything but
    /// the tokens and the end of a task it runs); more is a flood and closes the link.
    pub max_frames_per_s: u32,
    /// The live session of each node key: a newer session of the same key replaces the
    /// older one, here and on the other servers of the network.
    pub sessions: Arc<Sessions>,
    /// Bytes waiting to be written to a node; more means it stopped reading: the link is
    /// closed (and its tasks go elsewhere) instead of buffering without bound.
    pub max_queued_bytes: usize,
    /// A running task with no token for this long is taken away from its node (and any
    /// task past this plus `SLOWEST_TOKEN` per token it may produce).
    pub task_stall_timeout: Duration,
}

/// A handshake between Hello and Auth.
struct Pending {
    exchange: KeyExchange,
    node_x25519: [u8; 32],
    nonce: [u8; 32],
    transcript: Vec<u8>,
    address: Address,
    models: Vec<String>,
    capacity: usize,
    device: String,
    bundles: Vec<String>,
}

enum Outgoing {
    Binary(Bytes),
    Pong(Bytes),
    Close(String),
}

impl Outgoing {
    fn len(&self) -> usize {
        match self {
            Outgoing::Binary(b) | Outgoing::Pong(b) => b.len(),
            Outgoing::Close(_) => 0,
        }
    }
}

struct InFlight {
    job: Job,
    /// The proof-of-inference challenge sent with the task.
    challenge: Option<[u8; 32]>,
    /// Tokens the job had already emitted elsewhere when it came here (failover).
    prefix_len: usize,
    started: Instant,
    first_token: Option<Instant>,
    last_progress: Instant,
    /// Bytes of text the node sent for this task (bounded).
    text_bytes: usize,
}

/// A task whose game left, waiting for the node's receipt and proof of what it received.
struct Abandoned {
    /// The job as the game left it: `emitted` holds exactly the delivered tokens.
    job: Job,
    challenge: [u8; 32],
    prefix_len: usize,
    started: Instant,
    /// When the game left.
    at: Instant,
}

impl InFlight {
    /// Past this, the task is taken away however it trickles.
    fn deadline(&self, stall_timeout: Duration) -> Instant {
        self.started + stall_timeout + SLOWEST_TOKEN * self.job.max_tokens.min(u32::MAX as usize) as u32
    }

    /// Counts `bytes` more text; false when the task's text budget is spent.
    fn take_text(&mut self, bytes: usize) -> bool {
        self.text_bytes += bytes;
        self.text_bytes <= TASK_TEXT_ALLOWANCE + MAX_TEXT_BYTES_PER_TOKEN * self.job.max_tokens
    }
}

pub struct NodeProxy {
    id: NodeId,
    config: NodeProxyConfig,
    distributor: Addr<Distributor>,
    out: UnboundedSender<Outgoing>,
    pending: Option<Pending>,
    /// Authenticated but not yet in the distributor's table (until its first heartbeat).
    joining: Option<(Address, Vec<String>, usize, String)>,
    /// The node's address, once authenticated.
    address: Option<Address>,
    registered: bool,
    /// Tokens a sequence holds on the node (prompt and answer), as its joining heartbeat
    /// said (0: no limit). Fixed for the session: a node cannot shrink it to end answers
    /// early.
    context: usize,
    welcomed_at: Option<Instant>,
    sealer: Option<Sealer>,
    opener: Option<Opener>,
    ready: bool,
    last_seen: Instant,
    in_flight: HashMap<TaskId, InFlight>,
    /// Tasks whose game left, until the node's proof of what it received arrives.
    abandoned: HashMap<TaskId, Abandoned>,
    /// The format the node's last proof for a task of each model declared: what its
    /// proof-less tokens of that model are held to.
    declared_formats: HashMap<String, crate::proof::Format>,
    close_reason: String,
    /// Frames received in the current one-second window (flood limits): all of them, and
    /// those the server did not ask for.
    window_start: Instant,
    window_frames: u32,
    window_unsolicited: u32,
    /// Re-sent receipts checked in the current window.
    window_receipts: usize,
    /// Re-sent receipts passed on for checking in the last [`RESENT_MEMORY`], by task (at
    /// most [`RECEIPT_CHECKS_PER_S`] a second, so about 10,000).
    resent: HashMap<TaskId, Instant>,
    /// Blocks announced to the node (`Recorded`) and not yet confirmed.
    announced: std::collections::BTreeSet<u64>,
    /// Sequences the node declared it runs at once (scales the frame limit).
    capacity: usize,
    /// Bytes handed to the writer and not yet written to the socket.
    queued: Arc<std::sync::atomic::AtomicUsize>,
    /// Heartbeats reach the Distributor at most four times a heartbeat interval.
    load_pacer: LoadPacer,
    /// The ledger answered whether the node is quarantined ([`NodeJoined`]).
    standing_known: bool,
    /// The first heartbeat, held until then.
    first_load: Option<NodeLoad>,
    /// What the link's creator needs kept while the link lives, dropped with the actor (the
    /// HTTP layer's place for it in its address's count of open links).
    _held: Option<Box<dyn std::any::Any>>,
}

impl NodeProxy {
    /// A heartbeat: the first one puts the node in the Distributor's table, once the
    /// ledger's word on its quarantine is in (held until then); every one tells its load.
    fn on_heartbeat(&mut self, ctx: &mut Context<Self>, load: NodeLoad) {
        if self.joining.is_some() && !self.standing_known {
            self.first_load = Some(load);
            return;
        }
        if let Some((address, models, capacity, device)) = self.joining.take() {
            if (1..MIN_CONTEXT).contains(&load.context) {
                let context = load.context;
                return self.fail(ctx, format!("a context of {context} tokens is below the minimum {MIN_CONTEXT}"));
            }
            self.registered = true;
            self.context = (load.context as usize).min(MAX_CONTEXT);
            self.distributor.do_send(NodeConnected {
                id: self.id,
                proxy: ctx.address(),
                address: address.to_string(),
                models,
                capacity,
                device,
                context: self.context,
            });
        }
        let load = bounded_load(load, self.address);
        self.pace_load(ctx, load)
    }

    /// Tells the Distributor the node's load, paced ([`LoadPacer`]): a load held back is told
    /// when its gap ends, unless a newer one replaces it first.
    fn pace_load(&mut self, ctx: &mut Context<Self>, load: NodeLoad) {
        match self.load_pacer.offer(load, Instant::now()) {
            Paced::Now(load) => self.distributor.do_send(NodeHeartbeat { id: self.id, load }),
            Paced::Held { flush_after: Some(wait) } => {
                ctx.run_later(wait, |this, _| {
                    if let Some(load) = this.load_pacer.flush(Instant::now()) {
                        this.distributor.do_send(NodeHeartbeat { id: this.id, load });
                    }
                });
            }
            Paced::Held { flush_after: None } => {}
        }
    }

    /// A task the node failed goes back to the Distributor (another node, or the game's
    /// error). The tokens it delivered of its own have no proof (its `Done` never came),
    /// yet a streamed answer's game has read them: they are checked without one.
    fn hand_back(&mut self, run: InFlight, failure: TaskFailure) {
        self.check_delivered(&run.job, run.prefix_len..run.job.emitted.len());
        let address = self.address_text();
        self.distributor.do_send(TaskReturned { node: self.id, address, job: run.job, failure });
    }

    /// Has the node's own tokens `own` of `job` (the game read them) checked without a
    /// proof ([`super::delivery_check`]), held to the format its proofs declared on this
    /// link.
    fn check_delivered(&self, job: &Job, own: std::ops::Range<usize>) {
        if let (Some(v), Some(node)) = (&self.config.verification, self.address) {
            let format = self.declared_formats.get(&job.model).copied();
            super::delivery_check::check_delivered(v, node, job, own, format);
        }
    }

    /// The node's address as the distributor's table holds it (empty before the handshake,
    /// when the node holds no job).
    fn address_text(&self) -> String {
        self.address.map(|a| a.to_string()).unwrap_or_default()
    }

    /// Wraps an upgraded websocket; the writer task owns the session so frames leave in
    /// the order they were produced.
    pub fn new(session: Session, distributor: Addr<Distributor>, config: NodeProxyConfig) -> Self {
        let (out, mut rx) = unbounded_channel::<Outgoing>();
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let written = queued.clone();
        actix_web::rt::spawn(async move {
            let mut session = session;
            while let Some(item) = rx.recv().await {
                let len = item.len();
                let sent = match item {
                    Outgoing::Binary(b) => session.binary(b).await,
                    Outgoing::Pong(b) => session.pong(&b).await,
                    Outgoing::Close(reason) => {
                        let _ = session
                            .close(Some(actix_ws::CloseReason {
                                code: actix_ws::CloseCode::Normal,
                                description: Some(reason),
                            }))
                            .await;
                        return;
                    }
                };
                written.fetch_sub(len, Ordering::Relaxed);
                if sent.is_err() {
                    return;
                }
            }
        });
        let config_gap = config.heartbeat_interval / 4;
        Self {
            id: NEXT_NODE_ID.fetch_add(1, Ordering::Relaxed),
            config,
            distributor,
            out,
            pending: None,
            joining: None,
            address: None,
            registered: false,
            context: 0,
            welcomed_at: None,
            sealer: None,
            opener: None,
            ready: false,
            last_seen: Instant::now(),
            in_flight: HashMap::new(),
            abandoned: HashMap::new(),
            declared_formats: HashMap::new(),
            close_reason: "connection closed".into(),
            window_start: Instant::now(),
            window_frames: 0,
            window_unsolicited: 0,
            window_receipts: 0,
            resent: HashMap::new(),
            announced: Default::default(),
            capacity: 1,
            queued,
            load_pacer: LoadPacer::new(config_gap),
            standing_known: false,
            first_load: None,
            _held: None,
        }
    }

    /// The proxy keeps `held` for its life (a guard its creator drops with the link).
    pub fn holding(mut self, held: impl std::any::Any) -> Self {
        self._held = Some(Box::new(held));
        self
    }

    /// Hands a frame to the writer, counting the bytes it holds.
    fn push(&mut self, item: Outgoing) {
        self.queued.fetch_add(item.len(), Ordering::Relaxed);
        let _ = self.out.send(item);
    }

    /// Whether the node has stopped reading (its unwritten bytes exceed the limit).
    fn stopped_reading(&self) -> Option<usize> {
        let queued = self.queued.load(Ordering::Relaxed);
        (queued > self.config.max_queued_bytes).then_some(queued)
    }

    /// The frame for `message`: sealed once the session is up, clear during the handshake.
    fn frame(&mut self, message: &ServerMessage) -> Vec<u8> {
        match self.sealer.as_mut() {
            Some(sealer) => seal_message(sealer, message),
            None => encode_frame(message),
        }
    }

    fn send(&mut self, message: &ServerMessage) {
        let frame = self.frame(message);
        self.push(Outgoing::Binary(Bytes::from(frame)));
    }

    /// Closes the link, logging why.
    fn fail(&mut self, ctx: &mut Context<Self>, reason: impl Into<String>) {
        let reason: String = reason.into();
        self.close_reason = match reason.char_indices().nth(MAX_CLOSE_REASON_CHARS) {
            Some((end, _)) => format!("{}…", &reason[..end]),
            None => reason,
        };
        tracing::warn!(node = self.id, reason = %self.close_reason, "closing node link");
        self.send(&ServerMessage::Goodbye { reason: self.close_reason.clone() });
        ctx.stop();
    }

    fn on_hello(&mut self, ctx: &mut Context<Self>, hello: Hello) {
        let Hello { version, node_address, models, capacity, device, x25519_public, bundles } = hello;
        if version != PROTOCOL_VERSION as u16 {
            return self
                .fail(ctx, format!("protocol version {version} is not supported (server speaks {PROTOCOL_VERSION})"));
        }
        let Ok(address) = node_address.parse::<Address>() else {
            return self.fail(ctx, format!("node address `{node_address}` is not a 0x-prefixed 20-byte hex address"));
        };
        if self.config.banned.contains(&address) {
            return self.fail(ctx, format!("node {address} is banned"));
        }
        if models.is_empty() || capacity == 0 || capacity > MAX_CAPACITY {
            return self.fail(ctx, format!("a node must serve a model and claim a capacity of 1..={MAX_CAPACITY}"));
        }
        // Node-chosen names reach logs, the dashboard and /metrics: bounded and printable.
        let bad_name = |m: &String| m.is_empty() || m.len() > MAX_MODEL_NAME_BYTES || m.chars().any(char::is_control);
        if models.len() > MAX_MODELS_PER_NODE || models.iter().any(bad_name) {
            return self.fail(
                ctx,
                format!(
                    "a node serves at most {MAX_MODELS_PER_NODE} models, each named by 1..={MAX_MODEL_NAME_BYTES} \
                     bytes without control characters"
                ),
            );
        }
        if bundles.len() > MAX_MODELS_PER_NODE || bundles.iter().any(bad_name) {
            return self.fail(
                ctx,
                format!(
                    "a node needs the keys of at most {MAX_MODELS_PER_NODE} bundles, each named by \
                     1..={MAX_MODEL_NAME_BYTES} bytes without control characters"
                ),
            );
        }
        let Ok(node_x25519) = hex32(&x25519_public) else {
            return self.fail(ctx, "the node's X25519 key is not 32 bytes of hex");
        };
        let exchange = KeyExchange::new();
        let mut nonce = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let transcript = transcript(self.id, &nonce, &node_x25519, &exchange.public, &address);
        let signature = self.config.identity.sign(&distributor_challenge_message(&transcript));
        self.send(&ServerMessage::Challenge {
            session_id: self.id,
            nonce: hex::encode(nonce),
            x25519_public: hex::encode(exchange.public),
            distributor_address: self.config.identity.address.to_string(),
            signature: hex::encode(signature),
        });
        tracing::debug!(node = self.id, %address, %device, "challenge sent");
        // A label for operators (dashboard); bounded, since the node chooses it.
        let device: String = device.chars().filter(|c| !c.is_control()).take(64).collect();
        self.pending =
            Some(Pending { exchange, node_x25519, nonce, transcript, address, models, capacity, device, bundles });
    }

    /// Whether `address` is listed for the bundle key `id`.
    fn bundle_allowed(&self, id: &str, address: &Address) -> bool {
        self.config.bundle_nodes.get(id).is_some_and(|(_, allowed)| allowed.contains(address))
    }

    fn on_auth(&mut self, ctx: &mut Context<Self>, signature: String) {
        let Some(mut p) = self.pending.take() else {
            return self.fail(ctx, "Auth before Hello");
        };
        let signature = hex::decode(&signature).unwrap_or_default();
        if let Err(e) = verify(&node_auth_message(&p.transcript), &signature, &p.address) {
            return self.fail(ctx, format!("node authentication failed: {e}"));
        }
        let session = match p.exchange.finish(Role::Distributor, &p.node_x25519, &p.nonce, self.id) {
            Ok(session) => session,
            Err(e) => return self.fail(ctx, format!("key agreement failed: {e}")),
        };
        let mut model_keys = std::collections::BTreeMap::new();
        for id in &p.bundles {
            match self.config.model_keys.get(id) {
                // Protected weights go only to the nodes the operator listed for them.
                Some(_) if !self.bundle_allowed(id, &p.address) => {
                    let name = self.config.bundle_nodes.get(id).map_or("?", |(name, _)| name.as_str());
                    return self.fail(
                        ctx,
                        format!(
                            "node {} is not allowed the key of model bundle `{name}` \
                             (the operator lists allowed nodes in [distributor] bundle_nodes)",
                            p.address
                        ),
                    );
                }
                Some(key) => {
                    model_keys.insert(id.clone(), key.clone());
                }
                None => return self.fail(ctx, format!("this distributor holds no key for model bundle {id}")),
            }
        }
        self.sealer = Some(session.sealer);
        self.opener = Some(session.opener);
        self.ready = true;
        let heartbeat_interval_ms = self.config.heartbeat_interval.as_millis() as u64;
        // Sealed: bundle keys never cross the link in clear.
        self.send(&ServerMessage::Welcome { session_id: self.id, heartbeat_interval_ms, model_keys });
        tracing::info!(node = self.id, address = %p.address, bundles = p.bundles.len(), "node authenticated; session sealed");
        // One key, one session: a newer session replaces the older one (a node that
        // reconnects before the old link timed out), so a key never holds two slots.
        self.config.sessions.open(p.address, ctx.address());
        let claimed = p.capacity;
        p.capacity = claimed.min(super::delivery_check::MAX_TASKS_AT_ONCE);
        if p.capacity < claimed {
            tracing::info!(node = self.id, address = %p.address, claimed, given = p.capacity,
                "a node claims more room than it is given tasks at once (its failed tasks' checks must have room too)");
        }
        self.capacity = p.capacity;
        // The node joins the table with its first heartbeat (it may still be loading), and
        // not before the ledger said whether it is quarantined (a restart, or a server that
        // missed the notice, must not give a node caught cheating a task meanwhile).
        let address = p.address;
        self.config
            .registry
            .send(NodeJoined { node: address })
            .into_actor(self)
            .map(move |answer, this, ctx| {
                if let Ok(Some(duration)) = answer {
                    tracing::warn!(%address, left_s = duration.as_secs(), "a quarantined node joined; kept out of rotation");
                    let address = address.to_string();
                    this.distributor.do_send(QuarantineNode { address, duration, announce: false });
                }
                this.standing_known = true;
                if let Some(load) = this.first_load.take() {
                    this.on_heartbeat(ctx, load);
                }
            })
            .spawn(ctx);
        self.address = Some(p.address);
        self.joining = Some((p.address, p.models, p.capacity, p.device));
        self.welcomed_at = Some(Instant::now());
    }

    fn on_message(&mut self, ctx: &mut Context<Self>, message: NodeMessage) {
        match message {
            NodeMessage::Hello(hello) if !self.ready && self.pending.is_none() => self.on_hello(ctx, hello),
            NodeMessage::Auth { signature } if !self.ready => self.on_auth(ctx, signature),
            _ if !self.ready => self.fail(ctx, "the handshake is Hello, then Auth"),
            NodeMessage::Hello(_) | NodeMessage::Auth { .. } => {
                self.fail(ctx, "handshake messages after the handshake")
            }
            NodeMessage::Heartbeat(load) => self.on_heartbeat(ctx, load),
            NodeMessage::Token { id, index, token, text, logprobs } => {
                self.on_token(ctx, id, index, token, text, logprobs)
            }
            NodeMessage::Done { id, finish_reason, usage: _, tail, receipt, proof } => {
                let Some(mut run) = self.in_flight.remove(&id) else {
                    // Finished after a cancel or a stall: the game never got it whole.
                    return;
                };
                // One entry per model the node serves (at most 16).
                if let Some(format) = proof.as_deref().and_then(|p| crate::proof::Format::declared_by(p).ok()) {
                    self.declared_formats.insert(run.job.model.clone(), format);
                }
                if tail.len() > MAX_TOKEN_TEXT_BYTES || !run.take_text(tail.len()) {
                    // Back in the table so that the link's end hands it to another node.
                    self.in_flight.insert(id, run);
                    return self.fail(ctx, format!("task {id}: more text than its tokens can carry"));
                }
                // A task done without a token of its own did nothing: nothing to pay, nothing
                // a proof could cover. (But for a continuation after an end the server could
                // not see, of a model whose text it does not make: the node's engine ends it
                // at once.)
                let idle = run.job.emitted.len() <= run.prefix_len
                    && (run.prefix_len == 0 || run.job.text.as_ref().is_some_and(|t| !t.stream.stopped()));
                if idle {
                    self.in_flight.insert(id, run);
                    return self.fail(ctx, format!("task {id}: done without generating a token"));
                }
                // The server's own text says how the answer ended: at an end-of-sequence
                // token or a stop sequence, or else at its length (max_tokens, or a node's
                // context). A node's word is taken only where the server holds no tokenizer.
                // An answer the server sees no end of may stop short of max_tokens only where
                // it filled the context the node reported when it joined: a job longer than
                // every node's context goes to the largest (`Distributor::dispatch_once`), and an
                // honest node ends it there, at its length.
                let filled =
                    self.context != 0 && run.job.prompt.tokens as usize + run.job.emitted.len() >= self.context;
                // A structured answer ends complete, at a stop sequence, at max_tokens or at a
                // full context (`length`, as OpenAI ends one that runs out of room): a node
                // that stops inside it elsewhere goes the way of a failed node (the task fails
                // over).
                let cut_short = run.job.emitted.len() < run.job.max_tokens
                    && !filled
                    && run.job.text.as_mut().is_some_and(|t| !t.stream.stopped() && t.grammar_incomplete());
                if cut_short {
                    self.in_flight.insert(id, run);
                    return self.fail(ctx, format!("task {id}: ended a structured answer before it was complete"));
                }
                // Nor does an answer end early at its length: one that the server's text
                // sees no end of, short of max_tokens, must have filled the node's context.
                // Else a node could stop after one decode step and be paid for the whole
                // prompt.
                let early = run.job.emitted.len() < run.job.max_tokens
                    && run.job.text.as_ref().is_some_and(|t| !t.stream.stopped())
                    && !filled;
                if early {
                    let (tokens, max_tokens, context) = (run.job.emitted.len(), run.job.max_tokens, self.context);
                    let prompt = run.job.prompt.tokens;
                    self.in_flight.insert(id, run);
                    return self.fail(
                        ctx,
                        format!(
                            "task {id}: ended early, at no end of sequence: {tokens} of max_tokens {max_tokens}, \
                             {prompt} prompt tokens in a context of {context}"
                        ),
                    );
                }
                let (tail, finish_reason) = match run.job.text.as_mut() {
                    Some(server_text) => {
                        let reason =
                            if server_text.stream.stopped() { FinishReason::Stop } else { FinishReason::Length };
                        (server_text.finish(), reason)
                    }
                    None => (tail, finish_reason),
                };
                if !tail.is_empty() {
                    let _ = run.job.events.send_last_text(tail);
                }
                // The node's part is over either way: its slot is freed and its speed
                // learnt; for a task with a challenge, by Completion once it has judged
                // the proof (a failed one's quarantine lands first).
                let completed = TaskCompleted {
                    node: self.id,
                    task: id,
                    completion_tokens: run.job.emitted.len().saturating_sub(run.prefix_len),
                    time_to_first_token: run.first_token.map(|t| t - run.started),
                    duration: run.started.elapsed(),
                };
                let freed = match (self.address, run.challenge) {
                    (Some(_), Some(_)) => FreeSlot::new(self.distributor.clone(), completed),
                    _ => {
                        self.distributor.do_send(completed);
                        FreeSlot::freed()
                    }
                };
                let Some(address) = self.address else { return };
                self.config.completion.do_send(TaskFinished {
                    freed,
                    node: self.id,
                    address,
                    reply_to: ctx.address().recipient(),
                    latency_ms: run.started.elapsed().as_millis().min(i32::MAX as u128) as i32,
                    job: run.job,
                    challenge: run.challenge,
                    prefix_len: run.prefix_len,
                    finish_reason,
                    receipt,
                    proof,
                });
            }
            NodeMessage::Receipts { receipts } => self.on_receipts(ctx, receipts),
            NodeMessage::Cancelled { id, receipt, proof } => self.on_cancelled(ctx, id, receipt, proof),
            NodeMessage::Confirm { block, root, count, disputed, signature } => {
                self.on_confirm(ctx, block, root, count, disputed, signature)
            }
            NodeMessage::Failed { id, failure } => {
                if let Some(run) = self.in_flight.remove(&id) {
                    let failure = node_failure(&run.job, self.context, failure);
                    self.hand_back(run, failure);
                }
            }
        }
    }

    /// Passes a confirmation of a block announced to the node to be checked and stored.
    fn on_confirm(
        &mut self,
        ctx: &mut Context<Self>,
        block: u64,
        root: String,
        count: u32,
        disputed: Vec<TaskId>,
        signature: String,
    ) {
        let Some(address) = self.address else { return };
        // Only blocks announced to this node, each once: a confirmation is a database
        // transaction, never one a node can ask for at will.
        if !self.announced.remove(&block) {
            tracing::warn!(node = self.id, %address, block, "confirmation of a block not announced to the node; ignored");
            return;
        }
        let Ok(root) = hex32(&root) else {
            return self.fail(ctx, "a confirmation root is not 32 bytes of hex");
        };
        let signature = hex::decode(&signature).unwrap_or_default();
        let reply_to = ctx.address().recipient();
        self.config.completion.do_send(ConfirmBlock {
            node: address,
            block,
            root,
            count,
            disputed,
            signature,
            reply_to,
        });
    }

    /// Counts a frame the server did not ask for; true past the limit.
    fn unsolicited_flood(&mut self) -> bool {
        self.window_unsolicited += 1;
        self.window_unsolicited > self.config.max_frames_per_s
    }

    fn flooded(&mut self, ctx: &mut Context<Self>) {
        let limit = self.config.max_frames_per_s;
        self.fail(ctx, format!("flooding: more than {limit} frames in one second that the server did not ask for"));
    }

    /// Whether the server asked for this frame: the tokens and the end of a task the node
    /// runs here (or ran until a cancel that is still on its way to it), the answer to a
    /// cancel. Everything else counts against the flood limit.
    fn solicited(&self, message: &NodeMessage) -> bool {
        match message {
            NodeMessage::Token { id, .. } | NodeMessage::Done { id, .. } => {
                self.in_flight.contains_key(id) || self.abandoned.contains_key(id)
            }
            NodeMessage::Cancelled { id, .. } => self.abandoned.contains_key(id),
            _ => false,
        }
    }

    fn on_token(
        &mut self,
        ctx: &mut Context<Self>,
        id: TaskId,
        index: usize,
        token: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    ) {
        let vocab = self.config.verification.as_ref().map(|v| v.vocab.clone());
        // Cancelled or unknown: nothing to do.
        let Some(run) = self.in_flight.get_mut(&id) else { return };
        // Every number a node sends is bounded before it counts.
        let expected = run.job.emitted.len();
        let vocab =
            run.job.text.as_ref().map(JobText::vocab_size).or(vocab.and_then(|v| v.get(&run.job.model).copied()));
        let refused = if index != expected {
            Some(format!("task {id}: token index {index}, expected {expected}"))
        } else if expected >= run.job.max_tokens {
            Some(format!("task {id}: a token past max_tokens ({})", run.job.max_tokens))
        } else if run.job.text.as_ref().is_some_and(|t| t.stream.stopped()) {
            Some(format!("task {id}: a token after the answer's end (stop sequence or end-of-sequence token)"))
        } else if let Some(vocab) = vocab.filter(|&v| token as usize >= v) {
            Some(format!("task {id}: token id {token} is outside the model's vocabulary of {vocab}"))
        } else if text.len() > MAX_TOKEN_TEXT_BYTES || !run.take_text(text.len()) {
            Some(format!("task {id}: more text than its tokens can carry"))
        } else {
            // Log probabilities come exactly when asked for, in the shape asked for; their
            // values are the verifier's to check.
            match (run.job.params.logprobs, &logprobs, vocab) {
                (None, None, _) => None,
                (Some(top), Some(lp), Some(vocab)) => {
                    let exact = run.job.params.grammar.is_none();
                    check_shape(lp, token, top, vocab, exact)
                        .err()
                        .map(|e| format!("task {id}: log probabilities: {e}"))
                }
                (Some(_), Some(_), None) => {
                    Some(format!("task {id}: log probabilities for a model the server cannot check"))
                }
                (Some(_), None, _) => Some(format!("task {id}: a token without the log probabilities asked for")),
                (None, Some(_), _) => Some(format!("task {id}: log probabilities nobody asked for")),
            }
        };
        if let Some(reason) = refused {
            return self.fail(ctx, reason);
        }
        let Some(run) = self.in_flight.get_mut(&id) else { return };
        // The game reads the text the server makes from the id, never the node's own.
        let text = match run.job.text.as_mut().map(|server_text| server_text.push(token)) {
            Some(Ok((server_text, _))) => server_text,
            Some(Err(Refusal::NotAllowed(e))) => return self.fail(ctx, format!("task {id}: {e}")),
            Some(Err(Refusal::Broken(e))) => {
                // Not the node's fault: the answer cannot go on, the game gets an error and
                // pays for the tokens it read (a whole answer's game read none: the
                // server's failure is not its bill).
                tracing::warn!(task = %id, error = %e, "the grammar engine failed; ending the task");
                let _ = run.job.events.send(JobEvent::Failed(ServeError::Internal(format!("structured output: {e}"))));
                let delivered = if run.job.stream { run.job.emitted.len() } else { 0 };
                return self.abandon(id, delivered);
            }
            None => text,
        };
        run.job.emitted.push(token);
        if let (Some(lp), Some(server_text)) = (logprobs, run.job.text.as_ref()) {
            // One entry per completion token, the end of sequence included (it is counted
            // and billed): as many entries as `usage.completion_tokens`.
            if run.job.events.send(JobEvent::Logprobs(server_text.describe(token, &lp))).is_err() {
                // The game left, or fell too far behind: this token never reached it.
                let delivered = run.job.emitted.len() - 1;
                return self.abandon(id, delivered);
            }
            run.job.emitted_logprobs.push(lp);
        }
        run.last_progress = Instant::now();
        run.first_token.get_or_insert_with(Instant::now);
        if text.is_empty() {
            return;
        }
        if run.job.events.send(JobEvent::Text(text)).is_err() {
            // The game closed its connection: free the node's slot now. This token never
            // reached it; the ones before did.
            let delivered = run.job.emitted.len() - 1;
            self.abandon(id, delivered);
        }
    }

    /// The game left: the node stops, and the tokens the server had relayed are billed and
    /// paid. The node is asked for a receipt covering exactly those, and, for a task with a
    /// challenge, their proof: such a receipt is paid only with it, checked like any task's
    /// (else a node could stream anything to games that hang up and be paid unchecked).
    /// Without a challenge, the server writes the tokens ahead like a completion.
    fn abandon(&mut self, id: TaskId, delivered: usize) {
        let Some(mut run) = self.in_flight.remove(&id) else { return };
        // A game that leaves a whole (non-streamed) answer read nothing, yet pays for what
        // was made until it left, like a streamed one: it chose to leave, the node worked,
        // and a free hang-up would let any game occupy the network's nodes (and exceed its
        // tokens per minute) at no cost.
        let delivered = delivered.min(run.job.emitted.len());
        // Only what this node made is its to sign for (a continuation's prefix is not).
        let own = delivered > run.prefix_len;
        let keep = match self.address {
            Some(address) if delivered > 0 => {
                let proved = own && run.challenge.is_some();
                if proved && self.abandoned.len() >= MAX_ABANDONED {
                    tracing::warn!(node = self.id, task = %id, "too many hang-ups awaiting their proof; this one is unpaid");
                    // The game read them: checked without a proof.
                    self.check_delivered(&run.job, run.prefix_len..delivered);
                }
                self.config.completion.do_send(TaskAbandoned {
                    address,
                    task: id,
                    key_hash: run.job.key_hash.clone(),
                    prompt_tokens: run.job.prompt.tokens as usize,
                    delivered: run.job.emitted[..delivered].to_vec(),
                    witness: own && run.challenge.is_none(),
                    origin: run.job.origin.clone(),
                });
                match run.challenge {
                    Some(challenge) if proved && self.abandoned.len() < MAX_ABANDONED => {
                        run.job.emitted.truncate(delivered);
                        run.job.emitted_logprobs.truncate(delivered);
                        let (prefix_len, started, at) = (run.prefix_len, run.started, Instant::now());
                        self.abandoned.insert(id, Abandoned { job: run.job, challenge, prefix_len, started, at });
                    }
                    _ => {}
                }
                own.then_some(delivered as u32)
            }
            _ => None,
        };
        self.send(&ServerMessage::Cancel { id, delivered: keep });
        self.distributor.do_send(TaskCancelled { node: self.id, task: id });
    }

    /// The node's receipt (and proof) for a task whose game left: checked and paid like a
    /// completion of the delivered tokens when the proxy still waits for it; else only as
    /// a re-sent receipt (paid when the server witnessed those tokens).
    fn on_cancelled(&mut self, ctx: &mut Context<Self>, id: TaskId, receipt: SignedReceipt, proof: Option<Box<Proof>>) {
        let Some(address) = self.address else { return };
        let reply_to = ctx.address().recipient();
        match self.abandoned.remove(&id) {
            Some(a) => self.config.completion.do_send(HangUpProved {
                format: self.declared_formats.get(&a.job.model).copied(),
                address,
                reply_to,
                latency_ms: a.at.duration_since(a.started).as_millis().min(i32::MAX as u128) as i32,
                job: a.job,
                challenge: a.challenge,
                prefix_len: a.prefix_len,
                receipt,
                proof,
            }),
            None => self.on_receipts(ctx, vec![receipt]),
        }
    }

    /// Receipts a node re-sends, within its per-second budget of checks.
    fn on_receipts(&mut self, ctx: &mut Context<Self>, receipts: Vec<SignedReceipt>) {
        if receipts.len() > MAX_RECEIPTS_PER_FRAME {
            return self.fail(ctx, format!("more than {MAX_RECEIPTS_PER_FRAME} receipts in one frame"));
        }
        let sent = receipts.len();
        // Each task once per RESENT_MEMORY, within the frame too.
        let now = Instant::now();
        let mut fresh = Vec::with_capacity(sent);
        for receipt in receipts {
            let task = receipt.ticket.task;
            if self.resent.get(&task).is_none_or(|at| now.duration_since(*at) >= RESENT_MEMORY) {
                self.resent.insert(task, now);
                fresh.push(receipt);
            }
        }
        let repeats = sent - fresh.len();
        // Bounded work per second: what is over the budget waits for the next re-send.
        let room = RECEIPT_CHECKS_PER_S.saturating_sub(self.window_receipts);
        let deferred = fresh.len().saturating_sub(room);
        self.window_receipts += fresh.len() - deferred;
        // Deferred ones are not held against the node's next re-send.
        for receipt in fresh.iter().skip(room) {
            self.resent.remove(&receipt.ticket.task);
        }
        tracing::info!(node = self.id, receipts = sent, repeats, deferred, "node re-sent unconfirmed receipts");
        let Some(address) = self.address else { return };
        let receipts: Vec<SignedReceipt> = fresh.into_iter().take(room).collect();
        if receipts.is_empty() {
            return;
        }
        self.config.completion.do_send(ReceiptsResent { address, receipts, reply_to: ctx.address().recipient() });
    }
}

impl Actor for NodeProxy {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(65_536);
        ctx.run_later(HANDSHAKE_TIMEOUT, |this, ctx| {
            if !this.ready {
                this.fail(ctx, "no Hello within the handshake timeout");
            }
        });
        let check = self.config.heartbeat_interval.min(self.config.node_timeout / 2).max(Duration::from_millis(50));
        ctx.run_interval(check, |this, ctx| {
            if let Some(queued) = this.stopped_reading() {
                return this.fail(ctx, format!("the node stopped reading: {queued} bytes queued for it"));
            }
            let loading = this.welcomed_at.is_some_and(|t| !this.registered && t.elapsed() < MODEL_LOAD_TIMEOUT);
            if this.last_seen.elapsed() > this.config.node_timeout && !loading {
                let silent = this.last_seen.elapsed();
                this.fail(ctx, format!("no frame for {} ms (heartbeat timeout)", silent.as_millis()));
            }
            let now = Instant::now();
            this.resent.retain(|_, at| now.duration_since(*at) < RESENT_MEMORY);
            // A hang-up's proof that never came: its receipt is not paid.
            let expired = this.abandoned.len();
            let (late, waiting): (HashMap<_, _>, HashMap<_, _>) =
                std::mem::take(&mut this.abandoned).into_iter().partition(|(_, a)| a.at.elapsed() >= ABANDONED_WAIT);
            this.abandoned = waiting;
            // The games read those tokens: checked without a proof.
            for a in late.values() {
                this.check_delivered(&a.job, a.prefix_len..a.job.emitted.len());
            }
            if this.abandoned.len() < expired {
                tracing::warn!(
                    node = this.id,
                    tasks = expired - this.abandoned.len(),
                    "no proof for a hang-up's tokens in time; unpaid"
                );
            }
            // Jobs whose game left (noticed here when no text was sent since) are cancelled.
            let gone: Vec<TaskId> =
                this.in_flight.iter().filter(|(_, r)| r.job.cancelled()).map(|(&id, _)| id).collect();
            for id in gone {
                let delivered = this.in_flight.get(&id).map_or(0, |r| r.job.emitted.len());
                this.abandon(id, delivered);
            }
            // A task without progress for too long, or past its deadline however it
            // trickles, goes elsewhere (wedged or lying node).
            let now = Instant::now();
            let stall = this.config.task_stall_timeout;
            let stalled: Vec<TaskId> = this
                .in_flight
                .iter()
                .filter(|(_, r)| r.last_progress.elapsed() > stall || now > r.deadline(stall))
                .map(|(&id, _)| id)
                .collect();
            for id in stalled {
                if let Some(run) = this.in_flight.remove(&id) {
                    this.send(&ServerMessage::Cancel { id, delivered: None });
                    let failure = TaskFailure::Node(format!("no progress for {} s", stall.as_secs()));
                    this.hand_back(run, failure);
                }
            }
        });
    }

    fn stopping(&mut self, ctx: &mut Self::Context) -> Running {
        for (_, run) in std::mem::take(&mut self.in_flight) {
            let failure = TaskFailure::Node(format!("node disconnected: {}", self.close_reason));
            self.hand_back(run, failure);
        }
        // Hang-ups still waiting for their proof get none now: the games read those tokens.
        for (_, a) in std::mem::take(&mut self.abandoned) {
            self.check_delivered(&a.job, a.prefix_len..a.job.emitted.len());
        }
        if self.registered {
            self.distributor.do_send(NodeDisconnected { id: self.id, reason: self.close_reason.clone() });
        }
        if let Some(address) = self.address {
            self.config.sessions.close(address, &ctx.address());
        }
        let _ = self.out.send(Outgoing::Close(self.close_reason.clone()));
        Running::Stop
    }
}

impl StreamHandler<Result<WsMessage, ProtocolError>> for NodeProxy {
    fn handle(&mut self, item: Result<WsMessage, ProtocolError>, ctx: &mut Self::Context) {
        let now = Instant::now();
        self.last_seen = now;
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.window_frames = 0;
            self.window_unsolicited = 0;
            self.window_receipts = 0;
        }
        // A ceiling on everything (tokens included), scaled by the sequences the node runs,
        // checked before any work on the frame.
        self.window_frames += 1;
        let ceiling = self
            .config
            .max_frames_per_s
            .saturating_add(MAX_TOKENS_PER_S_PER_SEQUENCE.saturating_mul(self.capacity.min(MAX_CAPACITY) as u32));
        if self.window_frames > ceiling {
            return self.fail(ctx, format!("flooding: more than {ceiling} frames in one second"));
        }
        match item {
            Ok(WsMessage::Binary(bytes)) => {
                if !self.ready && bytes.len() > MAX_HANDSHAKE_FRAME_BYTES {
                    let len = bytes.len();
                    return self.fail(
                        ctx,
                        format!("a handshake frame of {len} bytes exceeds the {MAX_HANDSHAKE_FRAME_BYTES}-byte limit"),
                    );
                }
                // After the handshake only sealed frames are accepted.
                let decoded = match self.opener.as_mut() {
                    Some(opener) => open_message::<NodeMessage>(opener, &bytes),
                    None => decode_frame::<NodeMessage>(&bytes),
                };
                match decoded {
                    Ok(message) if self.solicited(&message) => self.on_message(ctx, message),
                    Ok(message) => {
                        if self.unsolicited_flood() {
                            return self.flooded(ctx);
                        }
                        self.on_message(ctx, message)
                    }
                    Err(e) => self.fail(ctx, format!("bad frame: {e}")),
                }
            }
            Ok(WsMessage::Ping(bytes)) => {
                if self.unsolicited_flood() {
                    return self.flooded(ctx);
                }
                if let Some(queued) = self.stopped_reading() {
                    return self.fail(ctx, format!("the node stopped reading: {queued} bytes queued for it"));
                }
                self.push(Outgoing::Pong(bytes));
            }
            Ok(WsMessage::Pong(_)) | Ok(WsMessage::Nop) => {}
            Ok(WsMessage::Close(reason)) => {
                self.close_reason = format!("node closed the link: {reason:?}");
                ctx.stop();
            }
            Ok(WsMessage::Text(_)) | Ok(WsMessage::Continuation(_)) => self.fail(ctx, "only binary frames are allowed"),
            Err(e) => {
                self.close_reason = format!("websocket error: {e}");
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Dispatch> for NodeProxy {
    type Result = ();

    /// Sends a task to the node (unless the game already left).
    fn handle(&mut self, Dispatch(job): Dispatch, _: &mut Self::Context) {
        if job.cancelled() {
            self.distributor.do_send(TaskCancelled { node: self.id, task: job.id });
            return;
        }
        let Some(address) = self.address else {
            let _ = job.events.send(JobEvent::Failed(ServeError::Internal("node not authenticated".into())));
            self.distributor.do_send(TaskCancelled { node: self.id, task: job.id });
            return;
        };
        let max_tokens = u32::try_from(job.max_tokens).unwrap_or(u32::MAX);
        let terms = (max_tokens, job.prompt);
        let prefix = u32::try_from(job.emitted.len()).unwrap_or(u32::MAX);
        let ticket = TaskTicket::issue(&self.config.ticket_secret, job.id, job.game_id, &job.model, terms, &address)
            .continuing(&self.config.ticket_secret, prefix);
        // A fresh challenge for models the verifiers hold, failover continuations included:
        // their proof covers prompt + prefix as its prompt, and the verifier counts the
        // prefix as generated for the penalties and the grammar.
        let challenge = self
            .config
            .verification
            .as_ref()
            .filter(|v| v.models.contains(&job.model))
            .map(|_| rand::random::<[u8; 32]>());
        let frame = self.frame(&ServerMessage::Task(Box::new(job.spec(ticket, challenge))));
        if frame.len() > MAX_FRAME_BYTES {
            let _ = job.events.send(JobEvent::Failed(ServeError::TooLarge(frame.len())));
            self.distributor.do_send(TaskCancelled { node: self.id, task: job.id });
            return;
        }
        self.push(Outgoing::Binary(Bytes::from(frame)));
        let prefix_len = job.emitted.len();
        let now = Instant::now();
        self.in_flight.insert(
            job.id,
            InFlight { job, challenge, prefix_len, started: now, first_token: None, last_progress: now, text_bytes: 0 },
        );
    }
}

impl Handler<Disconnect> for NodeProxy {
    type Result = ();

    fn handle(&mut self, Disconnect(reason): Disconnect, ctx: &mut Self::Context) {
        self.fail(ctx, reason);
    }
}

impl Handler<ReceiptsRecorded> for NodeProxy {
    type Result = ();

    /// Tells the node which of its tasks a block holds; it answers with a confirmation.
    fn handle(&mut self, msg: ReceiptsRecorded, _: &mut Self::Context) {
        if self.announced.len() >= MAX_ANNOUNCED_BLOCKS {
            // The node stopped confirming; the oldest announcements go (it may confirm them
            // again after they are announced again, when it re-sends their receipts).
            self.announced.pop_first();
        }
        self.announced.insert(msg.block);
        self.send(&ServerMessage::Recorded { block: msg.block, tasks: msg.tasks });
    }
}

impl Handler<BlockConfirmed> for NodeProxy {
    type Result = ();

    /// Tells the node its confirmation is stored: it may forget those receipts.
    fn handle(&mut self, msg: BlockConfirmed, _: &mut Self::Context) {
        self.send(&ServerMessage::Confirmed { block: msg.block, status: msg.status });
    }
}

/// Smallest prefix block a node may report: finer blocks would let a node claim the
/// chat template's first tokens, which every prompt shares.
const MIN_PREFIX_BLOCK: u32 = 64;

/// A heartbeat's load with its prefix report dropped when it is out of bounds (a block
/// under [`MIN_PREFIX_BLOCK`] or over 65,536 tokens, more than [`MAX_PREFIX_BLOCKS`] names,
/// a name that is not 8 bytes of lower-case hex): routing then ignores the node's cache,
/// nothing else changes.
fn bounded_load(mut load: NodeLoad, node: Option<Address>) -> NodeLoad {
    let p = &load.prefix;
    let hex = |b: &String| b.len() == 16 && b.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    let well_formed = p.blocks.is_empty()
        || ((MIN_PREFIX_BLOCK..=1 << 16).contains(&p.block)
            && p.blocks.len() <= MAX_PREFIX_BLOCKS
            && p.blocks.iter().all(hex));
    if !well_formed {
        let node = node.map(|a| a.to_string()).unwrap_or_default();
        tracing::warn!(
            node,
            blocks = p.blocks.len(),
            block = p.block,
            "a heartbeat's prefix report is out of bounds; ignored"
        );
        load.prefix = PrefixHeld::default();
    }
    // Shown to the operator and kept in the Distributor's table: printable ASCII (no
    // control, bidi or line-separator characters), bounded. Ludus nodes write them in ASCII.
    let printable = |c: &char| c.is_ascii_graphic() || *c == ' ';
    let bound = |text: &mut String, max: usize| {
        if text.len() > max || !text.chars().all(|c| printable(&c)) {
            *text = text.chars().filter(printable).take(max).collect();
        }
    };
    bound(&mut load.tuning, MAX_TUNING_CHARS);
    bound(&mut load.quantization, MAX_QUANTIZATION_CHARS);
    load
}

/// What a node's `Failed` frame for `job` is taken as. A node may say the request itself
/// cannot run (no retry, no fault of its own). Where the server holds the model's text
/// side, it has counted the prompt, fitted it to the model's context and compiled its
/// grammar itself, so such a refusal holds only for a prompt that does not fit the
/// `context` the node reported (a job longer than every node's goes to the largest);
/// otherwise it is the node's failure, retried on another node and counted against it.
/// Else a node could fail every task at no cost and with the game blamed (a 400), keep
/// drawing work as the least busy node, and write the game's error message. The node's
/// text reaches the game bounded and as the node's word.
fn node_failure(job: &Job, context: usize, failure: TaskFailure) -> TaskFailure {
    let prompt_fits = context == 0 || (job.prompt.tokens as usize).saturating_add(job.emitted.len()) < context;
    let said: String =
        failure.reason().chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_REASON_CHARS).collect();
    match failure {
        TaskFailure::Request(_) if job.text.is_some() && prompt_fits => {
            TaskFailure::Node(format!("the node refused a request the server had checked (it said: {said})"))
        }
        TaskFailure::Request(_) => TaskFailure::Request(format!("a node refused it: {said}")),
        TaskFailure::Node(_) => TaskFailure::Node(format!("the node said: {said}")),
    }
}

#[cfg(test)]
mod prefix_report_tests {
    use super::*;

    fn load(block: u32, blocks: Vec<String>) -> NodeLoad {
        NodeLoad { prefix: PrefixHeld { block, blocks, hits: 3, ..PrefixHeld::default() }, ..NodeLoad::default() }
    }

    #[test]
    fn heartbeat_reports_out_of_bounds_are_dropped_or_trimmed_and_sound_ones_kept() {
        let sound = load(256, vec!["00112233aabbccdd".into(); 64]);
        assert_eq!(bounded_load(sound.clone(), None), sound);
        for bad in [
            load(256, vec!["00112233aabbccdd".into(); 65]),
            load(256, vec!["0011".into()]),
            load(256, vec!["zz112233aabbccdd".into()]),
            load(256, vec!["00112233AABBCCDD".into()]),
            load(1 << 20, vec!["00112233aabbccdd".into()]),
            load(1, vec!["00112233aabbccdd".into()]),
        ] {
            assert_eq!(bounded_load(bad, None).prefix, PrefixHeld::default());
        }
        let tuning = |t: &str| bounded_load(NodeLoad { tuning: t.into(), ..NodeLoad::default() }, None).tuning;
        assert_eq!(tuning("int4 at 44.0 tok/s"), "int4 at 44.0 tok/s");
        assert_eq!(tuning("int4\n<b>\u{1b}[31m\u{202e}x\u{2028}"), "int4<b>[31mx");
        assert_eq!(tuning(&"x".repeat(10_000)).len(), MAX_TUNING_CHARS);
        // The storage format stays in the Distributor's table for the link's life.
        let format = |q: &str| bounded_load(NodeLoad { quantization: q.into(), ..NodeLoad::default() }, None);
        assert_eq!(format("int4").quantization, "int4");
        assert_eq!(format(&"é\n".repeat(500_000)).quantization, "");
        assert_eq!(format(&"q".repeat(1 << 20)).quantization.len(), MAX_QUANTIZATION_CHARS);
    }
}
