//! The prefix cache: keys and values of prompt blocks already computed, kept for the next
//! request that starts with the same tokens. Games send one long persona with thousands of
//! short player lines; with the persona's blocks cached, a request prefills only what
//! follows them.
//!
//! - **Blocks are prefill chunks.** A block is [`EngineConfig::prefill_chunk`] tokens at a
//!   multiple of that size, so a request that resumes after cached blocks runs exactly the
//!   chunks an uncached run would: the same rows through the same operations, hence the
//!   same keys, values and logits, and the same tokens.
//! - **Blocks are named by a hash chain**: block `i`'s name is SHA-256 over block `i-1`'s
//!   name and block `i`'s token ids, so a name stands for the whole prefix up to it (a
//!   block is reused only after the same leading tokens). The names are what a node tells
//!   its distributor it holds (cache-aware routing).
//! - **Least recently used blocks go first** when the budget is full. A use stamps a
//!   chain's blocks from its last to its first, so the head is the newest and a chain
//!   loses its tail before its head (a chain without its head is useless: reuse starts
//!   at block 0). Storing never evicts the chain being stored, and stores at most as many
//!   blocks of one prompt as the cache holds.
//!
//! [`EngineConfig::prefill_chunk`]: super::engine::EngineConfig::prefill_chunk

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::error::Result;
use super::kv_cache::KvCache;

/// The name of a block: the hash of every token up to its end.
pub type BlockName = [u8; 32];

/// The names of the full blocks of `tokens` (blocks of `block` tokens), in order.
pub fn block_names(tokens: &[u32], block: usize) -> Vec<BlockName> {
    let mut names = Vec::with_capacity(tokens.len() / block.max(1));
    let mut previous: BlockName = {
        let mut h = Sha256::new();
        h.update(b"ludus-prefix-v1");
        h.update((block as u32).to_be_bytes());
        h.finalize().into()
    };
    for chunk in tokens.chunks_exact(block.max(1)) {
        let mut h = Sha256::new();
        h.update(previous);
        for t in chunk {
            h.update(t.to_be_bytes());
        }
        previous = h.finalize().into();
        names.push(previous);
    }
    names
}

struct Entry {
    /// Index in the pool.
    at: usize,
    /// Logical time of the last use.
    used: u64,
}

/// How the cache has served, for the node's heartbeat and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Requests that found at least one cached block.
    pub hits: u64,
    /// Requests long enough to use a block that found none.
    pub misses: u64,
    /// Prompt tokens not prefilled thanks to the cache.
    pub tokens_reused: u64,
    /// Blocks held now, and at most.
    pub blocks: usize,
    pub capacity: usize,
    /// Changes whenever the blocks held, or their order of use, change.
    pub generation: u64,
}

pub struct PrefixCache {
    block: usize,
    /// Per layer: `[capacity, kv_heads, block, head_dim]`.
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    entries: HashMap<BlockName, Entry>,
    free: Vec<usize>,
    clock: u64,
    stats: PrefixStats,
}

impl std::fmt::Debug for PrefixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixCache").field("block", &self.block).field("stats", &self.stats).finish()
    }
}

impl PrefixCache {
    /// Bytes one cached token takes (keys and values of every layer).
    pub fn bytes_per_token(config: &LlamaConfig, kind: Kind) -> usize {
        2 * config.num_layers * config.num_kv_heads * config.head_dim * kind.elt_size_in_bytes()
    }

    /// A cache of `block`-token blocks within `budget` bytes; `None` when not even one block
    /// fits. Memory is reserved, not touched: pages fill as blocks are stored.
    pub fn new(config: &LlamaConfig, block: usize, budget: usize, device: Device, kind: Kind) -> Result<Option<Self>> {
        let block = block.max(1);
        let capacity = budget / (Self::bytes_per_token(config, kind) * block).max(1);
        if capacity == 0 {
            return Ok(None);
        }
        let (keys, values) = super::kv_cache::layer_tensors(config, capacity, block, device, kind)?;
        let stats = PrefixStats { capacity, ..PrefixStats::default() };
        Ok(Some(Self {
            block,
            keys,
            values,
            entries: HashMap::new(),
            free: (0..capacity).rev().collect(),
            clock: 0,
            stats,
        }))
    }

    pub fn block(&self) -> usize {
        self.block
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats { blocks: self.entries.len(), ..self.stats }
    }

