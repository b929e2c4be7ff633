//! Registry ingest: receipts per second committed into a local Postgres (a throwaway
//! private cluster, fsync and synchronous commit on, as shipped), one block per commit,
//! through the same `Store::commit_block` the Registry actor calls. Also: a block made
//! only of re-sent receipts (the crash-recovery path), and the receipt checks a NodeProxy
//! runs per receipt (ticket MAC + secp256k1 signature recovery).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ludus::crypto::identity::Identity;
use ludus::ledger::cluster::PrivateCluster;
use ludus::ledger::{Receipt, Store, Units};
use ludus::protocol::{SignedReceipt, TaskId, TaskTicket};

/// `n` receipts from 50 nodes, with fresh task ids from `next`.
fn receipts(n: usize, next: &mut u64, game: i64) -> Vec<Receipt> {
    (0..n)
        .map(|i| {
            *next += 1;
            let mut hash = [0u8; 32];
            hash[..8].copy_from_slice(&next.to_be_bytes());
            Receipt {
                task: *next,
                game_id: game,
                node: format!("0x{:040x}", i % 50),
                model: "SmolLM2-135M-Instruct.Q4_1".into(),
                prompt_tokens: 120,
                completion_tokens: 64,
                price: Units(2_480_000_000_000_000),
                latency_ms: 900,
                output_hash: hash,
                receipt_hash: hash,
                signature: vec![0x11; 65],
                // What a real receipt's signed bytes weigh (domain, ticket, MAC, counts, hash).
                signed_bytes: vec![0x22; 274],
                witnessed: true,
            }
        })
        .collect()
}

fn commit(c: &mut Criterion) {
    let cluster = PrivateCluster::throwaway().expect("a private Postgres cluster (run scripts/setup)");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = rt.block_on(Store::open(&cluster.url("postgres"), 4)).unwrap();
    let (game, _) = rt.block_on(store.add_game("bench", 1, 1)).unwrap();
    let mut next = 0u64;
    let mut group = c.benchmark_group("registry_commit");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    for n in [1_000usize, 10_000, 100_000] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("new_receipts", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch = receipts(n, &mut next, game);
                    let started = Instant::now();
                    let outcome = rt.block_on(store.commit_block(&batch, "bench")).unwrap();
                    total += started.elapsed();
                    assert_eq!(outcome.recorded, n);
                }
                total
            })
        });
    }
    // Re-sent receipts (after a server crash): all duplicates, nothing recorded.
    let n = 10_000;
    let resent = receipts(n, &mut next, game);
    rt.block_on(store.commit_block(&resent, "bench")).unwrap();
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(BenchmarkId::new("resent_receipts", n), |b| {
        b.iter(|| {
            let outcome = rt.block_on(store.commit_block(&resent, "bench")).unwrap();
            assert_eq!((outcome.recorded, outcome.duplicates), (0, n));
        })
    });
    group.finish();
}

fn check(c: &mut Criterion) {
    let node = Identity::generate();
    let secret = [3u8; 32];
    let ticket = TaskTicket::issue(
        &secret,
        TaskId(1),
        1,
        "model",
        (64, ludus::protocol::PromptCount { tokens: 120, exact: true }),
        &node.address,
    );
    let receipt = SignedReceipt::sign(&node, ticket, 120, &[1; 64]);
    c.bench_function("receipt_check", |b| b.iter(|| receipt.check(&secret, &node.address).unwrap()));
}

criterion_group!(benches, commit, check);
criterion_main!(benches);
