//! Criterion benches of the node link's sealing: seal and open of 1 KB and 64 KB frames
//! with the session keys (AES-256-GCM-SIV), and the secp256k1 handshake signature.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ludus::crypto::identity::{recover, Identity};
use ludus::crypto::session::{KeyExchange, Role};

fn seal_open(c: &mut Criterion) {
    let node = KeyExchange::new();
    let dist = KeyExchange::new();
    let (np, dp) = (node.public, dist.public);
    let mut a = node.finish(Role::Node, &dp, b"bench nonce", 1).unwrap();
    let mut b = dist.finish(Role::Distributor, &np, b"bench nonce", 1).unwrap();
    let mut group = c.benchmark_group("session");
    for size in [1024usize, 64 * 1024] {
        let payload = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal", size), &payload, |bench, p| bench.iter(|| a.sealer.seal(p)));
        group.bench_with_input(BenchmarkId::new("seal_then_open", size), &payload, |bench, p| {
            bench.iter(|| {
                let (seq, sealed) = a.sealer.seal(p);
                b.opener.open(seq, &sealed).unwrap()
            })
        });
    }
    group.finish();
    let id = Identity::generate();
    let mut group = c.benchmark_group("handshake");
    group.bench_function("sign", |bench| bench.iter(|| id.sign(b"transcript")));
    let sig = id.sign(b"transcript");
    group.bench_function("recover", |bench| bench.iter(|| recover(b"transcript", &sig).unwrap()));
    group.finish();
}

criterion_group!(benches, seal_open);
criterion_main!(benches);
