//! Structured output on the real model (issue 21): the grammar a request's
//! `response_format` / `tools` compile into holds every sampled token to it; the same
//! answer re-checked by the verifier passes, and an answer that leaves the grammar fails
//! the proof even where each token would pass as a near-tie.

use ludus::crypto::identity::Identity;
use ludus::http::structured;
use ludus::inference::grammar::{GrammarCompiler, GrammarError};
use ludus::inference::{ChatMessage, Engine, GenerateRequest, Model, SamplingParams};
use ludus::proof::verify::{verify, Tolerances};
use ludus::proof::{Format, ProofBuilder};
use serde_json::{json, Value};
use tch::{Device, Kind};

use crate::cluster::Cluster;
use crate::helpers::{collect, engine, smollm2};

/// The grammar `body`'s `response_format` / `tools` make.
fn grammar(body: Value) -> String {
    structured::parse(body.as_object().unwrap()).unwrap().grammar.expect("a grammar")
}

fn npc_schema() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "npc", "strict": true, "schema": {
        "type": "object",
        "properties": {
            "line": {"type": "string", "maxLength": 60},
            "emotion": {"enum": ["angry", "calm", "afraid"]},
            "gold": {"type": "integer", "minimum": 0, "maximum": 100}
        },
        "required": ["line", "emotion", "gold"],
        "additionalProperties": false
    }}})
}

fn prompt(model_tokenizer: &Model, ask: &str) -> Vec<u32> {
    let messages = vec![
        ChatMessage::new("system", "You are a guard in a fantasy village. Answer in JSON."),
        ChatMessage::new("user", ask),
    ];
    model_tokenizer.chat_prompt(&messages).unwrap()
}

/// Runs `request` on `engine` with a proof of inference for challenge `[seed; 32]`:
/// (completion, proof).
fn proved(engine: &Engine, node: &Identity, request: GenerateRequest, seed: u64) -> (Vec<u32>, ludus::proof::Proof) {
    let rx = engine.submit(GenerateRequest { collect_hidden: true, ..request }).unwrap();
    let mut builder = ProofBuilder::new([seed as u8; 32], 64).format(Format::of(engine.quantization, engine.kind));
    let completion = ludus::proof::signed::collect_blocking(rx, &mut builder).unwrap();
    let proof = builder.finish(node, seed, "smollm2", &completion).expect("a proof");
    (completion, proof)
}

fn run(prompt: &[u32], params: SamplingParams, collect_hidden: bool) -> GenerateRequest {
    GenerateRequest { prompt: prompt.to_vec(), params, max_tokens: 120, collect_hidden, ..Default::default() }
}

#[test]
fn sampled_answers_always_match_their_schema() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let engine = engine(&path, 8);
    let g: std::sync::Arc<str> = grammar(json!({"response_format": npc_schema()})).into();
    let asks = ["Who goes there?", "The dragon is coming!", "Can I pass the gate?", "Give me your gold."];
    let receivers: Vec<_> = (0..8)
        .map(|i| {
            let params = SamplingParams {
                temperature: 1.0,
                seed: 77 + i as u64,
                grammar: Some(g.clone()),
                ..Default::default()
            };
            engine.submit(run(&prompt(&model, asks[i % asks.len()]), params, false)).unwrap()
        })
        .collect();
    for rx in receivers {
        let (_, text, done) = crate::helpers::drain(rx);
        assert_eq!(done.reason, ludus::inference::FinishReason::Stop, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v["line"].as_str().is_some_and(|l| l.chars().count() <= 60), "{text}");
        assert!(["angry", "calm", "afraid"].contains(&v["emotion"].as_str().unwrap()), "{text}");
        assert!((0..=100).contains(&v["gold"].as_i64().unwrap()), "{text}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
    }
}

