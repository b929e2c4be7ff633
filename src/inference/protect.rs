//! Model protection (`ludus model protect`): turn a Llama checkpoint into a bundle whose
//! weights compute the same function but no longer resemble the public checkpoint, and
//! which is encrypted at rest.
//!
//! 1. Fold every RMSNorm gain into the linear layers that read its output.
//! 2. Rotate the residual stream by a secret random orthogonal matrix `Q` (D×D): the
//!    embedding becomes `E·Q`, layers reading the stream `W·Q`, layers writing it `Qᵀ·W`.
//!    A gain-less RMSNorm commutes with `Q` (it preserves norms), so outputs match the
//!    original up to float rounding.
//! 3. Permute attention KV groups (with their query heads) and FFN units, per layer.
//! 4. Encrypt the tensors with AES-256-GCM-SIV in 1 MiB chunks (AAD binds the chunk index
//!    and the manifest's content hash), next to a clear `manifest.json` and the tokenizer.
//!
//! What this buys and what it does not is in `docs/threat-model.md`: a node owner with
//! root can still read the decrypted, rotated weights from memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::error::{InferError, Result};
use super::gguf::{write_metadata_only, MetaValue};
use super::weights::WeightSource;
use crate::crypto::session::{aes256gcmsiv_open, aes256gcmsiv_seal};

/// Format tag of a bundle's manifest.
pub const BUNDLE_FORMAT: &str = "ludus-protected-model/1";
const CHUNK_BYTES: usize = 1 << 20;
const MANIFEST: &str = "manifest.json";
const WEIGHTS: &str = "weights.enc";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TensorEntry {
    name: String,
    shape: Vec<usize>,
    /// Offset of the tensor's f32 data in the decrypted stream.
    offset: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The name nodes serve the model under.
    pub name: String,
    pub config: LlamaConfig,
    tensors: Vec<TensorEntry>,
    /// Bytes of plaintext (all tensors, f32 little-endian).
    plaintext_bytes: usize,
    /// SHA-256 of the plaintext: checked after decryption.
    pub plaintext_sha256: String,
    /// SHA-256 of the key, first 8 bytes hex: tells which key a bundle needs.
    pub key_id: String,
    /// Tokenizer files shipped with the bundle (clear).
    pub tokenizer: Vec<String>,
}

/// True when `path` is a protected bundle directory.
pub fn is_bundle(path: &Path) -> bool {
    path.join(MANIFEST).is_file() && path.join(WEIGHTS).is_file()
}

/// A fresh random bundle key.
pub fn new_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

/// Reads a bundle key file (hex, 32 bytes).
pub fn read_key_file(path: &Path) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(path).map_err(|e| InferError::io(path, e))?;
    let bytes = hex::decode(text.trim()).map_err(|e| InferError::format(path, format!("not a hex key: {e}")))?;
    bytes.try_into().map_err(|_| InferError::format(path, "a model key is 32 bytes"))
}

pub fn key_id(key: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(key)[..8])
}

fn f64t(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_to_kind(Kind::Double)?)
}

/// A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal).
fn random_orthogonal(d: usize) -> Result<Tensor> {
    let g = Tensor::f_randn([d as i64, d as i64], (Kind::Double, Device::Cpu))?;
    let (q, r) = Tensor::f_linalg_qr(&g, "reduced")?;
    let signs = r.f_diagonal(0, 0, 1)?.f_sign()?;
    Ok(q.f_mul(&signs.f_unsqueeze(0)?)?)
}

fn permutation(n: usize) -> Vec<i64> {
    let mut p: Vec<i64> = (0..n as i64).collect();
    p.shuffle(&mut rand::rng());
    p
}

