//! Faults and hostile peers against a real server: every node gone, slow-loris clients,
//! API-key guessing, and a node flooding frames.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ludus::protocol::{NodeLoad, NodeMessage};

use super::cluster::{post_with, wait_for, Cluster};
use super::registry::{try_chat, Rogue};

const CHAT: &str = r#"{"model": "fake", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}"#;

#[test]
fn with_every_node_gone_requests_get_a_clean_503_and_service_returns_with_a_node() {
    let mut cluster = Cluster::start("");
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 2);
    assert!(try_chat(&cluster.addr, &cluster.key, "fake").is_some());
    for node in &mut cluster.nodes {
        node.kill();
    }
    wait_for("the nodes to leave the table", Duration::from_secs(10), || {
        cluster.get("/v1/models").1.contains("\"data\":[]")
    });
    let started = Instant::now();
    let r = cluster.post("/v1/chat/completions", CHAT);
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not after a queue timeout");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "no_node_available", "{}", r.body);
    assert!(r.header("retry-after").is_some());
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 1);
    assert!(try_chat(&cluster.addr, &cluster.key, "fake").is_some(), "served again once a node is back");
}

#[test]
fn slow_loris_clients_are_cut_off_and_never_starve_others() {
    let mut cluster = Cluster::start("");
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 1);
    // 64 clients that send half a request head and then nothing.
    let mut slow: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(&cluster.addr).unwrap();
            s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app").unwrap();
            s
        })
        .collect();
    for _ in 0..5 {
        assert!(try_chat(&cluster.addr, &cluster.key, "fake").is_some(), "others are served meanwhile");
    }
    // The server closes them once the request-head timeout (5 s by default) passes.
    let started = Instant::now();
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(started.elapsed() < Duration::from_secs(15), "every slow client was cut off");
    assert!(try_chat(&cluster.addr, &cluster.key, "fake").is_some());
}

#[test]
fn api_key_guessing_is_throttled_per_client_address() {
    let cluster = Cluster::start("");
    let mut statuses = Vec::new();
    for i in 0..35 {
        let key = format!("ludus-guess-{i:040}");
        statuses.push(post_with(&cluster.addr, "/v1/chat/completions", Some(&key), CHAT.as_bytes()).status);
    }
    // 30 failures a minute (refilling at one per 2 s while the test runs), then refused.
    assert!(statuses[..30].iter().all(|&s| s == 401), "{statuses:?}");
    assert!(statuses[32..].iter().all(|&s| s == 429), "{statuses:?}");
    let r = post_with(&cluster.addr, "/v1/chat/completions", Some("ludus-one-more"), CHAT.as_bytes());
    assert_eq!(r.status, 429);
    assert!(r.body.contains("invalid API keys"), "{}", r.body);
    assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    // The admin endpoints share the throttle.
    let (status, _) = cluster.get("/admin/nodes");
    assert_eq!(status, 429);
}

/// Sends a request head declaring a 100 KB body, then only `sent` bytes of it; the status
/// line the server answers with, and how long it took.
fn partial_body(addr: &str, key: &str, sent: &[u8]) -> (String, Duration) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {key}\r\nContent-Length: 100000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(sent).unwrap();
    let start = Instant::now();
    let mut response = [0u8; 512];
    let n = stream.read(&mut response).unwrap_or(0);
    let text = String::from_utf8_lossy(&response[..n]).to_string();
    (text.lines().next().unwrap_or("").to_string(), start.elapsed())
}

/// The key is checked before the body is read (a caller without one cannot make the server
/// buffer anything), and a body trickled in by a valid caller is cut with a 408.
#[test]
fn bodies_are_read_only_for_a_valid_key_and_never_wait_forever() {
    let cluster = Cluster::start_with_server("client_body_timeout_ms = 1000\n", "");
    // A wrong key: refused at once, the body never awaited.
    let (status, waited) = partial_body(&cluster.addr, "ludus-not-a-key", b"{");
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    assert!(waited < Duration::from_millis(900), "the server waited {waited:?} for the body of a wrong key");
    // A valid key and a body that stops after 10 bytes: 408 after the body timeout.
    let (status, waited) = partial_body(&cluster.addr, &cluster.key, br#"{"model": "#);
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(10), "{waited:?}");
}

/// A wrong-key request from `client` as a proxy forwards it (`X-Forwarded-For`).
fn guess_via_proxy(addr: &str, client: &str, i: usize) -> u16 {
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Authorization: Bearer ludus-guess-{i:040}\r\nX-Forwarded-For: {client}\r\nContent-Length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    );
    super::cluster::raw(addr, request.as_bytes()).status
}

/// Behind a trusted reverse proxy, the throttle counts the client the proxy names: one
/// guesser is refused while the other clients behind the same proxy are not. Without the
/// proxy trusted, the header is the client's own word and changes nothing.
#[test]
fn behind_a_trusted_proxy_the_throttle_counts_each_client_not_the_proxy() {
    let cluster = Cluster::start_with_server("failed_auth_per_minute = 5\ntrusted_proxies = [\"127.0.0.0/8\"]\n", "");
    let guesser: Vec<u16> = (0..8).map(|i| guess_via_proxy(&cluster.addr, "203.0.113.7", i)).collect();
    assert!(guesser[..5].iter().all(|&s| s == 401) && guesser[6..].iter().all(|&s| s == 429), "{guesser:?}");
    // Another player behind the same proxy still reaches the key check.
    assert_eq!(
        guess_via_proxy(&cluster.addr, "203.0.113.8", 99),
        401,
        "one guesser locked out the proxy's other clients"
    );
    assert_eq!(
        guess_via_proxy(&cluster.addr, "198.51.100.1, 203.0.113.7", 100),
        429,
        "a forged left-hand entry changed the client"
    );

    // Not trusted: rotating the header does not escape the throttle.
    let direct = Cluster::start_with_server("failed_auth_per_minute = 5\n", "");
    let rotating: Vec<u16> =
        (0..8).map(|i| guess_via_proxy(&direct.addr, &format!("203.0.113.{}", 10 + i), i)).collect();
    assert!(rotating[6..].iter().all(|&s| s == 429), "a forged X-Forwarded-For escaped the throttle: {rotating:?}");
}

