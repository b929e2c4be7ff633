//! Criterion benches of the inference hot paths: one decode step of the model at batch 1
//! and 8 (SmolLM2 when `scripts/setup` fetched it, else a tiny random model), a 128-token
//! prefill, the seeded sampler over a 49k vocabulary, and tokenization; and one int4
//! projection of SmolLM2's MLP shape by rows, through libtorch's int4 kernel and through
//! the unpacked weight (`inference::int4_prefill`), which sets where the engine switches.
//! End-to-end engine figures come from `ludus bench decode` (see docs/benchmarks.md).

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ludus::inference::kv_cache::KvCache;
use ludus::inference::llama::LogitsFor;
use ludus::inference::sampling::{sample, SamplingParams};
use ludus::inference::tiny_model::{write_gguf, TinySpec};
use ludus::inference::Model;
use tch::Device;

fn load_model() -> (Model, Option<tempfile::TempDir>) {
    tch::set_num_threads(2);
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if real.exists() {
        return (Model::load(&real, Device::Cpu, None).expect("SmolLM2 loads"), None);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tiny.gguf");
    let spec =
        TinySpec { layers: 4, hidden: 256, heads: 8, kv_heads: 4, ffn: 512, context: 1024, ..TinySpec::default() };
    write_gguf(&path, &spec).expect("tiny model");
    (Model::load(&path, Device::Cpu, None).expect("tiny model loads"), Some(dir))
}

fn model_benches(c: &mut Criterion) {
    let (model, _dir) = load_model();
    let _guard = tch::no_grad_guard();
    let prompt: Vec<u32> = (0..128u32).map(|i| 100 + i * 13 % 5000).collect();
    let mut group = c.benchmark_group("model");
    group.sample_size(20).measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(2));
    for batch in [1usize, 8] {
        let mut cache = KvCache::new(&model.llama.config, batch, 512, Device::Cpu, model.llama.kind).unwrap();
        for slot in 0..batch {
            model.llama.prefill(&mut cache, slot, &prompt[..64], 0, LogitsFor::None).unwrap();
        }
        let tokens = vec![42u32; batch];
        let positions = vec![64usize; batch];
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("decode_step", batch), &batch, |b, _| {
            // Re-decoding position 64 keeps the cache length fixed across iterations.
            b.iter(|| model.llama.decode(&mut cache, &tokens, &positions).unwrap())
        });
    }
    let mut cache = KvCache::new(&model.llama.config, 1, 512, Device::Cpu, model.llama.kind).unwrap();
    group.throughput(Throughput::Elements(prompt.len() as u64));
    group.bench_function("prefill_128", |b| {
        b.iter(|| model.llama.prefill(&mut cache, 0, &prompt, 0, LogitsFor::Last).unwrap())
    });
    group.finish();
}

/// `[rows, 576] x [576, 3072]^T` (SmolLM2's fused gate and up projection) in int4.
fn int4_product_benches(c: &mut Criterion) {
    use ludus::inference::int4_prefill;
    use ludus::inference::qlinear::{Linear, Quantization, INT4_GROUP};
    use tch::{Kind, Tensor};
    tch::set_num_threads(2);
    let Some(layout) = int4_prefill::layout() else { return };
    tch::manual_seed(1);
    let w = Tensor::randn([3072, 576], (Kind::Float, Device::Cpu)) * 0.05;
    let Linear::Int4(int4) = Linear::new(w, Quantization::Int4, Device::Cpu, Kind::BFloat16).unwrap() else {
        unreachable!("an int4 layer")
    };
    let (packed, scales_zeros) = int4.parts();
    let mut group = c.benchmark_group("int4_gate_up");
    for rows in [8i64, 16, 32, 64, 128, 256] {
        let x = Tensor::randn([rows, 576], (Kind::BFloat16, Device::Cpu));
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_with_input(BenchmarkId::new("kernel", rows), &rows, |b, _| {
            b.iter(|| x.internal_weight_int4pack_mm_for_cpu(packed, INT4_GROUP, scales_zeros))
        });
        for (name, product) in
            [("unpacked_bf16", int4_prefill::Product::SplitBf16), ("unpacked_f32", int4_prefill::Product::F32)]
        {
            group.bench_with_input(BenchmarkId::new(name, rows), &rows, |b, _| {
                b.iter(|| int4_prefill::matmul_t(&x, packed, scales_zeros, INT4_GROUP, layout, product).unwrap())
            });
        }
    }
    group.bench_function("unpack_only", |b| {
        b.iter(|| int4_prefill::split_weight(packed, scales_zeros, INT4_GROUP, layout).unwrap())
    });
    group.finish();
}

fn sampler_benches(c: &mut Criterion) {
    let logits: Vec<f32> =
        (0..49_152u32).map(|i| ((i.wrapping_mul(2_654_435_761) >> 16) % 2000) as f32 / 100.0 - 10.0).collect();
    let mut group = c.benchmark_group("sampling");
    let greedy = SamplingParams::greedy();
    group.bench_function("greedy_49k", |b| b.iter(|| sample(&logits, &greedy, 7)));
    let seeded = SamplingParams { temperature: 0.8, top_p: 0.95, seed: 1, ..Default::default() };
    group.bench_function("top_p_49k", |b| b.iter(|| sample(&logits, &seeded, 7)));
    group.finish();
}

fn tokenizer_benches(c: &mut Criterion) {
    let (model, _dir) = load_model();
    let text = "The blacksmith looked up from the anvil. \"Another sword? That'll be 30 gold, traveller.\" ".repeat(20);
    let mut group = c.benchmark_group("tokenizer");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("encode", |b| b.iter(|| model.tokenizer.encode(&text, false).unwrap()));
    group.finish();
}

criterion_group!(benches, model_benches, int4_product_benches, sampler_benches, tokenizer_benches);
criterion_main!(benches);
