//! The continuous-batching engine on a tiny model: batching does not change results,
//! cancellation frees slots, stop sequences and limits end sequences, bad requests fail.

use ludus::inference::tiny_model::TinySpec;
use ludus::inference::{Event, FinishReason, GenerateRequest, SamplingParams};

use crate::helpers::{collect, drain, engine, smollm2, tiny};

fn request(prompt: &[u32], params: SamplingParams, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { prompt: prompt.to_vec(), params, max_tokens, min_tokens: max_tokens, ..Default::default() }
}

#[test]
fn a_sequence_gives_the_same_tokens_alone_and_in_a_batch() {
    let t = tiny(&TinySpec::default());
    let engine = engine(&t.gguf, 8);
    let prompt = [10u32, 20, 30, 40];
    for params in [SamplingParams::greedy(), SamplingParams { temperature: 0.9, seed: 1234, ..Default::default() }] {
        let (alone, _, _) = collect(&engine, request(&prompt, params.clone(), 40));
        // Seven other sequences with other prompts and lengths, submitted together.
        let mut others = Vec::new();
        for i in 0..7u32 {
            let p: Vec<u32> = (0..(3 + i * 5)).map(|j| (i * 31 + j * 7) % 250).collect();
            others.push(
                engine
                    .submit(request(&p, SamplingParams { seed: i as u64, ..params.clone() }, 20 + i as usize * 6))
                    .unwrap(),
            );
        }
        let ours = engine.submit(request(&prompt, params.clone(), 40)).unwrap();
        let (batched, _, _) = drain(ours);
        for rx in others {
            drain(rx);
        }
        assert_eq!(alone, batched, "params {params:?}");
    }
}

#[test]
fn dropping_the_receiver_frees_the_slot() {
    let t = tiny(&TinySpec::default());
    let engine = engine(&t.gguf, 1);
    let mut long = engine.submit(request(&[1, 2, 3], SamplingParams::greedy(), 100_000)).unwrap();
    assert!(matches!(long.blocking_recv(), Some(Event::Token { .. })));
    drop(long);
    // With one slot, this only completes if the cancelled sequence left it.
    let (ids, _, done) = collect(&engine, request(&[4, 5, 6], SamplingParams::greedy(), 5));
    assert_eq!(ids.len(), 5);
    assert_eq!(done.reason, FinishReason::Length);
}

#[test]
fn stop_sequences_cut_the_text_and_end_the_stream() {
    let t = tiny(&TinySpec::default());
    let engine = engine(&t.gguf, 2);
    let prompt = [100u32, 101, 102];
    let (_, full, _) = collect(&engine, request(&prompt, SamplingParams::greedy(), 60));
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 20, "need some text: {full:?}");
    let stop: String = chars[12..15].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let mut req = request(&prompt, SamplingParams::greedy(), 60);
    req.stop = vec![stop.clone()];
    let (_, text, done) = collect(&engine, req);
    assert_eq!(text, expected, "stop {stop:?}");
    assert_eq!(done.reason, FinishReason::Stop);
}

#[test]
fn context_overflow_and_bad_requests_fail_cleanly() {
    let t = tiny(&TinySpec::default());
    let engine = engine(&t.gguf, 2);
    assert!(engine.submit(request(&[], SamplingParams::greedy(), 4)).is_err(), "empty prompt");
    let bad = SamplingParams { top_p: 2.0, ..Default::default() };
    assert!(engine.submit(request(&[1], bad, 4)).unwrap_err().to_string().contains("top_p"));
    let too_long: Vec<u32> = (0..300).map(|i| i % 200).collect(); // the tiny model's context is 256
    let mut rx = engine.submit(request(&too_long, SamplingParams::greedy(), 4)).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(Event::Rejected(e)) if e.contains("context")));
    let mut rx = engine.submit(request(&[99_999], SamplingParams::greedy(), 4)).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(Event::Rejected(e)) if e.contains("vocabulary")));
    // The engine still serves afterwards.
    let (ids, _, _) = collect(&engine, request(&[1, 2], SamplingParams::greedy(), 3));
    assert_eq!(ids.len(), 3);
}