/// The protected weights (GGUF names, f32, the model's own half-split layout).
pub fn protect_weights(source: &WeightSource) -> Result<(LlamaConfig, BTreeMap<String, Tensor>)> {
    let mut c = source.config()?;
    if c.sandwich_norms {
        return Err(InferError::InvalidRequest(format!(
            "model protection cannot rotate a {} model: its norms on the attention and MLP outputs scale each \
             channel of the residual stream after normalizing, which does not commute with a rotation. \
             Serve it unprotected (Qwen, Phi and Llama models can be protected)",
            c.family
        )));
    }
    let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (h, kv) = (c.num_heads, c.num_kv_heads);
    let groups = h / kv;
    let get = |name: &str, shape: &[usize]| source.tensor(name, shape, &c).and_then(|t| f64t(&t));
    let q = random_orthogonal(d)?;
    let qt = q.f_tr()?;
    let mut out = BTreeMap::new();
    let mut put = |name: String, t: Tensor| -> Result<()> {
        out.insert(name, t.f_to_kind(Kind::Float)?.f_contiguous()?);
        Ok(())
    };
    let embed = get("token_embd.weight", &[c.vocab_size, d])?;
    let head =
        if source.has("output.weight") { get("output.weight", &[c.vocab_size, d])? } else { embed.shallow_clone() };
    put("token_embd.weight".into(), embed.f_matmul(&q)?)?;
    let ones = Tensor::f_ones([d as i64], (Kind::Double, Device::Cpu))?;
    for i in 0..c.num_layers {
        let name = |leaf: &str| format!("blk.{i}.{leaf}.weight");
        let attn_g = get(&name("attn_norm"), &[d])?.f_unsqueeze(0)?;
        let ffn_g = get(&name("ffn_norm"), &[d])?.f_unsqueeze(0)?;
        // KV groups move together with their query heads.
        let kv_perm = permutation(kv);
        let q_rows: Vec<i64> = kv_perm
            .iter()
            .flat_map(|&g| {
                (0..groups as i64)
                    .flat_map(move |r| (0..hd as i64).map(move |e| ((g * groups as i64 + r) * hd as i64) + e))
            })
            .collect();
        let kv_rows: Vec<i64> = kv_perm.iter().flat_map(|&g| (0..hd as i64).map(move |e| g * hd as i64 + e)).collect();
        let q_rows = Tensor::f_from_slice(&q_rows)?;
        let kv_rows = Tensor::f_from_slice(&kv_rows)?;
        let reads = |w: Tensor, gain: &Tensor, rows: &Tensor| -> Result<Tensor> {
            Ok(w.f_mul(gain)?.f_index_select(0, rows)?.f_matmul(&q)?)
        };
        put(name("attn_q"), reads(get(&name("attn_q"), &[h * hd, d])?, &attn_g, &q_rows)?)?;
        put(name("attn_k"), reads(get(&name("attn_k"), &[kv * hd, d])?, &attn_g, &kv_rows)?)?;
        put(name("attn_v"), reads(get(&name("attn_v"), &[kv * hd, d])?, &attn_g, &kv_rows)?)?;
        if c.qkv_bias {
            // Biases sit on the heads' side: they move with their rows, unrotated.
            for (leaf, rows, len) in
                [("attn_q", &q_rows, h * hd), ("attn_k", &kv_rows, kv * hd), ("attn_v", &kv_rows, kv * hd)]
            {
                let bias_name = format!("blk.{i}.{leaf}.bias");
                let bias = source.tensor(&bias_name, &[len], &c)?.f_index_select(0, rows)?;
                put(bias_name, bias)?;
            }
        }
        if c.qk_norm {
            // One gain per head dimension, shared by every head: permuting heads keeps it.
            for leaf in ["attn_q_norm", "attn_k_norm"] {
                put(name(leaf), source.tensor(&name(leaf), &[hd], &c)?)?;
            }
        }
        let o = get(&name("attn_output"), &[d, h * hd])?.f_index_select(1, &q_rows)?;
        put(name("attn_output"), qt.f_matmul(&o)?)?;
        let ffn_perm = Tensor::f_from_slice(&permutation(f))?;
        put(name("ffn_gate"), reads(get(&name("ffn_gate"), &[f, d])?, &ffn_g, &ffn_perm)?)?;
        put(name("ffn_up"), reads(get(&name("ffn_up"), &[f, d])?, &ffn_g, &ffn_perm)?)?;
        let down = get(&name("ffn_down"), &[d, f])?.f_index_select(1, &ffn_perm)?;
        put(name("ffn_down"), qt.f_matmul(&down)?)?;
        put(name("attn_norm"), ones.shallow_clone())?;
        put(name("ffn_norm"), ones.shallow_clone())?;
    }
    let out_g = get("output_norm.weight", &[d])?.f_unsqueeze(0)?;
    put("output.weight".into(), head.f_mul(&out_g)?.f_matmul(&q)?)?;
    put("output_norm.weight".into(), ones)?;
    c.tie_word_embeddings = false;
    Ok((c, out))
}

fn chunk_aad(content_hash: &str, index: u64) -> Vec<u8> {
    [b"ludus-bundle".as_slice(), content_hash.as_bytes(), &index.to_le_bytes()].concat()
}

fn chunk_nonce(index: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_le_bytes());
    n
}

/// Protects `source` into the bundle directory `out` under `key`.
pub fn write_bundle(source_path: &Path, out: &Path, name: &str, key: &[u8; 32]) -> Result<Manifest> {
    write_bundle_with_progress(source_path, out, name, key, &mut |_, _, _| {})
}

