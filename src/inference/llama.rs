//! The Llama-lineage transformer on libtorch: RMSNorm, half-split rotary embeddings,
//! grouped-query attention, a gated MLP and a tied or untied output head — Llama 2/3,
//! SmolLM2, TinyLlama and Mistral as they are, and Qwen 2/3, Gemma 2/3 and Phi-3 through
//! the switches of [`LlamaConfig`]: bias on Q/K/V, per-head norms on Q and K, norms on the
//! attention and MLP outputs, GeGLU, soft-capped scores and logits, sliding-window layers
//! with their own rotary base, partial and LongRoPE-scaled rotary embeddings. Weights live
//! here; per-sequence state lives in [`KvCache`].
//!
//! Two entry points serve the engine's scheduler: [`Llama::prefill`] runs a chunk of one
//! sequence's prompt, [`Llama::decode`] advances a batch of sequences by one token each.
//! Both return the final hidden state (after the last norm) of every input position,
//! which the proof of inference commits to.

use tch::{Device, Kind, Tensor};

use super::config::{Activation, LlamaConfig};
use super::error::Result;
use super::fused_decode::{FusedDecode, Int4Part, LayerParts, ModelParts};
use super::int4_prefill;
use super::int8_table::Int8Table;
use super::kv_cache::KvCache;
use super::qlinear::{table_format, Embedding, Linear, Quantization, TableFormat};
use super::weights::{place, WeightSource};

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
    /// Rows from this index of the chunk on (a verifier needs no logits for the prompt).
    From(usize),
}

/// A chunk of one sequence's prompt to prefill within a step.
#[derive(Debug, Clone, Copy)]
pub struct PrefillChunk<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in its cache slot.
    pub start: usize,
    pub logits: LogitsFor,
    /// Rows per pass (0: the whole chunk in one). A chunk run while no sequence decodes
    /// may hold several passes of this many rows (the last may be shorter): each is
    /// computed exactly as if it were a chunk alone, bit for bit, and int4 on the CPU
    /// unpacks its weights once for all passes of 64 rows and more instead of once per pass. Only for `LogitsFor::None`
    /// and `Last`; with decode rows or other logits, one pass.
    pub pass_rows: usize,
}

/// What [`Llama::step`] returns: the decode rows and the prefill chunk's rows.
pub struct StepOutput {
    pub decode: ForwardOutput,
    pub prefill: Option<ForwardOutput>,
}

/// What a forward pass returns.
pub struct ForwardOutput {
    /// `[positions, hidden_size]`: the final hidden state (after the output norm).
    pub hidden: Tensor,
    /// `[rows, vocab]` in f32: the last position's logits (prefill) or one row per
    /// sequence (decode); empty when not asked for.
    pub logits: Tensor,
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    head_dim: i64,
    /// Identity on the dimensions that do not rotate (`[head_dim, head_dim]`), when some
    /// do not (partial rotary embeddings).
    pass_through: Option<Tensor>,
}

impl Rope {
    /// The rotary tables for base `theta`; `linear` divides every frequency (Gemma 3's
    /// global layers). Llama 3 and LongRoPE scaling come from `config`.
    fn new(config: &LlamaConfig, theta: f64, linear: Option<f64>, max_len: usize, device: Device) -> Result<Self> {
        let rotary = config.rotary_dim();
        let half = rotary / 2;
        let mut inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / rotary as f64)).collect();
        if let Some(s) = &config.rope_scaling {
            let old = s.original_max_position_embeddings as f64;
            let (low_wavelen, high_wavelen) = (old / s.low_freq_factor, old / s.high_freq_factor);
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        let mut magnitude = 1.0;
        if let Some(long) = &config.long_rope {
            for (f, factor) in inv_freq.iter_mut().zip(&long.short_factor) {
                *f /= factor;
            }
            magnitude = long.attention_factor;
        }
        if let Some(factor) = linear {
            inv_freq.iter_mut().for_each(|f| *f /= factor);
        }
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for pos in 0..max_len {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push((angle.cos() * magnitude) as f32);
                sin.push((angle.sin() * magnitude) as f32);
            }
        }
        let shape = [max_len as i64, half as i64];
        let head_dim = config.head_dim as i64;
        let pass_through = if rotary < config.head_dim {
            let keep: Vec<f32> = (0..head_dim).map(|i| if i < rotary as i64 { 0.0 } else { 1.0 }).collect();
            Some(Tensor::f_from_slice(&keep)?.f_diag(0)?.f_to_device(device)?)
        } else {
            None
        };
        Ok(Self {
            cos: Tensor::f_from_slice(&cos)?.f_reshape(shape)?.f_to_device(device)?,
            sin: Tensor::f_from_slice(&sin)?.f_reshape(shape)?.f_to_device(device)?,
            head_dim,
            pass_through,
        })
    }

    /// One rotation matrix per position (`[n, head_dim, head_dim]`), so that rotating a
    /// row vector `x` (half-split form) is `x @ R`: built once per forward pass, then each
    /// layer's rotary embedding is a single batched matmul instead of a dozen small ops.
    /// Dimensions past the rotary ones pass through unchanged.
    fn rotations(&self, positions: &Tensor, kind: Kind) -> Result<Tensor> {
        let cos = self.cos.f_index_select(0, positions)?.f_diag_embed(0, -2, -1)?;
        let sin = self.sin.f_index_select(0, positions)?.f_diag_embed(0, -2, -1)?;
        let top = Tensor::f_cat(&[&cos, &sin], -1)?;
        let bottom = Tensor::f_cat(&[&sin.f_neg()?, &cos], -1)?;
        let mut rotation = Tensor::f_cat(&[top, bottom], -2)?;
        if let Some(identity) = &self.pass_through {
            let rest = self.head_dim - rotation.size()[2];
            rotation = rotation.f_constant_pad_nd([0, rest, 0, rest])?.f_add(identity)?;
        }
        Ok(rotation.f_to_kind(kind)?)
    }
}

