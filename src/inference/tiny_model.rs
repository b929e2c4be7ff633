//! Writes tiny random Llama models — as GGUF (with a byte-level BPE tokenizer in its
//! metadata) and as a Hugging Face safetensors directory — from a fixed seed, so tests
//! and benches need no download. Both forms hold the same weights: the GGUF copy stores
//! Q/K rows permuted the way llama.cpp's converter does, which the loader must undo.

use std::io::Write;
use std::path::Path;

use super::chat_template::CHATML;
use super::error::{InferError, Result};
use super::quant::GgmlType;

/// Shape of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub context: usize,
    pub seed: u64,
    /// Storage type of the 2-D weights in the GGUF copy.
    pub dtype: GgmlType,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self { layers: 2, hidden: 64, heads: 4, kv_heads: 2, ffn: 128, context: 256, seed: 7, dtype: GgmlType::F32 }
    }
}

const MERGES: &[(&str, &str)] = &[
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "w"),
    ("r", "e"),
    ("Ġ", "s"),
    ("a", "t"),
    ("Ġ", "c"),
    ("in", "g"),
    ("Ġ", "o"),
    ("e", "n"),
    ("Ċ", "Ċ"),
];
const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The tiny tokenizer's vocabulary: 256 byte tokens, the merges, then the specials.
fn vocab() -> Vec<String> {
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
    tokens
}

fn byte_chars() -> Vec<char> {
    let mut out = Vec::with_capacity(256);
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out.push(
            if printable {
                char::from_u32(b)
            } else {
                next += 1;
                char::from_u32(next - 1)
            }
            .expect("valid chars"),
        );
    }
    out
}

/// Deterministic pseudo-random weights (SplitMix64 → uniform with standard deviation `std`).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn tensor(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * std * 1.732).collect()
    }
}

/// (Hugging Face-layout name, shape, values) of every weight.
fn weights(spec: &TinySpec) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng(spec.seed);
    let hd = spec.hidden / spec.heads;
    let v = vocab().len();
    let (d, f) = (spec.hidden, spec.ffn);
    let mut out = vec![("token_embd.weight".to_string(), vec![v, d], rng.tensor(v * d, 0.5))];
    for i in 0..spec.layers {
        let mut norm = rng.tensor(d, 0.1);
        norm.iter_mut().for_each(|x| *x += 1.0);
        out.push((format!("blk.{i}.attn_norm.weight"), vec![d], norm.clone()));
        out.push((format!("blk.{i}.attn_q.weight"), vec![spec.heads * hd, d], rng.tensor(spec.heads * hd * d, 0.15)));
        out.push((
            format!("blk.{i}.attn_k.weight"),
            vec![spec.kv_heads * hd, d],
            rng.tensor(spec.kv_heads * hd * d, 0.15),
        ));
        out.push((
            format!("blk.{i}.attn_v.weight"),
            vec![spec.kv_heads * hd, d],
            rng.tensor(spec.kv_heads * hd * d, 0.15),
        ));
        out.push((
            format!("blk.{i}.attn_output.weight"),
            vec![d, spec.heads * hd],
            rng.tensor(d * spec.heads * hd, 0.1),
        ));
        out.push((format!("blk.{i}.ffn_norm.weight"), vec![d], norm));
        out.push((format!("blk.{i}.ffn_gate.weight"), vec![f, d], rng.tensor(f * d, 0.15)));
        out.push((format!("blk.{i}.ffn_up.weight"), vec![f, d], rng.tensor(f * d, 0.15)));
        out.push((format!("blk.{i}.ffn_down.weight"), vec![d, f], rng.tensor(d * f, 0.1)));
    }
    out.push(("output_norm.weight".to_string(), vec![d], vec![1.0; d]));
    out
}

