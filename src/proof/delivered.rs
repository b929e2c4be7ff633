//! Tokens a node delivered and then failed before its proof. A streamed answer's game has
//! read them already, and no proof covers them: the node's `Done` never came, so the
//! answer went on elsewhere (a failover continuation) or ended there. They are checked
//! without commitments, token by token against the seeded sampler (the sampler is a pure
//! function of logits, seed and position), on the reference of each format an honest node
//! may run. One format whose reference explains every token within its tie margin
//! accepts them; garbage, an edited word or a steered answer fits none.

use super::format::Format;
use super::verify::{Limits, Replay, Tolerances, Verdict};
use crate::inference::{InferError, Model, Quantization, SamplingParams};

/// The references that can explain an honest node's tokens, most common first (int4 is
/// the node's default format), each with the widest limits among the formats it checks:
/// without a proof the node never said which format it ran.
pub fn references(tol: &Tolerances) -> Vec<(Quantization, Format, Limits)> {
    [Quantization::Int4, Quantization::None, Quantization::Int8]
        .into_iter()
        .filter_map(|quantization| {
            let widest = Format::ALL
                .into_iter()
                .filter(|f| f.reference() == quantization)
                .max_by(|a, b| a.tie_margin().total_cmp(&b.tie_margin()))?;
            Some((quantization, widest, tol.for_format(widest)))
        })
        .collect()
}

/// Judges `tokens`, generated after `prompt` (which ends with the `prefix` tokens earlier
/// nodes generated, counted as generated for the penalties and the grammar), against the
/// seeded sampler on `model`'s logits. Accepted when every token is the sampler's pick or
/// a near-tie within `limits`, the grammar holds and the answer does not run past an end
/// the reference chose by more than the margin.
pub fn check_tokens(
    model: &Model,
    prompt: &[u32],
    prefix: usize,
    tokens: &[u32],
    params: &SamplingParams,
    limits: Limits,
    format: Format,
) -> Result<Verdict, InferError> {
    let mut v = Verdict {
        tokens: tokens.len(),
        worst_index_overlap: 1.0,
        format: format.to_string(),
        tie_margin: limits.max_tie_margin,
        ..Verdict::default()
    };
    if tokens.is_empty() || prompt.is_empty() {
        v.reasons.push("nothing to check: no delivered token, or no prompt".into());
        return Ok(v);
    }
    let mut replay = Replay::start(model, prompt, prefix, tokens, params, limits)?;
    replay.prefill(&mut v, &[])?;
    replay.judge(&mut v, 0, format);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every format is covered by exactly one reference, each given the widest margin of
    /// the formats it stands for, and int4 (the default) is tried first.
    #[test]
    fn each_format_is_checked_by_its_own_reference_with_the_widest_margin() {
        let refs = references(&Tolerances::default());
        assert_eq!(refs.first().map(|r| r.0), Some(Quantization::Int4));
        for format in Format::ALL {
            let (_, named, limits) =
                refs.iter().find(|(q, _, _)| *q == format.reference()).expect("a reference for every format");
            assert!(limits.max_tie_margin >= format.tie_margin(), "{format} under {named}");
        }
        let unquantized = refs.iter().find(|r| r.0 == Quantization::None).unwrap();
        assert_eq!(unquantized.1, Format::Bf16, "bf16 has the widest margin of the unquantized formats");
    }
}