struct Block {
    attn_norm: Tensor,
    /// Q, K and V projections fused: `[(heads + 2 kv_heads) * head_dim, hidden]`.
    qkv: Linear,
    /// Output projection `[hidden, heads * head_dim]`; the residual add fuses into it.
    o: Linear,
    ffn_norm: Tensor,
    /// Gate and up projections fused: `[2 * intermediate, hidden]`.
    gate_up: Linear,
    /// Down projection `[hidden, intermediate]`.
    down: Linear,
    /// Q, K and V biases, fused like `qkv` (Qwen 2).
    qkv_bias: Option<Tensor>,
    /// Per-head RMSNorm gains of Q and K (`[head_dim]` each; Qwen 3, Gemma 3).
    qk_norm: Option<(Tensor, Tensor)>,
    /// Norms on the attention and MLP outputs (Gemma).
    post_norms: Option<(Tensor, Tensor)>,
    /// Attends to a sliding window, with the local rotary tables where there are some.
    sliding: bool,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub device: Device,
    pub kind: Kind,
    pub quantization: Quantization,
    embed: Embedding,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    /// The rotary tables of sliding layers, when their base differs (Gemma 3).
    rope_local: Option<Rope>,
    /// √hidden in the model's dtype (Gemma).
    embed_scale: Option<Tensor>,
    /// A lone sequence's decode step in one call, or why this model cannot take it.
    fused: std::result::Result<FusedDecode, String>,
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.f_rms_norm(weight.size().as_slice(), Some(weight), eps)?)
}

/// Whether this CPU has the instructions of the libtorch int4 kernel that packs in
/// `layout` (AVX-512F for 64-row blocks, AVX2 and FMA for 32-row ones), which the fused
/// step's own kernels use too.
fn cpu_runs_kernels_of(layout: int4_prefill::PackLayout) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match layout.block_rows {
            64 => std::arch::is_x86_feature_detected!("avx512f"),
            32 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = layout;
        false
    }
}

impl Llama {
    /// Loads every weight from `source` onto `device` in `kind`, unquantized.
    pub fn load(source: &WeightSource, device: Device, kind: Kind) -> Result<Self> {
        Self::load_quantized(source, device, kind, Quantization::None)
    }

    /// Loads every weight from `source` onto `device`: norms in `kind`, linear layers
    /// stored as `quantization` says. Each layer is quantized as it is read, so peak
    /// memory stays near one layer of f32 above the quantized model.
    pub fn load_quantized(
        source: &WeightSource,
        device: Device,
        kind: Kind,
        quantization: Quantization,
    ) -> Result<Self> {
        Self::load_with_progress(source, device, kind, quantization, &mut |_, _| {})
    }

