//! What a node sends about money, as the server checks it: arbitrary bytes decoded as a
//! node frame, and as a receipt (JSON, the form the node logs and re-sends), then every
//! check the Completion actor runs — ticket MAC, signature recovery, hashes, the
//! continuation's own-token count — and a block confirmation's signature recovery.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ludus::crypto::identity::{recover, Address};
use ludus::protocol::handshake::hex32;
use ludus::protocol::receipt::confirmation_message;
use ludus::protocol::{decode_frame, NodeMessage, SignedReceipt};

const SECRET: [u8; 32] = [7; 32];

fn check_receipt(receipt: &SignedReceipt) {
    let _ = receipt.check(&SECRET, &Address([1; 20]));
    let _ = receipt.hash();
    let _ = receipt.ticket.own_tokens(receipt.completion_tokens);
    let _ = hex::decode(&receipt.signature);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(receipt) = serde_json::from_slice::<SignedReceipt>(data) {
        check_receipt(&receipt);
    }
    match decode_frame::<NodeMessage>(data) {
        Ok(NodeMessage::Receipts { receipts }) => receipts.iter().for_each(check_receipt),
        Ok(NodeMessage::Done { receipt, .. }) => check_receipt(&receipt),
        Ok(NodeMessage::Confirm { block, root, count, disputed, signature }) => {
            if let Ok(root) = hex32(&root) {
                let message = confirmation_message(block, &root, count, &disputed);
                let _ = recover(&message, &hex::decode(&signature).unwrap_or_default());
            }
        }
        _ => {}
    }
});
