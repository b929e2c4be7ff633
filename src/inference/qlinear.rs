//! Linear layers that keep their weights small in memory: `--quantize none|int8|int4`.
//!
//! - **int8**: CPU only: fbgemm's packed int8 GEMM ([`super::fbgemm`]), made per-channel
//!   and per-token by exact rescaling. On CUDA, libtorch's `_weight_int8pack_mm` measured
//!   10x slower than bf16 on an H100 (docs/lightweight-models.md), so int8 is refused
//!   there with a pointer to int4.
//! - **int4**: weight-only, group-wise (32 weights per scale and zero, the Q4_1 block
//!   size): `_weight_int4pack_mm` on CUDA (the tinygemm kernel gpt-fast uses),
//!   `_weight_int4pack_mm_for_cpu` on CPU, except for products of many rows (prefill),
//!   which go through the same codes unpacked tile by tile ([`super::int4_prefill`]). A Q4_1
//!   GGUF's codes survive re-quantization exactly (its blocks already span 0..15).
//!
//! No layer ever materializes a full-precision copy of its weight after loading.

use std::fmt;
use std::str::FromStr;

use tch::{Device, Kind, Tensor};

use super::error::{InferError, Result};
use super::fbgemm::PackedInt8;
use super::int4_prefill;
use super::int8_table::Int8Table;

/// Weights per int4 scale/zero pair.
pub const INT4_GROUP: i64 = 32;

/// How a model's linear layers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// The model dtype (f32 on CPU, bf16 on CUDA).
    #[default]
    None,
    Int8,
    Int4,
}

impl Quantization {
    /// The default for a device: int4 on both. On the default Q4_1 model it is lossless
    /// (KL 0.002 to f32; the file's codes come back exactly), faster than int8 on CPU
    /// (121 vs 115 tok/s here) and smallest; int8 flipped a near-tied first token of a
    /// simple question (docs/lightweight-models.md). On CUDA it is what fits 8B in 8 GB.
    pub fn default_for(_device: Device) -> Self {
        Self::Int4
    }

    /// Bytes per weight as stored, scales included (for memory planning).
    pub fn bytes_per_weight(self, kind: Kind) -> f64 {
        match self {
            Self::None => kind.elt_size_in_bytes() as f64,
            Self::Int8 => 1.0,
            // 16 bytes of codes plus a bf16 scale and zero per 32 weights.
            Self::Int4 => 0.5 + 2.0 * 2.0 / INT4_GROUP as f64,
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        })
    }
}

impl FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" | "f32" | "off" => Ok(Self::None),
            "int8" | "q8" => Ok(Self::Int8),
            "int4" | "q4" => Ok(Self::Int4),
            other => Err(format!("unknown quantization `{other}` (none, int8, int4)")),
        }
    }
}

/// A linear layer `y = x W^T` with `W` of shape `[out, in]`.
pub enum Linear {
    /// Full precision, in the model's dtype.
    Dense(Tensor),
    Int8Cpu(PackedInt8),
    Int4(Int4Weight),
    /// Weight-only int8, one scale per row: a quantized model's output head on CPU.
    Int8Rows(Int8Table),
}

/// Group-wise int4 weights in libtorch's packed layout.
pub struct Int4Weight {
    packed: Tensor,
    /// `[in / group, out, 2]`: scale and zero of each group, in the kernel's dtype.
    scales_zeros: Tensor,
    out_features: i64,
    in_features: i64,
}

impl Linear {
    /// Builds a layer from an f32 CPU weight `[out, in]`, placed on `device`.
    pub fn new(weight: Tensor, quantization: Quantization, device: Device, kind: Kind) -> Result<Self> {
        // Quantize on the GPU when there is one: much faster than on the CPU for 8B models.
        let weight = if device.is_cuda() { weight.f_to_device(device)? } else { weight };
        Ok(match quantization {
            Quantization::None => Self::Dense(weight.f_to_device(device)?.f_to_kind(kind)?.f_contiguous()?),
            Quantization::Int8 if device.is_cuda() => {
                return Err(InferError::Quantization(
                    "int8 runs on CPU only (libtorch's CUDA int8 kernel is slower than bf16); use --quantize int4 or none on CUDA".into(),
                ))
            }
            Quantization::Int8 => Self::Int8Cpu(PackedInt8::pack(&weight)?),
            Quantization::Int4 => Self::Int4(Int4Weight::new(&weight, device)?),
        })
    }

