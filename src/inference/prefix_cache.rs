//! The prefix cache: keys, values and final hidden states of prompt chunks already
//! computed, kept for the next request that starts with the same tokens. Games send one
//! long persona with thousands of short player lines; with the persona's chunks cached, a
//! request prefills only what follows them.
//!
//! - **Entries are prefill chunks** ([`chunk_ends`]): a prompt is cut where its request
//!   asks (a chat prompt at the end of its system messages,
//!   [`super::chat_template::persona_breaks`]), and each piece into chunks of
//!   [`EngineConfig::prefill_chunk`] tokens from its start. Where a prompt is cut depends
//!   on the prompt alone, so a request that resumes after cached chunks runs exactly the
//!   chunks an uncached run would: the same rows through the same operations, hence the
//!   same keys, values and logits, and the same tokens. Cutting at the persona's end is
//!   what lets a warm request reuse the whole persona rather than its whole blocks.
//! - **Chunks are named by a hash chain**: chunk `i`'s name is SHA-256 over chunk `i-1`'s
//!   name and chunk `i`'s token ids, so a name stands for the whole prefix up to it (a
//!   chunk is reused only after the same leading tokens, cut the same way). The names are
//!   what a node tells its distributor it holds (cache-aware routing, which names a
//!   prompt's whole leading blocks: [`block_names`]).
//! - **Hidden states are kept too**, so that a request collecting them for a proof of
//!   inference (whose rows are among the prompt's last) restores as much as one that does
//!   not: the same bits its own run would give.
//! - **Least recently used chunks go first** when the budget is full. A use stamps a
//!   chain's chunks from its last to its first, so the head is the newest and a chain
//!   loses its tail before its head (a chain without its head is useless: reuse starts
//!   at chunk 0). Storing never evicts the chain being stored, and stores at most as many
//!   chunks of one prompt as the cache holds.
//!
//! [`EngineConfig::prefill_chunk`]: super::engine::EngineConfig::prefill_chunk

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::error::{InferError, Result};
use super::kv_cache::KvCache;

/// The name of a chunk: the hash of every token up to its end, cut as it was.
pub type BlockName = [u8; 32];

/// The ends of the prefill chunks of a `len`-token sequence: it is cut at each of
/// `breaks` (positions inside it; any out of order or out of range are ignored), and each
/// piece into chunks of `block` tokens from the piece's start.
pub fn chunk_ends(len: usize, breaks: &[usize], block: usize) -> Vec<usize> {
    let block = block.max(1);
    let mut ends = Vec::with_capacity(len / block + breaks.len() + 1);
    let mut start = 0;
    for piece_end in breaks.iter().copied().filter(|&b| b < len).chain(std::iter::once(len)) {
        if piece_end <= start {
            continue;
        }
        let mut at = start;
        while at < piece_end {
            at = (at + block).min(piece_end);
            ends.push(at);
        }
        start = piece_end;
    }
    ends
}

/// The names of the chunks of `tokens` that end at `ends` (ascending, within `tokens`),
/// in order, for a cache of `block`-token chunks.
pub fn chunk_names(tokens: &[u32], ends: &[usize], block: usize) -> Vec<BlockName> {
    let mut names = Vec::with_capacity(ends.len());
    let mut previous: BlockName = {
        let mut h = Sha256::new();
        h.update(b"ludus-prefix-v1");
        h.update((block as u32).to_be_bytes());
        h.finalize().into()
    };
    let mut start = 0;
    for &end in ends.iter().take_while(|&&e| e <= tokens.len()) {
        let mut h = Sha256::new();
        h.update(previous);
        for t in &tokens[start..end] {
            h.update(t.to_be_bytes());
        }
        previous = h.finalize().into();
        names.push(previous);
        start = end;
    }
    names
}

/// The names of the whole leading blocks of `tokens` (blocks of `block` tokens), in order:
/// a prompt cut nowhere else, as the distributor names it for routing.
pub fn block_names(tokens: &[u32], block: usize) -> Vec<BlockName> {
    let block = block.max(1);
    let ends: Vec<usize> = (1..=tokens.len() / block).map(|i| i * block).collect();
    chunk_names(tokens, &ends, block)
}

struct Entry {
    /// Index in the pool.
    at: usize,
    /// Tokens in the chunk (at most the block size).
    rows: usize,
    /// Logical time of the last use.
    used: u64,
}

/// How the cache has served, for the node's heartbeat and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Requests that found at least one cached chunk.
    pub hits: u64,
    /// Requests long enough to use a chunk that found none.
    pub misses: u64,
    /// Prompt tokens not prefilled thanks to the cache.
    pub tokens_reused: u64,
    /// Chunks held now, and at most.
    pub blocks: usize,
    pub capacity: usize,
    /// Changes whenever the chunks held, or their order of use, change.
    pub generation: u64,
}

