//! The fused batch-1 decode step (`inference::fused_decode`) against libtorch's step, on the
//! real SmolLM2 and on tiny int4 models whose shapes take the kernel's other paths: the same
//! numbers, bit for bit.

use ludus::inference::fused_decode;
use ludus::inference::kv_cache::KvCache;
use ludus::inference::llama::LogitsFor;
use ludus::inference::tiny_model::TinySpec;
use ludus::inference::{Model, Quantization};
use tch::{Device, Kind, Tensor};

use crate::helpers::{smollm2, tiny};

/// One decode step's outputs.
struct Step {
    hidden: Tensor,
    logits: Tensor,
}

/// Prefills `prompt`, then decodes `tokens` one at a time (given, not sampled, so that both
/// steps see the same inputs), with the model as it is.
fn run(model: &Model, prompt: &[u32], tokens: &[u32]) -> (Vec<Step>, KvCache) {
    let llama = &model.llama;
    let mut cache = KvCache::new(&llama.config, 2, 1024, Device::Cpu, llama.kind).unwrap();
    llama.prefill(&mut cache, 0, prompt, 0, LogitsFor::Last).unwrap();
    let mut steps = Vec::new();
    for (i, &t) in tokens.iter().enumerate() {
        let out = llama.decode(&mut cache, &[t], &[prompt.len() + i]).unwrap();
        steps.push(Step { hidden: out.hidden.to_kind(Kind::Float), logits: out.logits });
    }
    (steps, cache)
}

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let llama = &model.llama;
    let mut cache = KvCache::new(&llama.config, 1, 512, Device::Cpu, llama.kind).unwrap();
    let out = llama.prefill(&mut cache, 0, prompt, 0, LogitsFor::Last).unwrap();
    let mut next = out.logits.argmax(-1, false).int64_value(&[0]) as u32;
    let mut tokens = vec![next];
    for i in 0..n - 1 {
        let out = llama.decode(&mut cache, &[next], &[prompt.len() + i]).unwrap();
        next = out.logits.argmax(-1, false).int64_value(&[0]) as u32;
        tokens.push(next);
    }
    tokens
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-12)
}

/// How far a decode run's rows are from the verifier's view of the same tokens (one
/// prefill of prompt and answer): the worst and mean relative hidden-state error, the worst
/// relative logit error, and the steps whose best token differs.
#[derive(Debug)]
struct Distance {
    worst_hidden: f64,
    mean_hidden: f64,
    worst_logits: f64,
    flips: usize,
}

fn distance(steps: &[Step], reference: &(Tensor, Tensor), first: usize) -> Distance {
    let (hidden, logits) = reference;
    let mut d = Distance { worst_hidden: 0.0, mean_hidden: 0.0, worst_logits: 0.0, flips: 0 };
    for (i, s) in steps.iter().enumerate() {
        let row = (first + i) as i64;
        let h = rel(&s.hidden, &hidden.narrow(0, row, 1).to_kind(Kind::Float));
        let l = logits.narrow(0, row, 1);
        d.worst_hidden = d.worst_hidden.max(h);
        d.mean_hidden += h / steps.len() as f64;
        d.worst_logits = d.worst_logits.max(rel(&s.logits, &l));
        d.flips += usize::from(s.logits.argmax(-1, false) != l.argmax(-1, false));
    }
    d
}

