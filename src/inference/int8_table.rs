//! The vocabulary table of a quantized model on CPU — the token embedding and the output
//! head, one tensor when they are tied — as weight-only int8 with one scale per row.
//!
//! Why not int4 like the other layers: the head decides between near-tied tokens, and in
//! int4 (group 32) it flipped SmolLM2's answer to "What is the capital of France?" away from
//! "Paris". Why not bf16 either: at 2 bytes per weight the table was 57 of a 283 MiB int4
//! node. int8 halves it, and libtorch's `_weight_int8pack_mm` with bf16 activations
//! multiplies a decode batch by it faster than bf16 does (0.6 vs 1.7 ms for SmolLM2's
//! 49152 × 576 head, 2 threads; docs/lightweight-models.md).
//!
//! Each scale is a bf16 number chosen first, and the codes are rounded against that exact
//! value, so rounding the scales to the kernel's bf16 adds no error of its own.

use tch::{Device, Kind, Tensor};

use super::error::{InferError, Result};

/// Rows at or above which the head is multiplied by dequantized chunks instead: the
/// int8 kernel's cost grows with every row, a bf16 GEMM's much more slowly (at 256 rows
/// 53 ms against 47 ms for dequantizing and multiplying, measured here).
const KERNEL_MAX_ROWS: i64 = 128;
/// Vocabulary rows dequantized at once on the chunked path (about 5 MiB of bf16 for a
/// 576-wide model).
const CHUNK_ROWS: i64 = 4096;

/// Per-row int8 weights `[rows, cols]` and their bf16 scales `[rows]`.
pub struct Int8Table {
    codes: Tensor,
    scales: Tensor,
}

impl Int8Table {
    /// Whether the int8 kernel handles a table `cols` wide: libtorch's CPU kernel returns
    /// garbage, without an error, when the width is not a multiple of 32 (checked here with
    /// 40). Such tables stay dense.
    pub fn supports(device: Device, cols: i64) -> bool {
        device == Device::Cpu && cols > 0 && cols % 32 == 0
    }

    /// Quantizes a CPU weight `[rows, cols]`: `w ≈ code * scale`, codes in -127..=127.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let (_, cols) = weight.size2()?;
        if !Self::supports(weight.device(), cols) {
            return Err(InferError::Quantization(format!(
                "an int8 table needs a CPU weight whose width is a multiple of 32, got {:?} on {:?}",
                weight.size(),
                weight.device()
            )));
        }
        let w = weight.f_to_kind(Kind::Float)?;
        let max = w.f_abs()?.f_amax([1].as_slice(), true)?.f_clamp_min(1e-12)?;
        // Round the scale up to a bf16 value, then quantize against exactly that value.
        let scales = max.f_div_scalar(127.0)?.f_to_kind(Kind::BFloat16)?;
        let exact = scales.f_to_kind(Kind::Float)?;
        let scales = scales.f_where_self(&exact.f_ge_tensor(&max.f_div_scalar(127.0)?)?, &next_bf16_up(&exact)?)?;
        let exact = scales.f_to_kind(Kind::Float)?;
        let codes = w.f_div(&exact)?.f_round()?.f_clamp(-127, 127)?.f_to_kind(Kind::Int8)?.f_contiguous()?;
        Ok(Self { codes, scales: scales.f_squeeze_dim(1)?.f_contiguous()? })
    }

    /// Both tensors shared, not copied: a tied head and the embedding hold one table.
    pub fn share(&self) -> Self {
        Self { codes: self.codes.shallow_clone(), scales: self.scales.shallow_clone() }
    }

    /// The rows of `ids`, dequantized to `kind` (the embedding lookup).
    pub fn rows(&self, ids: &Tensor, kind: Kind) -> Result<Tensor> {
        let codes = self.codes.f_index_select(0, ids)?.f_to_kind(Kind::Float)?;
        let scales = self.scales.f_index_select(0, ids)?.f_to_kind(Kind::Float)?.f_unsqueeze(1)?;
        Ok(codes.f_mul(&scales)?.f_to_kind(kind)?)
    }

    /// `x W^T` for `x` of shape `[n, cols]`, in bf16; the caller converts.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.f_to_kind(Kind::BFloat16)?.f_contiguous()?;
        if x.size()[0] < KERNEL_MAX_ROWS {
            return Ok(x.f_internal_weight_int8pack_mm(&self.codes, &self.scales)?);
        }
        let rows = self.codes.size()[0];
        let mut parts = Vec::with_capacity(((rows + CHUNK_ROWS - 1) / CHUNK_ROWS) as usize);
        for start in (0..rows).step_by(CHUNK_ROWS as usize) {
            let len = CHUNK_ROWS.min(rows - start);
            let w = self.codes.f_narrow(0, start, len)?.f_to_kind(Kind::BFloat16)?;
            let w = w.f_mul(&self.scales.f_narrow(0, start, len)?.f_unsqueeze(1)?)?;
            parts.push(x.f_linear::<Tensor>(&w, None)?);
        }
        Ok(Tensor::f_cat(&parts, 1)?)
    }

    pub fn bytes(&self) -> usize {
        self.codes.numel() + self.scales.numel() * 2
    }

    /// The codes' storage, to tell a tied head from an untied one.
    pub fn data_ptr(&self) -> *mut std::ffi::c_void {
        self.codes.data_ptr()
    }
}

