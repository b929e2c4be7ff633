//! A lone sequence's decode step in one call (`csrc/fused_decode.cpp`), for int4 Llama
//! models on the CPU.
//!
//! At batch 1 a CPU step costs more in libtorch's per-operation overhead than in the
//! weights' bytes: about 400 small operations a token, half the step (docs/benchmarks.md,
//! "Where a batch-1 step goes"). The fused step computes [`super::llama::Llama::step`]'s
//! arithmetic in one call over the same memory: the int4 weights as libtorch packed them
//! (read in place, no copy), the int8 vocabulary table and the bf16 KV cache.
//!
//! It gives libtorch's step bit for bit: the same hidden states, logits and cache entries
//! (tests/it/fused_decode.rs). Each product and sum follows the order of libtorch's own
//! kernel (the int4 and int8 products, the norms' sums), attention and SiLU call libtorch's
//! own CPU kernels, and values round to bf16 wherever that path holds a bf16 tensor. So
//! nothing downstream can tell the two apart: greedy and seeded outputs, the proofs of inference and their calibration, speculative decoding's checks and the prefix
//! cache are those of libtorch's step. (A first version summed in orders of its own: it was
//! as close to the verifier on average, but one honest task in 150 went over int4's value
//! limit in the proof calibration; docs/benchmarks.md, "Fused batch-1 decode".)
//!
//! Taken only where it computes exactly that model: CPU, bf16 activations, every projection
//! int4 in the packing of libtorch's AVX-512 or AVX2 kernel ([`super::int4_prefill::layout`],
//! which also says which kernel's order the products follow; libtorch's plain build
//! computes without fused multiply-adds, and its own step stays there), the vocabulary
//! table in int8, and a plain Llama block (no biases, per-head norms, sandwich norms, soft-caps,
//! sliding windows or partial rotary embeddings: SmolLM2, Llama, TinyLlama, Mistral without
//! its window). Anything else, and every step of more than one row, stays on libtorch.
//!
//! On by default (`[engine] fused_decode = "on"`): it decodes 1.2–1.7× faster than
//! libtorch's step here (docs/benchmarks.md).

use std::ffi::CStr;
use std::os::raw::c_char;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

use super::error::{InferError, Result};
use super::int4_prefill::PackLayout;
use super::qlinear::INT4_GROUP;

