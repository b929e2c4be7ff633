//! Safe wrappers over `csrc/fbgemm_int8.cpp`: libtorch's fbgemm int8 weight packing and
//! int8 GEMM (the kernels behind PyTorch's dynamic quantization), which tch does not bind.
//! Tensors cross the boundary as tch's raw handles; errors come back as [`InferError`].

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};

use tch::Tensor;

use super::error::{InferError, Result};

/// An `at::Tensor*` (tch's tensor handle) as the shim sees it.
type RawTensor = std::ffi::c_void;

mod ffi {
    use super::*;
    extern "C" {
        pub fn ludus_last_error() -> *const c_char;
        pub fn ludus_fbgemm_available() -> c_int;
        pub fn ludus_fbgemm_quantize_and_pack(
            weight: *const RawTensor,
            packed: *mut *mut RawTensor,
            col_offsets: *mut *mut RawTensor,
            scale: *mut f64,
            zero_point: *mut i64,
        ) -> c_int;
        pub fn ludus_fbgemm_linear(
            input: *const RawTensor,
            packed: *const RawTensor,
            col_offsets: *const RawTensor,
            scale: f64,
            zero_point: i64,
            bias: *const RawTensor,
            out_features: i64,
            in_features: i64,
            out: *mut *mut RawTensor,
        ) -> c_int;
    }
}

fn check(rc: c_int, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a pointer to a thread-local, NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(ffi::ludus_last_error()) }.to_string_lossy().into_owned();
    Err(InferError::Quantization(format!("{what}: {msg}")))
}

fn raw(t: &Tensor) -> *const RawTensor {
    t.as_ptr() as *const RawTensor
}

/// Takes ownership of a tensor the shim allocated.
///
/// SAFETY: `p` must come from the shim's `new at::Tensor(...)` and be used once.
unsafe fn owned(p: *mut RawTensor) -> Tensor {
    Tensor::from_ptr(p as *mut _)
}

/// Whether this libtorch has fbgemm (x86-64 with AVX2).
pub fn available() -> bool {
    // SAFETY: no arguments; reads a libtorch global.
    unsafe { ffi::ludus_fbgemm_available() == 1 }
}

/// An int8 weight packed for fbgemm, with its quantization parameters.
pub struct PackedInt8 {
    packed: Tensor,
    col_offsets: Tensor,
    scale: f64,
    zero_point: i64,
    /// Zeros of the output width: fbgemm's linear always takes a bias.
    bias: Tensor,
    /// `[out]`: each output row's absolute maximum, divided out before packing.
    row_scales: Tensor,
    pub out_features: i64,
    pub in_features: i64,
}