/// The next bf16 value above each (positive) element of `x`, in f32.
fn next_bf16_up(x: &Tensor) -> Result<Tensor> {
    // A positive bf16's bits are the top 16 bits of its f32; one more unit in the last
    // place is 2^16 more in the f32's bits.
    let bits = x.f_to_kind(Kind::BFloat16)?.f_to_kind(Kind::Float)?.f_view_dtype(Kind::Int)?;
    Ok(bits.f_add_scalar(1 << 16)?.f_view_dtype(Kind::Float)?.f_to_kind(Kind::BFloat16)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(rows: i64, cols: i64) -> Tensor {
        tch::manual_seed(7);
        // Rows of very different magnitudes, as in a real vocabulary table.
        Tensor::randn([rows, cols], (Kind::Float, Device::Cpu)) * Tensor::rand([rows, 1], (Kind::Float, Device::Cpu))
    }

    fn dequantized(t: &Int8Table) -> Tensor {
        t.codes.to_kind(Kind::Float) * t.scales.to_kind(Kind::Float).unsqueeze(1)
    }

    #[test]
    fn codes_stay_within_half_a_step_of_the_weight() {
        let w = weight(300, 64);
        let t = Int8Table::quantize(&w).unwrap();
        assert_eq!(t.codes.kind(), Kind::Int8);
        assert_eq!(t.bytes(), 300 * 64 + 300 * 2);
        let step = t.scales.to_kind(Kind::Float).unsqueeze(1);
        let err = (dequantized(&t) - &w).abs() / &step;
        let worst = err.max().double_value(&[]);
        assert!(worst <= 0.5 + 1e-4, "worst error {worst} steps");
        // The scale was rounded up, never down, so no code had to be clipped.
        assert!(t.codes.to_kind(Kind::Float).abs().max().double_value(&[]) <= 127.0);
    }

    #[test]
    fn lookup_and_both_head_paths_match_the_dequantized_table() {
        let w = weight(1001, 96);
        let t = Int8Table::quantize(&w).unwrap();
        let reference = dequantized(&t);
        let ids = Tensor::from_slice(&[0i64, 1000, 17, 17]);
        let rows = t.rows(&ids, Kind::Float).unwrap();
        assert!(rows.allclose(&reference.index_select(0, &ids), 1e-6, 1e-6, false));
        for n in [1, 5, KERNEL_MAX_ROWS + 3] {
            let x = Tensor::randn([n, 96], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let y = t.matmul_t(&x).unwrap().to_kind(Kind::Float);
            let want = x.to_kind(Kind::Float).matmul(&reference.tr());
            assert_eq!(y.size(), [n, 1001]);
            let rel = (y - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
            assert!(rel < 1e-2, "{n} rows: relative error {rel}");
        }
    }

    #[test]
    fn widths_the_kernel_gets_wrong_are_refused() {
        assert!(!Int8Table::supports(Device::Cpu, 40));
        assert!(Int8Table::supports(Device::Cpu, 576));
        assert!(!Int8Table::supports(Device::Cuda(0), 576));
        let err = Int8Table::quantize(&weight(8, 40)).err().expect("a width of 40 is refused");
        assert!(err.to_string().contains("multiple of 32"), "{err}");
    }
}