mod ffi {
    use std::os::raw::{c_char, c_int};

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Q4 {
        pub packed: *const u8,
        pub scales_zeros: *const u16,
        pub n: i64,
        pub k: i64,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Layer {
        pub attn_norm: *const u16,
        pub ffn_norm: *const u16,
        pub qkv: Q4,
        pub o: Q4,
        pub gate_up: Q4,
        pub down: Q4,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Model {
        pub hidden: i64,
        pub intermediate: i64,
        pub heads: i64,
        pub kv_heads: i64,
        pub head_dim: i64,
        pub vocab: i64,
        pub layers: i64,
        pub group: i64,
        pub block_n: i64,
        pub max_len: i64,
        pub slots: i64,
        pub halves: i32,
        pub eps: f32,
        pub attn_scale: f32,
        pub layer: *const Layer,
        pub embed_codes: *const i8,
        pub embed_scales: *const u16,
        pub head_codes: *const i8,
        pub head_scales: *const u16,
        pub norm: *const u16,
        pub rope_cos: *const f32,
        pub rope_sin: *const f32,
    }

    extern "C" {
        pub fn ludus_fused_last_error() -> *const c_char;
        pub fn ludus_fused_row_sum(values: *const f32, n: i64) -> f32;
        pub fn ludus_fused_q4_product(
            packed: *const u8,
            scales_zeros: *const u16,
            n: i64,
            k: i64,
            group: i64,
            block_n: i64,
            halves: i32,
            x: *const f32,
            rows: i64,
            out: *mut u16,
        ) -> i32;
        pub fn ludus_fused_decode(
            model: *const Model,
            k_cache: *const *mut u16,
            v_cache: *const *mut u16,
            slot: i64,
            token: i64,
            pos: i64,
            hidden_out: *mut u16,
            logits_out: *mut f32,
        ) -> c_int;
    }
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// `[engine] fused_decode`: whether models loaded from now on in this process take the
/// fused step where they can ("on", the default) or never ("off").
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The sum of `values` in the order the fused step's norms add them, which is the order of
/// libtorch's CPU sum kernel over a contiguous row of 8 values or more (exposed for the test
/// that holds it to `at::sum`).
pub fn row_sum(values: &[f32]) -> f32 {
    // SAFETY: the shim reads `values.len()` f32s from the slice's start and keeps nothing.
    unsafe { ffi::ludus_fused_row_sum(values.as_ptr(), values.len() as i64) }
}

/// `x · Wᵀ` for a weight packed by libtorch (`packed`, `[k / group, n, 2]` bf16
/// `scales_zeros`) and bf16 rows `x` (`[rows, k]`), computed row by row as the fused step
/// computes its products, in bf16: for the test that holds them to libtorch's int4 kernel.
pub fn q4_product(packed: &Tensor, scales_zeros: &Tensor, group: i64, x: &Tensor) -> Result<Tensor> {
    let bad = |what: String| InferError::Quantization(format!("fused int4 product: {what}"));
    let layout = super::int4_prefill::layout().ok_or_else(|| bad("no known int4 layout".into()))?;
    let (n, k) = super::int4_prefill::check(packed, scales_zeros, group)?;
    let (rows, x_k) = x.size2()?;
    if x_k != k {
        return Err(bad(format!("{x_k} inputs for a weight of {k}")));
    }
    let x = x.f_to_kind(Kind::BFloat16)?.f_to_kind(Kind::Float)?.f_contiguous()?;
    let out = Tensor::f_empty([rows, n], (Kind::BFloat16, Device::Cpu))?;
    // SAFETY: `check` verified `packed` (n*k/2 bytes) and `scales_zeros` (k/group*n*2 bf16
    // values), contiguous on the CPU; `x` holds rows*k f32 values and `out` rows*n bf16, all
    // alive for the call; the shim keeps nothing.
    let status = unsafe {
        ffi::ludus_fused_q4_product(
            packed.data_ptr() as *const u8,
            scales_zeros.data_ptr() as *const u16,
            n,
            k,
            group,
            layout.block_rows,
            i32::from(layout.halves),
            x.data_ptr() as *const f32,
            rows,
            out.data_ptr() as *mut u16,
        )
    };
    if status != 0 {
        return Err(bad(last_error()));
    }
    Ok(out)
}

/// Parses `[engine] fused_decode`.
pub fn parse_setting(setting: &str) -> std::result::Result<bool, String> {
    match setting {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("fused_decode must be \"on\" or \"off\", not {other:?}")),
    }
}

/// One int4 projection as packed for libtorch's CPU kernel.
pub(crate) struct Int4Part<'a> {
    pub packed: &'a Tensor,
    pub scales_zeros: &'a Tensor,
}

/// One block's weights.
pub(crate) struct LayerParts<'a> {
    pub attn_norm: &'a Tensor,
    pub ffn_norm: &'a Tensor,
    pub qkv: Int4Part<'a>,
    pub o: Int4Part<'a>,
    pub gate_up: Int4Part<'a>,
    pub down: Int4Part<'a>,
}

/// Everything the step reads, borrowed from the model that owns it.
pub(crate) struct ModelParts<'a> {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub eps: f64,
    pub attn_scale: f64,
    pub layers: Vec<LayerParts<'a>>,
    /// The int8 table's codes `[vocab, hidden]` and bf16 scales `[vocab]`.
    pub embed: (&'a Tensor, &'a Tensor),
    pub head: (&'a Tensor, &'a Tensor),
    pub norm: &'a Tensor,
    /// f32 `[max_len, head_dim / 2]`.
    pub rope_cos: &'a Tensor,
    pub rope_sin: &'a Tensor,
    pub layout: PackLayout,
}

/// The fused step of one loaded model: the addresses of its weights, which live as long as
/// the model and never move or change after loading.
pub(crate) struct FusedDecode {
    model: ffi::Model,
    layers: Vec<ffi::Layer>,
    rope_len: i64,
}

