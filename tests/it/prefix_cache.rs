//! The prefix cache changes no token: the same requests with and without it give the same
//! ids (greedy and seeded, f32 and int4, one at a time and eight at once) while the cache
//! reports its hits; a prompt cut at its persona's end (as nodes cut chat prompts) reuses
//! the whole persona, with the same tokens and hidden states bit for bit, and is cut in the
//! same place on every turn, only where the template renders the persona whole; a proof
//! made on a cache hit is verified; the cache evicts within its budget. A prompt prefilled
//! alone in several passes of one step gives the bits of the same chunks run step by step
//! (which a cache hit, starting at another chunk, relies on).

use ludus::inference::chat_template::persona_breaks;
use ludus::inference::engine::HIDDEN_TAIL_ROWS;
use ludus::inference::kv_cache::KvCache;
use ludus::inference::llama::{LogitsFor, PrefillChunk};
use ludus::inference::prefix_cache::PrefixStats;
use ludus::inference::{
    ChatMessage, Engine, EngineConfig, Event, GenerateRequest, Model, Quantization, SamplingParams,
};
use tch::{Device, Kind, Tensor};

use crate::helpers::{drain, score_gap, smollm2};

const BLOCK: usize = 64;

/// A persona long enough for several blocks, as games send it.
fn persona() -> String {
    let lore = "The village of Emberfall sits under a sleeping volcano. Its smith, Brakka, \
        has forged blades for three kings and trusts none of them. She speaks in short, \
        gruff sentences, hates haggling, and softens only when someone mentions her late \
        brother Torv, who vanished on the ash road. ";
    format!("You are Brakka, the smith of Emberfall. Stay in character. {}", lore.repeat(6))
}

fn lines() -> Vec<&'static str> {
    vec![
        "How much for a sword?",
        "Have you seen my brother?",
        "Can you fix my shield?",
        "What do you think of the king?",
        "Is the volcano going to wake?",
        "Teach me to forge.",
        "Why so grumpy?",
        "Where is the ash road?",
    ]
}

fn prompt(model: &Model, line: &str) -> Vec<u32> {
    model
        .chat_prompt(&[ChatMessage::new("system", &persona()), ChatMessage::new("user", line)])
        .expect("the chat template renders")
}

/// The request of `line` after the persona, cut where a node cuts it (the persona's end).
fn cut_request(model: &Model, line: &str, params: &SamplingParams, collect_hidden: bool) -> GenerateRequest {
    let messages = [ChatMessage::new("system", &persona()), ChatMessage::new("user", line)];
    let prompt = model.chat_prompt(&messages).unwrap();
    let breaks = persona_breaks(&model.template, &model.tokenizer, &messages, &prompt);
    GenerateRequest { breaks, collect_hidden, ..request(prompt, params) }
}

/// The token ids of an answer, and the hidden states of its prompt's last
/// [`HIDDEN_TAIL_ROWS`] rows as a prover reads them (cached or computed), as bits.
fn ids_and_prompt_tail(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>, prompt_len: usize) -> (Vec<u32>, Vec<u32>) {
    let from = prompt_len.saturating_sub(HIDDEN_TAIL_ROWS);
    let (mut ids, mut tail, mut seen) = (Vec::new(), Vec::new(), 0);
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::PromptCached { rows } => seen += rows,
            Event::PromptHidden { rows, values } => {
                let d = values.len() / rows;
                for row in (seen..seen + rows).filter(|&r| r >= from) {
                    tail.extend(values[(row - seen) * d..(row - seen + 1) * d].iter().map(|v| v.to_bits()));
                }
                seen += rows;
            }
            Event::Token { id, .. } => ids.push(id),
            Event::Done(_) => break,
            Event::Error(e) | Event::Rejected(e) => panic!("generation failed: {e}"),
        }
    }
    assert_eq!(seen, prompt_len, "every prompt row is accounted for");
    (ids, tail)
}