/// What [`PrefixCache::restore`] put back.
#[derive(Debug, Default)]
pub struct Restored {
    /// Leading tokens restored (0 on a miss).
    pub rows: usize,
    /// The final hidden states of the restored rows from the asked position on,
    /// `[rows, hidden]`, when asked for and any were restored there.
    pub hidden: Option<Tensor>,
}

pub struct PrefixCache {
    block: usize,
    /// Per layer: `[capacity, kv_heads, block, head_dim]`.
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// `[capacity, block, hidden]`: the final hidden state of every cached row.
    hidden: Tensor,
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
    /// Bytes one cached token takes (keys and values of every layer, and its hidden state).
    pub fn bytes_per_token(config: &LlamaConfig, kind: Kind) -> usize {
        (2 * config.num_layers * config.num_kv_heads * config.head_dim + config.hidden_size) * kind.elt_size_in_bytes()
    }

    /// A cache of chunks of at most `block` tokens within `budget` bytes; `None` when not
    /// even one fits. Memory is reserved, not touched: pages fill as chunks are stored.
    pub fn new(config: &LlamaConfig, block: usize, budget: usize, device: Device, kind: Kind) -> Result<Option<Self>> {
        let block = block.max(1);
        let capacity = budget / (Self::bytes_per_token(config, kind) * block).max(1);
        if capacity == 0 {
            return Ok(None);
        }
        let (keys, values) = super::kv_cache::layer_tensors(config, capacity, block, device, kind)?;
        let hidden = Tensor::f_empty([capacity as i64, block as i64, config.hidden_size as i64], (kind, device))?;
        let stats = PrefixStats { capacity, ..PrefixStats::default() };
        Ok(Some(Self {
            block,
            keys,
            values,
            hidden,
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

    /// Copies the longest run of cached leading chunks of `tokens` (cut at `ends`,
    /// [`chunk_ends`]) that ends at or before `limit` into `slot` of `kv` (which must be
    /// empty). With `hidden_from`, also gives the hidden states of the restored rows from
    /// that position on.
    pub fn restore(
        &mut self,
        tokens: &[u32],
        ends: &[usize],
        limit: usize,
        kv: &mut KvCache,
        slot: usize,
        hidden_from: Option<usize>,
    ) -> Result<Restored> {
        let limit = limit.min(tokens.len());
        let usable: Vec<usize> = ends.iter().copied().take_while(|&e| e <= limit).collect();
        let Some(&last) = usable.last() else { return Ok(Restored::default()) };
        let names = chunk_names(&tokens[..last], &usable, self.block);
        // (pool place, first row, rows) of each chunk found, in order.
        let mut found = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let start = if i == 0 { 0 } else { usable[i - 1] };
            match self.entries.get(name) {
                Some(e) if e.rows == usable[i] - start => found.push((e.at, start, e.rows)),
                _ => break,
            }
        }
        if found.is_empty() {
            self.stats.misses += 1;
            return Ok(Restored::default());
        }
        self.touch(&names[..found.len()]);
        let len = usable[found.len() - 1];
        kv.check(slot, len)?;
        for (layer, (k_pool, v_pool)) in self.keys.iter().zip(&self.values).enumerate() {
            let (k_cache, v_cache) = kv.layer_mut(layer);
            let (k_slot, v_slot) = (k_cache.f_get(slot as i64)?, v_cache.f_get(slot as i64)?);
            for &(at, start, rows) in &found {
                let (start, n) = (start as i64, rows as i64);
                k_slot.f_narrow(1, start, n)?.f_copy_(&k_pool.f_get(at as i64)?.f_narrow(1, 0, n)?)?;
                v_slot.f_narrow(1, start, n)?.f_copy_(&v_pool.f_get(at as i64)?.f_narrow(1, 0, n)?)?;
            }
        }
        let hidden = match hidden_from.filter(|&from| from < len) {
            None => None,
            Some(from) => {
                let mut parts = Vec::new();
                for &(at, start, rows) in found.iter().filter(|&&(_, start, rows)| start + rows > from) {
                    let skip = from.saturating_sub(start);
                    parts.push(self.hidden.f_get(at as i64)?.f_narrow(0, skip as i64, (rows - skip) as i64)?);
                }
                Some(Tensor::f_cat(&parts, 0)?)
            }
        };
        kv.set_len(slot, len);
        kv.mark_written(slot, len);
        self.stats.hits += 1;
        self.stats.tokens_reused += len as u64;
        Ok(Restored { rows: len, hidden })
    }

    /// Stores the chunks of `tokens` (cut at `ends`) that the step which computed rows
    /// `from..upto` of `slot` finished, and that the cache does not hold, evicting the
    /// least recently used chunks when it is full. `hidden` holds that step's final hidden
    /// states, `[upto - from, hidden]`. A chunk of an earlier step that is missing (not
    /// stored then, or evicted since) ends the chain: its followers would never be reused.
    #[allow(clippy::too_many_arguments)]
    pub fn store(
        &mut self,
        tokens: &[u32],
        ends: &[usize],
        (from, upto): (usize, usize),
        kv: &mut KvCache,
        slot: usize,
        hidden: &Tensor,
    ) -> Result<()> {
        let within: Vec<usize> =
            ends.iter().copied().take_while(|&e| e <= upto.min(tokens.len())).take(self.stats.capacity).collect();
        let Some(&last) = within.last() else { return Ok(()) };
        let names = chunk_names(&tokens[..last], &within, self.block);
        let chain: HashSet<BlockName> = names.iter().copied().collect();
        for (i, name) in names.iter().enumerate() {
            if self.entries.contains_key(name) {
                continue;
            }
            let start = if i == 0 { 0 } else { within[i - 1] };
            if start < from {
                break;
            }
            let Some(at) = self.free.pop().or_else(|| self.evict(&chain)) else { break };
            let rows = within[i] - start;
            let copied = hidden
                .f_narrow(0, (start - from) as i64, rows as i64)
                .map_err(InferError::from)
                .and_then(|h| self.copy_in(kv, slot, start, rows, at, &h));
            if let Err(e) = copied {
                self.free.push(at);
                return Err(e);
            }
            self.entries.insert(*name, Entry { at, rows, used: 0 });
        }
        self.touch(&names);
        Ok(())
    }

    /// Copies rows `start..start + rows` of `slot`, and their hidden states, into place
    /// `at` of the pool.
    fn copy_in(
        &self,
        kv: &mut KvCache,
        slot: usize,
        start: usize,
        rows: usize,
        at: usize,
        hidden: &Tensor,
    ) -> Result<()> {
        let (start, n) = (start as i64, rows as i64);
        for (layer, (k_pool, v_pool)) in self.keys.iter().zip(&self.values).enumerate() {
            let (k_cache, v_cache) = kv.layer_mut(layer);
            let k = k_cache.f_get(slot as i64)?.f_narrow(1, start, n)?;
            let v = v_cache.f_get(slot as i64)?.f_narrow(1, start, n)?;
            k_pool.f_get(at as i64)?.f_narrow(1, 0, n)?.f_copy_(&k)?;
            v_pool.f_get(at as i64)?.f_narrow(1, 0, n)?.f_copy_(&v)?;
        }
        self.hidden.f_get(at as i64)?.f_narrow(0, 0, n)?.f_copy_(hidden)?;
        Ok(())
    }

    /// Stamps a chain's held chunks as just used, its last chunk first, so that its head
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

    /// Frees the least recently used chunk outside `keep` and returns its place; `None`
    /// when every chunk is in `keep`.
    fn evict(&mut self, keep: &HashSet<BlockName>) -> Option<usize> {
        let (&name, _) = self.entries.iter().filter(|(n, _)| !keep.contains(*n)).min_by_key(|(_, e)| e.used)?;
        self.stats.generation += 1;
        self.entries.remove(&name).map(|e| e.at)
    }

    /// The names of the chunks held, most recently used first, at most `max`.
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
        let ends = chunk_ends(12, &[], 4);
        assert_eq!(chunk_names(&a, &ends, 4), na, "a prompt cut nowhere else has the blocks' names");
        let cut = chunk_names(&a, &chunk_ends(12, &[6], 4), 4);
        assert_eq!(cut[0], na[0], "the chunks before a cut keep their names");
        assert!(cut[1..].iter().all(|n| !na.contains(n)), "a prefix cut elsewhere is another prefix");
    }

    #[test]
    fn a_prompt_is_cut_at_its_breaks_and_each_piece_in_blocks_from_its_start() {
        assert_eq!(chunk_ends(10, &[], 4), [4, 8, 10]);
        assert_eq!(chunk_ends(20, &[6], 4), [4, 6, 10, 14, 18, 20]);
        assert_eq!(chunk_ends(20, &[6, 8], 4), [4, 6, 8, 12, 16, 20]);
        assert_eq!(chunk_ends(12, &[4, 8], 4), [4, 8, 12], "a break on a block's end changes nothing");
        // Out of order, repeated, at 0 or past the end: ignored.
        assert_eq!(chunk_ends(10, &[0, 6, 3, 6, 10, 99], 4), [4, 6, 10]);
        assert!(chunk_ends(0, &[2], 4).is_empty());
        // Only the last chunk of a piece is short: a step that takes whole chunks from a
        // chunk's end, up to the piece's end, runs them as passes of `block` rows.
        let ends = chunk_ends(50, &[13, 30], 8);
        let mut start = 0;
        for &end in &ends {
            assert!(end - start == 8 || [13, 30, 50].contains(&end), "{ends:?}");
            start = end;
        }
    }
}