// SAFETY: the pointers address tensors owned by the same `Llama` as this value, read-only
// after loading; the step is called with `&self` from one thread at a time (the engine's),
// and tensors are `Send` themselves.
unsafe impl Send for FusedDecode {}
unsafe impl Sync for FusedDecode {}

fn bf16_vector(t: &Tensor, len: usize, what: &str) -> std::result::Result<*const u16, String> {
    if t.device() != Device::Cpu || t.kind() != Kind::BFloat16 || !t.is_contiguous() || t.numel() != len {
        return Err(format!("{what} is {:?} {:?}, not {len} contiguous bf16 values on the CPU", t.size(), t.kind()));
    }
    Ok(t.data_ptr() as *const u16)
}

fn int4(part: &Int4Part<'_>, rows: usize, inputs: usize, what: &str) -> std::result::Result<ffi::Q4, String> {
    let (packed, sz) = (part.packed, part.scales_zeros);
    let n = sz.size().get(1).copied().unwrap_or(0);
    let k = inputs as i64;
    let fits = packed.device() == Device::Cpu
        && packed.kind() == Kind::Uint8
        && packed.is_contiguous()
        && packed.numel() as i64 == n * k / 2
        && sz.kind() == Kind::BFloat16
        && sz.is_contiguous()
        && sz.size() == [k / INT4_GROUP, n, 2]
        && n >= rows as i64;
    if !fits {
        return Err(format!(
            "{what}: packed {:?} and scales {:?} do not fit [{rows}, {inputs}]",
            packed.size(),
            sz.size()
        ));
    }
    Ok(ffi::Q4 { packed: packed.data_ptr() as *const u8, scales_zeros: sz.data_ptr() as *const u16, n, k })
}

impl FusedDecode {
    /// The fused step over `parts`, or why it cannot compute this model.
    pub(crate) fn new(parts: &ModelParts<'_>) -> std::result::Result<Self, String> {
        let (d, f, hd) = (parts.hidden, parts.intermediate, parts.head_dim);
        let (h, kv) = (parts.heads, parts.kv_heads);
        if h == 0 || kv == 0 || h % kv != 0 || hd % 2 != 0 || d % INT4_GROUP as usize != 0 {
            return Err(format!("heads {h}/{kv} of {hd} and width {d} are not supported"));
        }
        let mut layers = Vec::with_capacity(parts.layers.len());
        for (i, l) in parts.layers.iter().enumerate() {
            let name = |p: &str| format!("layer {i} {p}");
            layers.push(ffi::Layer {
                attn_norm: bf16_vector(l.attn_norm, d, &name("attention norm"))?,
                ffn_norm: bf16_vector(l.ffn_norm, d, &name("MLP norm"))?,
                qkv: int4(&l.qkv, (h + 2 * kv) * hd, d, &name("qkv"))?,
                o: int4(&l.o, d, h * hd, &name("output projection"))?,
                gate_up: int4(&l.gate_up, 2 * f, d, &name("gate/up"))?,
                down: int4(&l.down, d, f, &name("down"))?,
            });
        }
        let table = |(codes, scales): (&Tensor, &Tensor), what: &str| -> std::result::Result<_, String> {
            let fits = codes.device() == Device::Cpu
                && codes.kind() == Kind::Int8
                && codes.is_contiguous()
                && codes.size() == [parts.vocab as i64, d as i64];
            if !fits {
                return Err(format!(
                    "{what} table is {:?} {:?}, not int8 [{}, {d}]",
                    codes.size(),
                    codes.kind(),
                    parts.vocab
                ));
            }
            Ok((codes.data_ptr() as *const i8, bf16_vector(scales, parts.vocab, what)?))
        };
        let (embed_codes, embed_scales) = table(parts.embed, "embedding")?;
        let (head_codes, head_scales) = table(parts.head, "output head")?;
        let rope_len = parts.rope_cos.size()[0];
        for t in [parts.rope_cos, parts.rope_sin] {
            if t.device() != Device::Cpu
                || t.kind() != Kind::Float
                || !t.is_contiguous()
                || t.size() != [rope_len, hd as i64 / 2]
            {
                return Err(format!("rotary table {:?} {:?} is not f32 [positions, {}]", t.size(), t.kind(), hd / 2));
            }
        }
        let model = ffi::Model {
            hidden: d as i64,
            intermediate: f as i64,
            heads: h as i64,
            kv_heads: kv as i64,
            head_dim: hd as i64,
            vocab: parts.vocab as i64,
            layers: layers.len() as i64,
            group: INT4_GROUP,
            block_n: parts.layout.block_rows,
            max_len: 0,
            slots: 0,
            halves: i32::from(parts.layout.halves),
            eps: parts.eps as f32,
            attn_scale: parts.attn_scale as f32,
            layer: std::ptr::null(),
            embed_codes,
            embed_scales,
            head_codes,
            head_scales,
            norm: bf16_vector(parts.norm, d, "output norm")?,
            rope_cos: parts.rope_cos.data_ptr() as *const f32,
            rope_sin: parts.rope_sin.data_ptr() as *const f32,
        };
        if layers.is_empty() {
            return Err("a model without layers".into());
        }
        Ok(Self { model, layers, rope_len })
    }

