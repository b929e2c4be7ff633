//! Arbitrary handshake material: X25519 keys (low-order points included), hex fields,
//! addresses and signatures as a distributor or node would receive them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ludus::crypto::identity::{recover, verify, Address, Identity};
use ludus::crypto::session::{KeyExchange, Role};
use ludus::protocol::handshake::{hex32, node_auth_message, transcript};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = hex32(&text);
    let _ = text.parse::<Address>();
    if data.len() >= 32 {
        let peer: [u8; 32] = data[..32].try_into().unwrap();
        let _ = KeyExchange::new().finish(Role::Distributor, &peer, &data[32..], 7);
        let t = transcript(7, &peer, &peer, &peer, &Address([1; 20]));
        let message = node_auth_message(&t);
        let _ = recover(&message, &data[32..]);
        let _ = verify(&message, &data[32..], &Identity::generate().address);
    }
});