    /// `x W^T` for `x` of shape `[rows, in]`, returned in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        Ok(match self {
            Self::Dense(w) if w.kind() == kind => x.f_linear::<Tensor>(w, None)?,
            // A bf16 table under an f32 model (quantized models on CUDA keep their head in bf16).
            Self::Dense(w) => x.f_to_kind(w.kind())?.f_linear::<Tensor>(w, None)?.f_to_kind(kind)?,
            Self::Int8Cpu(p) => p.matmul_t(&x.f_to_kind(Kind::Float)?)?.f_to_kind(kind)?,
            Self::Int4(w) => w.matmul_t(x)?.f_to_kind(kind)?,
            Self::Int8Rows(t) => t.matmul_t(x)?.f_to_kind(kind)?,
        })
    }

    /// `residual + x W^T` (one fused `addmm` for dense weights).
    pub fn forward_add(&self, residual: &Tensor, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) if w.kind() == x.kind() => Ok(residual.f_addmm(x, &w.tr())?),
            _ => Ok(residual.f_add(&self.forward(x)?)?),
        }
    }

    /// [`Linear::forward`] of each of `xs` (the passes of one prefill step), each output
    /// bit for bit what that input alone gives; int4 on the CPU unpacks its weight once for
    /// all the passes it multiplies through the unpacked weight.
    pub fn forward_passes(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        match self {
            Self::Int4(w) if xs.len() > 1 => {
                let kind = xs[0].kind();
                w.matmul_t_passes(xs)?.into_iter().map(|y| Ok(y.f_to_kind(kind)?)).collect()
            }
            _ => xs.iter().map(|x| self.forward(x)).collect(),
        }
    }

    /// [`Linear::forward_add`] of each pair of `residuals` and `xs`, as
    /// [`Linear::forward_passes`].
    pub fn forward_add_passes(&self, residuals: &[Tensor], xs: &[Tensor]) -> Result<Vec<Tensor>> {
        match self {
            Self::Int4(_) if xs.len() > 1 => {
                let ys = self.forward_passes(xs)?;
                residuals.iter().zip(&ys).map(|(r, y)| Ok(r.f_add(y)?)).collect()
            }
            _ => residuals.iter().zip(xs).map(|(r, x)| self.forward_add(r, x)).collect(),
        }
    }

    /// Bytes of weight memory this layer holds.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.numel() * w.kind().elt_size_in_bytes(),
            Self::Int8Cpu(p) => p.bytes(),
            Self::Int4(w) => w.bytes(),
            Self::Int8Rows(t) => t.bytes(),
        }
    }
}

/// The largest of libtorch's inner-k tilings (8, 4, 2) that divides `in_features`.
fn inner_k_tiles(in_features: i64) -> Result<i64> {
    [8, 4, 2].into_iter().find(|t| in_features % (t * 16) == 0).ok_or_else(|| {
        InferError::Quantization(format!("int4 needs an input width divisible by 32, got {in_features}"))
    })
}