fn start(quantization: Quantization, prefix_cache_bytes: usize, max_batch: usize) -> Engine {
    let path = smollm2().expect("checked by the caller");
    let model = Model::load_quantized(&path, Device::Cpu, None, quantization, None).unwrap();
    let config = EngineConfig {
        max_batch,
        max_context: 1024,
        prefill_chunk: BLOCK,
        threads: 2,
        single_sequence_threads: 0,
        prefix_cache_bytes,
        speculative: ludus::inference::Speculation::OFF,
        draft_model: None,
    };
    Engine::start(model, config).unwrap()
}

fn request(prompt: Vec<u32>, params: &SamplingParams) -> GenerateRequest {
    GenerateRequest { prompt, params: params.clone(), max_tokens: 24, ..Default::default() }
}

fn stats(engine: &Engine) -> PrefixStats {
    engine.load.prefix.lock().unwrap().stats
}

/// Runs `lines` on `engine`, `together` at a time; the token ids of each.
fn run(engine: &Engine, model: &Model, lines: &[&str], params: &SamplingParams, together: usize) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for group in lines.chunks(together) {
        let streams: Vec<_> =
            group.iter().map(|l| engine.submit(request(prompt(model, l), params)).expect("submit")).collect();
        out.extend(streams.into_iter().map(|rx| drain(rx).0));
    }
    out
}

#[test]
fn a_cached_prefix_changes_no_token() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    assert!(prompt(&model, "x").len() > 4 * BLOCK, "the persona spans several blocks");
    let greedy = SamplingParams::greedy();
    let seeded = SamplingParams { temperature: 0.9, top_p: 0.95, seed: 7, ..Default::default() };
    for quantization in [Quantization::None, Quantization::Int4] {
        for (name, params) in [("greedy", &greedy), ("seeded", &seeded)] {
            // One at a time: every request after the first finds the persona cached.
            let (cold, warm) = (start(quantization, 0, 1), start(quantization, 64 << 20, 1));
            let want = run(&cold, &model, &lines()[..4], params, 1);
            let got = run(&warm, &model, &lines()[..4], params, 1);
            assert_eq!(got, want, "{quantization} {name}, batch 1: the cache changed tokens");
            let s = stats(&warm);
            assert!(s.hits == 3 && s.misses == 1 && s.tokens_reused >= 3 * 4 * BLOCK as u64, "{s:?}");
            assert_eq!(stats(&cold), PrefixStats::default(), "the cache is off at 0 bytes");
        }
    }
}

/// Eight at once: each sequence's prefill shares steps with the others' decoding, and a
/// cache hit changes which steps those are. A row's numbers depend slightly on how many
/// rows share its step (int4's kernels more than f32's), so answers may part where two
/// tokens score within that noise, as they already do between batch sizes without any
/// cache (`smollm2_reference::seeded_sampling_is_batch_invariant_up_to_near_ties`): within
/// the tie margin the verifier grants an honest node of that format, and nowhere else.
#[test]
fn eight_at_once_with_a_warm_cache_answer_as_without_it_up_to_near_ties() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let greedy = SamplingParams::greedy();
    let seeded = SamplingParams { temperature: 0.9, top_p: 0.95, seed: 11, ..Default::default() };
    for quantization in [Quantization::None, Quantization::Int4] {
        let reference = Model::load_quantized(&path, Device::Cpu, None, quantization, None).unwrap();
        for (name, params) in [("greedy", &greedy), ("seeded", &seeded)] {
            let (cold, warm) = (start(quantization, 0, 8), start(quantization, 64 << 20, 8));
            // Warm the cache with the persona (another line), then eight lines at once.
            run(&warm, &model, &["Good morning."], params, 1);
            let want = run(&cold, &model, &lines(), params, 8);
            let got = run(&warm, &model, &lines(), params, 8);
            for (i, line) in lines().iter().enumerate() {
                if let Some(k) = want[i].iter().zip(&got[i]).position(|(a, b)| a != b) {
                    let gap =
                        score_gap(&reference, &prompt(&model, line), &want[i][..k], want[i][k], got[i][k], params);
                    let margin = ludus::proof::Format::of(quantization, tch::Kind::Float).tie_margin() as f64;
                    assert!(gap < margin, "{quantization} {name}, batch 8, answer {i}: parted at token {k} by {gap}");
                    eprintln!("{quantization} {name}: answer {i} parted at token {k}, a near-tie (gap {gap:.1e})");
                } else {
                    assert_eq!(want[i], got[i], "{quantization} {name}: answer {i} is shorter");
                }
            }
            assert!(stats(&warm).hits >= 8, "{:?}", stats(&warm));
        }
    }
}