    /// Copies the longest run of cached leading blocks of `tokens` that ends at or before
    /// `limit` into `slot` of `kv` (which must be empty), and returns how many tokens it
    /// restored (a multiple of the block size; 0 on a miss).
    pub fn restore(&mut self, tokens: &[u32], limit: usize, kv: &mut KvCache, slot: usize) -> Result<usize> {
        let usable = limit.min(tokens.len()) / self.block;
        if usable == 0 {
            return Ok(0);
        }
        let names = block_names(&tokens[..usable * self.block], self.block);
        let found: Vec<usize> = names.iter().map_while(|n| self.entries.get(n).map(|e| e.at)).collect();
        if found.is_empty() {
            self.stats.misses += 1;
            return Ok(0);
        }
        self.touch(&names[..found.len()]);
        let len = found.len() * self.block;
        kv.check(slot, len)?;
        for (layer, (k_pool, v_pool)) in self.keys.iter().zip(&self.values).enumerate() {
            let (k_cache, v_cache) = kv.layer_mut(layer);
            let (k_slot, v_slot) = (k_cache.f_get(slot as i64)?, v_cache.f_get(slot as i64)?);
            for (i, &at) in found.iter().enumerate() {
                let start = (i * self.block) as i64;
                k_slot.f_narrow(1, start, self.block as i64)?.f_copy_(&k_pool.f_get(at as i64)?)?;
                v_slot.f_narrow(1, start, self.block as i64)?.f_copy_(&v_pool.f_get(at as i64)?)?;
            }
        }
        kv.set_len(slot, len);
        kv.mark_written(slot, len);
        self.stats.hits += 1;
        self.stats.tokens_reused += len as u64;
        Ok(len)
    }

    /// Stores the full blocks of `tokens[..upto]` that `slot` of `kv` holds and the cache
    /// does not, evicting the least recently used blocks when it is full.
    pub fn store(&mut self, tokens: &[u32], upto: usize, kv: &mut KvCache, slot: usize) -> Result<()> {
        let blocks = (upto.min(tokens.len()) / self.block).min(self.stats.capacity);
        let names = block_names(&tokens[..blocks * self.block], self.block);
        let chain: std::collections::HashSet<BlockName> = names.iter().copied().collect();
        for (i, name) in names.iter().enumerate() {
            if self.entries.contains_key(name) {
                continue;
            }
            let Some(at) = self.free.pop().or_else(|| self.evict(&chain)) else { break };
            if let Err(e) = self.copy_in(kv, slot, i, at) {
                self.free.push(at);
                return Err(e);
            }
            self.entries.insert(*name, Entry { at, used: 0 });
        }
        self.touch(&names);
        Ok(())
    }

    /// Copies block `i` of `slot` into place `at` of the pool.
    fn copy_in(&self, kv: &mut KvCache, slot: usize, i: usize, at: usize) -> Result<()> {
        let start = (i * self.block) as i64;
        for (layer, (k_pool, v_pool)) in self.keys.iter().zip(&self.values).enumerate() {
            let (k_cache, v_cache) = kv.layer_mut(layer);
            let k = k_cache.f_get(slot as i64)?.f_narrow(1, start, self.block as i64)?;
            let v = v_cache.f_get(slot as i64)?.f_narrow(1, start, self.block as i64)?;
            k_pool.f_get(at as i64)?.f_copy_(&k)?;
            v_pool.f_get(at as i64)?.f_copy_(&v)?;
        }
        Ok(())
    }

    /// Stamps a chain's held blocks as just used, its last block first, so that its head
    /// is the newest.
    fn touch(&mut self, names: &[BlockName]) {
        for name in names.iter().rev() {
            if let Some(entry) = self.entries.get_mut(name) {
                self.clock += 1;
                entry.used = self.clock;
            }
        }
        self.stats.generation += 1;
    }

    /// Frees the least recently used block outside `keep` and returns its place; `None`
    /// when every block is in `keep`.
    fn evict(&mut self, keep: &std::collections::HashSet<BlockName>) -> Option<usize> {
        let (&name, _) = self.entries.iter().filter(|(n, _)| !keep.contains(*n)).min_by_key(|(_, e)| e.used)?;
        self.stats.generation += 1;
        self.entries.remove(&name).map(|e| e.at)
    }

    /// The names of the blocks held, most recently used first, at most `max`.
    pub fn held(&self, max: usize) -> Vec<BlockName> {
        let mut held: Vec<(&BlockName, u64)> = self.entries.iter().map(|(n, e)| (n, e.used)).collect();
        let newest = |&(_, used): &(&BlockName, u64)| std::cmp::Reverse(used);
        if held.len() > max && max > 0 {
            held.select_nth_unstable_by_key(max - 1, newest);
            held.truncate(max);
        }
        held.sort_unstable_by_key(newest);
        held.into_iter().take(max).map(|(n, _)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_name_stands_for_every_token_before_it() {
        let a: Vec<u32> = (0..12).collect();
        let mut b = a.clone();
        b[1] = 99; // differs in the first block only
        let (na, nb) = (block_names(&a, 4), block_names(&b, 4));
        assert_eq!(na.len(), 3);
        assert!(na.iter().zip(&nb).all(|(x, y)| x != y), "a change early renames every later block");
        assert_eq!(block_names(&a[..8], 4), na[..2].to_vec(), "a prefix has its own names");
        assert_ne!(block_names(&a[..4], 4)[0], block_names(&a[..4], 2)[1], "the block size is part of the name");
        assert!(block_names(&a[..3], 4).is_empty(), "no name for a partial block");
    }
}
