//! Many-row int4 products on CPU (prefill chunks) through the weight itself, dequantized
//! for the call: libtorch's CPU int4 kernel is the fastest way to multiply a few rows, but
//! it handles rows four at a time, so at a 128-row chunk it is several times slower than
//! a dense matrix product (docs/benchmarks.md, "Why int4 prefill was slow").
//!
//! [`matmul_t`] unpacks the kernel's own packed codes (`csrc/int4_dequant.cpp`, no second
//! copy of the weight is kept), tile by tile of 512 output columns so that each unpacked
//! tile is used while it is still in cache, in one of two forms ([`Product`]):
//! - [`Product::SplitBf16`]: `hi = bf16(w)` and `lo = bf16(w - hi)`, with `w` the f32 weight
//!   the kernel computes, and `[x, x]` multiplied by `[hi; lo]` in bf16. `hi + lo` holds `w`
//!   to 16 significant bits, which covers the codes times a bf16 scale (12 bits) plus a bf16
//!   zero in nearly every group, so the result matches the kernel's to within f32 rounding:
//!   about 2 outputs in 10,000 differ, by one bf16 step. The fastest where bf16 products run
//!   on AMX.
//! - [`Product::F32`]: `w` itself and `x · w` in f32, the kernel's own arithmetic in another
//!   order. The fastest without AMX, where a bf16 product is slower than an f32 one (every
//!   AMD and desktop CPU).
//!
//! Which one a process uses is chosen once ([`product`]): as `[engine] int4_prefill` says,
//! or by timing both on a projection of SmolLM2's shape. Either way a prefilled token reads
//! (to f32 rounding) as a decoded one, which the proof of inference relies on, and every
//! chunk of a process goes the same way, so a prefix cache hit changes no bit. The engine
//! takes this path from [`FROM_ROWS`] rows on and keeps the kernel below.
//!
//! The packed layout is libtorch's internal choice (it differs between AVX-512, AVX2 and
//! plain CPUs): [`layout`] probes which one this libtorch uses, once, by packing known
//! codes. When it is none of the known ones, every product stays on the kernel.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};
use std::sync::OnceLock;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::error::{InferError, Result};

/// Rows from which [`matmul_t`] beats the kernel: unpacking costs the same whatever the
/// rows, and is paid back from about 64 rows of SmolLM2's widest projection (`cargo bench
/// --bench engine -- int4_gate_up`: even at 64, 1.8x faster at 128, 2.5x at 256).
pub const FROM_ROWS: i64 = 64;

/// How a many-row product multiplies the unpacked weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// `[x, x] · [hi; lo]` in bf16.
    SplitBf16,
    /// `x · w` in f32, rounded to bf16 at the end.
    F32,
}

impl Product {
    /// `[engine] int4_prefill`: "auto" (None: timed), "f32" or "bf16".
    pub fn parse(setting: &str) -> std::result::Result<Option<Self>, String> {
        match setting {
            "auto" => Ok(None),
            "f32" => Ok(Some(Self::F32)),
            "bf16" => Ok(Some(Self::SplitBf16)),
            other => Err(format!("int4_prefill must be \"auto\", \"f32\" or \"bf16\", not {other:?}")),
        }
    }
}

impl std::fmt::Display for Product {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SplitBf16 => "bf16",
            Self::F32 => "f32",
        })
    }
}

/// How libtorch packed the codes (see `csrc/int4_dequant.cpp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackLayout {
    /// Rows per block: 64 with AVX-512, 32 otherwise.
    pub block_rows: i64,
    /// Whether a full block pairs row j with row j + block/2 in a byte (vectorized CPUs),
    /// rather than rows 2j and 2j + 1.
    pub halves: bool,
}

/// An `at::Tensor*` (tch's tensor handle) as the shim sees it.
type RawTensor = std::ffi::c_void;

