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
use crate::crypto::identity::{verify, Address, Identity};
use crate::crypto::session::{KeyExchange, Role, Session};
use crate::inference::Event;
use crate::protocol::handshake::{
    distributor_challenge_message, hex32, node_auth_message, open_message, seal_message, transcript,
};
use crate::protocol::{
    decode_frame, encode_frame, Hello, NodeMessage, ServerMessage, TaskId, TaskSpec, TaskUsage, MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
};

const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// ws://host:port/ws/node
    pub connect: String,
    pub key: PathBuf,
    /// Sequences announced to the distributor (0 = the backend's own capacity).
    pub capacity: usize,
    /// Only join a distributor whose key has this address (`--distributor-address`).
    pub distributor_address: Option<Address>,
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// The handshake completed before the link dropped: reconnect quickly.
    AfterWelcome(String),
    BeforeWelcome(String),
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
    let identity = Identity::load_or_create(&options.key)?;
    let address = identity.address;
    let mut loaded = match &model {
        NodeModel::Ready(b) => Some(b.clone()),
        NodeModel::Bundle { .. } => None,
    };
    match &loaded {
        Some(b) => tracing::info!(%address, models = ?b.models(), device = %b.device(), "node starting"),
        None => tracing::info!(%address, "node starting; its protected model loads once the distributor sends the key"),
    }
    let mut backoff = MIN_BACKOFF;
    loop {
        match session(&model, &mut loaded, &options, &identity).await {
            SessionEnd::AfterWelcome(reason) => {
                tracing::warn!(%reason, "link to the distributor lost; reconnecting");
                backoff = MIN_BACKOFF;
            }
            SessionEnd::BeforeWelcome(reason) => {
                tracing::warn!(%reason, retry_in_ms = backoff.as_millis() as u64, "could not join the distributor")
            }
        }
        let jitter = rand::rng().random_range(0.5..1.5);
        actix_web::rt::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// What the writer task sends: messages (sealed on the way out) and pongs.
enum Outgoing {
    Message(NodeMessage),
    Pong(actix_web::web::Bytes),
}

/// Reads the next binary frame, within `limit`.
async fn next_binary<S>(stream: &mut S, limit: Duration) -> Result<actix_web::web::Bytes, String>
where
    S: futures_util::Stream<Item = Result<ws::Frame, awc::error::WsProtocolError>> + Unpin,
{
    match actix_web::rt::time::timeout(limit, stream.next()).await {
        Ok(Some(Ok(ws::Frame::Binary(bytes)))) => Ok(bytes),
        Ok(Some(Ok(other))) => Err(format!("expected a binary frame, got {other:?}")),
        Ok(Some(Err(e))) => Err(format!("websocket error: {e}")),
        Ok(None) => Err("connection closed".into()),
        Err(_) => Err("no answer within the timeout".into()),
    }
}

impl From<Arc<Backend>> for NodeModel {
    fn from(b: Arc<Backend>) -> Self {
        Self::Ready(b)
    }
}

async fn session(
    model: &NodeModel,
    loaded: &mut Option<Arc<Backend>>,
    options: &NodeOptions,
    identity: &Identity,
) -> SessionEnd {
    let client = awc::Client::builder().timeout(CONNECT_TIMEOUT).finish();
    let connected = client.ws(&options.connect).max_frame_size(MAX_FRAME_BYTES).connect().await;
    let (_, framed) = match connected {
        Ok(ok) => ok,
        Err(e) => return SessionEnd::BeforeWelcome(format!("connect to {}: {e}", options.connect)),
    };
    let (mut sink, mut stream) = framed.split();
    let (models, own_capacity, device, bundles) = match (loaded.as_ref(), model) {
        (Some(b), _) => (b.models(), b.capacity(), b.device(), Vec::new()),
        (None, NodeModel::Bundle { name, key_id, capacity, .. }) => {
            (vec![name.clone()], *capacity, "loading".to_string(), vec![key_id.clone()])
        }
        (None, NodeModel::Ready(_)) => unreachable!("a ready model is always loaded"),
    };
    let capacity = if options.capacity > 0 { options.capacity } else { own_capacity };
    // Handshake (DESIGN.md §4): Hello → Challenge → Auth → sealed Welcome.
    let exchange = KeyExchange::new();
    let hello = NodeMessage::Hello(Hello {
        version: PROTOCOL_VERSION as u16,
        node_address: identity.address.to_string(),
        models,
        capacity,
        device,
        x25519_public: hex::encode(exchange.public),
        bundles,
    });
    if let Err(e) = sink.send(ws::Message::Binary(encode_frame(&hello).into())).await {
        return SessionEnd::BeforeWelcome(format!("send Hello: {e}"));
    }
    let challenge = match next_binary(&mut stream, WELCOME_TIMEOUT).await.map(|b| decode_frame::<ServerMessage>(&b)) {
        Ok(Ok(ServerMessage::Challenge { session_id, nonce, x25519_public, distributor_address, signature })) => {
            (session_id, nonce, x25519_public, distributor_address, signature)
        }
        Ok(Ok(ServerMessage::Goodbye { reason })) => return SessionEnd::BeforeWelcome(format!("refused: {reason}")),
        Ok(Ok(other)) => return SessionEnd::BeforeWelcome(format!("expected Challenge, got {other:?}")),
        Ok(Err(e)) => return SessionEnd::BeforeWelcome(format!("bad Challenge: {e}")),
        Err(e) => return SessionEnd::BeforeWelcome(e),
    };
    let (session_id, nonce, dist_x25519, distributor_address, signature) = challenge;
    let (Ok(nonce), Ok(dist_x25519)) = (hex32(&nonce), hex32(&dist_x25519)) else {
        return SessionEnd::BeforeWelcome("malformed Challenge keys".into());
    };
    let Ok(claimed) = distributor_address.parse::<Address>() else {
        return SessionEnd::BeforeWelcome(format!("malformed distributor address `{distributor_address}`"));
    };
    if let Some(pinned) = options.distributor_address {
        if pinned != claimed {
            return SessionEnd::BeforeWelcome(format!("distributor {claimed} is not the pinned {pinned}: refusing"));
        }
    }
    let transcript = transcript(session_id, &nonce, &exchange.public, &dist_x25519, &identity.address);
    let signature = hex::decode(&signature).unwrap_or_default();
    if let Err(e) = verify(&distributor_challenge_message(&transcript), &signature, &claimed) {
        return SessionEnd::BeforeWelcome(format!("the distributor's challenge signature is invalid: {e}"));
    }
    let auth = NodeMessage::Auth { signature: hex::encode(identity.sign(&node_auth_message(&transcript))) };
    if let Err(e) = sink.send(ws::Message::Binary(encode_frame(&auth).into())).await {
        return SessionEnd::BeforeWelcome(format!("send Auth: {e}"));
    }
    let Session { mut sealer, mut opener } = match exchange.finish(Role::Node, &dist_x25519, &nonce, session_id) {
        Ok(session) => session,
        Err(e) => return SessionEnd::BeforeWelcome(format!("key agreement failed: {e}")),
    };
    let heartbeat_interval = match next_binary(&mut stream, WELCOME_TIMEOUT).await {
        Ok(bytes) => match open_message::<ServerMessage>(&mut opener, &bytes)
            .or_else(|sealed_err| decode_frame::<ServerMessage>(&bytes).map_err(|_| sealed_err))
        {
            Ok(ServerMessage::Welcome { heartbeat_interval_ms, session_id, model_keys }) => {
                tracing::info!(session_id, distributor = %claimed, "joined the distributor; session sealed");
                if let (None, NodeModel::Bundle { key_id, load, .. }) = (loaded.as_ref(), model) {
                    let Some(key) = model_keys
                        .get(key_id)
                        .and_then(|k| hex::decode(k).ok())
                        .and_then(|k| <[u8; 32]>::try_from(k).ok())
                    else {
                        return SessionEnd::BeforeWelcome(format!("the distributor sent no key for bundle {key_id}"));
                    };
                    let load = load.clone();
                    // Decrypt and load off the event loop; the key lives only in this closure.
                    match actix_web::rt::task::spawn_blocking(move || load(key)).await {
                        Ok(Ok(backend)) => *loaded = Some(Arc::new(backend)),
                        Ok(Err(e)) => {
                            return SessionEnd::BeforeWelcome(format!("loading the protected model failed: {e:#}"))
                        }
                        Err(e) => return SessionEnd::BeforeWelcome(format!("model loader panicked: {e}")),
                    }
                    tracing::info!("protected model loaded in memory");
                }
                Duration::from_millis(heartbeat_interval_ms.max(50))
            }
            Ok(ServerMessage::Goodbye { reason }) => return SessionEnd::BeforeWelcome(format!("refused: {reason}")),
            Ok(other) => return SessionEnd::BeforeWelcome(format!("expected Welcome, got {other:?}")),
            Err(e) => return SessionEnd::BeforeWelcome(format!("bad Welcome: {e}")),
        },
        Err(e) => return SessionEnd::BeforeWelcome(e),
    };
    let backend = loaded.clone().expect("loaded above");
    let backend = &backend;
    // One writer keeps frames in order; tasks and heartbeats feed it.
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
    let tasks: Rc<RefCell<HashMap<TaskId, actix_web::rt::task::JoinHandle<()>>>> = Rc::default();
    let mut heartbeat = actix_web::rt::time::interval(heartbeat_interval);
    let (mut last_count, mut last_at) = (backend.load().1, Instant::now());
    let end = loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(ws::Frame::Binary(bytes))) => match open_message::<ServerMessage>(&mut opener, &bytes) {
                    Ok(ServerMessage::Task(spec)) => {
                        let id = spec.id;
                        tracing::info!(task = %id, model = %spec.model, prefix = spec.prefix.len(), "task started");
                        let handle = actix_web::rt::spawn(run_task(backend.clone(), spec, out.clone(), tasks.clone()));
                        tasks.borrow_mut().insert(id, handle);
                    }
                    Ok(ServerMessage::Cancel { id }) => {
                        if let Some(handle) = tasks.borrow_mut().remove(&id) {
                            handle.abort(); // drops the engine's receiver: the slot frees next step
                        }
                    }
                    Ok(ServerMessage::Goodbye { reason }) => break format!("distributor said goodbye: {reason}"),
                    Ok(ServerMessage::Welcome { .. } | ServerMessage::Challenge { .. }) => {
                        break "unexpected handshake message".to_string()
                    }
                    Err(e) => break format!("bad frame from the distributor: {e}"),
                },
                Some(Ok(ws::Frame::Ping(p))) => { let _ = out.send(Outgoing::Pong(p)); }
                Some(Ok(ws::Frame::Close(reason))) => break format!("closed by the distributor: {reason:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("websocket error: {e}"),
                None => break "connection closed".to_string(),
            },
            _ = heartbeat.tick() => {
                let (mut load, count) = backend.load();
                let dt = last_at.elapsed().as_secs_f64().max(1e-3);
                load.tokens_per_s = count.saturating_sub(last_count) as f64 / dt;
                (last_count, last_at) = (count, Instant::now());
                if out.send(Outgoing::Message(NodeMessage::Heartbeat(load))).is_err() {
                    break "writer stopped".to_string();
                }
            }
        }
    };
    for (_, handle) in tasks.borrow_mut().drain() {
        handle.abort();
    }
    writer.abort();
    SessionEnd::AfterWelcome(end)
}

