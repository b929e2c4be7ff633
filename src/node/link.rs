//! The node's end of the link: connect to a distributor's websocket and run the handshake
//! (Hello → Challenge → Auth → sealed Welcome, DESIGN.md §4), yielding a sealed [`Link`].
//! The node agent builds its session on it; tests build misbehaving nodes on it, so they
//! speak the real protocol.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use awc::error::WsProtocolError;
use awc::ws;
use futures_util::{Sink, SinkExt, Stream, StreamExt};

use super::error::LinkError;
use crate::crypto::identity::{verify, Address, Identity};
use crate::crypto::session::{KeyExchange, Opener, Role, Sealer, Session};
use crate::protocol::handshake::{
    distributor_challenge_message, hex32, node_auth_message, open_message, seal_message, transcript,
};
use crate::protocol::{
    decode_frame, encode_frame, Hello, NodeMessage, ServerMessage, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for each handshake answer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub type FrameSink = Pin<Box<dyn Sink<ws::Message, Error = WsProtocolError>>>;
pub type FrameStream = Pin<Box<dyn Stream<Item = Result<ws::Frame, WsProtocolError>>>>;

/// What the node announces when it joins.
#[derive(Debug, Clone)]
pub struct Announce {
    pub models: Vec<String>,
    pub capacity: usize,
    pub device: String,
    /// Key ids of protected bundles it needs keys for.
    pub bundles: Vec<String>,
}

/// An authenticated, sealed link to a distributor.
pub struct Link {
    pub sink: FrameSink,
    pub stream: FrameStream,
    pub sealer: Sealer,
    pub opener: Opener,
    pub session_id: u64,
    pub distributor: Address,
    pub heartbeat_interval: Duration,
    /// Keys of the protected bundles asked for (key id → hex key).
    pub model_keys: BTreeMap<String, String>,
}

/// Reads the next binary frame, within `limit`.
pub async fn next_binary(stream: &mut FrameStream, limit: Duration) -> Result<actix_web::web::Bytes, LinkError> {
    match actix_web::rt::time::timeout(limit, stream.next()).await {
        Ok(Some(Ok(ws::Frame::Binary(bytes)))) => Ok(bytes),
        Ok(Some(Ok(other))) => Err(LinkError::Protocol(format!("expected a binary frame, got {other:?}"))),
        Ok(Some(Err(e))) => Err(LinkError::Closed(format!("websocket error: {e}"))),
        Ok(None) => Err(LinkError::Closed("connection closed".into())),
        Err(_) => Err(LinkError::Timeout),
    }
}

/// Connects to `url` and runs the handshake as `identity`. With `pin`, only a distributor
/// with that address is accepted.
pub async fn join(url: &str, identity: &Identity, announce: Announce, pin: Option<Address>) -> Result<Link, LinkError> {
    let client = awc::Client::builder().timeout(CONNECT_TIMEOUT).finish();
    let (_, framed) = client
        .ws(url)
        .max_frame_size(MAX_FRAME_BYTES)
        .connect()
        .await
        .map_err(|e| LinkError::Connect { url: url.to_string(), reason: e.to_string() })?;
    let (sink, stream) = framed.split();
    let (mut sink, mut stream): (FrameSink, FrameStream) = (Box::pin(sink), Box::pin(stream));
    let exchange = KeyExchange::new();
    let hello = NodeMessage::Hello(Hello {
        version: PROTOCOL_VERSION as u16,
        node_address: identity.address.to_string(),
        models: announce.models,
        capacity: announce.capacity,
        device: announce.device,
        x25519_public: hex::encode(exchange.public),
        bundles: announce.bundles,
    });
    sink.send(ws::Message::Binary(encode_frame(&hello).into()))
        .await
        .map_err(|e| LinkError::Closed(format!("send Hello: {e}")))?;
    let (session_id, nonce, dist_x25519, distributor_address, signature) =
        match decode_frame::<ServerMessage>(&next_binary(&mut stream, HANDSHAKE_TIMEOUT).await?) {
            Ok(ServerMessage::Challenge { session_id, nonce, x25519_public, distributor_address, signature }) => {
                (session_id, nonce, x25519_public, distributor_address, signature)
            }
            Ok(ServerMessage::Goodbye { reason }) => return Err(LinkError::Refused(reason)),
            Ok(other) => return Err(LinkError::Protocol(format!("expected Challenge, got {other:?}"))),
            Err(e) => return Err(LinkError::Protocol(format!("bad Challenge: {e}"))),
        };
    let (Ok(nonce), Ok(dist_x25519)) = (hex32(&nonce), hex32(&dist_x25519)) else {
        return Err(LinkError::Protocol("malformed Challenge keys".into()));
    };
    let claimed: Address = distributor_address
        .parse()
        .map_err(|_| LinkError::Untrusted(format!("malformed distributor address `{distributor_address}`")))?;
    if let Some(pinned) = pin {
        if pinned != claimed {
            return Err(LinkError::Untrusted(format!("distributor {claimed} is not the pinned {pinned}: refusing")));
        }
    }
    let transcript = transcript(session_id, &nonce, &exchange.public, &dist_x25519, &identity.address);
    let signature = hex::decode(&signature).unwrap_or_default();
    verify(&distributor_challenge_message(&transcript), &signature, &claimed)
        .map_err(|e| LinkError::Untrusted(format!("the distributor's challenge signature is invalid: {e}")))?;
    let auth = NodeMessage::Auth { signature: hex::encode(identity.sign(&node_auth_message(&transcript))) };
    sink.send(ws::Message::Binary(encode_frame(&auth).into()))
        .await
        .map_err(|e| LinkError::Closed(format!("send Auth: {e}")))?;
    let Session { sealer, mut opener } = exchange
        .finish(Role::Node, &dist_x25519, &nonce, session_id)
        .map_err(|e| LinkError::Untrusted(format!("key agreement failed: {e}")))?;
    let bytes = next_binary(&mut stream, HANDSHAKE_TIMEOUT).await?;
    // A refusal after Auth comes in clear (the server could not seal it).
    match open_message::<ServerMessage>(&mut opener, &bytes)
        .or_else(|sealed_err| decode_frame::<ServerMessage>(&bytes).map_err(|_| sealed_err))
    {
        Ok(ServerMessage::Welcome { heartbeat_interval_ms, session_id, model_keys }) => Ok(Link {
            sink,
            stream,
            sealer,
            opener,
            session_id,
            distributor: claimed,
            heartbeat_interval: Duration::from_millis(heartbeat_interval_ms.max(50)),
            model_keys,
        }),
        Ok(ServerMessage::Goodbye { reason }) => Err(LinkError::Refused(reason)),
        Ok(other) => Err(LinkError::Protocol(format!("expected Welcome, got {other:?}"))),
        Err(e) => Err(LinkError::Protocol(format!("bad Welcome: {e}"))),
    }
}

impl Link {
    /// Seals and sends one message.
    pub async fn send(&mut self, message: &NodeMessage) -> Result<(), LinkError> {
        let frame = seal_message(&mut self.sealer, message);
        self.sink.send(ws::Message::Binary(frame.into())).await.map_err(|e| LinkError::Closed(format!("send: {e}")))
    }

    /// Sends a websocket ping (the distributor answers with a pong).
    pub async fn ping(&mut self, payload: &[u8]) -> Result<(), LinkError> {
        self.sink
            .send(ws::Message::Ping(payload.to_vec().into()))
            .await
            .map_err(|e| LinkError::Closed(format!("send: {e}")))
    }

    /// The next message from the distributor (pings answered, other control frames
    /// skipped), within `limit`.
    pub async fn recv(&mut self, limit: Duration) -> Result<ServerMessage, LinkError> {
        loop {
            let frame = match actix_web::rt::time::timeout(limit, self.stream.next()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) => return Err(LinkError::Closed(format!("websocket error: {e}"))),
                Ok(None) => return Err(LinkError::Closed("connection closed".into())),
                Err(_) => return Err(LinkError::Timeout),
            };
            match frame {
                ws::Frame::Binary(bytes) => {
                    return open_message(&mut self.opener, &bytes).map_err(|e| LinkError::Protocol(e.to_string()))
                }
                ws::Frame::Ping(p) => {
                    let _ = self.sink.send(ws::Message::Pong(p)).await;
                }
                ws::Frame::Close(reason) => return Err(LinkError::Closed(format!("closed: {reason:?}"))),
                _ => {}
            }
        }
    }
}
