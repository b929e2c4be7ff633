//! Hidden-state commitments (after TOPLOC, arXiv 2501.16007): a node commits to the
//! top-k entries (by magnitude) of the final hidden state at a few positions: one prompt
//! row and one row in every chunk of [`CHUNK`] generated tokens. Which row of each chunk
//! is drawn from the task's secret challenge, so commitments cannot be prepared before the
//! task or replayed from another one. Each commitment is `k` (index u16, value f16) pairs:
//! 4k bytes, 256 bytes for the default k = 64.

use half::f16;

use crate::crypto::identity::keccak;

/// Generated tokens per commitment.
pub const CHUNK: usize = 32;
/// Prompt rows committed (distinct, among the prompt's last [`CHUNK`]).
pub const PROMPT_COMMITMENTS: usize = 4;
/// Entries kept per committed hidden state.
pub const DEFAULT_TOP_K: usize = 64;

/// The rows of the hidden-state matrix (prompt rows first, then one row per generated
/// token: row `prompt_len + g - 1` is the one whose logits chose generated token `g`) that
/// a proof commits to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positions {
    /// Ascending.
    pub prompt_rows: Vec<usize>,
    /// One per chunk of generated tokens.
    pub chunk_rows: Vec<usize>,
}

fn draw(challenge: &[u8; 32], label: &[u8], index: u32) -> u64 {
    let mut bytes = challenge.to_vec();
    bytes.extend_from_slice(label);
    bytes.extend_from_slice(&index.to_be_bytes());
    u64::from_be_bytes(keccak(&bytes)[..8].try_into().expect("8 bytes"))
}

/// The rows committed for the prompt: [`PROMPT_COMMITMENTS`] distinct rows among its last
/// [`CHUNK`] (all of them for shorter prompts), ascending. Several rows, because an edit of
/// the prompt shows most at and right after the edited position.
pub fn prompt_rows(challenge: &[u8; 32], prompt_len: usize) -> Vec<usize> {
    let window = prompt_len.min(CHUNK);
    let mut offsets: Vec<usize> = Vec::with_capacity(PROMPT_COMMITMENTS);
    let mut i = 0u32;
    while offsets.len() < PROMPT_COMMITMENTS.min(window) {
        let offset = (draw(challenge, b"prompt", i) % window as u64) as usize;
        if !offsets.contains(&offset) {
            offsets.push(offset);
        }
        i += 1;
    }
    let mut rows: Vec<usize> = offsets.into_iter().map(|o| prompt_len - 1 - o).collect();
    rows.sort_unstable();
    rows
}

/// The generated-token index committed in chunk `c`, whose length is `len` (≤ CHUNK).
pub fn chunk_offset(challenge: &[u8; 32], c: usize, len: usize) -> usize {
    (draw(challenge, b"chunk", c as u32) % len.max(1) as u64) as usize
}

/// Every committed row for a prompt of `prompt_len` and `completion_len` generated tokens.
pub fn positions(challenge: &[u8; 32], prompt_len: usize, completion_len: usize) -> Positions {
    let chunk_rows = (0..completion_len.div_ceil(CHUNK))
        .map(|c| {
            let len = (completion_len - c * CHUNK).min(CHUNK);
            prompt_len + c * CHUNK + chunk_offset(challenge, c, len) - 1
        })
        .collect();
    Positions { prompt_rows: prompt_rows(challenge, prompt_len), chunk_rows }
}

/// The top-k entries of a hidden state, values rounded to f16, sorted by index.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub entries: Vec<(u16, f32)>,
}

/// Indices of the `k` largest magnitudes (ties: lower index first).
pub fn top_indices(hidden: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..hidden.len()).collect();
    let k = k.min(hidden.len());
    if k == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(k - 1, |&a, &b| hidden[b].abs().total_cmp(&hidden[a].abs()).then(a.cmp(&b)));
    order.truncate(k);
    order.sort_unstable();
    order
}

/// How far a committed state is from a recomputed one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distance {
    /// RMS of (committed − recomputed) over the committed indices, relative to the RMS of
    /// the recomputed values there.
    pub value_error: f32,
    /// Share of the committed indices that are also in the recomputed top-k.
    pub index_overlap: f32,
}