impl Int4Weight {
    /// Min-max quantization of each group of [`INT4_GROUP`] weights to codes 0..15, with
    /// `w ≈ (q - 8) * scale + zero` (libtorch's tinygemm convention).
    pub fn new(weight: &Tensor, device: Device) -> Result<Self> {
        let (out_features, in_features) = weight.size2()?;
        if in_features % INT4_GROUP != 0 {
            return Err(InferError::Quantization(format!(
                "int4 needs an input width divisible by {INT4_GROUP}, got [{out_features}, {in_features}]"
            )));
        }
        // The kernels want a multiple of 16 rows: pad with zero rows, cut them off after.
        let padded_rows = (out_features + 15) / 16 * 16;
        let padded;
        let weight = if padded_rows == out_features {
            weight
        } else {
            padded = weight.f_constant_pad_nd([0, 0, 0, padded_rows - out_features])?;
            &padded
        };
        let tiles = inner_k_tiles(in_features)?;
        let groups = in_features / INT4_GROUP;
        let (codes, scales, zeros) = int4_codes(weight)?;
        let (packed, kind) = if device.is_cuda() {
            // Two codes per byte, the even column in the high nibble.
            let even = codes.f_slice(1, 0, None, 2)?;
            let odd = codes.f_slice(1, 1, None, 2)?;
            let bytes =
                even.f_bitwise_left_shift_tensor_scalar(4)?.f_bitwise_or_tensor(&odd)?.f_to_kind(Kind::Uint8)?;
            (bytes.f_to_device(device)?.f_internal_convert_weight_to_int4pack(tiles)?, Kind::BFloat16)
        } else {
            // bf16 scales halve their share of the footprint (0.125 bytes per weight).
            (codes.f_to_kind(Kind::Int)?.f_internal_convert_weight_to_int4pack_for_cpu(tiles)?, Kind::BFloat16)
        };
        let scales_zeros = Tensor::f_stack(&[scales, zeros], 2)? // [out, groups, 2]
            .f_transpose(0, 1)?
            .f_contiguous()?
            .f_to_kind(kind)?
            .f_to_device(device)?;
        debug_assert_eq!(scales_zeros.size(), [groups, padded_rows, 2]);
        Ok(Self { packed, scales_zeros, out_features, in_features })
    }

    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.matmul_t_passes(std::slice::from_ref(x))?.pop().expect("one output per input"))
    }

    /// `x W^T` for each of `xs`: a few rows through the kernel, many (a prefill pass)
    /// through the unpacked weight, unpacked once for all such passes.
    fn matmul_t_passes(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let kind = self.scales_zeros.kind();
        let xs = xs.iter().map(|x| Ok(x.f_to_kind(kind)?.f_contiguous()?)).collect::<Result<Vec<Tensor>>>()?;
        let cpu = !self.packed.device().is_cuda();
        let layout = if cpu { int4_prefill::layout() } else { None };
        let unpacked = |x: &Tensor| layout.is_some() && x.size()[0] >= int4_prefill::FROM_ROWS;
        let many: Vec<Tensor> = xs.iter().filter(|x| unpacked(x)).map(Tensor::shallow_clone).collect();
        let mut many = match layout {
            // Many rows (prefill passes): products through the unpacked weight.
            Some(layout) if !many.is_empty() => int4_prefill::matmul_t_passes(
                &many,
                &self.packed,
                &self.scales_zeros,
                INT4_GROUP,
                layout,
                int4_prefill::product(),
            )?,
            _ => Vec::new(),
        }
        .into_iter();
        let mut out = Vec::with_capacity(xs.len());
        for x in &xs {
            let y = if unpacked(x) {
                many.next().expect("one output per input")
            } else if cpu {
                x.f_internal_weight_int4pack_mm_for_cpu(&self.packed, INT4_GROUP, &self.scales_zeros)?
            } else {
                x.f_internal_weight_int4pack_mm(&self.packed, INT4_GROUP, &self.scales_zeros)?
            };
            out.push(if y.size()[1] == self.out_features { y } else { y.f_narrow(1, 0, self.out_features)? });
        }
        Ok(out)
    }

    fn bytes(&self) -> usize {
        self.packed.numel() * self.packed.kind().elt_size_in_bytes()
            + self.scales_zeros.numel() * self.scales_zeros.kind().elt_size_in_bytes()
    }

    pub fn shape(&self) -> (i64, i64) {
        (self.out_features, self.in_features)
    }

    /// The packed codes and `[in / group, out, 2]` scales and zeros, as the kernel takes them.
    pub fn parts(&self) -> (&Tensor, &Tensor) {
        (&self.packed, &self.scales_zeros)
    }
}

/// Codes (int64, `[out, in]`, 0..15), scales and zeros (`[out, groups]`) of a weight.
pub fn int4_codes(weight: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (out_features, in_features) = weight.size2()?;
    let groups = in_features / INT4_GROUP;
    let w = weight.f_to_kind(Kind::Float)?.f_reshape([out_features, groups, INT4_GROUP])?;
    let min = w.f_amin([2].as_slice(), true)?;
    let max = w.f_amax([2].as_slice(), true)?;
    let scales = max.f_sub(&min)?.f_clamp_min(1e-8)?.f_div_scalar(15.0)?;
    let codes = w.f_sub(&min)?.f_div(&scales)?.f_round()?.f_clamp(0, 15)?.f_to_kind(Kind::Int64)?;
    let zeros = min.f_add(&scales.f_mul_scalar(8.0)?)?;
    Ok((codes.f_reshape([out_features, in_features])?, scales.f_squeeze_dim(2)?, zeros.f_squeeze_dim(2)?))
}

