//! The Llama-family transformer (Llama 2/3, SmolLM2, TinyLlama, Mistral) on libtorch:
//! RMSNorm, half-split rotary embeddings, grouped-query attention, SwiGLU MLP and a tied
//! or untied output head. Weights live here; per-sequence state lives in [`KvCache`].
//!
//! Two entry points serve the engine's scheduler: [`Llama::prefill`] runs a chunk of one
//! sequence's prompt, [`Llama::decode`] advances a batch of sequences by one token each.
//! Both return the final hidden state (after the last norm) of every input position,
//! which the proof of inference commits to.

use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::error::Result;
use super::kv_cache::KvCache;
use super::weights::{place, WeightSource};

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
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
}

impl Rope {
    fn new(config: &LlamaConfig, max_len: usize, device: Device) -> Result<Self> {
        let half = config.head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf((2 * i) as f64 / config.head_dim as f64)
            })
            .collect();
        if let Some(s) = &config.rope_scaling {
            let old = s.original_max_position_embeddings as f64;
            let (low_wavelen, high_wavelen) = (old / s.low_freq_factor, old / s.high_freq_factor);
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for pos in 0..max_len {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = [max_len as i64, half as i64];
        Ok(Self {
            cos: Tensor::f_from_slice(&cos)?
                .f_reshape(shape)?
                .f_to_device(device)?,
            sin: Tensor::f_from_slice(&sin)?
                .f_reshape(shape)?
                .f_to_device(device)?,
        })
    }

    /// Rotates `x` of shape `[n, heads, head_dim]` by the angles of `positions` (`[n]`).
    fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        let cos = self
            .cos
            .f_index_select(0, positions)?
            .f_unsqueeze(1)?
            .f_to_kind(kind)?;
        let sin = self
            .sin
            .f_index_select(0, positions)?
            .f_unsqueeze(1)?
            .f_to_kind(kind)?;
        let half = x.size()[2] / 2;
        let x1 = x.f_narrow(2, 0, half)?;
        let x2 = x.f_narrow(2, half, half)?;
        let a = x1.f_mul(&cos)?.f_sub(&x2.f_mul(&sin)?)?;
        let b = x2.f_mul(&cos)?.f_add(&x1.f_mul(&sin)?)?;
        Ok(Tensor::f_cat(&[a, b], 2)?)
    }
}

struct Block {
    attn_norm: Tensor,
    /// Q, K and V projections fused: `[(heads + 2 kv_heads) * head_dim, hidden]`.
    qkv: Tensor,
    o: Tensor,
    ffn_norm: Tensor,
    /// Gate and up projections fused: `[2 * intermediate, hidden]`.
    gate_up: Tensor,
    down: Tensor,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub device: Device,
    pub kind: Kind,
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = x.f_to_kind(Kind::Float)?;
    let var = xf.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
    let normed = xf
        .f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?
        .f_to_kind(x.kind())?;
    Ok(normed.f_mul(weight)?)
}

