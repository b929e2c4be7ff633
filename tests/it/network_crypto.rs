//! The node link is authenticated and sealed: a tap on a node's socket sees neither the
//! prompt nor the completion; banned nodes and nodes pinned to another distributor never
//! join.

use crate::cluster::{Cluster, Tap};
use crate::helpers::smollm2;

#[test]
fn a_tap_on_the_node_socket_sees_neither_prompt_nor_completion() {
    let mut c = Cluster::start("");
    let tap = Tap::start(&c.addr);
    let (model_args, name, fake);
    match smollm2() {
        Some(path) => {
            model_args = vec!["--model".to_string(), path.to_str().unwrap().to_string()];
            name = "SmolLM2-135M-Instruct.Q4_1";
            fake = false;
        }
        None => {
            model_args = vec!["--fake-engine".into(), "6".into(), "--fake-text".into(), " ZEBRAQUUX".into()];
            name = "fake";
            fake = true;
        }
    }
    let args: Vec<&str> = model_args.iter().map(String::as_str).collect();
    c.add_node_via(&tap.addr, &args);
    c.wait_nodes(name, 1);
    let secret = "PURPLE-ELEPHANT-42";
    let body = format!(
        r#"{{"model":"{name}","messages":[{{"role":"user","content":"{secret}: what is the capital of France?"}}],"max_tokens":24,"temperature":0}}"#
    );
    let r = c.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let completion = r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    if fake {
        assert!(completion.contains("ZEBRAQUUX"));
    } else {
        assert!(completion.contains("Paris"), "{completion}");
    }
    assert!(tap.len() > 1000, "the tap saw the traffic ({} bytes)", tap.len());
    assert!(!tap.contains(secret), "the prompt crossed the node link in clear");
    for word in completion.split_whitespace().filter(|w| w.len() >= 5) {
        assert!(!tap.contains(word), "the completion word {word:?} crossed the node link in clear");
    }
    assert!(tap.contains("\"type\":\"hello\""), "the handshake itself is in clear (sanity check of the tap)");
}