impl PackedInt8 {
    /// Quantizes an f32 CPU weight `[out, in]` and packs it.
    ///
    /// fbgemm's legacy kernel takes one scale for the whole weight and one for the whole
    /// input. Both are made per-row by exact rescaling: each weight row is divided by its
    /// absolute maximum before packing (per-output-channel weights), and each input row by
    /// its own before the call (per-token activations); the output is multiplied back.
    /// Without this, SmolLM2's perplexity rose 72 % under int8 (a few tokens with huge
    /// activations set the scale for everyone).
    pub fn pack(weight: &Tensor) -> Result<Self> {
        if !available() {
            return Err(InferError::Quantization(
                "this libtorch has no fbgemm (int8 needs an x86-64 CPU with AVX2); use --quantize none or int4".into(),
            ));
        }
        let (out_features, in_features) = weight.size2()?;
        let weight = weight.f_to_kind(tch::Kind::Float)?;
        let row_scales = weight.f_abs()?.f_amax([1].as_slice(), false)?.f_clamp_min(1e-12)?;
        let weight = weight.f_div(&row_scales.f_unsqueeze(1)?)?;
        // An extra weight row of [2, -2, 0, ...] (its output is dropped) widens the
        // weight grid so the real rows, within ±1, use codes -64..63 only (7 bits). On
        // AVX2 CPUs without VNNI, fbgemm adds pairs of u8 × i8 products in saturating
        // 16-bit arithmetic: 255 × 127 × 2 would overflow, 255 × 64 × 2 does not. (Taking
        // the bit from the activations instead cost 11 % perplexity; from the per-row
        // scaled weights, nothing measurable.)
        let guard = Tensor::f_zeros([1, in_features], (tch::Kind::Float, tch::Device::Cpu))?;
        guard.f_narrow(1, 0, 2)?.f_copy_(&Tensor::f_from_slice(&[2f32, -2.0])?.f_unsqueeze(0)?)?;
        let weight = Tensor::f_cat(&[weight, guard], 0)?.f_contiguous()?;
        let (mut packed, mut col_offsets) = (std::ptr::null_mut(), std::ptr::null_mut());
        let (mut scale, mut zero_point) = (0.0, 0);
        // SAFETY: `weight` outlives the call; the out-pointers are written on success only.
        let rc = unsafe {
            ffi::ludus_fbgemm_quantize_and_pack(
                raw(&weight),
                &mut packed,
                &mut col_offsets,
                &mut scale,
                &mut zero_point,
            )
        };
        check(rc, "fbgemm int8 packing")?;
        // SAFETY: both were allocated by the shim on success.
        let (packed, col_offsets) = unsafe { (owned(packed), owned(col_offsets)) };
        let bias = Tensor::f_zeros([out_features + 1], (tch::Kind::Float, tch::Device::Cpu))?;
        Ok(Self { packed, col_offsets, scale, zero_point, bias, row_scales, out_features, in_features })
    }

    /// `x W^T` for f32 `x` of shape `[rows, in]`.
    ///
    /// fbgemm picks the input's quantization grid from the minimum and maximum of the
    /// whole input. A last row of `[1, -1, 0, ...]` pins them to ±1, so every row is
    /// quantized on the same grid whatever else is in the batch: a token computes the
    /// same way in a node's one-row decode and in the verifier's many-row prefill (the
    /// proof of inference depends on it). The extra row is dropped from the output.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.size()[0];
        let token_scales = x.f_abs()?.f_amax([1].as_slice(), true)?.f_clamp_min(1e-12)?;
        let pin = Tensor::f_zeros([1, self.in_features], (tch::Kind::Float, tch::Device::Cpu))?;
        pin.f_narrow(1, 0, 2)?.f_copy_(&Tensor::f_from_slice(&[1f32, -1.0])?.f_unsqueeze(0)?)?;
        let x = Tensor::f_cat(&[x.f_div(&token_scales)?, pin], 0)?;
        let mut out = std::ptr::null_mut();
        // SAFETY: every tensor outlives the call; `out` is written on success only.
        let rc = unsafe {
            ffi::ludus_fbgemm_linear(
                raw(&x),
                raw(&self.packed),
                raw(&self.col_offsets),
                self.scale,
                self.zero_point,
                raw(&self.bias),
                self.out_features + 1,
                self.in_features,
                &mut out,
            )
        };
        check(rc, "fbgemm int8 linear")?;
        // SAFETY: allocated by the shim on success.
        let y = unsafe { owned(out) }.f_narrow(0, 0, rows)?.f_narrow(1, 0, self.out_features)?;
        Ok(y.f_mul(&token_scales)?.f_mul(&self.row_scales)?)
    }

    /// Bytes held: the packed matrix (one byte per weight plus fbgemm's padding) and the
    /// per-column offsets.
    pub fn bytes(&self) -> usize {
        // The packed blob is a uint8 tensor holding a pointer-sized handle; its real
        // footprint is the int8 matrix fbgemm allocated behind it.
        (self.out_features * self.in_features) as usize
            + (self.col_offsets.numel() + self.bias.numel() + self.row_scales.numel()) * 4
    }
}