#[test]
fn a_node_flooding_frames_is_disconnected_and_others_keep_serving() {
    let mut cluster = Cluster::start("max_node_frames_per_s = 500\n");
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 1);
    let addr = cluster.addr.clone();
    let sent = actix_rt::System::new().block_on(async move {
        let mut rogue = Rogue::join(&addr, "fake").await;
        let mut sent = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && sent < 20_000 {
            if rogue.link.send(&NodeMessage::Heartbeat(NodeLoad::default())).await.is_err() {
                break;
            }
            sent += 1;
        }
        // The server said why before closing.
        let mut reason = String::new();
        while let Ok(m) = rogue.link.recv(Duration::from_millis(500)).await {
            if let ludus::protocol::ServerMessage::Goodbye { reason: r } = m {
                reason = r;
                break;
            }
        }
        (sent, reason)
    });
    let (_, reason) = sent;
    assert!(reason.contains("flooding"), "the server says why it closed the link: {reason:?}");
    assert!(cluster.server.log_text().contains("flooding: more than 500 frames in one second"));
    assert!(try_chat(&cluster.addr, &cluster.key, "fake").is_some(), "the honest node still serves");
}

#[test]
fn a_node_that_stops_reading_is_disconnected_before_its_queue_grows_without_bound() {
    let mut cluster = Cluster::start("max_node_frames_per_s = 1000000\nmax_node_queue_bytes = 262144\n");
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 1);
    let addr = cluster.addr.clone();
    // The rogue pings as fast as it can and never reads the pongs.
    let server_log = || cluster.server.log_text();
    let log = cluster.server.log.clone();
    actix_rt::System::new().block_on(async move {
        let mut rogue = Rogue::join(&addr, "fake").await;
        let payload = [7u8; 125];
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut pings = 0u64;
        while Instant::now() < deadline {
            if rogue.link.ping(&payload).await.is_err() {
                break;
            }
            pings += 1;
            if pings.is_multiple_of(2000)
                && std::fs::read_to_string(&log).unwrap_or_default().contains("stopped reading")
            {
                break;
            }
        }
    });
    assert!(server_log().contains("the node stopped reading"), "{}", server_log());
    assert!(try_chat(&cluster.addr, &cluster.key, "fake").is_some(), "the honest node still serves");
}

#[test]
fn a_panicking_actor_is_restarted_its_queued_jobs_fail_cleanly_and_new_ones_succeed() {
    let mut cluster = Cluster::start_with_server("chaos = true\n", "");
    // One slot, slow answers: one job runs while the next waits in the queue.
    cluster.add_node(&["--fake-engine", "30:50", "--capacity", "1"]);
    cluster.wait_nodes("fake", 1);
    let token = std::fs::read_to_string(cluster.dir.path().join("data/admin-token")).unwrap();
    let chaos = |actor: &str| {
        super::cluster::raw(
            &cluster.addr,
            format!(
                "POST /admin/chaos/panic/{actor} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
                token.trim()
            )
            .as_bytes(),
        )
        .status
    };
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let running =
        std::thread::spawn(move || post_with(&addr, "/v1/chat/completions", Some(&key), CHAT_LONG.as_bytes()));
    std::thread::sleep(Duration::from_millis(300));
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let queued = std::thread::spawn(move || post_with(&addr, "/v1/chat/completions", Some(&key), CHAT_LONG.as_bytes()));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(chaos("distributor"), 202);
    let queued = queued.join().unwrap();
    assert_eq!(queued.status, 500, "the queued job fails cleanly: {}", queued.body);
    assert!(queued.body.contains("restarted"), "{}", queued.body);
    let running = running.join().unwrap();
    assert_eq!(running.status, 200, "the running job finishes on its node: {}", running.body);
    assert!(cluster.server.log_text().contains("actor panicked; restarting it"));
    assert!(try_chat(&cluster.addr, &cluster.key, "fake").is_some(), "new requests succeed");
    // The gateway and the registry come back too; answers keep reaching the books.
    assert_eq!(chaos("gateway"), 202);
    assert_eq!(chaos("registry"), 202);
    std::thread::sleep(Duration::from_millis(300));
    let ids: Vec<u64> =
        (0..3).map(|_| try_chat(&cluster.addr, &cluster.key, "fake").expect("served after restarts")).collect();
    super::registry::assert_all_recorded_once(&cluster, &ids);
    assert_eq!(chaos("nonsense"), 400);
}

#[test]
fn fault_injection_is_off_unless_configured() {
    let cluster = Cluster::start("");
    let token = std::fs::read_to_string(cluster.dir.path().join("data/admin-token")).unwrap();
    let r = super::cluster::raw(
        &cluster.addr,
        format!(
            "POST /admin/chaos/panic/distributor HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
            token.trim()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 404);
    assert!(r.body.contains("server.chaos"), "{}", r.body);
}

const CHAT_LONG: &str = r#"{"model": "fake", "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]}"#;
