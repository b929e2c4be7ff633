//! Arbitrary bytes through every decoder a peer's frame meets: clear frames (both
//! directions), sealed-frame splitting and opening with a live session.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ludus::crypto::session::{KeyExchange, Role};
use ludus::protocol::handshake::open_message;
use ludus::protocol::{decode_frame, decode_sealed, NodeMessage, ServerMessage};

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame::<NodeMessage>(data);
    let _ = decode_frame::<ServerMessage>(data);
    let _ = decode_sealed(data);
    let node = KeyExchange::new();
    let dist = KeyExchange::new();
    let dp = dist.public;
    if let Ok(mut session) = node.finish(Role::Node, &dp, b"fuzz", 1) {
        let _ = open_message::<ServerMessage>(&mut session.opener, data);
    }
});