#[test]
fn a_required_tool_call_names_a_listed_function_with_valid_arguments() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let engine = engine(&path, 2);
    let tools = json!([
        {"type": "function", "function": {"name": "draw_sword", "parameters": {"type": "object",
            "properties": {"hand": {"enum": ["left", "right"]}}, "required": ["hand"]}}},
        {"type": "function", "function": {"name": "flee", "parameters": {"type": "object",
            "properties": {"steps": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["steps"]}}}
    ]);
    let g: std::sync::Arc<str> = grammar(json!({"tools": tools, "tool_choice": "required"})).into();
    for seed in 0..3 {
        let params = SamplingParams { temperature: 1.0, seed, grammar: Some(g.clone()), ..Default::default() };
        let (_, text, _) = collect(&engine, run(&prompt(&model, "A bandit attacks you!"), params, false));
        let offered = ["draw_sword".to_string(), "flee".to_string()];
        let call = structured::tool_call(&text, &offered).unwrap_or_else(|| panic!("not a call: {text}"));
        let args: Value = serde_json::from_str(&call.arguments).unwrap();
        match call.name.as_str() {
            "draw_sword" => assert!(["left", "right"].contains(&args["hand"].as_str().unwrap()), "{text}"),
            "flee" => assert!((1..=9).contains(&args["steps"].as_i64().unwrap()), "{text}"),
            other => panic!("unlisted function {other}: {text}"),
        }
    }
}

#[test]
fn the_verifier_replays_the_grammar_honest_passes_and_leaving_it_fails() {
    let Some(path) = smollm2() else { return };
    let engine = engine(&path, 2);
    let reference = Model::load(&path, Device::Cpu, Some(Kind::Float)).unwrap();
    let node = Identity::generate();
    let g: std::sync::Arc<str> = grammar(json!({"response_format": npc_schema()})).into();
    let tol = Tolerances::default();
    for (seed, temperature) in [(5u64, 0.0f32), (6, 1.0)] {
        let params = SamplingParams { temperature, seed, grammar: Some(g.clone()), ..Default::default() };
        let p = prompt(&reference, "Who goes there?");
        let (completion, proof) = proved(&engine, &node, run(&p, params.clone(), true), seed);
        let honest = verify(&reference, &proof, &p, &completion, &params, &tol).unwrap();
        assert!(honest.accepted, "honest constrained answer rejected: {honest:?}");
        let unconstrained = SamplingParams { grammar: None, ..params.clone() };
        // A node that ignores the schema: it samples the same way without the mask, and
        // its first token is already prose the grammar forbids.
        let len = completion.len().max(4);
        let request = GenerateRequest { max_tokens: len, min_tokens: len, ..run(&p, unconstrained.clone(), true) };
        let (rogue, rogue_proof) = proved(&engine, &node, request, seed);
        let fair = verify(&reference, &rogue_proof, &p, &rogue, &unconstrained, &tol).unwrap();
        assert!(fair.accepted, "the same run checked without the grammar passes: {fair:?}");
        let caught = verify(&reference, &rogue_proof, &p, &rogue, &params, &tol).unwrap();
        assert!(!caught.accepted, "{caught:?}");
        assert!(caught.reasons.iter().any(|r| r.contains("grammar")), "{:?}", caught.reasons);
    }
}

#[test]
fn grammars_that_cannot_compile_are_refused_with_the_reason() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let compiler = GrammarCompiler::for_tokenizer(&model.tokenizer).unwrap();
    let bad = grammar(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
        "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}}}}));
    assert!(matches!(compiler.compile(&bad), Err(GrammarError::Invalid(_))));
    let too_big = "start: \"a\"\n".repeat(10_000);
    assert!(matches!(compiler.compile(&too_big), Err(GrammarError::Invalid(e)) if e.contains("at most")));
    assert!(compiler.compile(&grammar(json!({"response_format": npc_schema()}))).is_ok());
}