#[test]
fn generation_stops_at_the_context_limit() {
    let t = tiny(&TinySpec::default());
    let engine = engine(&t.gguf, 1);
    let prompt: Vec<u32> = (0..250).map(|i| i % 200).collect();
    let (ids, _, done) = collect(&engine, request(&prompt, SamplingParams::greedy(), 100));
    assert_eq!(ids.len(), 6, "256-token context minus a 250-token prompt");
    assert_eq!(done.reason, FinishReason::Length);
}

#[test]
fn failover_prefix_continues_the_same_stream() {
    let t = tiny(&TinySpec::default());
    let engine = engine(&t.gguf, 2);
    let params = SamplingParams { temperature: 0.8, seed: 99, ..Default::default() };
    let prompt = [7u32, 8, 9, 10];
    let (full, _, _) = collect(&engine, request(&prompt, params.clone(), 30));
    // A replacement node gets the prompt plus the 12 tokens already sent.
    let mut resumed = request(&prompt, params, 30);
    resumed.prefix = full[..12].to_vec();
    let (rest, _, done) = collect(&engine, resumed);
    assert_eq!(rest, full[12..].to_vec());
    assert_eq!(done.completion_tokens, 30);
}

/// A stop sequence that spans the failover boundary (its start in the prefix the first
/// node sent, its end in the replacement's first token) ends the continuation, as it ends
/// the text the server reads. The replacement used to start a fresh text and generate
/// past the end, and the server cut it for tokens after the answer's end.
#[test]
fn a_stop_sequence_across_the_failover_prefix_ends_the_continuation() {
    // Real text (the tiny model's is mostly invalid UTF-8), in f32: a continuation's
    // prefill then gives the tokens the first run decoded.
    let Some(path) = smollm2() else { return };
    let engine = engine(&path, 2);
    let prompt = ludus::inference::Model::load(&path, tch::Device::Cpu, None)
        .unwrap()
        .completion_prompt("The old market town was famous for")
        .unwrap();
    let params = SamplingParams::greedy();
    let (full, text, _) = collect(&engine, request(&prompt, params.clone(), 30));
    let (first, first_text, _) = collect(&engine, request(&prompt, params.clone(), 12));
    assert_eq!(first, full[..12].to_vec());
    // The last three characters of the prefix's text and the two that follow, where they
    // occur nowhere else in the answer.
    let cut = first_text.len();
    assert!(text.starts_with(&first_text) && text.len() > cut + 2, "{first_text:?} / {text:?}");
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = chars.iter().position(|&(i, _)| i == cut).expect("a character starts at the cut");
    assert!(at >= 3, "{text:?}");
    let stop: String = chars[at - 3..at + 2].iter().map(|&(_, c)| c).collect();
    assert_eq!(text.matches(&stop).count(), 1, "{stop:?} in {text:?}");

    let mut resumed = request(&prompt, params.clone(), 30);
    resumed.prefix = first;
    resumed.min_tokens = 0;
    resumed.stop = vec![stop.clone()];
    let (rest, _, done) = collect(&engine, resumed);
    assert_eq!(done.reason, FinishReason::Stop, "{stop:?} across the prefix: {} tokens after it", rest.len());
    assert!(!rest.is_empty() && rest.len() <= 2, "{rest:?}");
    assert_eq!(rest, full[12..12 + rest.len()].to_vec());
    // Where the prefix itself holds a stop sequence, the continuation has nothing to do.
    let mut ended = request(&prompt, params, 30);
    ended.prefix = full[..20].to_vec();
    ended.min_tokens = 0;
    ended.stop = vec![stop];
    let (after_end, _, done) = collect(&engine, ended);
    assert!(after_end.is_empty() && done.reason == FinishReason::Stop, "{after_end:?}");
}

#[test]
fn hidden_states_are_reported_when_asked() {
    let t = tiny(&TinySpec::default());
    let engine = engine(&t.gguf, 1);
    let mut req = request(&[1, 2, 3, 4, 5], SamplingParams::greedy(), 3);
    req.collect_hidden = true;
    let mut rx = engine.submit(req).unwrap();
    let (mut prompt_rows, mut token_hidden) = (0, 0);
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::PromptHidden { rows, values } => {
                assert_eq!(values.len(), rows * 64);
                prompt_rows += rows;
            }
            Event::Token { hidden: Some(h), .. } => {
                assert_eq!(h.len(), 64);
                assert!(h.iter().all(|v| v.is_finite()));
                token_hidden += 1;
            }
            Event::Done(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((prompt_rows, token_hidden), (5, 3));
}
