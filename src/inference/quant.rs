//! GGML tensor types and their block formats: dequantization of F32, F16, BF16, Q8_0,
//! Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K into `f32`, and quantizers for the simple block types
//! (used to write test models and to measure quantization error).
//!
//! Block layouts follow ggml's `ggml-common.h`; `tests/fixtures/smollm2/dequant.json`
//! (made by gguf-py's reference dequantizer) checks every type bit for bit.

use half::{bf16, f16};

/// Elements per K-quant super-block.
const QK_K: usize = 256;
/// Elements per simple block (Q4_0, Q4_1, Q8_0).
const QK: usize = 32;

/// The GGML tensor types Ludus can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// Maps GGML's numeric type id; `None` for types Ludus does not load.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (QK, 18),
            Self::Q4_1 => (QK, 20),
            Self::Q5_0 => (QK, 22),
            Self::Q5_1 => (QK, 24),
            Self::Q8_0 => (QK, 34),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }

    /// Bytes taken by `numel` elements; `None` when `numel` is not a whole number of blocks.
    pub fn bytes_for(self, numel: u64) -> Option<u64> {
        let (elems, bytes) = self.block();
        numel.is_multiple_of(elems as u64).then(|| numel / elems as u64 * bytes as u64)
    }

    /// Dequantizes `numel` elements stored in `data`.
    pub fn dequantize(self, data: &[u8], numel: usize) -> Result<Vec<f32>, String> {
        let (elems, bytes) = self.block();
        if !numel.is_multiple_of(elems) || data.len() != numel / elems * bytes {
            return Err(format!("{} bytes do not hold {numel} {self:?} elements", data.len()));
        }
        let mut out = vec![0f32; numel];
        let blocks = data.chunks_exact(bytes).zip(out.chunks_exact_mut(elems));
        match self {
            Self::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Self::F16 => blocks.for_each(|(b, y)| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Self::BF16 => blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            Self::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
            Self::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
            Self::Q5_0 => blocks.for_each(|(b, y)| dequant_q5(b, y, None)),
            Self::Q5_1 => blocks.for_each(|(b, y)| dequant_q5(b, y, Some(half_at(b, 2)))),
            Self::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
            Self::Q4K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
            Self::Q5K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
            Self::Q6K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
        }
        Ok(out)
    }

    /// Quantizes `values` (a multiple of the block size) into this type's blocks.
    /// Supported for F32, F16, BF16, Q8_0, Q4_0 and Q4_1.
    pub fn quantize(self, values: &[f32]) -> Result<Vec<u8>, String> {
        let (elems, _) = self.block();
        if !values.len().is_multiple_of(elems) {
            return Err(format!("{} values are not a whole number of {self:?} blocks", values.len()));
        }
        let mut out = Vec::with_capacity(self.bytes_for(values.len() as u64).unwrap_or(0) as usize);
        for x in values.chunks_exact(elems) {
            match self {
                Self::F32 => out.extend_from_slice(&x[0].to_le_bytes()),
                Self::F16 => out.extend_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
                Self::BF16 => out.extend_from_slice(&bf16::from_f32(x[0]).to_le_bytes()),
                Self::Q8_0 => quant_q8_0(x, &mut out),
                Self::Q4_0 => quant_q4_0(x, &mut out),
                Self::Q4_1 => quant_q4_1(x, &mut out),
                Self::Q5_0 | Self::Q5_1 | Self::Q4K | Self::Q5K | Self::Q6K => {
                    return Err(format!("no quantizer for {self:?}"))
                }
            }
        }
        Ok(out)
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0f) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Q5_0 (`min` = None: d f16 | qh u32 | 16 B of nibbles, x = d·(q − 16)) and Q5_1
/// (`min` = m: d f16 | m f16 | qh u32 | nibbles, x = d·q + m). Bit j of qh is the fifth
/// bit of value j; nibble order as Q4_0.
fn dequant_q5(b: &[u8], y: &mut [f32], min: Option<f32>) {
    let d = half_at(b, 0);
    let at = if min.is_some() { 4 } else { 2 };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let (offset, add) = match min {
        Some(m) => (0, m),
        None => (16, 0.0),
    };
    for (j, &q) in b[at + 4..at + 20].iter().enumerate() {
        let low = ((q & 0x0f) as u32 | (((qh >> j) & 1) << 4)) as i32 - offset;
        let high = ((q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)) as i32 - offset;
        y[j] = low as f32 * d + add;
        y[j + 16] = high as f32 * d + add;
    }
}

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = q as i8 as f32 * d;
    }
}

