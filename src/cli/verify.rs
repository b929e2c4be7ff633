//! `ludus verify PROOF_FILE --model PATH`: checks a stored proof of inference offline
//! against a reference copy of the model; prints the verdict as JSON and exits 1 when
//! the proof is rejected.

use std::path::PathBuf;

use clap::Args;
use tch::{Device, Kind};

use crate::inference::Model;
use crate::proof::verify::{node_breaks, verify_claimed};
use crate::proof::{StoredProof, Tolerances};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A stored proof (JSON: proof, input, params, completion).
    pub proof_file: PathBuf,
    /// The reference model (file, directory or protected bundle with --model-key).
    #[arg(long)]
    pub model: PathBuf,
    /// Key file of a protected model bundle.
    #[arg(long)]
    pub model_key: Option<PathBuf>,
    /// Largest relative error of committed hidden-state values.
    #[arg(long, default_value_t = Tolerances::default().max_value_error)]
    pub max_value_error: f32,
    /// Smallest share of committed indices in the recomputed top-k.
    #[arg(long, default_value_t = Tolerances::default().min_index_overlap)]
    pub min_index_overlap: f32,
    /// Scales every format's calibrated tie margin (the largest gap, in logit units,
    /// between the sampler's pick and the node's token forgiven as a near-tie).
    #[arg(long, default_value_t = Tolerances::default().tie_margin_scale)]
    pub tie_margin_scale: f32,
}

/// Returns whether the proof was accepted.
pub fn run(args: VerifyArgs) -> anyhow::Result<bool> {
    let text =
        std::fs::read_to_string(&args.proof_file).map_err(|e| anyhow::anyhow!("{}: {e}", args.proof_file.display()))?;
    let stored: StoredProof = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a stored proof: {e}", args.proof_file.display()))?;
    let key = args.model_key.as_deref().map(crate::inference::protect::read_key_file).transpose()?;
    // Recompute with the format the node signed for.
    let format = crate::proof::Format::declared_by(&stored.proof).map_err(|e| anyhow::anyhow!(e))?;
    let quantization = format.reference();
    if format == crate::proof::Format::Int8 {
        eprintln!("note: an int8 proof is checked with relaxed tolerances (value ×3, overlap −0.1)");
    }
    // Unquantized proofs are checked in f32; quantized ones in the format's own dtype. The
    // claim is checked against the stricter formats' references too, as the server does.
    let load = |q: crate::inference::Quantization| {
        let dtype = (q == crate::inference::Quantization::None).then_some(Kind::Float);
        Model::load_quantized(&args.model, Device::Cpu, dtype, q, key.as_ref())
    };
    let mut models = std::collections::HashMap::new();
    for q in std::iter::once(quantization).chain(format.stricter().iter().map(|f| f.reference())) {
        if let std::collections::hash_map::Entry::Vacant(slot) = models.entry(q) {
            slot.insert(load(q)?);
        }
    }
    let prompt = stored.prompt(&models[&quantization])?;
    let tol = Tolerances {
        max_value_error: args.max_value_error,
        min_index_overlap: args.min_index_overlap,
        tie_margin_scale: args.tie_margin_scale,
    };
    let reference = |q| models.get(&q);
    let own_prompt = &prompt[..prompt.len() - stored.prefix.len()];
    let breaks = node_breaks(&models[&quantization], &stored.input, own_prompt);
    let checked = verify_claimed(
        &reference,
        &stored.proof,
        &prompt,
        stored.prefix.len(),
        &stored.completion,
        &stored.params,
        &tol,
        Some(&breaks),
    )?;
    let accepted = checked.accepted();
    let signer = stored.proof.signer().map(|a| a.to_string()).unwrap_or_else(|e| format!("invalid: {e}"));
    let verdict = serde_json::json!({"signer": signer, "accepted": accepted, "reasons": checked.reasons(),
        "verdict": checked.verdict, "stricter_formats": checked.stricter});
    println!("{}", serde_json::to_string_pretty(&verdict)?);
    Ok(accepted)
}