/// The official Python SDK against a real node (tests/python/structured_output.py):
/// `chat.completions.parse` with ten Pydantic models at temperature 1, a tools round trip
/// streamed and not, and 400s that name their field.
#[test]
fn the_openai_sdk_parses_structured_answers_and_round_trips_tools() {
    let Some(python) = crate::helpers::python_with_openai() else { return };
    let Some(path) = smollm2() else { return };
    const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
    let mut cluster = Cluster::start(&format!("model_files = {{ \"{MODEL}\" = \"{}\" }}\n", path.display()));
    cluster.add_node(&["--model", path.to_str().unwrap(), "--capacity", "8"]);
    cluster.wait_nodes(MODEL, 1);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/structured_output.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .env("LUDUS_BASE_URL", format!("http://{}/v1", cluster.addr))
        .env("LUDUS_KEY", &cluster.key)
        .env("LUDUS_MODEL", MODEL)
        .env("LUDUS_RUNS_PER_SCHEMA", "20")
        .output()
        .unwrap();
    crate::helpers::assert_success(&out, "the structured output SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("200 structured answers under 10 schemas all parsed"), "{stdout}");
    assert!(stdout.contains("all structured output checks passed"), "{stdout}");
    // The same through the openai npm package (installed by scripts/setup --test).
    let js_tools = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.ludus/js-tools"));
    if !crate::helpers::required_tool(
        "the openai npm package (scripts/setup --test)",
        js_tools.join("node_modules/openai").exists(),
    ) {
        return;
    }
    let script = js_tools.join(format!("structured-output-{}.mjs", std::process::id()));
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/structured_output.mjs"), &script).unwrap();
    let out = std::process::Command::new("node")
        .arg(&script)
        .env("LUDUS_BASE_URL", format!("http://{}/v1", cluster.addr))
        .env("LUDUS_KEY", &cluster.key)
        .env("LUDUS_MODEL", MODEL)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&script);
    crate::helpers::assert_success(&out, "the structured output npm SDK script");
    assert!(String::from_utf8_lossy(&out.stdout).contains("all structured output checks passed (javascript)"));
}

/// A rogue on a real model's task: the game streams `body` (retrying until the rogue has
/// joined), the rogue answers with `lie(task)`, and the server's reason for cutting it
/// comes back with what the game read. Nothing may be recorded for the rogue.
fn rogue_cut(
    body: Value,
    lie: impl FnOnce(&ludus::protocol::TaskSpec, &Identity) -> Vec<ludus::protocol::NodeMessage>,
) -> Option<(String, String)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    let path = smollm2()?;
    const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
    let cluster = Cluster::start(&format!("model_files = {{ \"{MODEL}\" = \"{}\" }}\n", path.display()));
    let mut body = body;
    body["model"] = MODEL.into();
    body["stream"] = true.into();
    let body = body.to_string();
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let asked = std::sync::Arc::new(AtomicBool::new(false));
    let game = {
        let asked = asked.clone();
        std::thread::spawn(move || loop {
            let mut s = crate::cluster::SseStream::open(&addr, &key, &body);
            if s.status == 200 {
                let mut read = String::new();
                while let Some(data) = s.next_data() {
                    read.push_str(&data);
                }
                return read;
            }
            if asked.load(Ordering::Relaxed) {
                return String::new();
            }
            std::thread::sleep(Duration::from_millis(100));
        })
    };
    let reason = actix_rt::System::new().block_on(async {
        let mut rogue = crate::registry::Rogue::join(&cluster.addr, MODEL).await;
        let spec = rogue.task(&mut []).await;
        asked.store(true, Ordering::Relaxed);
        for m in lie(&spec, &rogue.id) {
            if rogue.link.send(&m).await.is_err() {
                break;
            }
        }
        rogue.goodbye().await
    });
    let read = game.join().unwrap();
    std::thread::sleep(Duration::from_millis(800)); // two blocks
    assert_eq!(crate::database::numbers(&cluster.store(), "SELECT count(*) FROM receipts"), vec![0]);
    Some((reason, read))
}

/// A node that answers a JSON task with prose is cut at the first token the grammar does
/// not allow: the server checks every id against its own copy of the grammar, so the
/// prose never reaches the game and nothing is recorded for the node.
#[test]
fn a_node_that_leaves_the_schema_is_cut_before_the_game_reads_it() {
    use ludus::protocol::NodeMessage;
    let Some(path) = smollm2() else { return };
    let text = ludus::inference::ModelText::load(&path).unwrap();
    let open = text.tokenizer.encode("{", false).unwrap();
    let prose = text.tokenizer.encode("Hello traveller", false).unwrap();
    let body = json!({"max_tokens": 16, "response_format": {"type": "json_object"},
        "messages": [{"role": "user", "content": "Greet the traveller."}]});
    let (reason, read) = rogue_cut(body, |spec, _| {
        assert!(spec.params.grammar.as_deref().is_some_and(|g| g.contains("%json")), "{:?}", spec.params);
        open.iter()
            .chain(&prose)
            .enumerate()
            .map(|(index, &token)| NodeMessage::Token {
                id: spec.id,
                index,
                token,
                text: String::new(),
                logprobs: None,
            })
            .collect()
    })
    .unwrap();
    assert!(reason.contains("leaves its grammar"), "{reason:?}");
    assert!(!read.contains("Hello"), "the game read the rogue's prose: {read}");
}