/// Runs one task on the backend and streams its events as frames.
async fn run_task(
    backend: Arc<Backend>,
    spec: TaskSpec,
    out: UnboundedSender<Outgoing>,
    tasks: Rc<RefCell<HashMap<TaskId, actix_web::rt::task::JoinHandle<()>>>>,
) {
    let id = spec.id;
    let mut index = spec.prefix.len();
    match backend.start(&spec) {
        Err(error) => {
            let _ = out.send(Outgoing::Message(NodeMessage::Failed { id, error, request_error: true }));
        }
        Ok(mut events) => loop {
            match events.recv().await {
                Some(Event::Token { id: token, text, .. }) => {
                    let _ = out.send(Outgoing::Message(NodeMessage::Token { id, index, token, text }));
                    index += 1;
                }
                Some(Event::Done(done)) => {
                    let usage =
                        TaskUsage { prompt_tokens: done.prompt_tokens, completion_tokens: done.completion_tokens };
                    let message = NodeMessage::Done { id, finish_reason: done.reason.into(), usage, tail: done.tail };
                    let _ = out.send(Outgoing::Message(message));
                    break;
                }
                Some(Event::Rejected(error)) => {
                    let _ = out.send(Outgoing::Message(NodeMessage::Failed { id, error, request_error: true }));
                    break;
                }
                Some(Event::Error(error)) => {
                    let _ = out.send(Outgoing::Message(NodeMessage::Failed { id, error, request_error: false }));
                    break;
                }
                Some(Event::PromptHidden { .. }) => {}
                None => {
                    let _ = out.send(Outgoing::Message(NodeMessage::Failed {
                        id,
                        error: "the engine stopped".into(),
                        request_error: false,
                    }));
                    break;
                }
            }
        },
    }
    tasks.borrow_mut().remove(&id);
}