/// The persona ends inside a block and among the rows a proof commits to: cut there, a
/// warm request restores all of it and computes only the player's line, and its tokens
/// and its prompt's last hidden states (from the cache) are those of a cold run, bit for
/// bit, in f32 and int4. Cut only into blocks, the same requests reuse less.
#[test]
fn a_persona_cut_at_its_end_is_reused_whole_with_the_same_tokens_and_hidden_states() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let seeded = SamplingParams { temperature: 0.9, top_p: 0.95, seed: 7, ..Default::default() };
    let first = cut_request(&model, "x", &seeded, true);
    let [cut] = first.breaks[..] else { panic!("one cut, at the persona's end: {:?}", first.breaks) };
    assert!(cut % BLOCK != 0 && cut > 4 * BLOCK, "the persona ends inside a block: {cut}");
    assert!(cut + HIDDEN_TAIL_ROWS > first.prompt.len(), "its end is among the rows whose hidden states a proof reads");
    for quantization in [Quantization::None, Quantization::Int4] {
        let (cold, warm) = (start(quantization, 0, 1), start(quantization, 64 << 20, 1));
        for line in &lines()[..3] {
            let r = cut_request(&model, line, &seeded, true);
            assert_eq!(r.breaks, [cut], "every line cuts the persona at the same place");
            let len = r.prompt.len();
            let want = ids_and_prompt_tail(cold.submit(r.clone()).unwrap(), len);
            let got = ids_and_prompt_tail(warm.submit(r).unwrap(), len);
            assert_eq!(got.0, want.0, "{quantization}: the cache changed tokens");
            assert_eq!(want.1.len(), HIDDEN_TAIL_ROWS * model.llama.config.hidden_size);
            assert!(got.1 == want.1, "{quantization}: the cached hidden states are not the computed ones");
        }
        let s = stats(&warm);
        assert_eq!((s.hits, s.tokens_reused), (2, 2 * cut as u64), "{quantization}: the persona reused whole: {s:?}");
        // Cut only into blocks: the persona's whole blocks, not its end.
        let blocks_only = GenerateRequest { breaks: Vec::new(), ..cut_request(&model, "Hello?", &seeded, true) };
        drain(warm.submit(blocks_only).unwrap());
        let after = stats(&warm);
        assert_eq!(after.tokens_reused - s.tokens_reused, (cut / BLOCK * BLOCK) as u64, "{after:?}");
    }
}

/// A node cuts a chat prompt at its persona's end: its second task with the persona
/// reuses all of it.
#[test]
fn a_node_cuts_a_chat_prompt_at_its_personas_end() {
    use ludus::crypto::identity::Address;
    use ludus::node::Backend;
    use ludus::protocol::receipt::{PromptCount, TaskTicket};
    use ludus::protocol::{TaskId, TaskInput, TaskSpec};
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let backend = std::sync::Arc::new(Backend::Engine(start(Quantization::Int4, 64 << 20, 1)));
    let Backend::Engine(engine) = backend.as_ref() else { unreachable!() };
    let task = |id: u64, line: &str| {
        let count = PromptCount { tokens: 0, exact: false };
        TaskSpec {
            id: TaskId(id),
            model: model.name.clone(),
            input: TaskInput::Chat(vec![ChatMessage::new("system", &persona()), ChatMessage::new("user", line)]),
            params: SamplingParams::greedy(),
            max_tokens: 4,
            stop: Vec::new(),
            prefix: Vec::new(),
            ticket: TaskTicket::issue(&[7; 32], TaskId(id), 1, &model.name, (4, count), &Address([0; 20])),
            challenge: Some(hex::encode([id as u8; 32])),
        }
    };
    for (id, line) in lines()[..2].iter().enumerate() {
        let (rx, prompt_tokens) = backend.start(&task(id as u64, line)).expect("the node runs the task");
        assert_eq!(ids_and_prompt_tail(rx, prompt_tokens).1.len(), HIDDEN_TAIL_ROWS * model.llama.config.hidden_size);
    }
    let cut = cut_request(&model, lines()[1], &SamplingParams::greedy(), false).breaks[0];
    let s = stats(engine);
    assert_eq!((s.hits, s.tokens_reused), (1, cut as u64), "{s:?}");
}