mod ffi {
    use super::*;
    extern "C" {
        pub fn ludus_int4_last_error() -> *const c_char;
        pub fn ludus_int4_linear_unpacked(
            xs: *const *const RawTensor,
            count: i64,
            packed: *const u8,
            scales_zeros: *const u16,
            n: i64,
            group: i64,
            block_n: i64,
            halves: c_int,
            f32: c_int,
            outs: *mut *mut RawTensor,
        ) -> c_int;
        pub fn ludus_int4_dequantize_split(
            packed: *const u8,
            scales_zeros: *const u16,
            n: i64,
            k: i64,
            group: i64,
            block_n: i64,
            halves: c_int,
            out: *mut u16,
        ) -> c_int;
    }
}

/// The weight `[n, k]` packed in `packed` (`n * k / 2` bytes) with `scales_zeros`
/// (`[k / group, n, 2]`, bf16), as `[hi; lo]`: a `[2k, n]` bf16 matrix, transposed so that
/// `[x, x] @ it` is `x W^T`.
pub fn split_weight(packed: &Tensor, scales_zeros: &Tensor, group: i64, layout: PackLayout) -> Result<Tensor> {
    let (n, k) = check(packed, scales_zeros, group)?;
    let out = Tensor::f_empty([2 * k, n], (Kind::BFloat16, Device::Cpu))?;
    // SAFETY: `check` verified the shapes: `packed` holds n*k/2 bytes, `scales_zeros`
    // k/group*n*2 bf16 values, `out` 2*k*n, all contiguous on the CPU and alive for the call.
    let rc = unsafe {
        ffi::ludus_int4_dequantize_split(
            packed.data_ptr() as *const u8,
            scales_zeros.data_ptr() as *const u16,
            n,
            k,
            group,
            layout.block_rows,
            c_int::from(layout.halves),
            out.data_ptr() as *mut u16,
        )
    };
    shim_result(rc)?;
    Ok(out)
}

/// `(n, k)` of a packed weight, after checking that its parts fit each other.
pub(crate) fn check(packed: &Tensor, scales_zeros: &Tensor, group: i64) -> Result<(i64, i64)> {
    let n = scales_zeros.size().get(1).copied().unwrap_or(0);
    let k = packed.numel() as i64 * 2 / n.max(1);
    let fits = packed.device() == Device::Cpu
        && packed.kind() == Kind::Uint8
        && packed.is_contiguous()
        && scales_zeros.device() == Device::Cpu
        && scales_zeros.kind() == Kind::BFloat16
        && scales_zeros.is_contiguous()
        && scales_zeros.size() == [k / group.max(1), n, 2]
        && n * k / 2 == packed.numel() as i64;
    if !fits {
        return Err(InferError::Quantization(format!(
            "int4 dequantization: packed {:?} {:?} does not fit scales {:?} {:?}",
            packed.size(),
            packed.kind(),
            scales_zeros.size(),
            scales_zeros.kind()
        )));
    }
    Ok((n, k))
}

fn shim_result(rc: c_int) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a pointer to a thread-local, NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(ffi::ludus_int4_last_error()) }.to_string_lossy().into_owned();
    Err(InferError::Quantization(format!("int4 dequantization: {msg}")))
}

/// `x W^T` for bf16 `x` (`[rows, k]`) through the unpacked weight; `[rows, n]` in bf16.
pub fn matmul_t(
    x: &Tensor,
    packed: &Tensor,
    scales_zeros: &Tensor,
    group: i64,
    layout: PackLayout,
    product: Product,
) -> Result<Tensor> {
    let mut out = matmul_t_passes(std::slice::from_ref(x), packed, scales_zeros, group, layout, product)?;
    Ok(out.pop().expect("one output per input"))
}