/// A node that stops inside a structured answer (an object opened, never closed) and
/// signs for it is cut like a failed node: the game never gets a cut-off object as a
/// finished answer, and the receipt is not recorded.
#[test]
fn a_node_that_stops_inside_a_structured_answer_is_cut() {
    use ludus::protocol::{FinishReason, NodeMessage, SignedReceipt, TaskUsage};
    let Some(path) = smollm2() else { return };
    let text = ludus::inference::ModelText::load(&path).unwrap();
    let open = text.tokenizer.encode("{\"line\": \"Halt", false).unwrap();
    let body = json!({"max_tokens": 40, "response_format": {"type": "json_object"},
        "messages": [{"role": "user", "content": "Greet the traveller."}]});
    let (reason, _) = rogue_cut(body, |spec, id| {
        let mut out: Vec<NodeMessage> = open
            .iter()
            .enumerate()
            .map(|(index, &token)| NodeMessage::Token {
                id: spec.id,
                index,
                token,
                text: String::new(),
                logprobs: None,
            })
            .collect();
        let receipt = SignedReceipt::sign(id, spec.ticket.clone(), spec.ticket.prompt.tokens, &open);
        let usage = TaskUsage { prompt_tokens: spec.ticket.prompt.tokens as usize, completion_tokens: open.len() };
        out.push(NodeMessage::Done {
            id: spec.id,
            finish_reason: FinishReason::Stop,
            usage,
            tail: String::new(),
            receipt,
            proof: None,
        });
        out
    })
    .unwrap();
    assert!(reason.contains("before it was complete"), "{reason:?}");
}

