//! What a speculative pass of n rows costs against a plain decode step, measured on the
//! model as it runs here, and how many draft tokens are worth a pass.
//!
//! A pass's cost does not grow smoothly with its rows: libtorch changes kernel at some row
//! count, and one more row then costs as much as the first (in f32 on an Intel Xeon with
//! 2 cores the fourth row, in int4 the fifth; `docs/benchmarks.md`, "Re-measured after the
//! flash prefill"). Which row that is depends on the CPU, the format and the library, so
//! the engine measures it when it starts with speculation on ([`measure`]), and drafts no
//! more tokens than [`draft_cap`] allows. The drafted tokens are the sampler's own at any
//! draft length; only near-ties between a one-row and a several-row pass can go either
//! way, as between batch sizes.
//!
//! The baseline is the step the engine takes when it does not draft: with the fused
//! batch-1 step on (`[engine] fused_decode`), one call of Ludus' own kernels, which costs
//! well under a libtorch pass of even one row. Where a second row already costs more than
//! a drafted token saves, the cap is 0 and the engine decodes plainly: speculation then
//! costs nothing and changes no token (on the AMD EPYC of docs/benchmarks.md, the fused
//! step took 5.0 ms and a libtorch pass of two rows 9.1 ms).
//!
//! The timing runs on CPU only (a CUDA pass would need a synchronize per timing, and a GPU
//! has no such cliff at a few rows), after a short context, and stops at the first row
//! that costs too much: a few dozen passes, about a second for SmolLM2, a few tens of
//! seconds for a 7B model on CPU.

use super::error::Result;
use super::kv_cache::KvCache;
use super::llama::{Llama, LogitsFor};

/// Past this share of a plain step, one more row costs more than the drafted token it
/// checks is likely to save (a token that deep in a draft is kept well under half the
/// time; `docs/benchmarks.md` counts 14 of 28 to 30 of 43 drafted tokens kept).
pub const WORTH: f64 = 1.0 / 3.0;

/// Timed passes per row count; the median counts.
const REPETITIONS: usize = 5;

/// Context the passes run after (the kernels' cliff is in the weights' products, which
/// do not depend on it; a longer one would only cost a longer prefill at start).
const CONTEXT: usize = 32;

/// Milliseconds of a plain decode step (index 0: what a token costs without drafting,
/// through the fused step where it is on) and of one pass of 2..=`rows` rows (index
/// `n - 1`: the last token and n - 1 drafted ones), after [`CONTEXT`] tokens, in the model's
/// own format, with the threads libtorch has now. With `stop_after_cliff`, the timing ends
/// at the first row [`draft_cap`] would not take.
pub fn measure(llama: &Llama, rows: usize, stop_after_cliff: bool) -> Result<Vec<f64>> {
    // Inside a small model's context and vocabulary too.
    let vocab = llama.config.vocab_size.max(1) as u32;
    let context_len = CONTEXT.min(llama.config.max_position_embeddings.saturating_sub(rows + 1)).max(1);
    let context: Vec<u32> = (0..context_len.max(rows) as u32).map(|i| (100 + i % 50) % vocab).collect();
    let mut cache = KvCache::new(&llama.config, 1, context_len + rows, llama.device, llama.kind)?;
    let _guard = tch::no_grad_guard();
    llama.prefill(&mut cache, 0, &context[..context_len], 0, LogitsFor::Last)?;
    let mut costs: Vec<f64> = Vec::with_capacity(rows);
    for n in 1..=rows {
        let past_cliff = costs.len() >= 2 && costs[costs.len() - 1] - costs[costs.len() - 2] > WORTH * costs[0];
        if stop_after_cliff && past_cliff {
            break;
        }
        let mut times = Vec::with_capacity(REPETITIONS);
        for _ in 0..REPETITIONS {
            cache.set_len(0, context_len);
            let started = std::time::Instant::now();
            if n == 1 {
                llama.decode(&mut cache, &context[..1], &[context_len])?;
            } else {
                llama.prefill(&mut cache, 0, &context[..n], context_len, LogitsFor::All)?;
            }
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        costs.push(times[times.len() / 2]);
    }
    Ok(costs)
}

/// Draft tokens a pass may carry, at most `k`: each row up to there costs at most
/// [`WORTH`] of a plain step (`costs[0]`) more than the pass (or step) without it. 0 when
/// even one drafted row costs more than that: drafting does not pay here.
pub fn draft_cap(costs: &[f64], k: usize) -> usize {
    let Some(&step) = costs.first() else { return k };
    costs.windows(2).take(k).take_while(|w| w[1] - w[0] <= WORTH * step).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stops_before_the_first_row_that_costs_too_much() {
        // f32 and int4 as measured on an Intel Xeon, 2 cores (ms for 1..=5 rows).
        assert_eq!(draft_cap(&[39.6, 45.4, 50.8, 100.1, 103.9], 4), 2);
        assert_eq!(draft_cap(&[18.8, 22.3, 25.3, 28.1, 39.4], 4), 3);
        // Every row cheap: the configured k, even with more rows measured than k needs.
        assert_eq!(draft_cap(&[20.0, 21.0, 22.0, 23.0, 24.0], 4), 4);
        assert_eq!(draft_cap(&[20.0, 21.0, 22.0, 23.0, 24.0], 2), 2);
        // The timing stopped one row past the cliff: the same cap as the whole range.
        assert_eq!(draft_cap(&[39.6, 45.4, 50.8, 100.1], 4), 2);
        // Fewer rows timed than k + 1, all cheap: only what was timed.
        assert_eq!(draft_cap(&[20.0, 21.0, 22.0], 4), 2);
        // A later cheap row does not make up for an expensive one before it.
        assert_eq!(draft_cap(&[20.0, 21.0, 40.0, 41.0], 3), 1);
        // The fused step against libtorch's passes, as measured on an AMD EPYC (2 cores):
        // the first drafted row costs 0.82 of a step, so nothing is drafted; nor where a
        // second row alone is past the cliff.
        assert_eq!(draft_cap(&[5.0, 9.1, 9.8, 10.5, 16.0], 4), 0);
        assert_eq!(draft_cap(&[20.0, 40.0, 41.0, 42.0], 3), 0);
        // Nothing measured: k.
        assert_eq!(draft_cap(&[], 4), 4);
    }
}