/// [`matmul_t`] of each of `xs` (prefill passes), unpacking the weight once for all: each
/// output is, bit for bit, what [`matmul_t`] of that input alone gives.
pub fn matmul_t_passes(
    xs: &[Tensor],
    packed: &Tensor,
    scales_zeros: &Tensor,
    group: i64,
    layout: PackLayout,
    product: Product,
) -> Result<Vec<Tensor>> {
    let (n, k) = check(packed, scales_zeros, group)?;
    let mut inputs = Vec::with_capacity(xs.len());
    for x in xs {
        if x.kind() != Kind::BFloat16 || x.device() != Device::Cpu || x.dim() != 2 || x.size()[1] != k {
            return Err(InferError::Quantization(format!(
                "int4 product: input {:?} {:?} does not fit a weight of {k} inputs",
                x.size(),
                x.kind()
            )));
        }
        inputs.push(x.f_contiguous()?);
    }
    if inputs.is_empty() {
        return Ok(Vec::new());
    }
    let handles: Vec<*const RawTensor> = inputs.iter().map(|x| x.as_ptr() as *const RawTensor).collect();
    let mut outs: Vec<*mut RawTensor> = vec![std::ptr::null_mut(); inputs.len()];
    // SAFETY: shapes checked above; every tensor outlives the call; `outs` (one slot per
    // input) is written on success only, with tensors the shim allocated.
    let rc = unsafe {
        ffi::ludus_int4_linear_unpacked(
            handles.as_ptr(),
            handles.len() as i64,
            packed.data_ptr() as *const u8,
            scales_zeros.data_ptr() as *const u16,
            n,
            group,
            layout.block_rows,
            c_int::from(layout.halves),
            c_int::from(product == Product::F32),
            outs.as_mut_ptr(),
        )
    };
    shim_result(rc)?;
    // SAFETY: allocated by the shim on success, owned from here on.
    Ok(outs.into_iter().map(|out| unsafe { Tensor::from_ptr(out as *mut _) }).collect())
}

/// The layout this libtorch packs int4 weights in, probed once; `None` when it is none of
/// the known ones.
pub fn layout() -> Option<PackLayout> {
    static LAYOUT: OnceLock<Option<PackLayout>> = OnceLock::new();
    *LAYOUT.get_or_init(|| match probe() {
        Ok(found) => {
            if found.is_none() {
                tracing::warn!(
                    "this libtorch packs int4 weights in an unknown layout: prefill stays on its int4 kernel"
                );
            }
            found
        }
        Err(e) => {
            tracing::warn!("probing libtorch's int4 layout failed ({e}): prefill stays on its int4 kernel");
            None
        }
    })
}

/// How this process multiplies the unpacked weight: what [`prefer`] set before the first
/// many-row product, or else the faster here of the two, timed once (a few tens of ms).
pub fn product() -> Product {
    choice().0
}

/// [`product`] and why: the times it was chosen on, or "as configured".
pub fn choice() -> &'static (Product, String) {
    PRODUCT.get_or_init(|| {
        let (chosen, why) = match time_products() {
            Ok((f32_s, split_s)) => {
                // f32 is the kernel's own arithmetic: bf16 must win clearly to be taken.
                let chosen = if split_s * 1.15 < f32_s { Product::SplitBf16 } else { Product::F32 };
                (chosen, format!("timed: f32 {:.2} ms, bf16 {:.2} ms per product", f32_s * 1e3, split_s * 1e3))
            }
            Err(e) => (Product::F32, format!("timing failed: {e}")),
        };
        tracing::info!(product = %chosen, measured = %why, "int4 prefill: products through the unpacked weight");
        (chosen, why)
    })
}

static PRODUCT: OnceLock<(Product, String)> = OnceLock::new();

/// Makes [`product`] `chosen` in this process (`[engine] int4_prefill`); false when the
/// process already took another (a second engine with another setting), which is logged.
pub fn prefer(chosen: Product) -> bool {
    let taken = PRODUCT
        .get_or_init(|| {
            tracing::info!(product = %chosen, "int4 prefill: products through the unpacked weight, as configured");
            (chosen, "as configured".into())
        })
        .0;
    if taken != chosen {
        tracing::warn!(wanted = %chosen, taken = %taken, "int4 prefill: this process already multiplies another way");
    }
    taken == chosen
}

