//! The number format a node declares in its signed proof (`quantization`, `dtype`), and
//! what each format is allowed: the tie margin the verifier forgives, the reference that
//! checks it, and how its honest runs deviate from that reference. Every figure is
//! calibrated from honest runs (docs/proof-of-inference.md, "Near-tie steering").
//!
//! A node gains by naming a looser format than it runs (a wider margin to steer in), so
//! the claim itself is checked against the commitments ([`Format::looks_like`]).

use std::fmt;

use tch::Kind;

use crate::inference::Quantization;

/// A proof that names a format the verifier does not know: it is rejected, never checked
/// against a guess.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownFormat {
    #[error("the proof names an unknown quantization `{0}`")]
    Quantization(String),
    #[error("the proof names an unknown dtype `{0}`")]
    Dtype(String),
}

/// How a node computes: its weight format, and for unquantized weights its dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    F32,
    F16,
    Bf16,
    Int8,
    Int4,
}

impl Format {
    pub const ALL: [Format; 5] = [Self::F32, Self::F16, Self::Bf16, Self::Int8, Self::Int4];

    /// The format of an engine storing its weights as `quantization` and computing in `kind`.
    pub fn of(quantization: Quantization, kind: Kind) -> Self {
        match (quantization, kind) {
            (Quantization::Int8, _) => Self::Int8,
            (Quantization::Int4, _) => Self::Int4,
            (Quantization::None, Kind::BFloat16) => Self::Bf16,
            (Quantization::None, Kind::Half) => Self::F16,
            (Quantization::None, _) => Self::F32,
        }
    }

    /// The format a proof declares: its `quantization` (`int8`, `int4`; empty =
    /// unquantized) and, for unquantized weights, its `dtype` (`bf16`, `f16`; empty = f32).
    pub fn declared(quantization: &str, dtype: &str) -> Result<Self, UnknownFormat> {
        match (quantization, dtype) {
            ("", "") => Ok(Self::F32),
            ("", "f16") => Ok(Self::F16),
            ("", "bf16") => Ok(Self::Bf16),
            ("int8", "") => Ok(Self::Int8),
            ("int4", "") => Ok(Self::Int4),
            ("" | "int8" | "int4", other) => Err(UnknownFormat::Dtype(other.to_string())),
            (other, _) => Err(UnknownFormat::Quantization(other.to_string())),
        }
    }

    /// The format `proof` declares (and the verifier holds it to).
    pub fn declared_by(proof: &crate::protocol::Proof) -> Result<Self, UnknownFormat> {
        Self::declared(&proof.quantization, &proof.dtype)
    }

