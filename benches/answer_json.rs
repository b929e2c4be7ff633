//! A whole answer's JSON with log probabilities, at the API's largest (`n` 8, 4,096 tokens,
//! `top_logprobs` 20): written straight to bytes ([`WholeAnswer`]) against a `Value` tree
//! first, as the route wrote it before. Time by criterion, and the peak heap each way
//! (above the answers themselves) by a counting allocator, printed once before the timing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{criterion_group, criterion_main, Criterion};
use ludus::actors::catalog::TokenLogprob;
use ludus::http::answer_json::WholeAnswer;
use serde_json::json;

/// The system allocator, counting the bytes held now and the most held since `reset`.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let held = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(held, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const CHOICES: usize = 8;
const TOKENS: usize = 4096;
const TOP: usize = 20;

fn answer() -> WholeAnswer {
    let entry = |i: usize| {
        let token = |j: usize| format!("tok{}", (i * 31 + j) % 997);
        TokenLogprob {
            token: token(0),
            bytes: token(0).into_bytes(),
            logprob: -0.1 * (i % 7) as f32,
            top: (0..TOP).map(|j| (token(j), token(j).into_bytes(), -0.37 * j as f32)).collect(),
        }
    };
    let choices: Vec<_> = (0..CHOICES)
        .map(|index| {
            json!({"index": index, "logprobs": null, "finish_reason": "length",
            "message": {"role": "assistant", "content": "x".repeat(TOKENS * 4)}})
        })
        .collect();
    let body = json!({"id": "chatcmpl-1", "object": "chat.completion", "choices": choices, "usage": {}});
    WholeAnswer::new(body, (0..CHOICES).map(|_| Some((0..TOKENS).map(entry).collect())).collect())
}

/// The heap `f` holds at its most, above what was held when it started, and its result's size.
fn peak_of(f: impl FnOnce() -> Vec<u8>) -> (usize, usize) {
    let base = HELD.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let written = f().len();
    (PEAK.load(Ordering::Relaxed) - base, written)
}

fn whole_answer(c: &mut Criterion) {
    let whole = answer();
    let tree = || serde_json::to_vec(&serde_json::to_value(&whole).unwrap()).unwrap();
    let direct = || serde_json::to_vec(&whole).unwrap();
    assert_eq!(tree(), direct(), "both ways must write the same bytes");
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let base = HELD.load(Ordering::Relaxed);
    let ((tree_peak, size), (direct_peak, _)) = (peak_of(tree), peak_of(direct));
    println!(
        "answer_json: {CHOICES} × {TOKENS} tokens × {TOP} alternatives, {:.1} MiB of answers held, {:.1} MiB written; \
         peak heap above them: tree {:.1} MiB, direct {:.1} MiB ({:.2}×)",
        mib(base),
        mib(size),
        mib(tree_peak),
        mib(direct_peak),
        tree_peak as f64 / direct_peak as f64
    );
    let mut group = c.benchmark_group("whole_answer");
    group.sample_size(10);
    group.bench_function("tree_then_bytes", |b| b.iter(tree));
    group.bench_function("direct", |b| b.iter(direct));
    group.finish();
}

criterion_group!(benches, whole_answer);
criterion_main!(benches);
