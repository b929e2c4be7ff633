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

/// Vocabulary rows quantized at once (9 MiB of f32 temporaries for a 576-wide table).
const QUANTIZE_ROWS: i64 = 4096;

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
        // Row blocks, so that the f32 temporaries stay small next to a large vocabulary
        // (Llama 3's table is 2 GiB in f32).
        let rows = weight.size()[0];
        let codes = Tensor::f_empty([rows, cols], (Kind::Int8, Device::Cpu))?;
        let mut scales = Vec::new();
        for start in (0..rows).step_by(QUANTIZE_ROWS as usize) {
            let len = QUANTIZE_ROWS.min(rows - start);
            let w = weight.f_narrow(0, start, len)?.f_to_kind(Kind::Float)?;
            let limit = w.f_abs()?.f_amax([1].as_slice(), true)?.f_clamp_min(1e-12)?.f_div_scalar(127.0)?;
            // Round the scale up to a bf16 value, then quantize against exactly that value.
            let nearest = limit.f_to_kind(Kind::BFloat16)?;
            let exact = nearest.f_to_kind(Kind::Float)?;
            let scale = nearest.f_where_self(&exact.f_ge_tensor(&limit)?, &next_bf16_up(&exact)?)?;
            let block = w.f_div(&scale.f_to_kind(Kind::Float)?)?.f_round_()?.f_clamp_(-127, 127)?;
            codes.f_narrow(0, start, len)?.f_copy_(&block)?;
            scales.push(scale);
        }
        let scales = Tensor::f_cat(&scales, 0)?.f_squeeze_dim(1)?.f_contiguous()?;
        Ok(Self { codes, scales })
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

    /// `x W^T` for `x` of shape `[n, cols]`, in bf16; the caller converts. Always the
    /// kernel, whatever `n`: its rows do not depend on the others (checked for 1 to 127
    /// rows and one by one), so a node decoding a token alone and a verifier prefilling
    /// a whole completion compute the same logits. (A bf16 GEMM over dequantized chunks
    /// is about as fast at 256 rows, 47 against 53 ms here, but rounds differently.)
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.f_to_kind(Kind::BFloat16)?.f_contiguous()?;
        Ok(x.f_internal_weight_int8pack_mm(&self.codes, &self.scales)?)
    }

    pub fn bytes(&self) -> usize {
        self.codes.numel() + self.scales.numel() * 2
    }

    /// The codes `[rows, cols]` (int8) and their scales `[rows]` (bf16).
    pub fn parts(&self) -> (&Tensor, &Tensor) {
        (&self.codes, &self.scales)
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
        // More rows than one quantization block.
        let rows = QUANTIZE_ROWS + 300;
        let w = weight(rows, 64);
        let t = Int8Table::quantize(&w).unwrap();
        assert_eq!(t.codes.kind(), Kind::Int8);
        assert_eq!(t.bytes() as i64, rows * 64 + rows * 2);
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
        let x = Tensor::randn([200, 96], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let all = t.matmul_t(&x).unwrap();
        assert_eq!(all.size(), [200, 1001]);
        let want = x.to_kind(Kind::Float).matmul(&reference.tr());
        let rel = (all.to_kind(Kind::Float) - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
        assert!(rel < 1e-2, "relative error {rel}");
        // A row comes out bit for bit the same alone as among 200 (node decode vs verifier).
        for row in [0i64, 57, 199] {
            let alone = t.matmul_t(&x.narrow(0, row, 1)).unwrap();
            assert!(alone.equal(&all.narrow(0, row, 1)), "row {row} differs alone");
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
