//! What a speculative pass of n rows costs against a plain decode step, measured on the
//! model as it runs here, and how many draft tokens are worth a pass.
//!
//! A pass's cost does not grow smoothly with its rows: libtorch changes kernel at some row
//! count, and one more row then costs as much as the first (in f32 on an Intel Xeon with
//! 2 cores the fourth row, in int4 the fifth; `docs/benchmarks.md`, "Re-measured after the
//! flash prefill"). Which row that is depends on the CPU, the format and the library, so
//! the engine measures it when it starts with speculation on ([`measure`]), and drafts no
//! more tokens than [`draft_cap`] allows. Only speed depends on it: a draft of any length
//! gives the same tokens.

use super::error::Result;
use super::kv_cache::KvCache;
use super::llama::{Llama, LogitsFor};

/// Past this share of a plain step, one more row costs more than the drafted token it
/// checks is likely to save (a token that deep in a draft is kept well under half the
/// time; `docs/benchmarks.md` counts 14 of 28 to 30 of 43 drafted tokens kept).
pub const WORTH: f64 = 1.0 / 3.0;

/// Timed passes per row count; the median counts.
const REPETITIONS: usize = 5;

/// Context the passes run after (as a sequence a few sentences into its answer).
const CONTEXT: usize = 128;

/// Milliseconds of one pass of 1..=`rows` rows at position [`CONTEXT`], in the model's
/// own format, with the threads libtorch has now: index `n - 1` holds n rows.
pub fn measure(llama: &Llama, rows: usize) -> Result<Vec<f64>> {
    let context: Vec<u32> = (0..CONTEXT as u32).map(|i| 100 + i % 50).collect();
    let mut cache = KvCache::new(&llama.config, 1, CONTEXT + rows, llama.device, llama.kind)?;
    let _guard = tch::no_grad_guard();
    llama.prefill(&mut cache, 0, &context, 0, LogitsFor::Last)?;
    let mut costs = Vec::with_capacity(rows);
    for n in 1..=rows {
        let mut times = Vec::with_capacity(REPETITIONS);
        for _ in 0..REPETITIONS {
            cache.set_len(0, CONTEXT);
            let started = std::time::Instant::now();
            llama.prefill(&mut cache, 0, &context[..n], CONTEXT, LogitsFor::All)?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        costs.push(times[times.len() / 2]);
    }
    Ok(costs)
}

/// Draft tokens a pass may carry, at most `k` and at least 1: each row up to there costs
/// at most [`WORTH`] of a plain step (`costs[0]`) more than the pass without it.
pub fn draft_cap(costs: &[f64], k: usize) -> usize {
    let Some(&step) = costs.first() else { return k.max(1) };
    let worth = costs.windows(2).take(k).take_while(|w| w[1] - w[0] <= WORTH * step).count();
    worth.clamp(1, k.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stops_before_the_first_row_that_costs_too_much() {
        // f32 and int4 as measured on an Intel Xeon, 2 cores (ms for 1..=5 rows).
        assert_eq!(draft_cap(&[39.6, 45.4, 50.8, 100.1, 103.9], 4), 2);
        assert_eq!(draft_cap(&[18.8, 22.3, 25.3, 28.1, 39.4], 4), 3);
        // Every row cheap: the configured k; fewer rows measured than k: what was measured.
        assert_eq!(draft_cap(&[20.0, 21.0, 22.0, 23.0, 24.0], 4), 4);
        assert_eq!(draft_cap(&[20.0, 21.0, 22.0, 23.0, 24.0], 2), 2);
        // A later cheap row does not make up for an expensive one before it.
        assert_eq!(draft_cap(&[20.0, 40.0, 41.0, 42.0], 3), 1);
        // Never below one token (speculation is on), nothing measured: k.
        assert_eq!(draft_cap(&[20.0, 60.0], 4), 1);
        assert_eq!(draft_cap(&[], 4), 4);
    }
}