    /// [`Llama::load_quantized`], calling `progress(layers done, layers)` as it goes.
    pub fn load_with_progress(
        source: &WeightSource,
        device: Device,
        kind: Kind,
        quantization: Quantization,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let c = source.config()?;
        let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (h, kv) = (c.num_heads, c.num_kv_heads);
        let get = |name: &str, shape: &[usize]| source.tensor(name, shape, &c);
        let linear = |w: Tensor| Linear::new(w, quantization, device, kind);
        let embed_cpu = get("token_embd.weight", &[c.vocab_size, d])?;
        let lm_head_cpu = if source.has("output.weight") {
            get("output.weight", &[c.vocab_size, d])?
        } else {
            embed_cpu.shallow_clone()
        };
        // The output head decides between near-tied tokens: in int4 it flipped SmolLM2's
        // first answer token ("What is the capital of France?" lost "Paris"). Quantized
        // models keep it, and the embedding it may be tied to, in per-row int8 on CPU and
        // bf16 on CUDA (`qlinear::table_format`).
        let tables = table_format(quantization, device, d as i64);
        let embed = Embedding::new(embed_cpu, device, tables, kind)?;
        let lm_head = if source.has("output.weight") {
            match tables {
                TableFormat::Int8Rows => Linear::Int8Rows(Int8Table::quantize(&lm_head_cpu)?),
                TableFormat::ModelDtype => Linear::new(lm_head_cpu, Quantization::None, device, kind)?,
                TableFormat::BFloat16 => Linear::new(lm_head_cpu, Quantization::None, device, Kind::BFloat16)?,
            }
        } else {
            // Tied: one table serves both.
            embed.tied_head()
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        progress(0, c.num_layers);
        for i in 0..c.num_layers {
            let name = |leaf: &str| format!("blk.{i}.{leaf}.weight");
            let q = get(&name("attn_q"), &[h * hd, d])?;
            let k = get(&name("attn_k"), &[kv * hd, d])?;
            let v = get(&name("attn_v"), &[kv * hd, d])?;
            let gate = get(&name("ffn_gate"), &[f, d])?;
            let up = get(&name("ffn_up"), &[f, d])?;
            let small = |leaf: &str, len: usize| -> Result<Tensor> { place(get(leaf, &[len])?, device, kind) };
            let qkv_bias = if c.qkv_bias {
                let bias = |leaf: &str, len: usize| get(&format!("blk.{i}.{leaf}.bias"), &[len]);
                let parts = [bias("attn_q", h * hd)?, bias("attn_k", kv * hd)?, bias("attn_v", kv * hd)?];
                Some(place(Tensor::f_cat(&parts, 0)?, device, kind)?)
            } else {
                None
            };
            let qk_norm = if c.qk_norm {
                Some((small(&name("attn_q_norm"), hd)?, small(&name("attn_k_norm"), hd)?))
            } else {
                None
            };
            let post_norms = if c.sandwich_norms {
                Some((small(&name("post_attention_norm"), d)?, small(&name("post_ffw_norm"), d)?))
            } else {
                None
            };
            layers.push(Block {
                attn_norm: place(get(&name("attn_norm"), &[d])?, device, kind)?,
                qkv: linear(Tensor::f_cat(&[q, k, v], 0)?)?,
                o: linear(get(&name("attn_output"), &[d, h * hd])?)?,
                ffn_norm: place(get(&name("ffn_norm"), &[d])?, device, kind)?,
                gate_up: linear(Tensor::f_cat(&[gate, up], 0)?)?,
                down: linear(get(&name("ffn_down"), &[d, f])?)?,
                qkv_bias,
                qk_norm,
                post_norms,
                sliding: c.is_sliding(i),
            });
            progress(i + 1, c.num_layers);
        }
        let norm = place(get("output_norm.weight", &[d])?, device, kind)?;
        let max_len = c.max_position_embeddings.max(1);
        let rope = Rope::new(&c, c.rope_theta, c.rope_linear_factor, max_len, device)?;
        let rope_local = match c.rope_local_theta {
            Some(theta) => Some(Rope::new(&c, theta, None, max_len, device)?),
            None => None,
        };
        let embed_scale = match c.embedding_scale {
            Some(scale) => Some(Tensor::f_from_slice(&[scale as f32])?.f_to_kind(kind)?.f_to_device(device)?),
            None => None,
        };
        let mut model = Self {
            config: c,
            device,
            kind,
            quantization,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            rope_local,
            embed_scale,
            fused: Err("not built".into()),
        };
        model.fused = Err("off ([engine] fused_decode)".into());
        if super::fused_decode::enabled() {
            let _ = model.enable_fused_decode();
        }
        Ok(model)
    }

    /// Decodes a lone sequence through [`FusedDecode`] from now on, where this model is one
    /// it computes exactly; otherwise says why not and stays on libtorch.
    pub fn enable_fused_decode(&mut self) -> std::result::Result<(), String> {
        self.fused = self.fused_parts().and_then(|parts| FusedDecode::new(&parts));
        self.fused_decode().map_err(str::to_string)
    }

    /// Whether a lone sequence decodes through [`FusedDecode`], or why not.
    pub fn fused_decode(&self) -> std::result::Result<(), &str> {
        self.fused.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// Decodes through libtorch from now on (to compare the two steps).
    pub fn disable_fused_decode(&mut self) {
        self.fused = Err("turned off".into());
    }

    /// What [`FusedDecode`] reads, when this model is one it computes exactly.
    fn fused_parts(&self) -> std::result::Result<ModelParts<'_>, String> {
        let c = &self.config;
        if self.device != Device::Cpu || self.kind != Kind::BFloat16 || self.quantization != Quantization::Int4 {
            return Err(format!(
                "{:?} {:?} {}: only int4 with bf16 activations on the CPU",
                self.device, self.kind, self.quantization
            ));
        }
        let plain = !c.qkv_bias
            && !c.qk_norm
            && !c.sandwich_norms
            && c.embedding_scale.is_none()
            && c.activation == Activation::Silu
            && c.attn_softcap.is_none()
            && c.final_softcap.is_none()
            && self.rope_local.is_none()
            && self.rope.pass_through.is_none()
            && self.layers.iter().all(|l| !l.sliding);
        if !plain {
            return Err("not a plain Llama block (biases, extra norms, soft-caps, windows or partial rotary)".into());
        }
        // From 32,768 values a row, libtorch splits its sums and element-wise ops across
        // threads, in another order than the fused step's.
        if c.hidden_size >= 32_768 || c.intermediate_size >= 32_768 {
            return Err(format!("widths {} and {} are past 32,768", c.hidden_size, c.intermediate_size));
        }
        // libtorch's int8 kernels (the head) read the width 16 (AVX-512) or 8 (AVX2) values
        // at a time, with no tail.
        if !c.hidden_size.is_multiple_of(16) {
            return Err(format!("hidden width {} is not a multiple of 16", c.hidden_size));
        }
        let layout = int4_prefill::layout().ok_or("libtorch's int4 packing is not a known one")?;
        if !cpu_runs_kernels_of(layout) {
            // libtorch would not pick kernels the CPU lacks; should it, the step is never
            // taken rather than refused at every token.
            return Err(format!("this CPU lacks the instructions of libtorch's {layout:?} kernels"));
        }
        if !layout.halves {
            // The step's products follow libtorch's AVX-512 or AVX2 kernel (64- or 32-row
            // blocks of halves); its plain build packs row pairs and sums without fused
            // multiply-adds, and its own step stays the reference there.
            return Err(
                "libtorch runs its plain int4 kernel here (the fused step follows its AVX-512 and AVX2 ones)".into()
            );
        }
        fn int4(l: &Linear) -> std::result::Result<Int4Part<'_>, String> {
            match l {
                Linear::Int4(w) => {
                    let (packed, scales_zeros) = w.parts();
                    Ok(Int4Part { packed, scales_zeros })
                }
                _ => Err("a projection is not int4".to_string()),
            }
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for b in &self.layers {
            layers.push(LayerParts {
                attn_norm: &b.attn_norm,
                ffn_norm: &b.ffn_norm,
                qkv: int4(&b.qkv)?,
                o: int4(&b.o)?,
                gate_up: int4(&b.gate_up)?,
                down: int4(&b.down)?,
            });
        }
        let embed = self.embed.int8_table().ok_or("the embedding is not an int8 table")?.parts();
        let head = match &self.lm_head {
            Linear::Int8Rows(t) => t.parts(),
            _ => return Err("the output head is not an int8 table".into()),
        };
        Ok(ModelParts {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps,
            attn_scale: c.query_scale.unwrap_or(1.0 / (c.head_dim as f64).sqrt()),
            layers,
            embed,
            head,
            norm: &self.norm,
            rope_cos: &self.rope.cos,
            rope_sin: &self.rope.sin,
            layout,
        })
    }

    /// Bytes of weights read per decoded token (embedding rows excluded).
    pub fn weight_bytes(&self) -> usize {
        let elt = self.kind.elt_size_in_bytes();
        let mut n = self.norm.numel() * elt + self.lm_head.bytes();
        for b in &self.layers {
            n += (b.attn_norm.numel() + b.ffn_norm.numel()) * elt;
            let extras = [b.qkv_bias.as_ref()]
                .into_iter()
                .chain(b.qk_norm.iter().flat_map(|(q, k)| [Some(q), Some(k)]))
                .chain(b.post_norms.iter().flat_map(|(a, m)| [Some(a), Some(m)]));
            n += extras.flatten().map(Tensor::numel).sum::<usize>() * elt;
            n += b.qkv.bytes() + b.o.bytes() + b.gate_up.bytes() + b.down.bytes();
        }
        n
    }

    /// Bytes of weights held in memory, embedding included (a tied head counted once).
    pub fn model_bytes(&self) -> usize {
        self.weight_bytes() + if self.embed.is_shared_with(&self.lm_head) { 0 } else { self.embed.bytes() }
    }

    fn ids(&self, values: &[i64]) -> Result<Tensor> {
        Ok(Tensor::f_from_slice(values)?.f_to_device(self.device)?)
    }

    /// Runs `tokens` of the sequence in cache `slot`, starting at position `start` (the
    /// number of tokens already in that slot's cache).
    pub fn prefill(
        &self,
        cache: &mut KvCache,
        slot: usize,
        tokens: &[u32],
        start: usize,
        logits: LogitsFor,
    ) -> Result<ForwardOutput> {
        let chunk = PrefillChunk { slot, tokens, start, logits, pass_rows: 0 };
        let out = self.step(cache, &[], &[], Some(chunk))?;
        Ok(out.prefill.expect("a prefill chunk was given"))
    }

    /// Advances the sequences in cache slots `0..tokens.len()` by one token each;
    /// `positions[i]` is the number of tokens already in slot `i`.
    pub fn decode(&self, cache: &mut KvCache, tokens: &[u32], positions: &[usize]) -> Result<ForwardOutput> {
        Ok(self.step(cache, tokens, positions, None)?.decode)
    }

    /// One engine step: a decode token for each sequence in slots `0..tokens.len()` and,
    /// optionally, a prefill chunk of another sequence, in one pass over the weights —
    /// the chunk's rows ride along in the same matrix multiplications. A chunk without
    /// decode rows may run as several passes ([`PrefillChunk::pass_rows`]), each with
    /// products of its own.
    pub fn step(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        positions: &[usize],
        prefill: Option<PrefillChunk<'_>>,
    ) -> Result<StepOutput> {
        let b = tokens.len() as i64;
        for (slot, &pos) in positions.iter().enumerate() {
            cache.check(slot, pos + 1)?;
        }
        if let (Ok(fused), [token], [pos], None) = (&self.fused, tokens, positions, &prefill) {
            cache.ensure_initialized(0, pos + 1)?;
            let (keys, values) = cache.layers();
            let (hidden, logits) = fused.step(keys, values, 0, *token, *pos)?;
            cache.set_len(0, pos + 1);
            return Ok(StepOutput { decode: ForwardOutput { hidden, logits }, prefill: None });
        }
        let longest = positions.iter().max().map_or(0, |&p| p + 1) as i64;
        for slot in 0..positions.len() {
            cache.ensure_initialized(slot, longest as usize)?;
        }
        let mut ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let mut pos: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let (mut n, mut total) = (0i64, 0i64);
        if let Some(chunk) = &prefill {
            n = chunk.tokens.len() as i64;
            total = (chunk.start + chunk.tokens.len()) as i64;
            cache.check(chunk.slot, total as usize)?;
            ids.extend(chunk.tokens.iter().map(|&t| t as i64));
            pos.extend(chunk.start as i64..total);
        }
        let groups = (self.config.num_heads / self.config.num_kv_heads) as i64;
        // The passes, as (first row, rows) of this step's rows: one, unless a chunk runs
        // alone in several (see `PrefillChunk::pass_rows`).
        let pass_rows = match &prefill {
            Some(c) if b == 0 && c.pass_rows > 0 && matches!(c.logits, LogitsFor::None | LogitsFor::Last) => {
                c.pass_rows as i64
            }
            _ => b + n,
        };
        let passes: Vec<(i64, i64)> =
            (0..(b + n).max(1)).step_by(pass_rows.max(1) as usize).map(|r| (r, pass_rows.min(b + n - r))).collect();
        let positions_t = self.ids(&pos)?;
        let decode_pos = positions_t.f_narrow(0, 0, b)?;
        let slots = Tensor::f_arange(b, (Kind::Int64, self.device))?;
        // Decode: sequence i sees keys 0..=pos_i. Prefill: row (group, t) of a pass sees
        // 0..=its position, the keys up to the pass's end.
        let masks = |window: Option<usize>| -> Result<(Tensor, Vec<Tensor>)> {
            let decode = causal_mask(&decode_pos, longest, window, self.device)?
                .f_view([b, 1, 1, longest])?
                .f_to_kind(self.kind)?;
            let mut prefill_masks = Vec::new();
            for &(first, rows) in &passes {
                // One pass: the chunk's rows after the decode rows, seeing the keys up to its
                // end; a pass of a chunk run alone: the keys up to the pass's end.
                let (first, rows, keys) =
                    if passes.len() == 1 { (b, n, total) } else { (first, rows, total - n + first + rows) };
                prefill_masks.push(
                    causal_mask(&positions_t.f_narrow(0, first, rows)?, keys, window, self.device)?
                        .f_repeat([groups, 1])?
                        .f_view([1, 1, groups * rows, keys])?
                        .f_to_kind(self.kind)?,
                );
            }
            Ok((decode, prefill_masks))
        };
        let global_masks = masks(None)?;
        let any_sliding = self.layers.iter().any(|l| l.sliding);
        let sliding_masks = if any_sliding { Some(masks(self.config.sliding_window)?) } else { None };
        let split = |t: Tensor| -> Result<Vec<Tensor>> {
            if passes.len() == 1 {
                return Ok(vec![t]);
            }
            passes.iter().map(|&(first, rows)| Ok(t.f_narrow(0, first, rows)?)).collect()
        };
        let rotations = split(self.rope.rotations(&positions_t, self.kind)?)?;
        let local_rotations = match (&self.rope_local, any_sliding) {
            (Some(rope), true) => Some(split(rope.rotations(&positions_t, self.kind)?)?),
            _ => None,
        };
        let mut x = self.embed.lookup(&self.ids(&ids)?)?;
        if let Some(scale) = &self.embed_scale {
            x = x.f_mul(scale)?;
        }
        let mut xs = split(x)?;
        for (l, block) in self.layers.iter().enumerate() {
            let (decode_mask, prefill_masks) = match (&sliding_masks, block.sliding) {
                (Some(m), true) => m,
                _ => &global_masks,
            };
            let rotations = match (&local_rotations, block.sliding) {
                (Some(r), true) => r,
                _ => &rotations,
            };
            xs = self.block_forward(block, &xs, rotations, |p, q, k, v| {
                let (k_cache, v_cache) = cache.layer_mut(l);
                let mut outputs = Vec::with_capacity(2);
                if b > 0 {
                    let index = [Some(slots.shallow_clone()), None, Some(decode_pos.shallow_clone())];
                    let _ = k_cache.f_index_put_(&index, &k.f_narrow(0, 0, b)?, false)?;
                    let _ = v_cache.f_index_put_(&index, &v.f_narrow(0, 0, b)?, false)?;
                    if self.quantization == Quantization::Int8 && b > 1 {
                        // int8's activation codes flip with the last bit of an attention
                        // sum, and the keys a batch pads to its longest sequence change
                        // that bit: each sequence attends alone over its own keys, so that
                        // its rows are those of a decode without the others, which is how
                        // a verifier replays it (`proof::verify`, as the node ran it).
                        let mut each = Vec::with_capacity(b as usize);
                        for (i, &p) in positions.iter().enumerate() {
                            let (i, len) = (i as i64, p as i64 + 1);
                            let keys = k_cache.f_narrow(0, i, 1)?.f_narrow(2, 0, len)?;
                            let values = v_cache.f_narrow(0, i, 1)?.f_narrow(2, 0, len)?;
                            let (kv, hd) = (keys.size()[1], keys.size()[3]);
                            let q = q.f_narrow(0, i, 1)?.f_view([1, kv, groups, hd])?;
                            let mask = decode_mask.f_narrow(0, i, 1)?.f_narrow(3, 0, len)?.f_contiguous()?;
                            each.push(self.attention(&q, &keys, &values, &mask)?.f_reshape([1, kv * groups * hd])?);
                        }
                        outputs.push(Tensor::f_cat(&each, 0)?);
                    } else {
                        let keys = k_cache.f_narrow(0, 0, b)?.f_narrow(2, 0, longest)?;
                        let values = v_cache.f_narrow(0, 0, b)?.f_narrow(2, 0, longest)?;
                        let (kv, hd) = (keys.size()[1], keys.size()[3]);
                        let q = q.f_narrow(0, 0, b)?.f_view([b, kv, groups, hd])?;
                        let out = self.attention(&q, &keys, &values, decode_mask)?; // [b, kv, groups, hd]
                        outputs.push(out.f_reshape([b, kv * groups * hd])?);
                    }
                }
                if let Some(chunk) = &prefill {
                    // This pass's rows of the chunk: all of them after the decode rows, or
                    // one pass of a chunk run alone.
                    let (first, n) = if passes.len() == 1 { (0, n) } else { passes[p] };
                    let k_slot = k_cache.f_get(chunk.slot as i64)?;
                    let v_slot = v_cache.f_get(chunk.slot as i64)?;
                    let start = chunk.start as i64 + first;
                    let total = start + n;
                    let rows = q.size()[0] - n; // decode rows before the chunk's
                    k_slot.f_narrow(1, start, n)?.f_copy_(&k.f_narrow(0, rows, n)?.f_transpose(0, 1)?)?;
                    v_slot.f_narrow(1, start, n)?.f_copy_(&v.f_narrow(0, rows, n)?.f_transpose(0, 1)?)?;
                    let keys = k_slot.f_narrow(1, 0, total)?;
                    let values = v_slot.f_narrow(1, 0, total)?;
                    let (kv, hd) = (keys.size()[0], keys.size()[2]);
                    // q: [n, heads, hd] -> [1, kv_heads, groups * n, hd]: four dimensions, like
                    // decode's, take libtorch's flash kernel (three take the unfused path).
                    let q =
                        q.f_narrow(0, rows, n)?.f_transpose(0, 1)?.f_contiguous()?.f_view([1, kv, groups * n, hd])?;
                    let (keys, values) = (keys.f_unsqueeze(0)?, values.f_unsqueeze(0)?);
                    // [1, kv, groups * n, hd]; CUDA's kernels return it transposed (not
                    // contiguous): reshape copies there and is free where it is contiguous.
                    let out = self.attention(&q, &keys, &values, &prefill_masks[p])?;
                    let out = out.f_reshape([kv * groups, n, hd])?.f_transpose(0, 1)?;
                    outputs.push(out.f_reshape([n, kv * groups * hd])?);
                }
                Ok(if outputs.len() == 1 { outputs.pop().expect("one output") } else { Tensor::f_cat(&outputs, 0)? })
            })?;
        }
        for (slot, &p) in positions.iter().enumerate() {
            cache.set_len(slot, p + 1);
        }
        if let Some(chunk) = &prefill {
            cache.set_len(chunk.slot, total as usize);
            cache.mark_written(chunk.slot, total as usize);
        }
        // The output norm pass by pass too: a prefilled row's hidden state goes into the
        // proof of inference.
        let hidden = xs.iter().map(|x| self.norm_out(x)).collect::<Result<Vec<Tensor>>>()?;
        let hidden =
            if hidden.len() == 1 { hidden.into_iter().next().expect("one pass") } else { Tensor::f_cat(&hidden, 0)? };
        // Logits rows: every decode row, plus the chunk's last row or all its rows.
        let prefill_logits = prefill.as_ref().map_or(LogitsFor::None, |c| c.logits);
        let rows = match prefill_logits {
            LogitsFor::None => hidden.f_narrow(0, 0, b)?,
            LogitsFor::Last if b == 0 => hidden.f_narrow(0, n - 1, 1)?,
            LogitsFor::Last => Tensor::f_cat(&[hidden.f_narrow(0, 0, b)?, hidden.f_narrow(0, b + n - 1, 1)?], 0)?,
            LogitsFor::All => hidden.shallow_clone(),
            LogitsFor::From(k) => {
                let k = (k as i64).min(n);
                Tensor::f_cat(&[hidden.f_narrow(0, 0, b)?, hidden.f_narrow(0, b + k, n - k)?], 0)?
            }
        };
        let logits = self.logits(&rows)?;
        let decode = ForwardOutput { hidden: hidden.f_narrow(0, 0, b)?, logits: logits.f_narrow(0, 0, b)? };
        let prefill = match prefill {
            None => None,
            Some(_) => Some(ForwardOutput {
                hidden: hidden.f_narrow(0, b, n)?,
                logits: logits.f_narrow(0, b, logits.size()[0] - b)?,
            }),
        };
        Ok(StepOutput { decode, prefill })
    }

    fn norm_out(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }

    fn logits(&self, rows: &Tensor) -> Result<Tensor> {
        if rows.size()[0] == 0 {
            return Ok(Tensor::f_zeros([0, self.config.vocab_size as i64], (Kind::Float, self.device))?);
        }
        let logits = self.lm_head.forward(rows)?.f_to_kind(Kind::Float)?;
        match self.config.final_softcap {
            Some(cap) => Ok(logits.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?),
            None => Ok(logits),
        }
    }

    /// Scaled dot-product attention with an additive mask: libtorch's fused kernel, or the
    /// written-out form when scores are soft-capped (Gemma 2), which the kernel cannot do.
    fn attention(&self, q: &Tensor, keys: &Tensor, values: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let scale = c.query_scale.unwrap_or(1.0 / (c.head_dim as f64).sqrt());
        let Some(cap) = c.attn_softcap else {
            let scale = c.query_scale.map(|_| scale);
            return Ok(Tensor::f_scaled_dot_product_attention(q, keys, values, Some(mask), 0.0, false, scale, false)?);
        };
        let scores = q.f_matmul(&keys.f_transpose(-2, -1)?)?.f_mul_scalar(scale)?;
        let scores = scores.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?.f_add(mask)?;
        Ok(scores.f_softmax(-1, Kind::Float)?.f_to_kind(values.kind())?.f_matmul(values)?)
    }

    /// One transformer block over the passes `xs` (`[rows, hidden]` each), one after
    /// another op by op, so that int4 on the CPU unpacks a projection's weight once for
    /// all passes of 64 rows and more (other formats multiply pass by pass); `attend(pass, q, k, v)` stores the pass's K/V in the cache and returns
    /// its attention output `[rows, heads * head_dim]`, pass by pass in order.
    fn block_forward(
        &self,
        block: &Block,
        xs: &[Tensor],
        rotations: &[Tensor],
        mut attend: impl FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let (h, kv, hd) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
        let normed = each(xs, |x| rms_norm(x, &block.attn_norm, c.rms_norm_eps))?;
        let qkv = block.qkv.forward_passes(&normed)?;
        let mut attn = Vec::with_capacity(xs.len());
        for (p, qkv) in qkv.iter().enumerate() {
            let n = qkv.size()[0];
            let qkv = match &block.qkv_bias {
                Some(bias) => qkv.f_add(bias)?,
                None => qkv.shallow_clone(),
            };
            let qk = qkv.f_narrow(1, 0, (h + kv) * hd)?.f_view([n, h + kv, hd])?;
            let qk = match &block.qk_norm {
                Some((q_gain, k_gain)) => Tensor::f_cat(
                    &[
                        rms_norm(&qk.f_narrow(1, 0, h)?, q_gain, c.rms_norm_eps)?,
                        rms_norm(&qk.f_narrow(1, h, kv)?, k_gain, c.rms_norm_eps)?,
                    ],
                    1,
                )?,
                None => qk,
            };
            let qk = qk.f_matmul(&rotations[p])?;
            let q = qk.f_narrow(1, 0, h)?;
            let k = qk.f_narrow(1, h, kv)?;
            let v = qkv.f_narrow(1, (h + kv) * hd, kv * hd)?.f_view([n, kv, hd])?;
            attn.push(attend(p, &q, &k, &v)?);
        }
        let xs = match &block.post_norms {
            Some((after_attn, _)) => {
                let out = block.o.forward_passes(&attn)?;
                xs.iter()
                    .zip(&out)
                    .map(|(x, o)| Ok(x.f_add(&rms_norm(o, after_attn, c.rms_norm_eps)?)?))
                    .collect::<Result<Vec<Tensor>>>()?
            }
            None => block.o.forward_add_passes(xs, &attn)?,
        };
        let normed = each(&xs, |x| rms_norm(x, &block.ffn_norm, c.rms_norm_eps))?;
        let gate_up = block.gate_up.forward_passes(&normed)?;
        let f = c.intermediate_size as i64;
        let act = each(&gate_up, |gate_up| {
            let gate = gate_up.f_narrow(1, 0, f)?;
            let gate = match c.activation {
                Activation::Silu => gate.f_silu()?,
                Activation::GeluTanh => gate.f_gelu("tanh")?,
            };
            Ok(gate.f_mul(&gate_up.f_narrow(1, f, f)?)?)
        })?;
        match &block.post_norms {
            Some((_, after_mlp)) => {
                let out = block.down.forward_passes(&act)?;
                xs.iter().zip(&out).map(|(x, d)| Ok(x.f_add(&rms_norm(d, after_mlp, c.rms_norm_eps)?)?)).collect()
            }
            None => block.down.forward_add_passes(&xs, &act),
        }
    }
}

/// `f` of each pass.
fn each(xs: &[Tensor], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    xs.iter().map(f).collect()
}

/// Additive mask `[rows, keys]`: row r may see keys `0..=positions[r]`, and with a
/// sliding `window` only the last `window` of them.
fn causal_mask(positions: &Tensor, keys: i64, window: Option<usize>, device: Device) -> Result<Tensor> {
    let rows = positions.size()[0];
    let key_pos = Tensor::f_arange(keys, (Kind::Int64, device))?.f_unsqueeze(0)?;
    let query_pos = positions.f_unsqueeze(1)?;
    let mut hidden = key_pos.f_gt_tensor(&query_pos)?;
    if let Some(window) = window {
        hidden = hidden.f_logical_or(&key_pos.f_le_tensor(&query_pos.f_sub_scalar(window as i64)?)?)?;
    }
    Ok(Tensor::f_zeros([rows, keys], (Kind::Float, device))?.f_masked_fill(&hidden, f64::NEG_INFINITY)?)
}