/// [`write_bundle`], calling `progress(stage, done, total)` for its stages: "transform"
/// (0 or 1 of 1), "serialize" (tensors) and "encrypt" (chunks).
pub fn write_bundle_with_progress(
    source_path: &Path,
    out: &Path,
    name: &str,
    key: &[u8; 32],
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Manifest> {
    let source = WeightSource::open(source_path)?;
    progress("transform", 0, 1);
    let (config, tensors) = protect_weights(&source)?;
    progress("transform", 1, 1);
    std::fs::create_dir_all(out).map_err(|e| InferError::io(out, e))?;
    let mut entries = Vec::new();
    let mut plain = Vec::new();
    for (done, (tname, t)) in tensors.iter().enumerate() {
        progress("serialize", done, tensors.len());
        let values = Vec::<f32>::try_from(&t.f_flatten(0, -1)?)?;
        entries.push(TensorEntry {
            name: tname.clone(),
            shape: t.size().iter().map(|&d| d as usize).collect(),
            offset: plain.len(),
        });
        plain.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    let plaintext_sha256 = hex::encode(Sha256::digest(&plain));
    let mut sealed = Vec::with_capacity(plain.len() + plain.len() / CHUNK_BYTES * 16 + 16);
    let chunks = plain.len().div_ceil(CHUNK_BYTES);
    for (i, chunk) in plain.chunks(CHUNK_BYTES).enumerate() {
        progress("encrypt", i, chunks);
        sealed.extend(aes256gcmsiv_seal(key, &chunk_nonce(i as u64), &chunk_aad(&plaintext_sha256, i as u64), chunk));
    }
    progress("encrypt", chunks, chunks);
    std::fs::write(out.join(WEIGHTS), &sealed).map_err(|e| InferError::io(out.join(WEIGHTS), e))?;
    let tokenizer = copy_tokenizer(&source, out)?;
    let manifest = Manifest {
        format: BUNDLE_FORMAT.into(),
        name: name.to_string(),
        config,
        tensors: entries,
        plaintext_bytes: plain.len(),
        plaintext_sha256,
        key_id: key_id(key),
        tokenizer,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| InferError::format(out, e.to_string()))?;
    std::fs::write(out.join(MANIFEST), json).map_err(|e| InferError::io(out.join(MANIFEST), e))?;
    Ok(manifest)
}

/// Puts the tokenizer next to the weights, in the clear: a metadata-only GGUF for GGUF
/// sources, the tokenizer files for Hugging Face directories.
fn copy_tokenizer(source: &WeightSource, out: &Path) -> Result<Vec<String>> {
    match source {
        WeightSource::Gguf(g) => {
            let meta: BTreeMap<String, MetaValue> = g
                .metadata
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            write_metadata_only(&out.join("tokenizer.gguf"), &meta)?;
            Ok(vec!["tokenizer.gguf".into()])
        }
        WeightSource::Safetensors(s, _) => {
            let mut files = Vec::new();
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                if s.dir.join(f).exists() {
                    std::fs::copy(s.dir.join(f), out.join(f)).map_err(|e| InferError::io(out.join(f), e))?;
                    files.push(f.to_string());
                }
            }
            Ok(files)
        }
        WeightSource::Memory { .. } => Err(InferError::format(out, "cannot protect an already protected model")),
    }
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(dir.join(MANIFEST)).map_err(|e| InferError::io(dir.join(MANIFEST), e))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| InferError::format(dir, format!("manifest: {e}")))?;
    manifest.config.validate()?;
    if manifest.format != BUNDLE_FORMAT {
        return Err(InferError::format(dir, format!("bundle format `{}` (expected {BUNDLE_FORMAT})", manifest.format)));
    }
    Ok(manifest)
}

/// Decrypts a bundle in memory (nothing plaintext touches the disk).
pub fn open_bundle(dir: &Path, key: Option<&[u8; 32]>) -> Result<(Manifest, WeightSource)> {
    let manifest = read_manifest(dir)?;
    let key = key.ok_or_else(|| {
        InferError::InvalidRequest(format!(
            "{} is a protected model bundle: it needs its key (id {}), which the distributor sends to authenticated nodes",
            dir.display(),
            manifest.key_id
        ))
    })?;
    if key_id(key) != manifest.key_id {
        return Err(InferError::InvalidRequest(format!(
            "wrong key for {} (it needs key id {})",
            dir.display(),
            manifest.key_id
        )));
    }
    let sealed = std::fs::read(dir.join(WEIGHTS)).map_err(|e| InferError::io(dir.join(WEIGHTS), e))?;
    let mut plain = Vec::with_capacity(manifest.plaintext_bytes);
    for (i, chunk) in sealed.chunks(CHUNK_BYTES + 16).enumerate() {
        let opened =
            aes256gcmsiv_open(key, &chunk_nonce(i as u64), &chunk_aad(&manifest.plaintext_sha256, i as u64), chunk)
                .map_err(|e| InferError::format(dir, format!("weights chunk {i}: {e}")))?;
        plain.extend_from_slice(&opened);
    }
    if plain.len() != manifest.plaintext_bytes || hex::encode(Sha256::digest(&plain)) != manifest.plaintext_sha256 {
        return Err(InferError::format(dir, "decrypted weights do not match the manifest's hash"));
    }
    let mut tensors = HashMap::new();
    for e in &manifest.tensors {
        let n: usize = e.shape.iter().product();
        let bytes = plain
            .get(e.offset..e.offset + 4 * n)
            .ok_or_else(|| InferError::format(dir, format!("tensor `{}` out of range", e.name)))?;
        let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let dims: Vec<i64> = e.shape.iter().map(|&d| d as i64).collect();
        tensors.insert(e.name.clone(), Tensor::f_from_slice(&values)?.f_reshape(&dims)?);
    }
    let source = WeightSource::Memory { path: PathBuf::from(dir), config: manifest.config.clone(), tensors };
    Ok((manifest, source))
}