/// Runs `tokens` through the fused step and through libtorch's, and checks that every hidden
/// state, every logit and every key and value written is the same, bit for bit. Returns both
/// runs' distance from the verifier's view (one prefill of prompt and answer), which are then
/// equal too.
fn compare(mut model: Model, prompt: &[u32], tokens: &[u32]) -> (Distance, Distance) {
    assert_eq!(model.llama.enable_fused_decode(), Ok(()), "this model should take the fused step");
    let (fused, fused_cache) = run(&model, prompt, tokens);
    model.llama.disable_fused_decode();
    let (plain, plain_cache) = run(&model, prompt, tokens);
    for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
        assert_eq!(f.logits.kind(), Kind::Float);
        assert!(f.hidden.equal(&p.hidden), "step {i}: hidden states differ by {}", rel(&f.hidden, &p.hidden));
        assert!(f.logits.equal(&p.logits), "step {i}: logits differ by {}", rel(&f.logits, &p.logits));
    }
    // The keys and values written by the decode steps (the next steps' inputs, and what a
    // prefix cache may keep).
    let written = (prompt.len() + tokens.len()) as i64;
    let (fk, fv) = fused_cache.layers();
    let (pk, pv) = plain_cache.layers();
    for (l, (f, p)) in fk.iter().zip(pk).chain(fv.iter().zip(pv)).enumerate() {
        let (f, p) = (f.narrow(0, 0, 1).narrow(2, 0, written), p.narrow(0, 0, 1).narrow(2, 0, written));
        assert!(f.equal(&p), "cache {l} differs by {}", rel(&f.to_kind(Kind::Float), &p.to_kind(Kind::Float)));
    }
    assert_eq!(fused_cache.len(0), written as usize);
    let all: Vec<u32> = prompt.iter().chain(tokens).copied().collect();
    let llama = &model.llama;
    let mut cache = KvCache::new(&llama.config, 1, 1024, Device::Cpu, llama.kind).unwrap();
    let out = llama.prefill(&mut cache, 0, &all, 0, LogitsFor::All).unwrap();
    let reference = (out.hidden, out.logits);
    (distance(&fused, &reference, prompt.len()), distance(&plain, &reference, prompt.len()))
}

/// Whether this machine's libtorch packs int4 for its AVX-512 or AVX2 kernel, where the
/// fused step runs; says why not, and checks that the step then stays off, where it does not.
fn fused_step_runs_here() -> bool {
    let t = tiny(&TinySpec::default());
    let mut model = Model::load_quantized(&t.gguf, Device::Cpu, None, Quantization::Int4, None).unwrap();
    match model.llama.enable_fused_decode() {
        Ok(()) => {
            eprintln!("the fused step runs here, on libtorch's {:?}", ludus::inference::int4_prefill::layout());
            true
        }
        Err(why) => {
            assert!(why.contains("plain int4 kernel") || why.contains("not a known one"), "{why}");
            assert!(model.llama.fused_decode().is_err());
            eprintln!("the fused step does not run on this CPU: {why}");
            false
        }
    }
}

#[test]
fn smollm2s_fused_step_is_libtorchs_step_bit_for_bit() {
    let Some(path) = smollm2() else { return };
    if !fused_step_runs_here() {
        return;
    }
    let model = Model::load_quantized(&path, Device::Cpu, None, Quantization::Int4, None).unwrap();
    let prompt = model.completion_prompt("The capital of France is Paris. The capital of Italy is").unwrap();
    let tokens = greedy(&model, &prompt, 48);
    let (fused, plain) = compare(model, &prompt, &tokens);
    eprintln!("SmolLM2 int4 against the verifier's prefill: fused {fused:?}, libtorch {plain:?}");
    // And the answer reads as SmolLM2's (a wrong rotation, position or scale gives errors of
    // whole units, on both paths alike if the fault were shared).
    assert!(fused.worst_hidden < 0.08, "{fused:?}");
}