    /// Decodes `token` at position `pos` of the sequence in cache `slot`: writes its key and
    /// value into `keys[l]` / `values[l]` (`[slots, kv_heads, max_len, head_dim]`, bf16) and
    /// returns its final hidden state `[1, hidden]` (bf16) and logits `[1, vocab]` (f32).
    pub(crate) fn step(
        &self,
        keys: &[Tensor],
        values: &[Tensor],
        slot: usize,
        token: u32,
        pos: usize,
    ) -> Result<(Tensor, Tensor)> {
        let m = &self.model;
        let shape = |t: &Tensor| {
            let s = t.size();
            s.len() == 4 && s[1] == m.kv_heads && s[3] == m.head_dim
        };
        let cache_ok = keys.len() == self.layers.len()
            && values.len() == self.layers.len()
            && keys.iter().chain(values).all(|t| {
                t.device() == Device::Cpu
                    && t.kind() == Kind::BFloat16
                    && t.is_contiguous()
                    && shape(t)
                    && t.size() == keys[0].size()
            });
        if !cache_ok {
            return Err(InferError::InvalidRequest(
                "fused decode: the KV cache is not a bf16 CPU cache of this model".into(),
            ));
        }
        let size = keys[0].size();
        let (slots, max_len) = (size[0], size[2]);
        if pos as i64 >= max_len.min(self.rope_len) || slot as i64 >= slots {
            return Err(InferError::ContextOverflow {
                got: pos + 1,
                max_new: 0,
                limit: max_len.min(self.rope_len) as usize,
            });
        }
        let k_ptrs: Vec<*mut u16> = keys.iter().map(|t| t.data_ptr() as *mut u16).collect();
        let v_ptrs: Vec<*mut u16> = values.iter().map(|t| t.data_ptr() as *mut u16).collect();
        let hidden = Tensor::f_empty([1, m.hidden], (Kind::BFloat16, Device::Cpu))?;
        let logits = Tensor::f_empty([1, m.vocab], (Kind::Float, Device::Cpu))?;
        let model = ffi::Model { layer: self.layers.as_ptr(), max_len, slots, ..*m };
        // SAFETY: every weight pointer was checked against its shape in `new` and lives as
        // long as the model (`&self` borrows it); the cache tensors were checked just above
        // (bf16, contiguous, this model's heads and width, the slot and position in range);
        // `hidden` and `logits` are fresh contiguous tensors of the sizes the shim writes.
        let rc = unsafe {
            ffi::ludus_fused_decode(
                &model,
                k_ptrs.as_ptr(),
                v_ptrs.as_ptr(),
                slot as i64,
                token as i64,
                pos as i64,
                hidden.data_ptr() as *mut u16,
                logits.data_ptr() as *mut f32,
            )
        };
        if rc != 0 {
            return Err(InferError::InvalidRequest(format!("fused decode: {}", last_error())));
        }
        Ok((hidden, logits))
    }
}

/// The shim's last error on this thread.
fn last_error() -> String {
    // SAFETY: the shim returns a pointer to a thread-local, NUL-terminated string.
    unsafe { CStr::from_ptr(ffi::ludus_fused_last_error() as *const c_char) }.to_string_lossy().into_owned()
}
