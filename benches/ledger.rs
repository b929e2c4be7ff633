//! Registry ingest: receipts per second committed into a local Postgres (a throwaway
//! private cluster, fsync and synchronous commit on, as shipped), one block per commit,
//! through the same `Store::commit_block` the Registry actor calls. Also: a block made
//! only of re-sent receipts (the crash-recovery path), and the receipt checks a NodeProxy
//! runs per receipt (ticket MAC + secp256k1 signature recovery).
//!
//! First it prints the anchor every figure is read against: a raw text `COPY` of the same
//! receipt-shaped rows into a bare table (no key, no index, no constraint; the COPY text
//! built beforehand, as `psql \copy` reads a file) on the same cluster, interleaved with
//! `commit_block` rounds, as ratios, with the CPU model.

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
                sampled: false,
            }
        })
        .collect()
}

/// The same rows as COPY text for the bare table (block 0), built outside the timing.
fn raw_copy_text(receipts: &[Receipt]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(receipts.len() * 900);
    for r in receipts {
        let _ = writeln!(
            out,
            "{}\t0\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t\\\\x{}\t\\\\x{}\t\\\\x{}\t\\\\x{}",
            r.task as i64,
            r.game_id,
            r.node,
            r.model,
            r.prompt_tokens,
            r.completion_tokens,
            r.price,
            r.latency_ms,
            hex::encode(r.output_hash),
            hex::encode(r.receipt_hash),
            hex::encode(&r.signature),
            hex::encode(&r.signed_bytes),
        );
    }
    out
}

const BARE_TABLE: &str = "CREATE TABLE IF NOT EXISTS raw_receipts (
    task_id BIGINT, block BIGINT, game_id BIGINT, node_address TEXT, model TEXT, prompt_tokens INTEGER,
    completion_tokens INTEGER, price_units NUMERIC(78, 0), latency_ms INTEGER, output_hash BYTEA,
    receipt_hash BYTEA, node_signature BYTEA, signed_bytes BYTEA)";

/// Seconds for one raw COPY of `text` into the bare table.
async fn raw_copy(store: &Store, text: String) -> f64 {
    use futures_util::SinkExt;
    let conn = store.conn().await.unwrap();
    let started = Instant::now();
    let sink = conn.copy_in::<_, bytes::Bytes>("COPY raw_receipts FROM STDIN").await.unwrap();
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from(text)).await.unwrap();
    sink.as_mut().finish().await.unwrap();
    started.elapsed().as_secs_f64()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Raw COPY vs `commit_block` (new and re-sent blocks), interleaved round by round on the
/// same cluster, printed as ratios, for blocks of 1,000, 10,000 and 100,000 receipts.
fn versus_raw_copy(rt: &tokio::runtime::Runtime, store: &Store, game: i64, next: &mut u64) {
    rt.block_on(async { store.conn().await.unwrap().batch_execute(BARE_TABLE).await.unwrap() });
    eprintln!("registry ingest on {}, median of interleaved rounds, receipts/s:", cpu_model());
    eprintln!("  {:>7}  {:>9}  {:>9} {:>6}  {:>9} {:>6}", "block", "raw COPY", "new", "ratio", "re-sent", "ratio");
    for (n, rounds) in [(1_000usize, 15), (10_000, 7), (100_000, 3)] {
        let (mut raw, mut new, mut resent) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let batch = receipts(n, next, game);
            raw.push(rt.block_on(raw_copy(store, raw_copy_text(&batch))));
            let started = Instant::now();
            assert_eq!(rt.block_on(store.commit_block(&batch, "bench")).unwrap().recorded, n);
            new.push(started.elapsed().as_secs_f64());
            let started = Instant::now();
            assert_eq!(rt.block_on(store.commit_block(&batch, "bench")).unwrap().duplicates, n);
            resent.push(started.elapsed().as_secs_f64());
        }
        let rate = |v: Vec<f64>| n as f64 / median(v);
        let (raw, new, resent) = (rate(raw), rate(new), rate(resent));
        eprintln!(
            "  {n:>7}  {raw:>9.0}  {new:>9.0} {:>5.0}%  {resent:>9.0} {:>5.0}%",
            100.0 * new / raw,
            100.0 * resent / raw
        );
    }
    let (bytes, rows): (i64, i64) = rt.block_on(async {
        let conn = store.conn().await.unwrap();
        conn.batch_execute("VACUUM ANALYZE receipts").await.unwrap();
        let r = conn.query_one("SELECT pg_total_relation_size('receipts'), count(*) FROM receipts", &[]).await.unwrap();
        (r.get(0), r.get(1))
    });
    eprintln!("  storage: {} bytes per receipt, indexes included ({rows} receipts)", bytes / rows.max(1));
}

fn commit(c: &mut Criterion) {
    let cluster = PrivateCluster::throwaway().expect("a private Postgres cluster (run scripts/setup)");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = rt.block_on(Store::open(&cluster.url("postgres"), 4)).unwrap();
    let (game, _) = rt.block_on(store.add_game("bench", 1, 1)).unwrap();
    let mut next = 0u64;
    versus_raw_copy(&rt, &store, game, &mut next);
    if std::env::var_os("LUDUS_BENCH_RATIO_ONLY").is_some() {
        return;
    }
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