/// A chat prompt is cut once, at its persona's end, and in the same place on every turn of
/// a conversation (a cut at a later message would move with each turn, and the next turn
/// would no longer find this one's blocks); never after a short persona, nor where the
/// template renders the persona alone otherwise than in the prompt (Gemma's folds it into
/// the first user turn: alone, it renders as the BOS token only).
#[test]
fn a_persona_is_cut_at_the_same_place_every_turn_and_only_where_it_renders_whole() {
    use ludus::inference::chat_template::MIN_PERSONA_CUT;
    use ludus::inference::ChatTemplate;
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let turns = [
        vec![ChatMessage::new("system", &persona()), ChatMessage::new("user", lines()[0])],
        vec![
            ChatMessage::new("system", &persona()),
            ChatMessage::new("user", lines()[0]),
            ChatMessage::new("assistant", "Forty crowns. No haggling."),
            ChatMessage::new("user", lines()[1]),
        ],
    ];
    let cuts = |template: &ChatTemplate, messages: &[ChatMessage]| {
        let text = template.render(messages, true).unwrap();
        let prompt = model.tokenizer.encode(&text, false).unwrap();
        (persona_breaks(template, &model.tokenizer, messages, &prompt), prompt.len())
    };
    let (first, len) = cuts(&model.template, &turns[0]);
    let [cut] = first[..] else { panic!("one cut: {first:?}") };
    assert!(cut > 4 * BLOCK && cut < len, "{cut} of {len}");
    assert_eq!(cuts(&model.template, &turns[1]).0, [cut], "the next turn is cut where this one was");
    // A short persona is not worth a pass of its own.
    let short = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", lines()[0])];
    assert!(cuts(&model.template, &short).0.is_empty(), "a persona under {MIN_PERSONA_CUT} tokens");
    // No system turn of its own: alone, the persona renders as the BOS token.
    let gemma_like = ChatTemplate::new(
        Some(
            "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}\
             {% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}\
             {% for m in rest %}<|im_start|>{{ m['role'] }}\n{% if loop.first %}{{ first }}{% endif %}\
             {{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ),
        "<|endoftext|>",
        "<|im_end|>",
    )
    .unwrap();
    let (none, len) = cuts(&gemma_like, &turns[0]);
    assert!(none.is_empty() && len > 4 * BLOCK, "{none:?} in {len} tokens");
    // The persona alone renders with more after it than the prompt has there.
    let closing = ChatTemplate::new(
        Some(
            "{% for m in messages %}{{ m['content'] }}\n{% endfor %}\
             {% if messages|length == 1 %}(nobody has spoken yet){% endif %}",
        ),
        "",
        "",
    )
    .unwrap();
    assert!(cuts(&closing, &turns[0]).0.is_empty(), "a render that is not the prompt's start");
}

#[test]
fn a_proof_made_on_a_cache_hit_is_verified() {
    use ludus::crypto::identity::Identity;
    use ludus::proof::signed::collect_blocking;
    use ludus::proof::{verify, ProofBuilder, Tolerances};
    let Some(path) = smollm2() else { return };
    const {
        assert!(ludus::proof::commitment::CHUNK <= HIDDEN_TAIL_ROWS, "the engine computes every row a proof commits to")
    };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let reference = Model::load(&path, Device::Cpu, None).unwrap();
    let engine = start(Quantization::None, 64 << 20, 1);
    let params = SamplingParams { temperature: 0.7, seed: 3, ..Default::default() };
    let identity = Identity::generate();
    for (i, line) in lines()[..3].iter().enumerate() {
        let challenge = [i as u8 + 1; 32];
        // Cut at the persona's end: the rows a proof commits to come from the cache.
        let r = cut_request(&model, line, &params, true);
        let prompt = r.prompt.clone();
        let rx = engine.submit(r).expect("submit");
        let mut builder = ProofBuilder::new(challenge, ludus::proof::commitment::DEFAULT_TOP_K);
        let completion = collect_blocking(rx, &mut builder).unwrap();
        let proof = builder.finish(&identity, i as u64, &model.name, &completion).expect("a proof");
        assert_eq!(proof.prompt_tokens as usize, prompt.len(), "cached rows count in the prompt");
        let verdict = verify(&reference, &proof, &prompt, &completion, &params, &Tolerances::default()).unwrap();
        assert!(verdict.accepted, "request {i}: {:?}", verdict.reasons);
    }
    let cut = cut_request(&model, "x", &params, true).breaks[0] as u64;
    assert_eq!(
        (stats(&engine).hits, stats(&engine).tokens_reused),
        (2, 2 * cut),
        "the later requests reused the persona"
    );
}

fn block_bytes(model: &Model) -> usize {
    ludus::inference::prefix_cache::PrefixCache::bytes_per_token(&model.llama.config, model.llama.kind) * BLOCK
}

#[test]
fn the_cache_stays_within_its_budget_and_keeps_what_is_used() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    let greedy = SamplingParams::greedy();
    // Room for exactly the first persona's blocks.
    let blocks = (prompt(&model, "Hello.").len() - 1) / BLOCK;
    let engine = start(Quantization::None, blocks * block_bytes(&model), 1);
    // Another persona, longer, that starts differently: it needs every block.
    let other = |line: &str| {
        let system = format!("You are Vessa, the baker, and she knows this smith well. {}", persona());
        model.chat_prompt(&[ChatMessage::new("system", &system), ChatMessage::new("user", line)]).unwrap()
    };
    drain(engine.submit(request(prompt(&model, "Hello."), &greedy)).unwrap());
    drain(engine.submit(request(other("Hello."), &greedy)).unwrap());
    let s = stats(&engine);
    assert!(s.blocks == blocks && s.capacity == blocks, "{s:?}");
    // The second persona evicted the first one's blocks (least recently used): a miss.
    drain(engine.submit(request(prompt(&model, "Again."), &greedy)).unwrap());
    let after = stats(&engine);
    assert_eq!((after.hits, after.misses), (0, 3), "{after:?}");
    // Used again right away, it is a hit.
    drain(engine.submit(request(prompt(&model, "Once more."), &greedy)).unwrap());
    assert_eq!(stats(&engine).hits, 1, "{:?}", stats(&engine));
}