/// Dequantizes what [`int4_codes`] returned (the reference the kernels are tested against).
pub fn int4_dequantize(codes: &Tensor, scales: &Tensor, zeros: &Tensor) -> Result<Tensor> {
    let (out_features, in_features) = codes.size2()?;
    let c = codes.f_to_kind(Kind::Float)?.f_reshape([out_features, in_features / INT4_GROUP, INT4_GROUP])?;
    let w = c.f_sub_scalar(8.0)?.f_mul(&scales.f_unsqueeze(2)?)?.f_add(&zeros.f_unsqueeze(2)?)?;
    Ok(w.f_reshape([out_features, in_features])?)
}

/// How a quantized model stores its vocabulary tables (embedding and output head).
pub fn table_format(quantization: Quantization, device: Device, hidden: i64) -> TableFormat {
    match quantization {
        Quantization::None => TableFormat::ModelDtype,
        _ if Int8Table::supports(device, hidden) => TableFormat::Int8Rows,
        _ => TableFormat::BFloat16,
    }
}

/// See [`table_format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFormat {
    /// Unquantized models.
    ModelDtype,
    /// Quantized models on CPU ([`Int8Table`]).
    Int8Rows,
    /// Quantized models on CUDA, or tables the int8 kernel cannot take.
    BFloat16,
}

/// The token embedding, whose rows come out in the model dtype: a dense table (the model
/// dtype, or bf16), or an [`Int8Table`]; a tied output head shares it.
pub enum Embedding {
    Dense { table: Tensor, out: Kind },
    Int8 { table: Int8Table, out: Kind },
}

impl Embedding {
    pub fn new(weight: Tensor, device: Device, format: TableFormat, kind: Kind) -> Result<Self> {
        Ok(match format {
            TableFormat::Int8Rows => Self::Int8 { table: Int8Table::quantize(&weight)?, out: kind },
            TableFormat::ModelDtype | TableFormat::BFloat16 => {
                let table_kind = if format == TableFormat::ModelDtype { kind } else { Kind::BFloat16 };
                let table = weight.f_to_device(device)?.f_to_kind(table_kind)?.f_contiguous()?;
                Self::Dense { table, out: kind }
            }
        })
    }

