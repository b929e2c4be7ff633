//! `ludus tokenize`, `ludus model synth`, `ludus model protect` and `ludus keys new`:
//! the commands that make or read model and key files.

use std::path::Path;

use super::{inspect, progress};

/// `ludus tokenize`: the ids of `text`, as JSON.
pub fn tokenize(model: &Path, text: &str, add_special: bool) -> anyhow::Result<()> {
    let tokenizer = inspect::load_tokenizer(model)?;
    let ids = tokenizer.encode(text, add_special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

/// `ludus model synth`: a model of a known shape with random weights (benchmarks, tests).
pub fn synth(shape: &str, dtype: &str, out: &Path) -> anyhow::Result<()> {
    use crate::inference::quant::GgmlType;
    use crate::inference::tiny_model::{write_gguf, TinySpec};
    let base = TinySpec { context: 4096, ..TinySpec::default() };
    let spec = match shape {
        "tiny" => base,
        "smollm2-135m" => TinySpec { layers: 30, hidden: 576, heads: 9, kv_heads: 3, ffn: 1536, ..base },
        "llama3-8b" => TinySpec { layers: 32, hidden: 4096, heads: 32, kv_heads: 8, ffn: 14336, ..base },
        other => anyhow::bail!("unknown shape `{other}` (smollm2-135m, llama3-8b, tiny)"),
    };
    let dtype = match dtype {
        "f32" => GgmlType::F32,
        "f16" => GgmlType::F16,
        "q8_0" => GgmlType::Q8_0,
        "q4_0" => GgmlType::Q4_0,
        "q4_1" => GgmlType::Q4_1,
        other => anyhow::bail!("unknown dtype `{other}` (f32, f16, q8_0, q4_0, q4_1)"),
    };
    write_gguf(out, &TinySpec { dtype, ..spec })?;
    eprintln!("wrote {} ({shape}, random weights)", out.display());
    Ok(())
}

/// `ludus model protect`: a protected bundle of `input` and its new key.
pub fn protect(input: &Path, out: &Path, key_out: &Path, name: Option<String>) -> anyhow::Result<()> {
    let key = crate::inference::protect::new_key();
    write_model_key(key_out, &key)?;
    let name = name.unwrap_or_else(|| crate::inference::model::model_name(input));
    let bar = progress::bar("protecting");
    let manifest =
        crate::inference::protect::write_bundle_with_progress(input, out, &name, &key, &mut |stage, done, total| {
            bar.set_message(format!("protecting: {stage}"));
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
    bar.finish_and_clear();
    eprintln!(
        "protected `{}` into {} (key id {}, key in {})",
        manifest.name,
        out.display(),
        manifest.key_id,
        key_out.display()
    );
    Ok(())
}

/// `ludus keys new`: a node key file; prints its address.
pub fn new_node_key(out: &Path) -> anyhow::Result<()> {
    let identity = crate::crypto::identity::Identity::create(out)?;
    eprintln!("wrote {} (keep it secret; it controls the payouts)", out.display());
    println!("{}", identity.address);
    Ok(())
}

/// Writes a new key file with mode 0600, refusing to overwrite one.
fn write_model_key(path: &std::path::Path, key: &[u8; 32]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    file.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
    Ok(())
}