/// A prompt with more blocks than the cache holds keeps its first ones (reuse starts at
/// block 0), and a chain loses its tail before its head.
#[test]
fn a_prompt_longer_than_the_cache_keeps_its_head() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path, Device::Cpu, None).unwrap();
    assert!((prompt(&model, "Hello.").len() - 1) / BLOCK > 3);
    let engine = start(Quantization::None, 3 * block_bytes(&model), 1);
    let greedy = SamplingParams::greedy();
    drain(engine.submit(request(prompt(&model, "Hello."), &greedy)).unwrap());
    drain(engine.submit(request(prompt(&model, "Again."), &greedy)).unwrap());
    let s = stats(&engine);
    assert_eq!((s.hits, s.tokens_reused, s.blocks), (1, 3 * BLOCK as u64, 3), "{s:?}");
}

/// Two scripted nodes of two slots each, one reporting the persona's blocks in its
/// heartbeats: the persona's requests go to it while it has a free slot, then to the other.
#[test]
fn requests_of_one_persona_go_to_the_node_that_holds_it_until_it_is_busy() {
    let Some((to_holder, to_other, metrics)) = route_one_persona(true) else { return };
    assert_eq!((to_holder, to_other), (2, 1), "two to the holder until its slots were full, then the other");
    assert!(metrics.contains("ludus_prefix_routed_total 2"), "{metrics}");
    assert!(metrics.contains("ludus_prefix_cache_requests{result=\"hit\"} 5"), "{metrics}");
}

