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
use super::identity;
use crate::inference::Event;
use crate::protocol::{
    decode_frame, encode_frame, NodeMessage, ServerMessage, TaskId, TaskSpec, TaskUsage, MAX_FRAME_BYTES,
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
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// The handshake completed before the link dropped: reconnect quickly.
    AfterWelcome(String),
    BeforeWelcome(String),
}

/// Runs the node until the process is stopped: connects, serves, reconnects.
pub async fn run_node(backend: Arc<Backend>, options: NodeOptions) -> anyhow::Result<()> {
    let address = identity::load_or_create(&options.key)?;
    tracing::info!(%address, models = ?backend.models(), device = %backend.device(), "node starting");
    let mut backoff = MIN_BACKOFF;
    loop {
        match session(&backend, &options, &address).await {
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

fn frame(message: &NodeMessage) -> ws::Message {
    ws::Message::Binary(encode_frame(message).into())
}

async fn session(backend: &Arc<Backend>, options: &NodeOptions, address: &str) -> SessionEnd {
    let client = awc::Client::builder().timeout(CONNECT_TIMEOUT).finish();
    let connected = client.ws(&options.connect).max_frame_size(MAX_FRAME_BYTES).connect().await;
    let (_, framed) = match connected {
        Ok(ok) => ok,
        Err(e) => return SessionEnd::BeforeWelcome(format!("connect to {}: {e}", options.connect)),
    };
    let (mut sink, mut stream) = framed.split();
    let capacity = if options.capacity > 0 { options.capacity } else { backend.capacity() };
    let hello = NodeMessage::Hello {
        version: PROTOCOL_VERSION as u16,
        node_address: address.to_string(),
        models: backend.models(),
        capacity,
        device: backend.device(),
    };
    if let Err(e) = sink.send(frame(&hello)).await {
        return SessionEnd::BeforeWelcome(format!("send Hello: {e}"));
    }
    let heartbeat_interval = match actix_web::rt::time::timeout(WELCOME_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(ws::Frame::Binary(bytes)))) => match decode_frame::<ServerMessage>(&bytes) {
            Ok(ServerMessage::Welcome { heartbeat_interval_ms, session_id }) => {
                tracing::info!(session_id, "joined the distributor");
                Duration::from_millis(heartbeat_interval_ms.max(50))
            }
            Ok(ServerMessage::Goodbye { reason }) => return SessionEnd::BeforeWelcome(format!("refused: {reason}")),
            Ok(other) => return SessionEnd::BeforeWelcome(format!("expected Welcome, got {other:?}")),
            Err(e) => return SessionEnd::BeforeWelcome(format!("bad Welcome frame: {e}")),
        },
        Ok(other) => return SessionEnd::BeforeWelcome(format!("expected Welcome, got {other:?}")),
        Err(_) => return SessionEnd::BeforeWelcome("no Welcome within the timeout".into()),
    };
    // One writer keeps frames in order; tasks and heartbeats feed it.
    let (out, mut out_rx) = unbounded_channel::<ws::Message>();
    let writer = actix_web::rt::spawn(async move {
        // Everything queued goes out in one flush: fewer small TCP segments for Nagle's
        // algorithm to hold back behind a delayed ACK.
        while let Some(message) = out_rx.recv().await {
            if sink.feed(message).await.is_err() {
                return;
            }
            while let Ok(message) = out_rx.try_recv() {
                if sink.feed(message).await.is_err() {
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
                Some(Ok(ws::Frame::Binary(bytes))) => match decode_frame::<ServerMessage>(&bytes) {
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
                    Ok(ServerMessage::Welcome { .. }) => break "unexpected second Welcome".to_string(),
                    Err(e) => break format!("bad frame from the distributor: {e}"),
                },
                Some(Ok(ws::Frame::Ping(p))) => { let _ = out.send(ws::Message::Pong(p)); }
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
                if out.send(frame(&NodeMessage::Heartbeat(load))).is_err() {
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
    out: UnboundedSender<ws::Message>,
    tasks: Rc<RefCell<HashMap<TaskId, actix_web::rt::task::JoinHandle<()>>>>,
) {
    let id = spec.id;
    let mut index = spec.prefix.len();
    match backend.start(&spec) {
        Err(error) => {
            let _ = out.send(frame(&NodeMessage::Failed { id, error, request_error: true }));
        }
        Ok(mut events) => loop {
            match events.recv().await {
                Some(Event::Token { id: token, text, .. }) => {
                    let _ = out.send(frame(&NodeMessage::Token { id, index, token, text }));
                    index += 1;
                }
                Some(Event::Done(done)) => {
                    let usage =
                        TaskUsage { prompt_tokens: done.prompt_tokens, completion_tokens: done.completion_tokens };
                    let message = NodeMessage::Done { id, finish_reason: done.reason.into(), usage, tail: done.tail };
                    let _ = out.send(frame(&message));
                    break;
                }
                Some(Event::Rejected(error)) => {
                    let _ = out.send(frame(&NodeMessage::Failed { id, error, request_error: true }));
                    break;
                }
                Some(Event::Error(error)) => {
                    let _ = out.send(frame(&NodeMessage::Failed { id, error, request_error: false }));
                    break;
                }
                Some(Event::PromptHidden { .. }) => {}
                None => {
                    let _ = out.send(frame(&NodeMessage::Failed {
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