#[test]
fn tiny_int4_models_of_other_shapes_match_too() {
    if !fused_step_runs_here() {
        return;
    }
    // 80 = a full 64-row block and a partial one; one KV head for four query heads; a
    // hidden width that is not a multiple of 64; a cache longer than one of the attention
    // kernel's 512-key blocks; 48 query, key and value rows (heads of 8): a partial block
    // for either kernel, and for AVX2's (32-row blocks) a 16-row one.
    for (spec, prompt_len) in [
        (
            TinySpec {
                layers: 2,
                hidden: 32,
                heads: 4,
                kv_heads: 1,
                ffn: 64,
                context: 1024,
                seed: 13,
                ..Default::default()
            },
            50,
        ),
        (
            TinySpec {
                layers: 2,
                hidden: 96,
                heads: 6,
                kv_heads: 2,
                ffn: 160,
                context: 1024,
                seed: 11,
                ..Default::default()
            },
            37,
        ),
        (
            TinySpec {
                layers: 3,
                hidden: 64,
                heads: 4,
                kv_heads: 1,
                ffn: 128,
                context: 1024,
                seed: 12,
                ..Default::default()
            },
            500,
        ),
    ] {
        let t = tiny(&spec);
        let model = Model::load_quantized(&t.gguf, Device::Cpu, None, Quantization::Int4, None).unwrap();
        let prompt: Vec<u32> = (0..prompt_len).map(|i| ((i + 3) * 7 % 200) as u32).collect();
        let tokens: Vec<u32> = (0..30).map(|i| (i * 13 % 200) as u32).collect();
        let (fused, plain) = compare(model, &prompt, &tokens);
        eprintln!("tiny {spec:?}: fused {fused:?}, libtorch {plain:?}");
        assert!(fused.worst_hidden < 0.05, "{fused:?}");
    }
}

/// Desktop CPUs without AVX-512 run libtorch's AVX2 kernels: int4 packed in 32-row blocks,
/// dequantized and summed in another order. The fused step follows those too. Checked on any
/// CPU with AVX2 by running this file's exactness tests again in a process whose libtorch is
/// held to its AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`, read when libtorch starts).
#[test]
fn the_fused_step_is_libtorchs_step_with_its_avx2_kernels_too() {
    // The child itself, or a run already held to one set of kernels.
    if std::env::var_os("ATEN_CPU_CAPABILITY").is_some() {
        return;
    }
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
        eprintln!("no AVX2 here: libtorch's AVX2 kernels cannot run");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["fused_decode::", "--test-threads", "1", "--nocapture"])
        .env("ATEN_CPU_CAPABILITY", "avx2")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the exactness tests failed on libtorch's AVX2 kernels:\n{text}");
    // They ran, on the AVX2 packing, rather than skipping.
    assert!(text.contains("PackLayout { block_rows: 32, halves: true }"), "{text}");
    assert!(!text.contains("does not run on this CPU"), "{text}");
    assert!(text.contains("tiny TinySpec"), "{text}");
    if smollm2().is_some() {
        assert!(text.contains("SmolLM2 int4 against the verifier's prefill"), "{text}");
    }
}