/// The same with `prefix_routing = false`: no request is routed by its prefix (the nodes'
/// cache counters are still reported).
#[test]
fn with_cache_aware_routing_off_no_request_is_routed_by_its_prefix() {
    let Some((to_holder, to_other, metrics)) = route_one_persona(false) else { return };
    assert_eq!(to_holder + to_other, 3);
    assert!(metrics.contains("ludus_prefix_routed_total 0"), "{metrics}");
    assert!(metrics.contains("ludus_prefix_cache_requests{result=\"hit\"} 5"), "{metrics}");
}

/// Three requests of one persona sent to two scripted nodes, one of which reports holding
/// the persona: how many each got, and `/metrics` after (None without the model file).
fn route_one_persona(prefix_routing: bool) -> Option<(usize, usize, String)> {
    use std::time::{Duration, Instant};

    use ludus::inference::prefix_cache::block_names;
    use ludus::node::link::{join, Announce};
    use ludus::protocol::{NodeLoad, NodeMessage, PrefixHeld, ServerMessage};

    use crate::cluster::Cluster;
    use crate::registry::try_post_chat;

    let path = smollm2()?;
    const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
    let cluster = Cluster::start(&format!(
        "model_files = {{ \"{MODEL}\" = \"{}\" }}\nprefix_routing = {prefix_routing}\n",
        path.display()
    ));
    let text = ludus::inference::ModelText::load(&path).unwrap();
    let messages = |line: &str| vec![ChatMessage::new("system", &persona()), ChatMessage::new("user", line)];
    let ids = text.chat_prompt(&messages(lines()[0])).unwrap();
    let blocks: Vec<String> = block_names(&ids, BLOCK).iter().take(4).map(|n| hex::encode(&n[..8])).collect();
    let holder_load = NodeLoad {
        prefix: PrefixHeld { block: BLOCK as u32, blocks, hits: 5, misses: 1, tokens_reused: 1280 },
        ..NodeLoad::default()
    };
    let (addr, key) = (cluster.addr.clone(), cluster.key.clone());
    let models = move |addr: &str| {
        crate::cluster::raw(addr, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").body
    };
    let game = std::thread::spawn(move || {
        // Both nodes first (their first heartbeats carry their prefix reports).
        crate::cluster::wait_for("both nodes", Duration::from_secs(30), || models(&addr).contains("\"nodes\":2"));
        for line in &lines()[..3] {
            let body = serde_json::json!({"model": MODEL, "max_tokens": 4, "messages": messages(line)}).to_string();
            let (addr, key) = (addr.clone(), key.clone());
            std::thread::spawn(move || try_post_chat(&addr, &key, &body));
            std::thread::sleep(Duration::from_millis(400));
        }
    });
    let (to_holder, to_other, metrics) = actix_rt::System::new().block_on(async {
        let announce = || Announce { models: vec![MODEL.into()], capacity: 2, device: "cpu".into(), bundles: vec![] };
        let url = format!("ws://{}/ws/node", cluster.addr);
        let mut holder = join(&url, &ludus::crypto::identity::Identity::generate(), announce(), None).await.unwrap();
        let mut other = join(&url, &ludus::crypto::identity::Identity::generate(), announce(), None).await.unwrap();
        let (mut to_holder, mut to_other) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(30);
        while to_holder.len() + to_other.len() < 3 && Instant::now() < deadline {
            holder.send(&NodeMessage::Heartbeat(holder_load.clone())).await.unwrap();
            other.send(&NodeMessage::Heartbeat(NodeLoad::default())).await.unwrap();
            if let Ok(ServerMessage::Task(spec)) = holder.recv(Duration::from_millis(25)).await {
                to_holder.push(spec.id);
            }
            if let Ok(ServerMessage::Task(spec)) = other.recv(Duration::from_millis(25)).await {
                to_other.push(spec.id);
            }
        }
        // While both nodes are live (their caches count in /metrics while they are).
        holder.send(&NodeMessage::Heartbeat(holder_load.clone())).await.unwrap();
        let addr = cluster.addr.clone();
        let get = move || crate::cluster::raw(&addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let metrics = actix_rt::task::spawn_blocking(get).await.unwrap();
        (to_holder, to_other, metrics)
    });
    game.join().unwrap();
    assert_eq!(metrics.status, 200);
    Some((to_holder.len(), to_other.len(), metrics.body))
}

/// Chunks of 128 run as passes of one step (`PrefillChunk::pass_rows`, what the engine
/// does while nothing else decodes) against the same chunks one step each: the hidden
/// states, the last logits and the next decoded token's logits (which read the cache the
/// passes wrote) are equal bit for bit, in f32, bf16 and int4, whose last pass of 44 rows
/// goes through the kernel while the others share one unpacked weight. From the start and
/// after a cached block, as a prefix cache hit starts. (All 428 rows as one pass differ
/// from the chunks, already in f32: a row's numbers depend on the rows beside it.)
#[test]
fn passes_of_one_step_give_the_bits_of_chunks_run_one_by_one() {
    let Some(path) = smollm2() else { return };
    const CHUNK: usize = 128;
    fn chunk(tokens: &[u32], start: usize, pass_rows: usize, last: bool) -> PrefillChunk<'_> {
        let logits = if last { LogitsFor::Last } else { LogitsFor::None };
        PrefillChunk { slot: 0, tokens, start, logits, pass_rows }
    }
    let tokens: Vec<u32> = (0..428u32).map(|i| 100 + (i * 37) % 5000).collect();
    let cases = [(None, Quantization::None), (Some(Kind::BFloat16), Quantization::None), (None, Quantization::Int4)];
    for (dtype, quantization) in cases {
        let model = Model::load_quantized(&path, Device::Cpu, dtype, quantization, None).unwrap();
        let llama = &model.llama;
        for from in [0, CHUNK] {
            let cache = || KvCache::new(&llama.config, 1, tokens.len() + 1, Device::Cpu, llama.kind).unwrap();
            // One by one: every chunk a step of its own.
            let (mut one_by_one, mut hidden) = (cache(), Vec::new());
            let mut last_logits = None;
            for start in (0..tokens.len()).step_by(CHUNK) {
                let end = (start + CHUNK).min(tokens.len());
                let c = chunk(&tokens[start..end], start, 0, end == tokens.len());
                let out = llama.step(&mut one_by_one, &[], &[], Some(c)).unwrap().prefill.unwrap();
                hidden.push(out.hidden);
                last_logits = Some(out.logits);
            }
            let hidden = Tensor::cat(&hidden, 0);
            // Passes: the first `from` tokens as a step of their own (a cached block), then
            // the rest in one step.
            let mut passes = cache();
            let mut got = Vec::new();
            if from > 0 {
                got.push(llama.step(&mut passes, &[], &[], Some(chunk(&tokens[..from], 0, 0, false))).unwrap());
            }
            let rest = chunk(&tokens[from..], from, CHUNK, true);
            got.push(llama.step(&mut passes, &[], &[], Some(rest)).unwrap());
            let got_hidden = Tensor::cat(
                &got.iter().map(|o| o.prefill.as_ref().unwrap().hidden.shallow_clone()).collect::<Vec<_>>(),
                0,
            );
            let name = format!("{quantization} {:?} from {from}", llama.kind);
            assert_eq!(got_hidden.size(), hidden.size(), "{name}");
            assert!(got_hidden.equal(&hidden), "{name}: the passes' hidden states differ from the chunks'");
            let got_logits = &got.last().unwrap().prefill.as_ref().unwrap().logits;
            assert!(got_logits.equal(last_logits.as_ref().unwrap()), "{name}: the last logits differ");
            let next = [7u32];
            let position = [tokens.len()];
            let a = llama.decode(&mut one_by_one, &next, &position).unwrap().logits;
            let b = llama.decode(&mut passes, &next, &position).unwrap().logits;
            assert!(a.equal(&b), "{name}: a token decoded after the passes reads another cache");
        }
    }
}