#[test]
fn banned_and_mispinned_nodes_never_join() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("banned.key");
    let out = crate::cluster::ludus().args(["keys", "new", "--out", key.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let banned = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(banned.starts_with("0x") && banned.len() == 42, "{banned}");
    let mut c = Cluster::start(&format!("banned_nodes = [\"{banned}\"]\n"));
    // The banned node (its key file given explicitly).
    let cfg = c.config.to_str().unwrap().to_string();
    let url = format!("ws://{}/ws/node", c.addr);
    let log = c.dir.path().join("banned-node.log");
    let mut banned_node = crate::cluster::Proc {
        child: crate::cluster::ludus()
            .args(["--config", &cfg, "node", "--connect", &url, "--key", key.to_str().unwrap(), "--fake-engine", "4"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log,
    };
    // A node pinned to some other distributor.
    let mispinned =
        c.add_node(&["--fake-engine", "4", "--distributor-address", "0x0000000000000000000000000000000000000001"]);
    // A node pinned to the right one joins.
    let server_log = c.server.log_text();
    let address = crate::cluster::complete_lines(&server_log)
        .find_map(|l| l.strip_prefix("distributor address ").and_then(|r| r.split_whitespace().next()))
        .expect("the server prints its address")
        .to_string();
    c.add_node(&["--fake-engine", "4", "--distributor-address", &address]);
    c.wait_nodes("fake", 1);
    std::thread::sleep(std::time::Duration::from_millis(800));
    let (_, models) = c.get("/v1/models");
    assert!(models.contains("\"nodes\":1"), "only the well-pinned node joined: {models}");
    assert!(c.server.log_text().contains("is banned"), "{}", c.server.log_text());
    assert!(banned_node.log_text().contains("refused"), "{}", banned_node.log_text());
    assert!(c.nodes[mispinned].log_text().contains("not the pinned"), "{}", c.nodes[mispinned].log_text());
    banned_node.kill();
}

/// Hand-made clients speaking the protocol wrongly are refused with a reason: an Auth
/// signed by another key, an unknown protocol version, a text frame, frames before Hello.
#[test]
fn wrong_handshakes_are_refused_with_a_reason() {
    use awc::ws;
    use futures_util::{SinkExt, StreamExt};
    use ludus::crypto::identity::Identity;
    use ludus::crypto::session::KeyExchange;
    use ludus::protocol::handshake::{hex32, node_auth_message, transcript};
    use ludus::protocol::{decode_frame, encode_frame, NodeMessage, ServerMessage};

    let c = Cluster::start("");
    let url = format!("ws://{}/ws/node", c.addr);
    let node_x25519 = KeyExchange::new().public;
    let hello = move |address: String, version: u16| {
        NodeMessage::Hello(ludus::protocol::Hello {
            version,
            node_address: address,
            models: vec!["m".into()],
            capacity: 1,
            device: "test".into(),
            x25519_public: hex::encode(node_x25519),
            bundles: vec![],
        })
    };
    actix_web::rt::System::new().block_on(async move {
        // Returns the Goodbye reason the server sends after `frames`.
        let exchange = |frames: Vec<ws::Message>, sign_with: Option<(Identity, ludus::crypto::identity::Address)>| {
            let url = url.clone();
            async move {
                let (_, framed) = awc::Client::new().ws(&url).connect().await.unwrap();
                let (mut sink, mut stream) = framed.split();
                for f in frames {
                    sink.send(f).await.unwrap();
                }
                while let Some(Ok(frame)) = stream.next().await {
                    let ws::Frame::Binary(bytes) = frame else { continue };
                    match decode_frame::<ServerMessage>(&bytes).unwrap() {
                        ServerMessage::Goodbye { reason } => return reason,
                        ServerMessage::Challenge { session_id, nonce, x25519_public, .. } => {
                            // The right transcript (for the claimed address), signed by another key.
                            let (signer, claimed) = sign_with.as_ref().expect("a signer for the challenge");
                            let t = transcript(
                                session_id,
                                &hex32(&nonce).unwrap(),
                                &node_x25519,
                                &hex32(&x25519_public).unwrap(),
                                claimed,
                            );
                            let auth =
                                NodeMessage::Auth { signature: hex::encode(signer.sign(&node_auth_message(&t))) };
                            sink.send(ws::Message::Binary(encode_frame(&auth).into())).await.unwrap();
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                "closed without a reason".to_string()
            }
        };
        let honest = Identity::generate();
        let impostor = Identity::generate();
        let frame = |m: &NodeMessage| ws::Message::Binary(encode_frame(m).into());
        // Claims `honest`'s address but signs with the impostor's key.
        let reason = exchange(
            vec![frame(&hello(honest.address.to_string(), ludus::protocol::PROTOCOL_VERSION as u16))],
            Some((impostor, honest.address)),
        )
        .await;
        assert!(reason.contains("authentication failed"), "{reason}");
        let reason = exchange(vec![frame(&hello(honest.address.to_string(), 9))], None).await;
        assert!(reason.contains("protocol version 9"), "{reason}");
        let reason = exchange(vec![ws::Message::Text("hello".into())], None).await;
        assert!(reason.contains("binary"), "{reason}");
        let reason = exchange(vec![frame(&NodeMessage::Auth { signature: "00".into() })], None).await;
        assert!(reason.contains("Auth before Hello") || reason.contains("Hello, then Auth"), "{reason}");
        let reason =
            exchange(vec![ws::Message::Binary(vec![ludus::protocol::PROTOCOL_VERSION, b'{', b'x'].into())], None).await;
        assert!(reason.contains("bad frame"), "{reason}");
        // What a stranger sends before it authenticates is bounded: the frame, the reason
        // quoting it (logged and sent back), the bundle ids.
        let version = ludus::protocol::PROTOCOL_VERSION as u16;
        let huge = exchange(vec![frame(&hello("0x".to_string() + &"a".repeat(100_000), version))], None).await;
        assert!(huge.contains("handshake frame of") && huge.contains("16384-byte limit"), "{huge}");
        let long = exchange(vec![frame(&hello("0x".to_string() + &"a".repeat(10_000), version))], None).await;
        assert!(long.starts_with("node address `0xaaaa"), "{long}");
        assert!(long.chars().count() <= 301, "a reason of {} characters", long.chars().count());
        let mut many = hello(honest.address.to_string(), version);
        if let NodeMessage::Hello(h) = &mut many {
            h.bundles = (0..100).map(|i| format!("bundle-{i}")).collect();
        }
        let reason = exchange(vec![frame(&many)], None).await;
        assert!(reason.contains("at most 16 bundles"), "{reason}");
    });
}

/// Asks `addr` to upgrade to a node websocket: the response head, and the socket (open
/// while held, for a 101).
fn ws_upgrade(addr: &str) -> (String, std::net::TcpStream) {
    use std::io::{BufRead, BufReader, Write};
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    socket
        .write_all(
            b"GET /ws/node HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut head = String::new();
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    (head, socket)
}

/// Node identities are free, and every handshake costs the server a key exchange and a
/// signature before the node proves anything: each client IP gets
/// `node_connections_per_minute` of them, then 429 with Retry-After.
#[test]
fn node_connections_are_limited_per_client_address() {
    let c = Cluster::start_with_server("node_connections_per_minute = 5\n", "");
    let heads: Vec<String> = (0..8).map(|_| ws_upgrade(&c.addr).0).collect();
    let switched = heads.iter().filter(|h| h.starts_with("HTTP/1.1 101")).count();
    let refused: Vec<&String> = heads.iter().filter(|h| h.starts_with("HTTP/1.1 429")).collect();
    assert_eq!((switched, refused.len()), (5, 3), "{heads:#?}");
    assert!(refused[0].to_ascii_lowercase().contains("retry-after"), "{}", refused[0]);
    // The API is not counted against it.
    assert_eq!(c.get("/health").0, 200);
}

/// One address may hold `node_links_per_address` node links open at once (a silent
/// authenticated link may stay minutes, and every link sits in the table each job's choice
/// scans); a link that closes gives its place back.
#[test]
fn node_links_open_at_once_are_limited_per_client_address() {
    let c = Cluster::start_with_server("node_links_per_address = 3\n", "");
    let upgrade = || ws_upgrade(&c.addr);
    let mut open: Vec<_> = (0..3).map(|_| upgrade()).collect();
    assert!(
        open.iter().all(|(s, _)| s.starts_with("HTTP/1.1 101")),
        "{:?}",
        open.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    let (refused, _) = upgrade();
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    // One link closes: its place comes back once the server has noticed.
    drop(open.pop());
    crate::cluster::wait_for("a freed place", std::time::Duration::from_secs(20), || {
        upgrade().0.starts_with("HTTP/1.1 101")
    });
    drop(open);
}

/// A node serving a protected bundle gets its key only inside the sealed session, loads it
/// in memory, and answers exactly like a node serving the original model.
#[test]
fn protected_bundles_are_served_with_keys_sent_in_the_session() {
    use ludus::inference::protect::{new_key, write_bundle};
    use ludus::inference::tiny_model::TinySpec;

    let t = crate::helpers::tiny(&TinySpec::default());
    let bundle = t.dir.path().join("bundle");
    let key = new_key();
    write_bundle(&t.gguf, &bundle, "tiny-protected", &key).unwrap();
    let other_bundle = t.dir.path().join("other");
    write_bundle(&t.gguf, &other_bundle, "tiny-other", &new_key()).unwrap();
    let key_hex = hex::encode(key);
    // The bundle's key goes only to the node the operator lists (closed by default).
    let keys = tempfile::tempdir().unwrap();
    let listed = ludus::crypto::identity::Identity::load_or_create(&keys.path().join("listed.key")).unwrap();
    let mut c = Cluster::start_prepared(&format!("bundle_nodes = {{ tiny = [\"{}\"] }}\n", listed.address), |data| {
        std::fs::create_dir_all(data.join("model-keys")).unwrap();
        std::fs::write(data.join("model-keys/tiny.key"), format!("{key_hex}\n")).unwrap();
    });
    std::fs::copy(keys.path().join("listed.key"), c.dir.path().join("node0.key")).unwrap();
    // Protection preserves answers exactly in full precision (quantizing a rotated model
    // rounds differently).
    c.add_node(&["--model", bundle.to_str().unwrap(), "--quantize", "none"]);
    c.add_node(&["--model", t.gguf.to_str().unwrap(), "--quantize", "none"]);
    let unknown = c.add_node(&["--model", other_bundle.to_str().unwrap()]);
    let unlisted = c.add_node(&["--model", bundle.to_str().unwrap(), "--quantize", "none"]);
    c.wait_nodes("tiny-protected", 1);
    c.wait_nodes("tiny", 1);
    let ask = |model: &str| {
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"the cat"}}],"max_tokens":10,"temperature":0}}"#
        );
        let r = c.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    };
    assert_eq!(ask("tiny-protected"), ask("tiny"), "protection must not change answers");
    assert!(!c.nodes[0].log_text().contains(&key_hex), "the key must never be logged");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(c.nodes[unknown].log_text().contains("holds no key"), "{}", c.nodes[unknown].log_text());
    let refused = c.nodes[unlisted].log_text();
    assert!(refused.contains("is not allowed the key of model bundle `tiny`"), "{refused}");
    assert!(!refused.contains(&key_hex), "an unlisted node got the key");
}

/// An unpinned node trusts the first distributor it joins and only that one for the rest of
/// the run: when the server comes back with another key, the node refuses it (it used to
/// trust any distributor on every reconnect, unlike what docs/threat-model.md said).
#[test]
fn an_unpinned_node_keeps_trusting_only_the_first_distributor_it_joined() {
    let mut c = Cluster::start("");
    c.add_node(&["--fake-engine", "4"]);
    c.wait_nodes("fake", 1);
    c.server.kill();
    // The operator's key is gone: the server that comes back is another distributor.
    std::fs::remove_file(c.dir.path().join("data/distributor.key")).unwrap();
    c.restart_server();
    crate::cluster::wait_for("the node to refuse the new distributor", std::time::Duration::from_secs(20), || {
        c.nodes[0].log_text().contains("is not the pinned")
    });
    let (_, models) = c.get("/v1/models");
    assert!(!models.contains("\"fake\""), "the node joined another distributor: {models}");
}