/// The best of 5 timed products (after 2 untimed) of 128 rows by a [576 -> 1536] weight
/// (SmolLM2's up projection), in seconds: `(f32, split bf16)`.
fn time_products() -> Result<(f64, f64)> {
    let layout = layout().ok_or_else(|| InferError::Quantization("no known int4 layout".into()))?;
    let (n, k, group) = (1536i64, 576i64, 32i64);
    let codes = Tensor::f_randint(16, [n, k], (Kind::Int, Device::Cpu))?;
    let packed = codes.f_internal_convert_weight_to_int4pack_for_cpu(2)?.f_contiguous()?;
    let scales = Tensor::f_rand([k / group, n, 1], (Kind::Float, Device::Cpu))?.f_mul_scalar(0.01)?;
    let zeros = Tensor::f_randn([k / group, n, 1], (Kind::Float, Device::Cpu))?.f_mul_scalar(0.01)?;
    let scales_zeros = Tensor::f_cat(&[scales, zeros], 2)?.f_to_kind(Kind::BFloat16)?.f_contiguous()?;
    let x = Tensor::f_randn([128, k], (Kind::Float, Device::Cpu))?.f_to_kind(Kind::BFloat16)?;
    let mut best = [f64::INFINITY; 2];
    for round in 0..7 {
        // Alternating, so that a busy moment weighs on both.
        for (i, product) in [Product::F32, Product::SplitBf16].into_iter().enumerate() {
            let start = Instant::now();
            let _ = matmul_t(&x, &packed, &scales_zeros, group, layout, product)?;
            if round >= 2 {
                best[i] = best[i].min(start.elapsed().as_secs_f64());
            }
        }
    }
    Ok((best[0], best[1]))
}