/// Unpacks the 6-bit scale and min of sub-block `j` from a K-quant's 12 scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        let sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// Q4_K: d f16 | dmin f16 | scales[12] | qs[128]
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..QK_K / 64 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let y = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            y[l] = d * sc1 * (q[l] & 0x0f) as f32 - dmin * m1;
            y[l + 32] = d * sc2 * (q[l] >> 4) as f32 - dmin * m2;
        }
    }
}

/// Q5_K: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..QK_K / 64 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let ql = &qs[chunk * 32..chunk * 32 + 32];
        let y = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d * sc1 * ((ql[l] & 0x0f) + hi1) as f32 - dmin * m1;
            y[l + 32] = d * sc2 * ((ql[l] >> 4) + hi2) as f32 - dmin * m2;
        }
    }
}

/// Q6_K: ql[128] | qh[64] | scales i8[16] | d f16
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let y = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

fn quant_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

fn quant_q4_0(x: &[f32], out: &mut Vec<u8>) {
    // ggml's reference: the value of largest magnitude maps to -8.
    let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    for j in 0..16 {
        let lo = ((x[j] * id + 8.5) as i32).clamp(0, 15) as u8;
        let hi = ((x[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
        out.push(lo | (hi << 4));
    }
}

fn quant_q4_1(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
    for j in 0..16 {
        let lo = (((x[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        let hi = (((x[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        out.push(lo | (hi << 4));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q5_0 and Q5_1 blocks (random bytes, sane scales) against gguf-py's dequantizer
    /// (`tests/fixtures/families/dequant_q5.json`): Gemma 3 270M's GGUF uses Q5_0.
    #[test]
    fn q5_blocks_match_gguf_py() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/families/dequant_q5.json")).unwrap();
        for (name, kind) in [("Q5_0", GgmlType::Q5_0), ("Q5_1", GgmlType::Q5_1)] {
            let bytes: Vec<u8> =
                fixture[name]["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
            let expected: Vec<f32> =
                fixture[name]["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(kind.dequantize(&bytes, expected.len()).unwrap(), expected, "{name}");
            assert_eq!(GgmlType::from_id(kind.id()), Some(kind));
        }
    }

    #[test]
    fn simple_quantizers_round_trip_within_one_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 31.5) / 10.0).collect();
        for kind in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::F16, GgmlType::BF16] {
            let packed = kind.quantize(&x).unwrap();
            assert_eq!(packed.len() as u64, kind.bytes_for(64).unwrap());
            let y = kind.dequantize(&packed, 64).unwrap();
            let step = match kind {
                GgmlType::Q8_0 => 3.2 / 127.0,
                GgmlType::Q4_0 => 3.2 / 8.0,
                GgmlType::Q4_1 => 6.4 / 15.0,
                _ => 0.02,
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= step, "{kind:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(GgmlType::Q4K.dequantize(&[0; 143], 256).is_err());
        assert!(GgmlType::Q4_0.dequantize(&[0; 18], 31).is_err());
        assert!(GgmlType::Q4_0.quantize(&[0.0; 33]).is_err());
        assert!(GgmlType::from_id(10).is_none(), "Q2_K is not supported and must say so");
    }
}