impl Llama {
    /// Loads every weight from `source` onto `device` in `kind`.
    pub fn load(source: &WeightSource, device: Device, kind: Kind) -> Result<Self> {
        let c = source.config()?;
        let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (h, kv) = (c.num_heads, c.num_kv_heads);
        let get = |name: &str, shape: &[usize]| source.tensor(name, shape, &c);
        let embed_cpu = get("token_embd.weight", &[c.vocab_size, d])?;
        let lm_head = if source.has("output.weight") {
            place(get("output.weight", &[c.vocab_size, d])?, device, kind)?
        } else {
            place(embed_cpu.shallow_clone(), device, kind)?
        };
        let embed = place(embed_cpu, device, kind)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let name = |leaf: &str| format!("blk.{i}.{leaf}.weight");
            let q = get(&name("attn_q"), &[h * hd, d])?;
            let k = get(&name("attn_k"), &[kv * hd, d])?;
            let v = get(&name("attn_v"), &[kv * hd, d])?;
            let gate = get(&name("ffn_gate"), &[f, d])?;
            let up = get(&name("ffn_up"), &[f, d])?;
            layers.push(Block {
                attn_norm: place(get(&name("attn_norm"), &[d])?, device, kind)?,
                qkv: place(Tensor::f_cat(&[q, k, v], 0)?, device, kind)?,
                o: place(get(&name("attn_output"), &[d, h * hd])?, device, kind)?,
                ffn_norm: place(get(&name("ffn_norm"), &[d])?, device, kind)?,
                gate_up: place(Tensor::f_cat(&[gate, up], 0)?, device, kind)?,
                down: place(get(&name("ffn_down"), &[d, f])?, device, kind)?,
            });
        }
        let norm = place(get("output_norm.weight", &[d])?, device, kind)?;
        let rope = Rope::new(&c, c.max_position_embeddings.max(1), device)?;
        Ok(Self {
            config: c,
            device,
            kind,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// Bytes of weights read per decoded token (embedding rows excluded).
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.norm.numel() + self.lm_head.numel();
        for b in &self.layers {
            n += b.attn_norm.numel() + b.qkv.numel() + b.o.numel() + b.ffn_norm.numel();
            n += b.gate_up.numel() + b.down.numel();
        }
        n * self.kind.elt_size_in_bytes()
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
        let n = tokens.len() as i64;
        let total = start as i64 + n;
        cache.check(slot, start + tokens.len())?;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let positions = self.ids(&(start as i64..total).collect::<Vec<_>>())?;
        // Row r = (group, t) of the grouped query may see keys 0..=start+t.
        let groups = (self.config.num_heads / self.config.num_kv_heads) as i64;
        let key_pos = Tensor::f_arange(total, (Kind::Int64, self.device))?.f_unsqueeze(0)?;
        let query_pos = positions.f_unsqueeze(1)?;
        let mask = Tensor::f_zeros([n, total], (Kind::Float, self.device))?
            .f_masked_fill(&key_pos.f_gt_tensor(&query_pos)?, f64::NEG_INFINITY)?
            .f_repeat([groups, 1])?;
        let mut x = self.embed.f_index_select(0, &self.ids(&ids)?)?;
        for (l, block) in self.layers.iter().enumerate() {
            x = self.block_forward(block, &x, &positions, |q, k, v| {
                let (k_cache, v_cache) = cache.layer_mut(l);
                let k_slot = k_cache.f_get(slot as i64)?;
                let v_slot = v_cache.f_get(slot as i64)?;
                k_slot
                    .f_narrow(1, start as i64, n)?
                    .f_copy_(&k.f_transpose(0, 1)?)?;
                v_slot
                    .f_narrow(1, start as i64, n)?
                    .f_copy_(&v.f_transpose(0, 1)?)?;
                let keys = k_slot.f_narrow(1, 0, total)?;
                let values = v_slot.f_narrow(1, 0, total)?;
                // q: [n, heads, hd] -> [kv_heads, groups * n, hd]
                let (kv, hd) = (keys.size()[0], keys.size()[2]);
                let q = q
                    .f_transpose(0, 1)?
                    .f_contiguous()?
                    .f_view([kv, groups * n, hd])?;
                let out = attention(&q, &keys, &values, &mask)?; // [kv, groups * n, hd]
                Ok(out
                    .f_view([kv * groups, n, hd])?
                    .f_transpose(0, 1)?
                    .f_reshape([n, kv * groups * hd])?)
            })?;
        }
        cache.set_len(slot, start + tokens.len());
        cache.mark_written(slot, start + tokens.len());
        self.finish(x, logits)
    }

    /// Advances the sequences in cache slots `0..tokens.len()` by one token each;
    /// `positions[i]` is the number of tokens already in slot `i`.
    pub fn decode(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        positions: &[usize],
    ) -> Result<ForwardOutput> {
        let b = tokens.len() as i64;
        for (slot, &pos) in positions.iter().enumerate() {
            cache.check(slot, pos + 1)?;
        }
        let longest = positions.iter().max().map_or(1, |&p| p + 1) as i64;
        for slot in 0..positions.len() {
            cache.ensure_initialized(slot, longest as usize)?;
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let pos64: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let positions_t = self.ids(&pos64)?;
        let slots = Tensor::f_arange(b, (Kind::Int64, self.device))?;
        let key_pos = Tensor::f_arange(longest, (Kind::Int64, self.device))?.f_unsqueeze(0)?;
        let mask = Tensor::f_zeros([b, longest], (Kind::Float, self.device))?
            .f_masked_fill(
                &key_pos.f_gt_tensor(&positions_t.f_unsqueeze(1)?)?,
                f64::NEG_INFINITY,
            )?
            .f_view([b, 1, 1, longest])?;
        let groups = (self.config.num_heads / self.config.num_kv_heads) as i64;
        let mut x = self.embed.f_index_select(0, &self.ids(&ids)?)?;
        for (l, block) in self.layers.iter().enumerate() {
            x = self.block_forward(block, &x, &positions_t, |q, k, v| {
                let (k_cache, v_cache) = cache.layer_mut(l);
                let index = [
                    Some(slots.shallow_clone()),
                    None,
                    Some(positions_t.shallow_clone()),
                ];
                let _ = k_cache.f_index_put_(&index, k, false)?;
                let _ = v_cache.f_index_put_(&index, v, false)?;
                let keys = k_cache.f_narrow(0, 0, b)?.f_narrow(2, 0, longest)?;
                let values = v_cache.f_narrow(0, 0, b)?.f_narrow(2, 0, longest)?;
                let (kv, hd) = (keys.size()[1], keys.size()[3]);
                let q = q.f_view([b, kv, groups, hd])?;
                let out = attention(&q, &keys, &values, &mask)?; // [b, kv, groups, hd]
                Ok(out.f_reshape([b, kv * groups * hd])?)
            })?;
        }
        for (slot, &pos) in positions.iter().enumerate() {
            cache.set_len(slot, pos + 1);
        }
        self.finish(x, LogitsFor::All)
    }

    /// One transformer block over `x` (`[n, hidden]`); `attend` stores K/V in the cache and
    /// returns the attention output `[n, heads * head_dim]`.
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        positions: &Tensor,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (h, kv, hd) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
        let n = x.size()[0];
        let normed = rms_norm(x, &block.attn_norm, c.rms_norm_eps)?;
        let qkv = normed.f_linear::<Tensor>(&block.qkv, None)?;
        let qk = qkv.f_narrow(1, 0, (h + kv) * hd)?.f_view([n, h + kv, hd])?;
        let qk = self.rope.apply(&qk, positions)?;
        let q = qk.f_narrow(1, 0, h)?;
        let k = qk.f_narrow(1, h, kv)?;
        let v = qkv
            .f_narrow(1, (h + kv) * hd, kv * hd)?
            .f_view([n, kv, hd])?;
        let attn = attend(&q, &k, &v)?;
        let x = x.f_add(&attn.f_linear::<Tensor>(&block.o, None)?)?;
        let normed = rms_norm(&x, &block.ffn_norm, c.rms_norm_eps)?;
        let gate_up = normed.f_linear::<Tensor>(&block.gate_up, None)?;
        let f = c.intermediate_size as i64;
        let act = gate_up
            .f_narrow(1, 0, f)?
            .f_silu()?
            .f_mul(&gate_up.f_narrow(1, f, f)?)?;
        Ok(x.f_add(&act.f_linear::<Tensor>(&block.down, None)?)?)
    }

    fn finish(&self, x: Tensor, logits: LogitsFor) -> Result<ForwardOutput> {
        let hidden = rms_norm(&x, &self.norm, self.config.rms_norm_eps)?;
        let n = hidden.size()[0];
        let logits = match logits {
            LogitsFor::None => Tensor::f_zeros(
                [0, self.config.vocab_size as i64],
                (Kind::Float, self.device),
            )?,
            LogitsFor::Last => hidden
                .f_narrow(0, n - 1, 1)?
                .f_linear::<Tensor>(&self.lm_head, None)?
                .f_to_kind(Kind::Float)?,
            LogitsFor::All => hidden
                .f_linear::<Tensor>(&self.lm_head, None)?
                .f_to_kind(Kind::Float)?,
        };
        Ok(ForwardOutput { hidden, logits })
    }
}

/// Scaled dot-product attention with an additive mask, softmax in f32.
fn attention(q: &Tensor, keys: &Tensor, values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let hd = q.size()[q.dim() - 1];
    let scores = q
        .f_matmul(&keys.f_transpose(-2, -1)?)?
        .f_mul_scalar(1.0 / (hd as f64).sqrt())?;
    let probs = scores
        .f_to_kind(Kind::Float)?
        .f_add(mask)?
        .f_softmax(-1, Kind::Float)?
        .f_to_kind(q.kind())?;
    Ok(probs.f_matmul(values)?)
}