impl TopK {
    pub fn of(hidden: &[f32], k: usize) -> Self {
        let entries = top_indices(hidden, k.min(u16::MAX as usize))
            .into_iter()
            .map(|i| (i as u16, f16::from_f32(hidden[i]).to_f32()))
            .collect();
        Self { entries }
    }

    /// `k` × (index u16 BE, value f16 BE).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 4);
        for &(i, v) in &self.entries {
            out.extend_from_slice(&i.to_be_bytes());
            out.extend_from_slice(&f16::from_f32(v).to_bits().to_be_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if !bytes.len().is_multiple_of(4) {
            return Err(format!("a commitment is 4 bytes per entry, got {} bytes", bytes.len()));
        }
        let entries: Vec<(u16, f32)> = bytes
            .chunks_exact(4)
            .map(|c| (u16::from_be_bytes([c[0], c[1]]), f16::from_bits(u16::from_be_bytes([c[2], c[3]])).to_f32()))
            .collect();
        if entries.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("commitment indices are not strictly increasing".into());
        }
        if entries.iter().any(|(_, v)| !v.is_finite()) {
            return Err("a committed value is not finite".into());
        }
        Ok(Self { entries })
    }

    /// Compares with a recomputed hidden state of the same size.
    pub fn distance(&self, recomputed: &[f32]) -> Distance {
        let k = self.entries.len();
        if k == 0 || self.entries.iter().any(|&(i, _)| i as usize >= recomputed.len()) {
            return Distance { value_error: f32::INFINITY, index_overlap: 0.0 };
        }
        let (mut diff, mut norm) = (0f64, 0f64);
        for &(i, v) in &self.entries {
            let r = recomputed[i as usize] as f64;
            diff += (v as f64 - r).powi(2);
            norm += r * r;
        }
        let value_error = ((diff / norm.max(1e-30)).sqrt()) as f32;
        let top: std::collections::HashSet<usize> = top_indices(recomputed, k).into_iter().collect();
        let shared = self.entries.iter().filter(|(i, _)| top.contains(&(*i as usize))).count();
        Distance { value_error, index_overlap: shared as f32 / k as f32 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_depend_on_the_challenge_and_stay_in_range() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        for (p, g) in [(1, 1), (5, 31), (40, 32), (40, 33), (100, 128), (7, 200)] {
            let pos = positions(&a, p, g);
            assert_eq!(pos.chunk_rows.len(), g.div_ceil(CHUNK));
            assert_eq!(pos.prompt_rows.len(), p.min(PROMPT_COMMITMENTS));
            assert!(pos.prompt_rows.windows(2).all(|w| w[0] < w[1]), "distinct, ascending");
            assert!(pos.prompt_rows.iter().all(|&r| r < p && r + CHUNK >= p));
            for (c, &row) in pos.chunk_rows.iter().enumerate() {
                // The row that chose a token of chunk c.
                assert!(row + 1 >= p + c * CHUNK && row + 1 < p + (c * CHUNK + CHUNK).min(g), "p={p} g={g} c={c}");
            }
        }
        let differ =
            (0..20).any(|n| positions(&a, 100, 32 * 20).chunk_rows[n] != positions(&b, 100, 32 * 20).chunk_rows[n]);
        assert!(differ);
    }

    #[test]
    fn top_k_round_trips_and_measures_distance() {
        let hidden: Vec<f32> = (0..576).map(|i| ((i * 7919 % 577) as f32 - 288.0) / 50.0).collect();
        let top = TopK::of(&hidden, 64);
        assert_eq!(top.encode().len(), 256);
        assert_eq!(TopK::decode(&top.encode()).unwrap(), top);
        let same = top.distance(&hidden);
        assert!(same.value_error < 1e-3 && same.index_overlap == 1.0, "{same:?}");
        let other: Vec<f32> = hidden.iter().rev().copied().collect();
        let far = top.distance(&other);
        assert!(far.value_error > 0.5 && far.index_overlap < 0.5, "{far:?}");
        assert!(TopK::decode(&[0, 1, 0]).is_err());
        assert!(TopK::decode(&[0, 2, 0, 0, 0, 1, 0, 0]).is_err(), "indices must increase");
    }
}