    /// The proof's `quantization` field for this format.
    pub fn quantization_field(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::Int4 => "int4",
            _ => "",
        }
    }

    /// The proof's `dtype` field for this format.
    pub fn dtype_field(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            _ => "",
        }
    }

    /// The weights of the verifier's reference for this format: unquantized formats are
    /// checked in f32, quantized ones in their own format (its default dtype).
    pub fn reference(self) -> Quantization {
        match self {
            Self::Int8 => Quantization::Int8,
            Self::Int4 => Quantization::Int4,
            _ => Quantization::None,
        }
    }

    /// The largest score gap forgiven as a near-tie, for a node in this format checked
    /// against its reference: about twice the worst gap honest runs showed (100 tasks of
    /// 64 tokens per format, docs/proof-of-inference.md), never less than 0.25 (hardware
    /// differences within one format).
    pub fn tie_margin(self) -> f32 {
        match self {
            // Honest f32 never deviated; f16's worst gap was 0.02.
            Self::F32 | Self::F16 => 0.25,
            // Worst 0.54 (bf16, an earlier 100-task calibration) and 0.52 (int4).
            Self::Bf16 | Self::Int4 => 1.0,
            // int8 quantizes activations at run time, and a rounding flip in one layer
            // grows through the next: an honest task deviated by 3.59 (1.25 × that).
            Self::Int8 => 4.5,
        }
    }

    /// A forgiven near-tie with a gap above this is "wide": beyond the noise most honest
    /// near-ties in this format show.
    pub fn wide_gap(self) -> f32 {
        match self {
            Self::F32 | Self::F16 => 0.05,
            Self::Bf16 => 0.3,
            Self::Int4 => 0.4,
            Self::Int8 => 1.0,
        }
    }

    /// An upper bound on the share of an honest node's generated tokens that are wide
    /// near-ties: about three times the rate measured (100 honest 64-token tasks), and about
    /// 3 / (tokens measured) where none was seen.
    pub fn honest_wide_rate(self) -> f64 {
        match self {
            // 0 in 9,263 f32 and f16 tokens.
            Self::F32 | Self::F16 => 0.0004,
            // bf16: 0 in 4,434; int4: 1 in 4,400.
            Self::Bf16 | Self::Int4 => 0.0007,
            // 9 in 4,043.
            Self::Int8 => 0.007,
        }
    }

    /// The same bound for near-ties that pass over an end of the answer the reference picked.
    pub fn honest_end_pass_rate(self) -> f64 {
        match self {
            Self::F32 | Self::F16 => 0.0004,
            // bf16: 1 in 4,434 (at the nucleus' edge); int4: 0 in 4,400.
            Self::Bf16 | Self::Int4 => 0.0007,
            // 2 in 4,043.
            Self::Int8 => 0.0015,
        }
    }

    /// The stricter formats a claim of this one must not look like: the commitments must
    /// not sit clearly closer to one of their references than to this format's own. A
    /// bf16 claim is checked against the f32 reference alone ([`Format::min_f32_distance`]).
    pub fn stricter(self) -> &'static [Format] {
        match self {
            Self::Int8 => &[Self::F32, Self::Int4],
            Self::Int4 => &[Self::F32],
            _ => &[],
        }
    }

    /// The smallest mean value error against the f32 reference that a run in this format
    /// shows: a bf16 claim whose values match f32 closer than this was computed in f32.
    pub fn min_f32_distance(self) -> f32 {
        match self {
            Self::Bf16 => 0.002,
            _ => 0.0,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|f| f.to_string() == s).ok_or_else(|| format!("unknown format `{s}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_round_trips_through_the_proof_fields_and_unknown_names_are_refused() {
        for f in Format::ALL {
            assert_eq!(Format::declared(f.quantization_field(), f.dtype_field()), Ok(f));
            assert_eq!(f.to_string().parse::<Format>(), Ok(f));
        }
        assert_eq!(Format::declared("int9", ""), Err(UnknownFormat::Quantization("int9".into())));
        assert_eq!(Format::declared("", "f64"), Err(UnknownFormat::Dtype("f64".into())));
        assert!(Format::declared("int8", "bf16").is_err(), "quantized formats name no dtype");
        assert_eq!(Format::of(Quantization::None, Kind::BFloat16), Format::Bf16);
        assert_eq!(Format::of(Quantization::Int4, Kind::BFloat16), Format::Int4);
    }

    #[test]
    fn a_looser_claim_is_always_checked_against_the_stricter_formats() {
        for claimed in Format::ALL {
            for other in Format::ALL {
                if other.tie_margin() < claimed.tie_margin() && other.reference() != claimed.reference() {
                    // A stricter format with its own reference: the claim is compared with it,
                    // or the f32 reference stands for it (every unquantized run's numbers are
                    // close to f32's, far closer than to quantized weights').
                    let covered = claimed.stricter().contains(&other)
                        || (other.reference() == Quantization::None && claimed.stricter().contains(&Format::F32));
                    assert!(covered, "{claimed} is not checked against {other}");
                }
            }
            if claimed.reference() == Quantization::None && claimed.tie_margin() > Format::F32.tie_margin() {
                assert!(claimed.min_f32_distance() > 0.0, "{claimed} could be claimed by an f32 node");
            }
        }
    }
}