    /// The rows of `ids` in the model dtype.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense { table, out } => Ok(table.f_index_select(0, ids)?.f_to_kind(*out)?),
            Self::Int8 { table, out } => table.rows(ids, *out),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense { table, .. } => table.numel() * table.kind().elt_size_in_bytes(),
            Self::Int8 { table, .. } => table.bytes(),
        }
    }

    /// The int8 table, when the embedding is one.
    pub fn int8_table(&self) -> Option<&Int8Table> {
        match self {
            Self::Int8 { table, .. } => Some(table),
            Self::Dense { .. } => None,
        }
    }

    /// An output head sharing this table (tied embeddings).
    pub fn tied_head(&self) -> Linear {
        match self {
            Self::Dense { table, .. } => Linear::Dense(table.shallow_clone()),
            Self::Int8 { table, .. } => Linear::Int8Rows(table.share()),
        }
    }

    /// Whether `head` reads this table's storage.
    pub fn is_shared_with(&self, head: &Linear) -> bool {
        match (self, head) {
            (Self::Dense { table, .. }, Linear::Dense(w)) => w.data_ptr() == table.data_ptr(),
            (Self::Int8 { table, .. }, Linear::Int8Rows(t)) => t.data_ptr() == table.data_ptr(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_kind(Kind::Float);
        let b = b.to_kind(Kind::Float);
        (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
    }

    fn random(shape: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn int8_matches_dense_even_when_one_row_has_huge_activations() {
        let w = random(&[96, 64], 1).f_mul_scalar(0.05).unwrap();
        let x = random(&[5, 64], 2);
        // A "massive activation" token: 1000x the others. Per-tensor scaling would crush
        // the other rows to a handful of levels; per-token scaling keeps them accurate.
        let _ = x.get(0).f_mul_scalar_(1000.0).unwrap();
        let dense = x.linear::<Tensor>(&w, None);
        let int8 = Linear::new(w.shallow_clone(), Quantization::Int8, Device::Cpu, Kind::Float).unwrap();
        let y = int8.forward(&x).unwrap();
        for row in 0..5 {
            let e = rel_err(&y.get(row), &dense.get(row));
            assert!(e < 0.02, "row {row}: relative error {e}");
        }
        // The codes, plus per-column offsets and a bias for 96 + 1 guard rows, plus row scales.
        assert_eq!(int8.bytes(), 96 * 64 + (2 * 97 + 96) * 4);
        // Each row computes exactly as it would alone (a node's decode vs a verifier's
        // prefill must agree).
        for row in 0..5 {
            let alone = int8.forward(&x.narrow(0, row, 1)).unwrap();
            assert!(alone.equal(&y.narrow(0, row, 1)), "row {row} depends on the batch");
        }
    }

    /// `x W^T` with `W` quantized to int4 and dequantized again, in f32.
    fn int4_reference(w: &Tensor, x: &Tensor) -> Tensor {
        let (codes, scales, zeros) = int4_codes(w).unwrap();
        x.linear::<Tensor>(&int4_dequantize(&codes, &scales, &zeros).unwrap(), None)
    }

    #[test]
    fn int4_matches_its_dequantized_reference() {
        let w = random(&[64, 128], 3);
        let x = random(&[3, 128], 4);
        let reference = int4_reference(&w, &x);
        let int4 = Linear::new(w.shallow_clone(), Quantization::Int4, Device::Cpu, Kind::Float).unwrap();
        let y = int4.forward(&x).unwrap();
        assert_eq!(y.kind(), Kind::Float);
        // bf16 activations and scales: about 3 significant digits.
        assert!(rel_err(&y, &reference) < 0.01, "{}", rel_err(&y, &reference));
        // And the reference itself is close to the f32 product (4-bit error, 32-weight groups).
        assert!(rel_err(&reference, &x.linear::<Tensor>(&w, None)) < 0.15);
        assert_eq!(int4.bytes(), 64 * 128 / 2 + (128 / 32) * 64 * 2 * 2);
    }

    #[test]
    fn int4_keeps_the_codes_of_weights_already_on_a_q4_1_grid() {
        // Each group is d * q + m with q covering 0..15, as a Q4_1 block dequantizes.
        let q = Tensor::arange(16, (Kind::Int64, Device::Cpu)).repeat([8, 4]); // [8, 64]
        let d = Tensor::from_slice(&[0.01f32, 0.02, 0.5, 0.003, 0.1, 0.07, 0.2, 0.9]).unsqueeze(1);
        let m = Tensor::from_slice(&[-0.1f32, 0.3, -2.0, 0.0, 1.0, -0.5, 0.25, -4.0]).unsqueeze(1);
        let w = q.to_kind(Kind::Float).f_mul(&d).unwrap().f_add(&m).unwrap();
        let (codes, scales, _) = int4_codes(&w).unwrap();
        assert!(codes.equal(&q), "codes changed");
        assert!(rel_err(&scales.get(0).get(0), &d.get(0).get(0)) < 1e-5);
    }

    #[test]
    fn bad_shapes_get_a_clear_error() {
        let err = Linear::new(random(&[8, 20], 5), Quantization::Int4, Device::Cpu, Kind::Float).err().unwrap();
        assert!(err.to_string().contains("int4 needs an input width divisible by 32"), "{err}");
    }

    #[test]
    fn int4_pads_an_odd_number_of_rows() {
        let w = random(&[275, 64], 6);
        let x = random(&[2, 64], 7);
        let reference = int4_reference(&w, &x);
        let y = Linear::new(w, Quantization::Int4, Device::Cpu, Kind::Float).unwrap().forward(&x).unwrap();
        assert_eq!(y.size(), [2, 275]);
        assert!(rel_err(&y, &reference) < 0.01);
    }

    #[test]
    fn quantization_names_round_trip() {
        for q in [Quantization::None, Quantization::Int8, Quantization::Int4] {
            assert_eq!(q.to_string().parse::<Quantization>(), Ok(q));
        }
        assert!("int3".parse::<Quantization>().unwrap_err().contains("none, int8, int4"));
    }
}

#[cfg(test)]
mod empty_input_tests {
    use super::*;

    #[test]
    fn every_layer_kind_accepts_zero_rows() {
        let w = Tensor::randn([32, 64], (Kind::Float, Device::Cpu));
        for q in [Quantization::None, Quantization::Int8, Quantization::Int4] {
            let layer = Linear::new(w.shallow_clone(), q, Device::Cpu, Kind::Float).unwrap();
            let y = layer.forward(&Tensor::zeros([0, 64], (Kind::Float, Device::Cpu))).unwrap();
            assert_eq!(y.size(), [0, 32], "{q}");
        }
    }
}
