//! The OpenAI-compatible API over real processes: malformed input, keys, limits, unknown
//! models and missing nodes get the right OpenAI errors; the official `openai` Python SDK
//! works against it (non-streaming, streaming, errors).

use std::process::Command;
use std::time::Duration;

use ludus::inference::tiny_model::TinySpec;

use crate::cluster::{post_with, raw, wait_for, Cluster};
use crate::helpers::tiny;

const CHAT: &str = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;

#[test]
fn malformed_input_and_refusals_get_openai_errors() {
    let mut c = Cluster::start("models = [\"fake\", \"offline-model\"]\n");
    c.add_node(&["--fake-engine", "8"]);
    c.wait_nodes("fake", 1);
    let ok = c.post("/v1/chat/completions", CHAT);
    assert_eq!(ok.status, 200, "{}", ok.body);
    let v = ok.json();
    assert_eq!(v["choices"][0]["message"]["content"], " tok tok tok tok");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let check = |r: crate::cluster::Response, status: u16, kind: &str, param: Option<&str>| {
        assert_eq!(r.status, status, "{}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["type"], kind, "{}", r.body);
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{}", r.body);
        }
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        r
    };
    check(c.post("/v1/chat/completions", "{\"model\": \"fake\", "), 400, "invalid_request_error", None);
    check(
        c.post(
            "/v1/chat/completions",
            r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#,
        ),
        400,
        "invalid_request_error",
        Some("temperature"),
    );
    check(
        c.post("/v1/chat/completions", r#"{"model":"fake","messages":[]}"#),
        400,
        "invalid_request_error",
        Some("messages"),
    );
    check(
        c.post(
            "/v1/chat/completions",
            r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":"many"}"#,
        ),
        400,
        "invalid_request_error",
        Some("max_tokens"),
    );
    check(c.post("/v1/completions", r#"{"model":"fake","prompt":42}"#), 400, "invalid_request_error", Some("prompt"));
    let big = format!(r#"{{"model":"fake","messages":[{{"role":"user","content":"{}"}}]}}"#, "a".repeat(10 << 20));
    check(c.post("/v1/chat/completions", &big), 413, "invalid_request_error", None);
    check(
        c.post("/v1/chat/completions", &CHAT.replace("fake", "no-such-model")),
        404,
        "invalid_request_error",
        Some("model"),
    );
    check(post_with(&c.addr, "/v1/chat/completions", None, CHAT.as_bytes()), 401, "authentication_error", None);
    check(
        post_with(&c.addr, "/v1/chat/completions", Some("ludus-wrong"), CHAT.as_bytes()),
        401,
        "authentication_error",
        None,
    );
    let r = check(c.post("/v1/chat/completions", &CHAT.replace("fake", "offline-model")), 503, "server_error", None);
    assert!(r.header("Retry-After").is_some());
    let stream = CHAT.replace("fake", "offline-model").replace("\"max_tokens\":4", "\"max_tokens\":4,\"stream\":true");
    check(c.post("/v1/chat/completions", &stream), 503, "server_error", None);

    // The server is still healthy after all that.
    assert_eq!(
        c.post("/v1/completions", r#"{"model":"fake","prompt":"Once","max_tokens":2}"#).json()["choices"][0]["text"],
        " tok tok"
    );

    // A key limited to 2 requests per minute gets 429 with Retry-After on the third, and on
    // anything else it asks of its limits.
    let cfg = c.config.to_str().unwrap().to_string();
    let out =
        crate::cluster::ludus().args(["--config", &cfg, "games", "add", "tiny-budget", "--rpm", "2"]).output().unwrap();
    let limited = String::from_utf8(out.stdout).unwrap().trim().to_string();
    for _ in 0..2 {
        assert_eq!(post_with(&c.addr, "/v1/chat/completions", Some(&limited), CHAT.as_bytes()).status, 200);
    }
    let r = check(
        post_with(&c.addr, "/v1/chat/completions", Some(&limited), CHAT.as_bytes()),
        429,
        "rate_limit_error",
        None,
    );
    assert!(r.header("Retry-After").and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s >= 1));
    // The request is counted before its body is read: a key over its limit gets its 429
    // without the server waiting for (or buffering, parsing, tokenizing) a 400 KB prompt,
    // here never sent (it used to wait out the body deadline).
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {limited}\r\n\
         Content-Type: application/json\r\nContent-Length: 400000\r\nConnection: close\r\n\r\n"
    );
    let r = raw(&c.addr, head.as_bytes());
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("requests per minute"), "{}", r.body);
    // A usage report is a request too.
    let usage =
        format!("GET /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {limited}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw(&c.addr, usage.as_bytes()).status, 429);
    assert_eq!(raw(&c.addr, usage.replace(&limited, &c.key).as_bytes()).status, 200, "another key's report");
    // Raw garbage on the socket does not hurt the server.
    let r = raw(&c.addr, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n\xff\xfe\x00\x01\x02");
    assert_eq!(r.status, 401);
    assert_eq!(c.get("/health").0, 200);
}

#[test]
fn the_openai_python_sdk_works_against_the_server() {
    let Some(python) = super::helpers::python_with_openai() else { return };
    let t = tiny(&TinySpec::default());
    let mut c = Cluster::start("");
    c.add_node(&["--model", t.gguf.to_str().unwrap()]);
    c.wait_nodes("tiny", 1);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_sdk.py");
    let out = Command::new(&python)
        .arg(script)
        .env("LUDUS_BASE_URL", format!("http://{}/v1", c.addr))
        .env("LUDUS_KEY", &c.key)
        .env("LUDUS_MODEL", "tiny")
        .output()
        .unwrap();
    super::helpers::assert_success(&out, "the openai SDK script");
    assert!(String::from_utf8_lossy(&out.stdout).contains("all openai SDK checks passed"));
}

/// A game that hangs up mid-stream frees its node slot: with capacity 1 and an 80-second
/// answer in progress (longer than the next request's client waits), the next request is
/// served. No timing bound: a loaded machine may take its time, a slot never freed fails.
#[test]
fn a_closed_connection_frees_the_node_slot() {
    let mut c = Cluster::start("");
    c.add_node(&["--fake-engine", "4000:20", "--capacity", "1"]);
    c.wait_nodes("fake", 1);
    let body = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":4000,"stream":true}"#;
    let mut stream = crate::cluster::SseStream::open(&c.addr, &c.key, body);
    assert_eq!(stream.status, 200);
    for _ in 0..3 {
        assert!(stream.next_data().is_some());
    }
    drop(stream); // the game goes away
    let r = c.post("/v1/chat/completions", &CHAT.replace("\"max_tokens\":4", "\"max_tokens\":2"));
    assert_eq!(r.status, 200, "the slot was not freed: {}", r.body);
    assert!(c.nodes[0].log_text().contains("task started"));
}

/// Sends a chat completion on a connection of its own and returns it, unread (dropping it
/// is the game going away).
fn send_chat(c: &Cluster, body: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut game = std::net::TcpStream::connect(&c.addr).unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
        c.key,
        body.len()
    );
    game.write_all(request.as_bytes()).unwrap();
    game
}

/// A game that closes its connection while it waits for a whole (non-streamed) answer
/// frees its node slot too: it used to go unnoticed until the answer was ready, the node
/// busy for a game that had gone (80 s here: longer than the next request waits). What
/// was made until it left is billed, as for a stream: it chose to leave, and a free
/// hang-up would let a game occupy nodes at no cost.
#[test]
fn a_game_that_leaves_before_its_whole_answer_frees_the_node_slot() {
    let mut c = Cluster::start("");
    c.add_node(&["--fake-engine", "4000:20", "--capacity", "1"]);
    c.wait_nodes("fake", 1);
    let body = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":4000}"#;
    let game = send_chat(&c, body);
    wait_for("the long answer to start", Duration::from_secs(10), || c.nodes[0].log_text().contains("task started"));
    std::thread::sleep(Duration::from_millis(500)); // a few tokens made (one per 20 ms)
    drop(game); // the game goes away
                // Behind the abandoned answer, this one would wait past the client's 60 s timeout.
    let r = c.post("/v1/chat/completions", &CHAT.replace("\"max_tokens\":4", "\"max_tokens\":2"));
    assert_eq!(r.status, 200, "{}", r.body);
    let log = c.server.log_text();
    assert!(log.contains("the game closed its connection before its answer was ready"), "{log}");
    let store = c.store();
    wait_for("the leaver's receipt", Duration::from_secs(20), || {
        let made = "SELECT count(*) FROM receipts WHERE completion_tokens > 2 AND price_units > 0";
        crate::database::numbers(&store, made) == vec![1]
    });
}

/// A streamed request whose game leaves while it waits in the queue (here behind another
/// stream on the only slot) is dropped from the queue: it used to stay there, so the node
/// prefilled and started it once free, and the game was billed its prompt and first
/// tokens for an answer it had left. Only the first stream's task ever starts.
#[test]
fn a_stream_whose_game_leaves_before_its_first_token_never_runs() {
    let mut c = Cluster::start("");
    c.add_node(&["--fake-engine", "4000:20", "--capacity", "1"]);
    c.wait_nodes("fake", 1);
    let body = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":4000,"stream":true}"#;
    let mut first = crate::cluster::SseStream::open(&c.addr, &c.key, body);
    assert_eq!(first.status, 200);
    assert!(first.next_data().is_some());
    let queued = send_chat(&c, body);
    std::thread::sleep(Duration::from_secs(1)); // admitted and queued behind the first
    drop(queued); // the game goes away before its first token
    let noticed = "the game closed its connection before its stream began";
    // Not longer: the queue would time the job out (10 s here) before the slot frees.
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while !c.server.log_text().contains(noticed) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(first); // the slot frees: a queued job would start now
    let store = c.store();
    wait_for("the first stream's hang-up receipt", Duration::from_secs(20), || {
        crate::database::numbers(&store, "SELECT count(*) FROM receipts") >= vec![1]
    });
    // Had the leaver's job stayed queued, it would have started within a heartbeat of the
    // slot freeing; it never does, and nothing else is billed.
    std::thread::sleep(Duration::from_secs(3));
    let started = c.nodes[0].log_text().matches("task started").count();
    assert_eq!(started, 1, "{}", c.nodes[0].log_text());
    assert_eq!(crate::database::numbers(&store, "SELECT count(*) FROM receipts"), vec![1]);
    assert!(c.server.log_text().contains(noticed));
}

/// SIGTERM: running streams finish, the process exits cleanly within the grace period.
#[test]
fn sigterm_lets_running_streams_finish() {
    let mut c = Cluster::start("");
    c.add_node(&["--fake-engine", "20:50"]);
    c.wait_nodes("fake", 1);
    let body = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":20,"stream":true}"#;
    let mut stream = crate::cluster::SseStream::open(&c.addr, &c.key, body);
    assert!(stream.next_data().is_some());
    let pid = c.server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut chunks = 1;
    let mut done = false;
    while let Some(data) = stream.next_data() {
        if data == "[DONE]" {
            done = true;
            break;
        }
        assert!(!data.contains("\"error\""), "{data}");
        chunks += 1;
    }
    assert!(done, "the stream was cut");
    assert_eq!(chunks, 21, "20 token chunks and the finish chunk");
    let status = c.server.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// A request the node cannot run (prompt longer than the model's context) is the game's
/// fault: a 400 at once, no retry on other nodes, and the node keeps serving.
#[test]
fn requests_a_node_rejects_are_400_not_node_failures() {
    let t = tiny(&TinySpec::default());
    let mut c = Cluster::start("");
    c.add_node(&["--model", t.gguf.to_str().unwrap()]);
    c.wait_nodes("tiny", 1);
    let long = "word ".repeat(400); // about 800 tokens; the tiny model's context is 256
    let body = format!(r#"{{"model":"tiny","messages":[{{"role":"user","content":"{long}"}}],"max_tokens":4}}"#);
    let r = c.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "request_rejected");
    assert!(r.body.contains("context"), "{}", r.body);
    // Streaming gets the same status before any byte of the stream is sent.
    let stream_body = body.replace("\"max_tokens\":4", "\"max_tokens\":4,\"stream\":true");
    assert_eq!(c.post("/v1/chat/completions", &stream_body).status, 400);
    let ok = c
        .post("/v1/chat/completions", r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#);
    assert_eq!(ok.status, 200, "{}", ok.body);
}

/// Tokens per minute: a key that spent its budget gets 429 (tokens) until it refills.
#[test]
fn a_key_over_its_token_budget_gets_429() {
    let mut c = Cluster::start("");
    c.add_node(&["--fake-engine", "16"]);
    c.wait_nodes("fake", 1);
    let cfg = c.config.to_str().unwrap().to_string();
    let out =
        crate::cluster::ludus().args(["--config", &cfg, "games", "add", "thrifty", "--tpm", "10"]).output().unwrap();
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let body = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#;
    let first = post_with(&c.addr, "/v1/chat/completions", Some(&key), body.as_bytes());
    assert_eq!(first.status, 200, "{}", first.body);
    // 16 completion tokens plus the prompt overdraw the 10-token budget: blocked ~30 s.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let second = post_with(&c.addr, "/v1/chat/completions", Some(&key), body.as_bytes());
    assert_eq!(second.status, 429, "{}", second.body);
    assert!(second.body.contains("tokens per minute"), "{}", second.body);
    assert!(second.header("Retry-After").is_some());
}

/// A job's tokens (its prompt and max_tokens) are held from the key's per-minute budget
/// from its admission until it ends: requests sent together cannot each find the budget
/// whole (usage is only known at the end, so before this a burst of long streams all got
/// in). What a job did not use comes back when it ends.
#[test]
fn streams_sent_together_hold_their_tokens_from_the_budget_until_they_end() {
    let mut c = Cluster::start("");
    c.add_node(&["--fake-engine", "450:50", "--capacity", "8"]);
    c.wait_nodes("fake", 1);
    let key = c.add_game("bursty", &["--tpm", "1000"]);
    let body = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":450,"stream":true}"#;
    // Six long streams at once, each holding its first token: 450 tokens and a prompt each.
    let streams: Vec<_> = (0..6).map(|_| crate::cluster::SseStream::open(&c.addr, &key, body)).collect();
    let admitted = streams.iter().filter(|s| s.status == 200).count();
    assert!((2..=3).contains(&admitted), "{admitted} of 6 streams of 450 tokens admitted on 1,000 a minute");
    assert!(streams.iter().skip(admitted).all(|s| s.status == 429), "the first ones are admitted, then 429");
    // The games leave having read a token or two: the rest of what they held comes back.
    drop(streams);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let small = r#"{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    let next = post_with(&c.addr, "/v1/chat/completions", Some(&key), small.as_bytes());
    assert_eq!(next.status, 200, "{}", next.body);
}

/// Receipt proofs cost the database whether they are found or not (a node's signature over
/// a task is good for minutes, and the key throttle counts only failures): every ask
/// counts against the client's allowance, then 429 with Retry-After. Payout claims too.
#[test]
fn receipt_proofs_are_throttled_per_client_found_or_not() {
    let c = Cluster::start("");
    let path = "/v1/receipts/chatcmpl-0000000000000001/proof";
    let per_minute = ludus::http::settlement_api::RECEIPT_PROOFS_PER_MINUTE as usize;
    let asks: Vec<(u16, String)> = (0..per_minute + 30).map(|_| c.get_admin(path, &c.key)).collect();
    assert!(asks[..per_minute].iter().all(|(s, _)| *s == 404), "{asks:?}");
    // (The allowance refills at two a second meanwhile.)
    let (_, refused) = asks[per_minute..].iter().find(|(s, _)| *s == 429).expect("no 429 past the allowance");
    assert!(refused.contains("too many receipt proofs"), "{refused}");
    // A node's payout claims (each rebuilds the payout tree of every epoch it was paid in)
    // count against the same allowance.
    let payouts = format!("/v1/settlement/payouts/0x{:040x}", 0x5c);
    let claims: Vec<(u16, String)> = (0..10).map(|_| c.get_admin(&payouts, &c.key)).collect();
    assert!(claims.iter().any(|(s, _)| *s == 429), "{claims:?}");
    // Other endpoints are not throttled by it, nor is the operator.
    assert_eq!(c.get_admin("/v1/models", &c.key).0, 200);
    let admin = std::fs::read_to_string(c.dir.path().join("data/admin-token")).unwrap();
    assert_eq!(c.get_admin(path, admin.trim()).0, 404);
    assert_ne!(c.get_admin(&payouts, admin.trim()).0, 429);
}

/// A streamed request with `n` choices starts at the first event of any choice: a choice
/// that waits out the queue ends the stream with an error event, after the game read what
/// the other choice streamed meanwhile. The headers used to wait for every choice's first
/// event: the running choice went on (and was billed) while the game got a 503.
#[test]
fn a_streamed_choice_failing_after_another_began_ends_the_stream_with_an_error() {
    let mut c = Cluster::start("");
    // Room for one sequence: the second choice waits in the queue (10 s here) and times out.
    c.add_node(&["--fake-engine", "400:50", "--capacity", "1"]);
    c.wait_nodes("fake", 1);
    let body = r#"{"model":"fake","n":2,"stream":true,"max_tokens":400,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut stream = crate::cluster::SseStream::open(&c.addr, &c.key, body);
    assert_eq!(stream.status, 200, "the stream begins with the first choice's first token");
    let events: Vec<String> = std::iter::from_fn(|| stream.next_data()).collect();
    let chunks: Vec<serde_json::Value> = events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let read = chunks.iter().filter(|c| c["choices"][0]["delta"]["content"].is_string()).count();
    assert!(read > 10, "the game read the running choice's tokens: {read}");
    let error = chunks.iter().find(|c| c.get("error").is_some()).expect("an error event");
    assert_eq!(error["error"]["code"], "queue_timeout", "{error}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

/// Not streamed, the same: one choice runs to its end (its receipt is on the books) while
/// the other waits out the queue. The game gets the finished choice, with its index, and
/// the failed one under `failed_choices`, rather than a 503 for a request it paid for; it
/// is billed exactly the answer's usage.
#[test]
fn a_whole_answer_keeps_the_choices_that_finished_when_another_fails() {
    let mut c = Cluster::start("");
    c.add_node(&["--fake-engine", "400:50", "--capacity", "1"]);
    c.wait_nodes("fake", 1);
    let body = r#"{"model":"fake","n":2,"max_tokens":400,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = c.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "the finished choice comes back: {}", r.body);
    let v = r.json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1, "{v}");
    let index = choices[0]["index"].as_u64().unwrap();
    assert_eq!(choices[0]["message"]["content"].as_str().unwrap().matches("tok").count(), 400, "{v}");
    let failed = v["failed_choices"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{v}");
    assert_eq!(failed[0]["index"].as_u64(), Some(1 - index), "{v}");
    assert_eq!(failed[0]["error"]["code"], "queue_timeout", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 400, "{v}");
    // What the game is billed is what it read: one task of 400 tokens.
    let usage =
        format!("GET /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", c.key);
    let billed = || -> serde_json::Value {
        let r = raw(&c.addr, usage.as_bytes());
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["data"][0].clone()
    };
    wait_for("the receipt on the books", Duration::from_secs(30), || billed()["tasks"].as_u64() >= Some(1));
    let day = billed();
    assert_eq!((day["tasks"].as_u64(), day["completion_tokens"].as_u64()), (Some(1), Some(400)), "{day}");
}

/// `n` choices are `n` tasks run side by side: the answer has one choice per index, the
/// usage is their sum (each is billed), and a stream interleaves the choices' chunks, each
/// naming its index and finishing on its own, with one usage chunk and one `[DONE]`.
#[test]
fn n_choices_come_back_indexed_whole_and_streamed() {
    let mut c = Cluster::start("");
    c.add_node(&["--fake-engine", "5:2"]);
    c.wait_nodes("fake", 1);
    let body = |stream: bool| {
        format!(
            r#"{{"model":"fake","n":3,"stream":{stream},"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"hi"}}]}}"#
        )
    };
    let whole = c.post("/v1/chat/completions", &body(false));
    assert_eq!(whole.status, 200, "{}", whole.body);
    let v = whole.json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.iter().map(|c| c["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(choices.iter().all(|c| c["message"]["content"].as_str().is_some_and(|t| t.contains("tok"))), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 15, "{v}");
    assert!(v["system_fingerprint"].as_str().is_some_and(|f| f.starts_with("fp_")), "{v}");
    let mut stream = crate::cluster::SseStream::open(&c.addr, &c.key, &body(true));
    assert_eq!(stream.status, 200);
    let (mut finished, mut text, mut usage, mut done) = (Vec::new(), [0usize; 3], None, false);
    while let Some(data) = stream.next_data() {
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(&data).unwrap();
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u["completion_tokens"].as_u64().unwrap());
            continue;
        }
        let choice = &chunk["choices"][0];
        let index = choice["index"].as_u64().unwrap() as usize;
        if let Some(t) = choice["delta"]["content"].as_str() {
            text[index] += t.matches("tok").count();
        }
        if choice["finish_reason"].is_string() {
            finished.push(index);
        }
    }
    finished.sort();
    assert!(done);
    assert_eq!(finished, vec![0, 1, 2]);
    assert_eq!(text, [5, 5, 5]);
    assert_eq!(usage, Some(15));
    let over = c.post("/v1/chat/completions", r#"{"model":"fake","n":9,"messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(over.status, 400);
    assert_eq!(over.json()["error"]["param"], "n");
    // A request is one request whatever its `n`: on a key allowed 2 a minute, 3 choices
    // pass (each choice counted as one more used to give a 429 no retry could pass), and
    // so does one more request; the third is refused.
    let cfg = c.config.to_str().unwrap().to_string();
    let out = crate::cluster::ludus()
        .args(["--config", &cfg, "games", "add", "two-a-minute", "--rpm", "2"])
        .output()
        .unwrap();
    let limited = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let three = post_with(&c.addr, "/v1/chat/completions", Some(&limited), body(false).as_bytes());
    assert_eq!(three.status, 200, "{}", three.body);
    assert_eq!(three.json()["choices"].as_array().map(Vec::len), Some(3));
    assert_eq!(post_with(&c.addr, "/v1/chat/completions", Some(&limited), CHAT.as_bytes()).status, 200);
    assert_eq!(post_with(&c.addr, "/v1/chat/completions", Some(&limited), CHAT.as_bytes()).status, 429);
}

/// A game that stopped reading its stream (a hung client, or one that means harm) had every
/// token of every choice held in the server's memory until the answer's end: up to `n ×
/// max_tokens` events a request. Now a choice more than `stream_unread_kib` of tokens
/// behind has its answer ended as a hang-up is: the node stops early, the tokens made are
/// billed, and the stream, once read, says why.
#[test]
fn a_game_that_stops_reading_its_stream_has_its_answer_ended_and_billed_as_made() {
    let mut c = Cluster::start_with_server("stream_unread_kib = 64\nmax_tokens_limit = 8192\n", "");
    let token_text = "x".repeat(200);
    // 8 × 1,000 tokens a second, under the node link's frame limit.
    c.add_node(&["--fake-engine", "8192:1", "--fake-text", &token_text, "--capacity", "16"]);
    c.wait_nodes("fake", 1);
    // About 30 MB of events for 8 × 8,192 tokens; the two sockets hold about 4 MB here
    // (the sender's buffer grows to `net.ipv4.tcp_wmem`'s largest, 4 MB by default; the
    // receiver's grows only as its reader reads).
    let body = r#"{"model":"fake","n":8,"max_tokens":8192,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut stream = crate::cluster::SseStream::open(&c.addr, &c.key, body);
    assert_eq!(stream.status, 200);
    // The game reads nothing more until every choice has its receipt.
    let store = c.store();
    let sql = "SELECT count(*)::bigint, coalesce(sum(completion_tokens), 0)::bigint, \
               coalesce(max(completion_tokens), 0)::bigint FROM receipts";
    wait_for("the choices' receipts", Duration::from_secs(60), || crate::database::numbers(&store, sql)[0] == 8);
    let [_, billed, longest] = crate::database::numbers(&store, sql)[..] else { unreachable!() };
    assert!(longest < 8192, "every choice ended early: the longest was billed {longest} tokens");
    let (mut read, mut last) = (0, serde_json::Value::Null);
    while let Some(data) = stream.next_data() {
        if data == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(&data).unwrap();
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            assert_eq!(text, token_text);
            read += 1;
        }
        last = chunk;
    }
    assert_eq!(last["error"]["code"], "stream_not_read", "the stream's last event says why: {last}");
    // What the game read is billed; what it left unread was made for it, and is billed too.
    assert!(read > 0 && read <= billed, "read {read} tokens, billed {billed}");
    assert!(!c.server.log_text().contains("closing node link"), "the node did nothing wrong");
}

/// A game sending more than the nodes serve fills a model's queue, and used to lock every
/// other game out of that model (429 `queue_full`) until its jobs drained. Now another
/// game's request takes the place of the flooding game's newest job (that one gets the
/// 429 it would have had coming last) and runs in its turn, before the flooding game's
/// later jobs; the flooding game's next request is refused while the queue stays full.
#[test]
fn a_game_that_floods_a_models_queue_does_not_lock_other_games_out() {
    use std::time::Instant;
    let mut c = Cluster::start("queue_capacity = 3\nqueue_timeout_ms = 60000\n");
    // One slot, about six seconds a job: the first is still running when the last request
    // below comes (each step waits for the server's own figures, not for a guessed delay,
    // and has the six seconds for all of them), and the last served waits three jobs out.
    c.add_node(&["--fake-engine", "20:300", "--capacity", "1"]);
    c.wait_nodes("fake", 1);
    let patient = c.add_game("patient", &[]);
    let body = r#"{"model":"fake","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;
    let send = |key: String| {
        let addr = c.addr.clone();
        std::thread::spawn(move || {
            let r = post_with(&addr, "/v1/chat/completions", Some(&key), body.as_bytes());
            let code = serde_json::from_str::<serde_json::Value>(&r.body).ok().map(|v| v["error"]["code"].clone());
            (r.status, code, Instant::now())
        })
    };
    let metric = |line: &str| {
        let line = format!("\n{line}\n");
        wait_for(line.trim(), Duration::from_secs(10), || c.get("/metrics").1.contains(&line));
    };
    // The flooding game: one job runs, three fill the queue, one after another, so that
    // their order is known.
    let mut flood = vec![send(c.key.clone())];
    metric("ludus_running_jobs 1");
    for queued in 1..=3 {
        flood.push(send(c.key.clone()));
        metric(&format!("ludus_queued_jobs{{model=\"fake\"}} {queued}"));
    }
    metric("ludus_queued_games{model=\"fake\"} 1");
    // The other game finds the queue full: the flood's newest job gives its place.
    let other = send(patient);
    metric("ludus_queue_refused_total{reason=\"gave_way\"} 1");
    metric("ludus_queued_games{model=\"fake\"} 2");
    // Now the flood holds two places and the other game one: the flood is refused.
    let more = post_with(&c.addr, "/v1/chat/completions", Some(&c.key), body.as_bytes());
    assert_eq!(more.status, 429, "{}", more.body);
    assert!(more.body.contains("queue_full"), "{}", more.body);
    metric("ludus_queue_refused_total{reason=\"full\"} 1");
    let (status, code, other_done) = other.join().unwrap();
    assert_eq!(status, 200, "the other game was refused: {code:?}");
    let flood: Vec<_> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    let statuses: Vec<u16> = flood.iter().map(|r| r.0).collect();
    assert_eq!(statuses, [200, 200, 200, 429], "{flood:?}");
    assert_eq!(flood[3].1.as_ref().and_then(|c| c.as_str()), Some("queue_full"), "{flood:?}");
    // Turns: the flooding game's first queued job, the other game's, then the flood's next.
    assert!(flood[1].2 < other_done && other_done < flood[2].2, "{flood:?} / {other_done:?}");
    assert!(c.server.log_text().contains("gave its place to another game's"));
    // Drained: nothing waits, nothing runs, and the refusals stay counted.
    metric("ludus_running_jobs 0");
    let text = c.get("/metrics").1;
    assert!(!text.contains("ludus_queued_jobs{"), "{text}");
    assert!(text.contains("\nludus_queue_refused_total{reason=\"timeout\"} 0\n"), "{text}");
}
