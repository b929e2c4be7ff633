//! `ludus verify PROOF_FILE --model PATH`: checks a stored proof of inference offline
//! against a reference copy of the model; prints the verdict as JSON and exits 1 when
//! the proof is rejected.

use std::path::PathBuf;

use clap::Args;
use tch::{Device, Kind};

use crate::inference::Model;
use crate::proof::{verify, StoredProof, Tolerances};

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
    /// Largest sampler score gap forgiven as a near-tie.
    #[arg(long, default_value_t = Tolerances::default().max_tie_margin)]
    pub max_tie_margin: f32,
}

/// Returns whether the proof was accepted.
pub fn run(args: VerifyArgs) -> anyhow::Result<bool> {
    let text =
        std::fs::read_to_string(&args.proof_file).map_err(|e| anyhow::anyhow!("{}: {e}", args.proof_file.display()))?;
    let stored: StoredProof = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a stored proof: {e}", args.proof_file.display()))?;
    let key = args.model_key.as_deref().map(crate::crypto::protect::read_key_file).transpose()?;
    // Recompute with the quantization the node signed for.
    let quantization = match stored.proof.quantization.as_str() {
        "" => crate::inference::Quantization::None,
        "int8" => crate::inference::Quantization::Int8,
        "int4" => crate::inference::Quantization::Int4,
        other => anyhow::bail!("the proof names an unknown quantization `{other}`"),
    };
    if quantization == crate::inference::Quantization::Int8 {
        eprintln!("note: an int8 proof is checked with relaxed tolerances (value ×3, overlap −0.1)");
    }
    // Unquantized proofs are checked in f32; quantized ones in the format's own dtype.
    let dtype = (quantization == crate::inference::Quantization::None).then_some(Kind::Float);
    let model = Model::load_quantized(&args.model, Device::Cpu, dtype, quantization, key.as_ref())?;
    let prompt = stored.prompt(&model)?;
    let tol = Tolerances {
        max_value_error: args.max_value_error,
        min_index_overlap: args.min_index_overlap,
        max_tie_margin: args.max_tie_margin,
    };
    let verdict = verify(&model, &stored.proof, &prompt, &stored.completion, &stored.params, &tol)?;
    let signer = stored.proof.signer().map(|a| a.to_string()).unwrap_or_else(|e| format!("invalid: {e}"));
    println!("{}", serde_json::to_string_pretty(&serde_json::json!({"signer": signer, "verdict": verdict}))?);
    Ok(verdict.accepted)
}