/// Packs known codes (80 rows: a full block and a partial one in every layout) with scale
/// 1 and zero 8, so that each weight is its code, and finds the layout that reads them back.
fn probe() -> Result<Option<PackLayout>> {
    let (n, k, group) = (80i64, 64i64, 32i64);
    let mut state = 0x2545_f491u32;
    let codes: Vec<i32> = (0..n * k)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            ((state >> 16) & 15) as i32
        })
        .collect();
    let codes = Tensor::f_from_slice(&codes)?.f_view([n, k])?;
    let packed = codes.f_internal_convert_weight_to_int4pack_for_cpu(2)?.f_contiguous()?;
    let ones = Tensor::f_ones([k / group, n, 1], (Kind::BFloat16, Device::Cpu))?;
    let scales_zeros = Tensor::f_cat(&[ones.shallow_clone(), ones.f_mul_scalar(8)?], 2)?;
    let want = codes.f_to_kind(Kind::BFloat16)?.f_tr()?; // [k, n]
    let zeros = Tensor::f_zeros([k, n], (Kind::BFloat16, Device::Cpu))?;
    let candidates = [(64, true), (32, true), (32, false), (64, false)];
    for (block_rows, halves) in candidates {
        let layout = PackLayout { block_rows, halves };
        let w = split_weight(&packed, &scales_zeros, group, layout)?;
        if w.f_narrow(0, 0, k)?.equal(&want) && w.f_narrow(0, k, k)?.equal(&zeros) {
            return Ok(Some(layout));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::qlinear::{int4_codes, int4_dequantize, Linear, Quantization, INT4_GROUP};

    #[test]
    fn this_libtorch_packs_in_a_known_layout() {
        // Every x86-64 build of libtorch uses one of them; on another, prefill would silently
        // lose its fast path, which this test would show.
        assert!(layout().is_some(), "unknown int4 layout");
    }

    #[test]
    fn the_split_weight_is_the_kernels_weight() {
        let Some(layout) = layout() else { return };
        tch::manual_seed(11);
        // 208 rows: three full blocks of 64 (or six of 32) and a partial one of 16.
        let w = Tensor::randn([200, 96], (Kind::Float, Device::Cpu));
        let (codes, scales, zeros) = int4_codes(&w).unwrap();
        let Linear::Int4(int4) = Linear::new(w, Quantization::Int4, Device::Cpu, Kind::BFloat16).unwrap() else {
            panic!("an int4 layer")
        };
        let (packed, scales_zeros) = int4.parts();
        let split = split_weight(packed, scales_zeros, INT4_GROUP, layout).unwrap(); // [192, 208]
                                                                                     // The kernel's weight: bf16 scales and zeros, codes as they were.
        let bf = |t: &Tensor| t.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let want = int4_dequantize(&codes, &bf(&scales), &bf(&zeros)).unwrap(); // [200, 96]
        let hi = split.narrow(0, 0, 96).narrow(1, 0, 200).to_kind(Kind::Float);
        let lo = split.narrow(0, 96, 96).narrow(1, 0, 200).to_kind(Kind::Float);
        let got = (&hi + &lo).tr();
        let err = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(err <= scale * 2f64.powi(-16), "hi + lo is off by {err} (weights up to {scale})");
        assert!(hi.tr().equal(&want.to_kind(Kind::BFloat16).to_kind(Kind::Float)), "hi is not bf16(w)");
        // The padded rows (200..208) are zero weights.
        assert_eq!(split.narrow(1, 200, 8).abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn many_rows_match_the_kernel_to_its_rounding() {
        if layout().is_none() {
            return;
        }
        tch::manual_seed(12);
        let w = Tensor::randn([320, 192], (Kind::Float, Device::Cpu)).f_mul_scalar(0.05).unwrap();
        let (codes, scales, zeros) = int4_codes(&w).unwrap();
        let dequantized = int4_dequantize(&codes, &scales, &zeros).unwrap();
        let layer = Linear::new(w, Quantization::Int4, Device::Cpu, Kind::BFloat16).unwrap();
        let Linear::Int4(int4) = &layer else { panic!("an int4 layer") };
        let x = Tensor::randn([FROM_ROWS + 8, 192], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        // Row by row the kernel runs; all rows at once go through the unpacked weight, in
        // the form this process chose, and each form matches the kernel to its rounding.
        let rows: Vec<Tensor> = (0..x.size()[0]).map(|r| layer.forward(&x.narrow(0, r, 1)).unwrap()).collect();
        let by_kernel = Tensor::cat(&rows, 0);
        let at_once = layer.forward(&x).unwrap();
        let (packed, scales_zeros) = int4.parts();
        let layout = layout().unwrap();
        assert!(at_once.equal(&matmul_t(&x, packed, scales_zeros, INT4_GROUP, layout, product()).unwrap()));
        for form in [Product::SplitBf16, Product::F32] {
            let got = matmul_t(&x, packed, scales_zeros, INT4_GROUP, layout, form).unwrap();
            let differ = by_kernel.ne_tensor(&got).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
            let step = (&by_kernel.to_kind(Kind::Float) - &got.to_kind(Kind::Float)).abs();
            // One bf16 step of the output, plus the f32 noise of summing in another order
            // (which is more than a step for an output near zero): far below int4's own error.
            let magnitudes = x.to_kind(Kind::Float).abs().matmul(&dequantized.abs().tr());
            let bound = by_kernel.to_kind(Kind::Float).abs() * 2f64.powi(-7) + magnitudes * 2f64.powi(-18);
            assert!(differ < 0.01, "{form}: {differ} of the outputs differ");
            assert!(
                step.le_tensor(&bound).all().int64_value(&[]) == 1,
                "{form}: an output differs by more than rounding"
            );
        }
        // Not vacuous: the two forms are different arithmetic.
        let split = matmul_t(&x, packed, scales_zeros, INT4_GROUP, layout, Product::SplitBf16).unwrap();
        let f32 = matmul_t(&x, packed, scales_zeros, INT4_GROUP, layout, Product::F32).unwrap();
        assert!(!split.equal(&f32), "the split and f32 products gave the same bits");
    }

    #[test]
    fn the_setting_names_a_product_or_auto() {
        assert_eq!(Product::parse("auto"), Ok(None));
        assert_eq!(Product::parse("f32"), Ok(Some(Product::F32)));
        assert_eq!(Product::parse("bf16"), Ok(Some(Product::SplitBf16)));
        let err = Product::parse("int4").unwrap_err();
        assert!(err.contains("\"auto\", \"f32\" or \"bf16\""), "{err}");
        // Whatever this process took, asking for it again is granted, the other is not.
        let taken = product();
        assert!(prefer(taken));
        let other = if taken == Product::F32 { Product::SplitBf16 } else { Product::F32 };
        assert!(!prefer(other));
        assert_eq!(product(), taken);
    }

    /// Several passes through one unpacking, and through `Linear::forward_passes` (a short
    /// pass on the kernel among them), give each pass's product alone, bit for bit.
    #[test]
    fn passes_sharing_one_unpacking_give_each_passs_own_product() {
        let Some(layout) = layout() else { return };
        tch::manual_seed(13);
        let w = Tensor::randn([600, 192], (Kind::Float, Device::Cpu)).f_mul_scalar(0.05).unwrap();
        let layer = Linear::new(w, Quantization::Int4, Device::Cpu, Kind::BFloat16).unwrap();
        let Linear::Int4(int4) = &layer else { panic!("an int4 layer") };
        let (packed, scales_zeros) = int4.parts();
        let xs: Vec<Tensor> = [128, 64, 100, 20]
            .into_iter()
            .map(|rows| Tensor::randn([rows, 192], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16))
            .collect();
        for form in [Product::SplitBf16, Product::F32] {
            let shared = matmul_t_passes(&xs[..3], packed, scales_zeros, INT4_GROUP, layout, form).unwrap();
            for (x, y) in xs.iter().zip(&shared) {
                let alone = matmul_t(x, packed, scales_zeros, INT4_GROUP, layout, form).unwrap();
                assert!(y.equal(&alone), "{form}: a pass of {} rows differs from its product alone", x.size()[0]);
            }
        }
        let through_layer = layer.forward_passes(&xs).unwrap();
        let residuals: Vec<Tensor> =
            xs.iter().map(|x| Tensor::ones([x.size()[0], 600], (Kind::BFloat16, Device::Cpu))).collect();
        let added = layer.forward_add_passes(&residuals, &xs).unwrap();
        for (i, x) in xs.iter().enumerate() {
            let alone = layer.forward(x).unwrap();
            assert_eq!(through_layer[i].size(), [x.size()[0], 600]);
            assert!(through_layer[i].equal(&alone), "pass {i} through the layer differs from it alone");
            assert!(added[i].equal(&layer.forward_add(&residuals[i], x).unwrap()), "pass {i} with its residual");
        }
        assert!(matmul_t_passes(&[], packed, scales_zeros, INT4_GROUP, layout, product()).unwrap().is_empty());
    }

    #[test]
    fn a_mismatched_weight_is_refused() {
        let Some(layout) = layout() else { return };
        let packed = Tensor::zeros([10], (Kind::Uint8, Device::Cpu));
        let scales = Tensor::zeros([1, 16, 2], (Kind::BFloat16, Device::Cpu));
        let err = split_weight(&packed, &scales, 32, layout).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let w = Tensor::randn([64, 64], (Kind::Float, Device::Cpu));
        let Linear::Int4(int4) = Linear::new(w, Quantization::Int4, Device::Cpu, Kind::BFloat16).unwrap() else {
            panic!("an int4 layer")
        };
        let (packed, scales) = int4.parts();
        for x in [
            Tensor::zeros([40, 32], (Kind::BFloat16, Device::Cpu)),
            Tensor::zeros([40, 64], (Kind::Float, Device::Cpu)),
        ] {
            let err = matmul_t(&x, packed, scales, INT4_GROUP, layout, Product::F32).unwrap_err();
            assert!(err.to_string().contains("does not fit a weight of 64 inputs"), "{err}");
        }
    }
}