/// A job longer than every node's context goes to the largest one, which ends it where its
/// context is full: a structured answer cut there ends at its length (`length`, as OpenAI
/// ends one that runs out of room), is recorded, and costs the node nothing. Before, the
/// server cut such a node off as one that stopped inside the answer, so any game could
/// knock honest nodes off the network with long prompts and a long schema.
#[test]
fn a_node_that_fills_its_context_inside_a_structured_answer_ends_it_at_its_length() {
    use ludus::protocol::{FinishReason, NodeMessage, SignedReceipt, TaskUsage};
    use std::time::Duration;
    let Some(path) = smollm2() else { return };
    const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
    const CONTEXT: usize = ludus::protocol::MIN_CONTEXT as usize;
    let text = ludus::inference::ModelText::load(&path).unwrap();
    let cluster = Cluster::start(&format!("model_files = {{ \"{MODEL}\" = \"{}\" }}\n", path.display()));
    // About 180 prompt tokens and room for 1,000 more: the node's 256 fill first.
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 1000,
        "response_format": {"type": "json_object"},
        "messages": [{"role": "user", "content": "Greet the traveller at the gate. ".repeat(15)}]})
    .to_string();
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let game = std::thread::spawn(move || loop {
        let mut s = crate::cluster::SseStream::open(&addr, &key, &body);
        if s.status == 200 {
            return std::iter::from_fn(|| s.next_data()).collect::<Vec<String>>();
        }
        if std::time::Instant::now() > deadline {
            return vec![format!("no answer: status {}", s.status)];
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    let (reason, prompt, sent) = actix_rt::System::new().block_on(async {
        let mut rogue = crate::registry::Rogue::join(&cluster.addr, MODEL).await;
        rogue.load.context = CONTEXT as u32;
        let spec = rogue.task(&mut []).await;
        let prompt = spec.ticket.prompt.tokens as usize;
        assert!(prompt < CONTEXT - 8, "the prompt ({prompt} tokens) leaves no room");
        // An object opened and a string that runs until the context is full.
        let long = format!("{{\"line\": \"{}", "Halt, who goes there? ".repeat(100));
        let mut answer = text.tokenizer.encode(&long, false).unwrap();
        answer.truncate(CONTEXT - prompt);
        for (index, &token) in answer.iter().enumerate() {
            let m = NodeMessage::Token { id: spec.id, index, token, text: String::new(), logprobs: None };
            rogue.link.send(&m).await.unwrap();
        }
        let receipt = SignedReceipt::sign(&rogue.id, spec.ticket.clone(), spec.ticket.prompt.tokens, &answer);
        let usage = TaskUsage { prompt_tokens: prompt, completion_tokens: answer.len() };
        let done = NodeMessage::Done {
            id: spec.id,
            finish_reason: FinishReason::Length,
            usage,
            tail: String::new(),
            receipt,
            proof: None,
        };
        rogue.link.send(&done).await.unwrap();
        rogue.idle(&mut [], Duration::from_millis(500)).await;
        // The link stays up until the node stops its heartbeats.
        (rogue.goodbye().await, prompt, answer.len())
    });
    assert!(reason.contains("heartbeat timeout"), "a node that filled its context was cut: {reason}");
    let events = game.join().unwrap();
    let chunks: Vec<Value> = events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let ends: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|r| !r.is_null()).collect();
    assert_eq!(ends, [&Value::from("length")], "{events:?}");
    assert!(text.starts_with("{\"line\": \"Halt, who goes there?"), "{text}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(prompt + sent, CONTEXT);
    // Recorded for the node (two blocks).
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(crate::database::numbers(&cluster.store(), "SELECT count(*) FROM receipts"), vec![1]);
}

/// Log probabilities come from the node, so the server bounds their shape on every
/// token (finite, at most 0, best first, as many as asked): a node that sends a
/// probability above 1 or leaves them out is cut before the game reads the value.
#[test]
fn a_node_reporting_impossible_log_probabilities_is_cut() {
    use ludus::inference::logprobs::TokenLogprobs;
    use ludus::protocol::NodeMessage;
    let body = json!({"max_tokens": 8, "logprobs": true, "top_logprobs": 2,
        "messages": [{"role": "user", "content": "Greet the traveller."}]});
    let cases: [(TokenLogprobs, &str); 2] = [
        (TokenLogprobs { logprob: 0.7, top: vec![(42, 0.7), (43, -1.0)] }, "not a finite value at most 0"),
        (TokenLogprobs { logprob: -0.1, top: vec![(43, -2.0), (42, -0.1)] }, "best first"),
    ];
    for (lie, why) in cases {
        let Some((reason, read)) = rogue_cut(body.clone(), |spec, _| {
            assert_eq!(spec.params.logprobs, Some(2));
            vec![NodeMessage::Token { id: spec.id, index: 0, token: 42, text: String::new(), logprobs: Some(lie) }]
        }) else {
            return;
        };
        assert!(reason.contains(why), "{reason:?}");
        assert!(!read.contains("0.7"), "{read}");
    }
}

/// The engine reports what its sampler saw, and the verifier measures a report against the
/// reference: an honest int4 node is within its format's margin, one that flatters its
/// answers (every chosen token a certainty) is not. Under a grammar no masked token is an
/// alternative.
#[test]
fn reported_log_probabilities_are_what_the_sampler_saw_and_the_verifier_measures_them() {
    use ludus::inference::logprobs::TokenLogprobs;
    use ludus::proof::logprob_check::{judge, worst_deviation};
    let Some(path) = smollm2() else { return };
    let int4 = Model::load_quantized(&path, Device::Cpu, None, ludus::inference::Quantization::Int4, None).unwrap();
    let reference =
        Model::load_quantized(&path, Device::Cpu, None, ludus::inference::Quantization::Int4, None).unwrap();
    let format = Format::of(ludus::inference::Quantization::Int4, int4.llama.kind);
    let engine = Engine::start(int4, ludus::inference::EngineConfig { max_batch: 2, ..Default::default() }).unwrap();
    let p = prompt(&reference, "Who goes there?");
    let g: std::sync::Arc<str> = grammar(json!({"response_format": npc_schema()})).into();
    for params in [
        SamplingParams { logprobs: Some(5), ..SamplingParams::greedy() },
        SamplingParams { logprobs: Some(3), temperature: 1.0, seed: 4, grammar: Some(g), ..Default::default() },
    ] {
        let mut rx = engine.submit(GenerateRequest { max_tokens: 24, ..run(&p, params.clone(), false) }).unwrap();
        let (mut ids, mut reported) = (Vec::new(), Vec::new());
        while let Some(event) = rx.blocking_recv() {
            match event {
                ludus::inference::Event::Token { id, logprobs, .. } => {
                    ids.push(id);
                    reported.push(logprobs.expect("asked for"));
                }
                ludus::inference::Event::Done(_) => break,
                other => panic!("{other:?}"),
            }
        }
        for (lp, &id) in reported.iter().zip(&ids) {
            assert!(lp.logprob <= 0.0 && lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "{lp:?}");
            if params.temperature == 0.0 {
                assert_eq!(lp.top[0].0, id, "greedy picks the most likely token");
            }
            if params.grammar.is_some() {
                let text: String = lp.top.iter().map(|&(t, _)| reference.tokenizer.decode(&[t], false)).collect();
                assert!(!text.contains("Hello"), "a masked token among the alternatives: {text}");
            }
        }
        let honest = worst_deviation(&reference, &p, 0, &ids, &params, &reported).unwrap().unwrap();
        eprintln!("log probabilities, honest int4 node: worst deviation {honest:.4}");
        assert!(judge(honest, format, 1.0).is_none(), "honest deviation {honest}");
        // Every value shifted two nats towards certainty.
        let shift = |v: f32| (v + 2.0).min(0.0);
        let flattered: Vec<TokenLogprobs> = reported
            .iter()
            .map(|lp| TokenLogprobs {
                logprob: shift(lp.logprob),
                top: lp.top.iter().map(|&(t, v)| (t, shift(v))).collect(),
            })
            .collect();
        let lied = worst_deviation(&reference, &p, 0, &ids, &params, &flattered).unwrap().unwrap();
        eprintln!("log probabilities shifted by 2 nats: worst deviation {lied:.4}");
        assert!(judge(lied, format, 1.0).is_some(), "a flattering report passed: {lied}");
    }
}

/// Failover under a grammar: a continuation that prefills the first half of an answer as
/// its prefix resumes the grammar there and samples the same second half; a prefix the
/// grammar does not allow is refused.
#[test]
fn a_failover_continuation_resumes_the_grammar_at_the_prefix() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let engine = engine(&path, 2);
    let g: std::sync::Arc<str> = grammar(json!({"response_format": npc_schema()})).into();
    let params = SamplingParams { temperature: 1.0, seed: 11, grammar: Some(g), ..Default::default() };
    let p = prompt(&model, "The dragon is coming!");
    let (ids, text, _) = collect(&engine, run(&p, params.clone(), false));
    assert!(ids.len() >= 6, "{text}");
    let k = ids.len() / 2;
    let resumed = GenerateRequest { prefix: ids[..k].to_vec(), ..run(&p, params.clone(), false) };
    let (rest, _, _) = collect(&engine, resumed);
    assert_eq!(rest, ids[k..].to_vec(), "{text}");
    let prose = model.tokenizer.encode("Hello there", false).unwrap();
    let bad = GenerateRequest { prefix: prose, ..run(&p, params, false) };
    let err = engine.submit(bad).unwrap_err().to_string();
    assert!(err.contains("prefix leaves the grammar"), "{err}");
}

/// `logit_bias` is part of the sampler: the node adds it before sampling and the verifier
/// replays it. A token forced with +100 fills a greedy answer, and that answer passes only
/// when checked with the bias it was asked with.
#[test]
fn logit_bias_is_applied_by_the_node_and_replayed_by_the_verifier() {
    let Some(path) = smollm2() else { return };
    let engine = engine(&path, 2);
    let reference = Model::load(&path, Device::Cpu, Some(Kind::Float)).unwrap();
    let node = Identity::generate();
    let p = prompt(&reference, "Who goes there?");
    let halt = reference.tokenizer.encode(" Halt", false).unwrap()[0];
    let (plain, _, _) = collect(&engine, run(&p, SamplingParams::greedy(), false));
    let banned = plain[0];
    let params = SamplingParams { logit_bias: vec![(banned, -100.0)], ..SamplingParams::greedy() };
    let (ids, _, _) = collect(&engine, run(&p, params, false));
    assert!(!ids.contains(&banned), "a banned token was sampled: {ids:?}");
    let forced = SamplingParams { logit_bias: vec![(halt, 100.0)], ..SamplingParams::greedy() };
    let (completion, proof) =
        proved(&engine, &node, GenerateRequest { max_tokens: 8, ..run(&p, forced.clone(), true) }, 9);
    assert_eq!(completion, vec![halt; 8]);
    let tol = Tolerances::default();
    assert!(verify(&reference, &proof, &p, &completion, &forced, &tol).unwrap().accepted);
    assert!(!verify(&reference, &proof, &p, &completion, &SamplingParams::greedy(), &tol).unwrap().accepted);
}

/// A failover continuation is verified like any task: the verifier carries the penalties'
/// history and the grammar through the prefix earlier nodes generated. Checked as if the
/// prefix were prompt, the same honest continuation fails (its first token is mid-object).
#[test]
fn a_continuation_under_a_grammar_and_penalties_is_verified_through_its_prefix() {
    use ludus::proof::verify::verify_continuation;
    let Some(path) = smollm2() else { return };
    let engine = engine(&path, 2);
    let reference = Model::load(&path, Device::Cpu, Some(Kind::Float)).unwrap();
    let node = Identity::generate();
    let g: std::sync::Arc<str> = grammar(json!({"response_format": npc_schema()})).into();
    let params =
        SamplingParams { temperature: 1.0, seed: 21, frequency_penalty: 0.5, grammar: Some(g), ..Default::default() };
    let p = prompt(&reference, "Can I pass the gate?");
    let (ids, text, _) = collect(&engine, run(&p, params.clone(), false));
    assert!(ids.len() >= 8, "{text}");
    let k = ids.len() / 2;
    let continuation = GenerateRequest { prefix: ids[..k].to_vec(), ..run(&p, params.clone(), true) };
    let (own, proof) = proved(&engine, &node, continuation, 21);
    assert_eq!(own, ids[k..].to_vec());
    let ran: Vec<u32> = p.iter().chain(&ids[..k]).copied().collect();
    let tol = Tolerances::default();
    let verdict = verify_continuation(&reference, &proof, &ran, k, &own, &params, &tol).unwrap();
    assert!(verdict.accepted, "{verdict:?}");
    let blind = verify(&reference, &proof, &ran, &own, &params, &tol).unwrap();
    assert!(!blind.accepted, "without its prefix the grammar starts over: {blind:?}");
}

/// The server checks each token a node sends against the game's grammar without a whole
/// mask per token (`Constraint::check`), and llguidance refills its lexer's budget only
/// when it computes a mask. A review feared that a long answer under a schema making a
/// new lexer state per character would run the budget dry on the way, so that the honest
/// node's next token read as "not allowed" and the node was cut. It does not: 3,000
/// letters under a pattern pass (a costlier pattern is refused when it compiles).
#[test]
fn a_long_answer_under_a_costly_grammar_passes_the_servers_check() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let compiler = GrammarCompiler::for_tokenizer(&model.tokenizer).unwrap();
    let schema = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "string", "pattern": "^[a-z]*$", "minLength": 3000, "maxLength": 3000}}}});
    let mut constraint = compiler.compile(&grammar(schema)).unwrap();
    let letters: String = (0..3000).map(|i| (b'a' + (i * 7 % 26) as u8) as char).collect();
    let ids = model.tokenizer.encode(&format!("\"{letters}\""), false).unwrap();
    for (i, &id) in ids.iter().enumerate() {
        constraint.check(id).unwrap_or_else(|e| panic!("token {i} of {}: {e:?}", ids.len()));
    }
    assert!(constraint.is_complete());
}