/// The int4 products alone, against libtorch's kernel on the same packed weight: equal in
/// every output, over enough outputs that a product in another order, or a weight
/// dequantized as the other kernel does, shows (such differences reach a bf16 output about
/// once in 10,000). 48 rows: for AVX-512 (64-row blocks) a partial block of 48, for AVX2
/// (32-row blocks) a full one and a partial one of 16, whose layout and arithmetic no real
/// model's step takes otherwise. Run on AVX2 kernels too, by the test above.
#[test]
fn int4_products_are_libtorchs_kernel_bit_for_bit_partial_blocks_too() {
    if !fused_step_runs_here() {
        return;
    }
    tch::manual_seed(21);
    let (group, k) = (32i64, 128i64);
    for n in [48i64, 304] {
        let codes = Tensor::randint(16, [n, k], (Kind::Int, Device::Cpu));
        let packed = codes.internal_convert_weight_to_int4pack_for_cpu(2).contiguous();
        // Scales some 20 binary orders below their zeros: the two kernels' dequantizations
        // (AVX2 folds -8 * scale into the zero first) then part in the last bit of many
        // weights. With a real model's scales and zeros (a few orders apart) both are exact,
        // and the products alone could not tell the kernels apart.
        let scales = Tensor::rand([k / group, n, 1], (Kind::Float, Device::Cpu)) * 1e-6 + 1e-7;
        let zeros = Tensor::randn([k / group, n, 1], (Kind::Float, Device::Cpu));
        let scales_zeros = Tensor::cat(&[scales, zeros], 2).to_kind(Kind::BFloat16).contiguous();
        let x = Tensor::randn([16000, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let theirs = x.internal_weight_int4pack_mm_for_cpu(&packed, group, &scales_zeros);
        let ours = fused_decode::q4_product(&packed, &scales_zeros, group, &x).unwrap();
        let differ = ours.ne_tensor(&theirs).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(differ, 0, "{differ} of {} outputs differ from libtorch's kernel (n = {n})", 16000 * n);
    }
    // A weight that is not what it says is an error, not a read past it.
    let x = Tensor::zeros([1, 64], (Kind::BFloat16, Device::Cpu));
    let packed = Tensor::zeros([16], (Kind::Uint8, Device::Cpu));
    let scales_zeros = Tensor::zeros([2, 48, 2], (Kind::BFloat16, Device::Cpu));
    let err = fused_decode::q4_product(&packed, &scales_zeros, 32, &x).unwrap_err();
    assert!(err.to_string().contains("does not fit scales"), "{err}");
}

#[test]
fn the_norms_sum_in_libtorchs_order() {
    // Every width a model may have (up to 28,672, Llama 70B's widest), against libtorch's own
    // sum of the same row: equal, not close (a sum in another order differs in its last bit about half the time).
    let mut differ = Vec::new();
    for n in (8..300).chain((300..5000).step_by(37)).chain([8192, 16384, 28672]) {
        for seed in 0..3 {
            tch::manual_seed(seed * 7919 + n);
            let row = Tensor::rand([1, n], (Kind::Float, Device::Cpu)) * 3.0;
            let values: Vec<f32> = Vec::<f32>::try_from(row.flatten(0, -1)).unwrap();
            let theirs = row.sum_dim_intlist(-1, false, Kind::Float).double_value(&[0]) as f32;
            if fused_decode::row_sum(&values) != theirs {
                differ.push(n);
            }
        }
    }
    assert!(differ.is_empty(), "widths whose sum differs from libtorch's: {differ:?}");
}

#[test]
fn models_the_fused_step_does_not_compute_stay_on_libtorch_and_say_why() {
    let t = tiny(&TinySpec::default());
    let mut f32_model = Model::load(&t.gguf, Device::Cpu, None).unwrap();
    let why = f32_model.llama.enable_fused_decode().unwrap_err();
    assert!(why.contains("only int4"), "{why}");
    assert!(f32_model.llama.fused_decode().is_err());
    // On by default ([engine] fused_decode) where the CPU allows, off where asked.
    if fused_step_runs_here() {
        let mut int4 = Model::load_quantized(&t.gguf, Device::Cpu, None, Quantization::Int4, None).unwrap();
        assert_eq!(int4.llama.fused_decode(), Ok(()));
        int4.llama.disable_fused_decode();
        assert!(int4.llama.fused_decode().unwrap_err().contains("off"));
        assert_eq!(int4.llama.enable_fused_decode(), Ok(()));
    }
    assert_eq!(fused_decode::parse_setting("off"), Ok(false));
    assert_eq!(fused_decode::parse_setting("on"), Ok(true));
    assert!(fused_decode::parse_setting("fast").unwrap_err().contains("\"on\" or \"off\""));
}

#[test]
fn a_position_past_the_cache_is_refused_not_written() {
    if !fused_step_runs_here() {
        return;
    }
    let t = tiny(&TinySpec::default());
    let mut model = Model::load_quantized(&t.gguf, Device::Cpu, None, Quantization::Int4, None).unwrap();
    model.llama.enable_fused_decode().unwrap();
    let llama = &model.llama;
    let mut cache = KvCache::new(&llama.config, 1, 16, Device::Cpu, llama.kind).unwrap();
    let err = llama.decode(&mut cache, &[5], &[16]).err().expect("position 16 of a 16-long cache");
    assert!(err.to_string().contains("16"), "{err}");
    assert_eq!(cache.len(0), 0);
    // A token outside the vocabulary is an error too, not a read past the table.
    let err = llama.decode(&mut cache, &[llama.config.vocab_size as u32 + 5], &[0]).err().expect("a bad token");
    assert!(err.to_string().contains("out of range"), "{err}");
    assert_eq!(cache.len(0), 0);
}