/// llama.cpp's `permute(w, n_head)`: half-split rotary rows to interleaved pairs (how GGUF
/// stores Q and K).
pub fn permute_rotary(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for j in 0..half {
            for k in 0..2 {
                let src = h * 2 * half + k * half + j;
                let dst = h * 2 * half + j * 2 + k;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

struct GgufWriter {
    buf: Vec<u8>,
}

impl GgufWriter {
    fn string(&mut self, s: &str) {
        self.buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn kv_u32(&mut self, k: &str, v: u32) {
        self.string(k);
        self.buf.extend_from_slice(&4u32.to_le_bytes());
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn kv_f32(&mut self, k: &str, v: f32) {
        self.string(k);
        self.buf.extend_from_slice(&6u32.to_le_bytes());
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn kv_str(&mut self, k: &str, v: &str) {
        self.string(k);
        self.buf.extend_from_slice(&8u32.to_le_bytes());
        self.string(v);
    }
    fn kv_strs(&mut self, k: &str, v: &[String]) {
        self.string(k);
        self.buf.extend_from_slice(&9u32.to_le_bytes());
        self.buf.extend_from_slice(&8u32.to_le_bytes());
        self.buf.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for s in v {
            self.string(s);
        }
    }
    fn kv_i32s(&mut self, k: &str, v: &[i32]) {
        self.string(k);
        self.buf.extend_from_slice(&9u32.to_le_bytes());
        self.buf.extend_from_slice(&5u32.to_le_bytes());
        self.buf.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
}

fn io_err(path: &Path, e: std::io::Error) -> InferError {
    InferError::io(path, e)
}

/// Writes the tiny model as a GGUF v3 file.
pub fn write_gguf(path: &Path, spec: &TinySpec) -> Result<()> {
    let tokens = vocab();
    let n_regular = 256 + MERGES.len();
    let types: Vec<i32> = (0..tokens.len()).map(|i| if i < n_regular { 1 } else { 3 }).collect();
    let merges: Vec<String> = MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let tensors = weights(spec);
    let mut w = GgufWriter { buf: Vec::new() };
    w.buf.extend_from_slice(b"GGUF");
    w.buf.extend_from_slice(&3u32.to_le_bytes());
    w.buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    w.buf.extend_from_slice(&18u64.to_le_bytes());
    w.kv_str("general.architecture", "llama");
    w.kv_str("general.name", "tiny-random-llama");
    w.kv_u32("llama.block_count", spec.layers as u32);
    w.kv_u32("llama.context_length", spec.context as u32);
    w.kv_u32("llama.embedding_length", spec.hidden as u32);
    w.kv_u32("llama.feed_forward_length", spec.ffn as u32);
    w.kv_u32("llama.attention.head_count", spec.heads as u32);
    w.kv_u32("llama.attention.head_count_kv", spec.kv_heads as u32);
    w.kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    w.kv_f32("llama.rope.freq_base", 10_000.0);
    w.kv_str("tokenizer.ggml.model", "gpt2");
    w.kv_str("tokenizer.ggml.pre", "smollm");
    w.kv_strs("tokenizer.ggml.tokens", &tokens);
    w.kv_i32s("tokenizer.ggml.token_type", &types);
    w.kv_strs("tokenizer.ggml.merges", &merges);
    w.kv_u32("tokenizer.ggml.bos_token_id", (n_regular + 1) as u32);
    w.kv_u32("tokenizer.ggml.eos_token_id", (n_regular + 2) as u32);
    w.kv_str("tokenizer.chat_template", CHATML);
    let hd = spec.hidden / spec.heads;
    let mut data = Vec::new();
    for (name, shape, values) in &tensors {
        let values = if name.ends_with("attn_q.weight") {
            permute_rotary(values, spec.heads * hd, spec.hidden, spec.heads)
        } else if name.ends_with("attn_k.weight") {
            permute_rotary(values, spec.kv_heads * hd, spec.hidden, spec.kv_heads)
        } else {
            values.clone()
        };
        let dtype = if shape.len() == 2 { spec.dtype } else { GgmlType::F32 };
        let bytes = dtype.quantize(&values).map_err(|e| InferError::format(path, e))?;
        while data.len() % 32 != 0 {
            data.push(0);
        }
        w.string(name);
        w.buf.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            w.buf.extend_from_slice(&(d as u64).to_le_bytes());
        }
        w.buf.extend_from_slice(&dtype.id().to_le_bytes());
        w.buf.extend_from_slice(&(data.len() as u64).to_le_bytes());
        data.extend_from_slice(&bytes);
    }
    while !w.buf.len().is_multiple_of(32) {
        w.buf.push(0);
    }
    w.buf.extend_from_slice(&data);
    std::fs::write(path, &w.buf).map_err(|e| io_err(path, e))
}

/// Writes the tiny model as a Hugging Face directory: config.json, model.safetensors,
/// tokenizer.json and tokenizer_config.json.
pub fn write_safetensors_dir(dir: &Path, spec: &TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let tokens = vocab();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tokens.len(), "hidden_size": spec.hidden, "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": spec.context, "tie_word_embeddings": true,
    });
    let write =
        |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).map_err(|e| io_err(&dir.join(name), e));
    write("config.json", serde_json::to_string_pretty(&config).expect("JSON values serialize").as_bytes())?;
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in weights(spec) {
        let start = data.len();
        values.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
        let entry = serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]});
        header.insert(super::weights::hf_name(&name, super::config::Family::Llama), entry);
    }
    let header = serde_json::to_vec(&header).expect("JSON values serialize");
    let mut file = Vec::with_capacity(8 + header.len() + data.len());
    file.extend_from_slice(&(header.len() as u64).to_le_bytes());
    file.extend_from_slice(&header);
    file.extend_from_slice(&data);
    write("model.safetensors", &file)?;
    let n_regular = 256 + MERGES.len();
    let vocab_map: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().take(n_regular).map(|(i, t)| (t.clone(), i.into())).collect();
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": n_regular + i, "content": s, "special": true}))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": null, "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab_map, "merges": MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
    });
    write("tokenizer.json", serde_json::to_string(&tokenizer).expect("JSON values serialize").as_bytes())?;
    let tok_config = serde_json::json!({"bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "add_bos_token": false, "chat_template": CHATML});
    write("tokenizer_config.json", serde_json::to_string(&tok_config).expect("JSON values serialize").as_bytes())?;
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("config.json")).map_err(|e| io_err(dir, e))?;
    f.write_all(b"\n").map_err(|e| io_err(dir, e))
}
