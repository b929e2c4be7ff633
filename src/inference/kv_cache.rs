//! The KV cache: per layer, keys and values of every sequence slot, kept apart from the
//! weights. Layout `[slots, kv_heads, max_len, head_dim]`, so the running decode batch
//! (slots `0..B`, kept contiguous by the engine) is a zero-copy view for attention.
//! Memory is allocated with `empty`, so pages are only touched as sequences grow; each
//! slot is zeroed lazily up to the furthest position a batch ever reads, because a
//! masked attention weight of 0 times uninitialized NaN memory is still NaN.

use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::error::{InferError, Result};

/// Positions zeroed at once by [`KvCache::ensure_initialized`].
const ZERO_BLOCK: usize = 128;

/// Keys and values for every layer, `[rows, kv_heads, len, head_dim]` each, allocated
/// (`empty`: pages are touched only when written).
pub(crate) fn layer_tensors(
    config: &LlamaConfig,
    rows: usize,
    len: usize,
    device: Device,
    kind: Kind,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let shape = [rows as i64, config.num_kv_heads as i64, len as i64, config.head_dim as i64];
    let mut keys = Vec::with_capacity(config.num_layers);
    let mut values = Vec::with_capacity(config.num_layers);
    for _ in 0..config.num_layers {
        keys.push(Tensor::f_empty(shape, (kind, device))?);
        values.push(Tensor::f_empty(shape, (kind, device))?);
    }
    Ok((keys, values))
}

pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    lens: Vec<usize>,
    /// Per slot: positions `0..initialized` hold finite values (written or zeroed).
    initialized: Vec<usize>,
    max_len: usize,
}

impl KvCache {
    /// Bytes held by the keys and values of every layer.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum()
    }

    pub fn new(config: &LlamaConfig, slots: usize, max_len: usize, device: Device, kind: Kind) -> Result<Self> {
        let (keys, values) = layer_tensors(config, slots, max_len, device, kind)?;
        Ok(Self { keys, values, lens: vec![0; slots], initialized: vec![0; slots], max_len })
    }

    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokens currently cached for `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    pub(crate) fn set_len(&mut self, slot: usize, len: usize) {
        self.lens[slot] = len;
    }

    /// Fails unless `slot` exists and can hold `len` tokens.
    pub(crate) fn check(&self, slot: usize, len: usize) -> Result<()> {
        if slot >= self.slots() {
            return Err(InferError::InvalidRequest(format!("KV slot {slot} of {}", self.slots())));
        }
        if len > self.max_len {
            return Err(InferError::ContextOverflow { got: len, max_new: 0, limit: self.max_len });
        }
        Ok(())
    }

    /// Makes positions `0..upto` of `slot` finite, zeroing what was never written. Zeroes
    /// [`ZERO_BLOCK`] positions at a time so that growing sequences do not pay per step.
    pub(crate) fn ensure_initialized(&mut self, slot: usize, upto: usize) -> Result<()> {
        let from = self.initialized[slot];
        if upto > from {
            let to = upto.div_ceil(ZERO_BLOCK).saturating_mul(ZERO_BLOCK).min(self.max_len);
            for t in self.keys.iter().chain(self.values.iter()) {
                let _ = t.f_get(slot as i64)?.f_narrow(1, from as i64, (to - from) as i64)?.f_zero_()?;
            }
            self.initialized[slot] = to;
        }
        Ok(())
    }

    /// Records that positions `0..upto` of `slot` were written.
    pub(crate) fn mark_written(&mut self, slot: usize, upto: usize) {
        self.initialized[slot] = self.initialized[slot].max(upto);
    }

    pub(crate) fn layer_mut(&mut self, layer: usize) -> (&mut Tensor, &mut Tensor) {
        (&mut self.keys[layer], &mut self.values[layer])
    }

    /// Every layer's keys and values (the fused decode step writes into them in place).
    pub fn layers(&self) -> (&[Tensor], &[Tensor]) {
        (&self.keys, &self.values)
    }

    /// Copies the first `len` cached positions of slot `from` into slot `to`.
    pub fn move_slot(&mut self, from: usize, to: usize) -> Result<()> {
        let len = self.lens[from];
        if from != to && len > 0 {
            for t in self.keys.iter().chain(self.values.iter()) {
                let src = t.f_get(from as i64)?.f_narrow(1, 0, len as i64)?;
                t.f_get(to as i64)?.f_narrow(1, 0, len as i64)?.f_copy_(&src)?;
            }
        }
        self.lens[to] = len;
        self.lens[from] = 0;
        self.mark_written(to, len);
        Ok(())
    }

    /// Forgets the contents of `slot`.
    pub fn clear(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }
}
