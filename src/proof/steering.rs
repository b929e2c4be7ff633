//! Catching a node that steers within its tie margin, across tasks. One forgiven near-tie
//! proves nothing: honest nodes in other formats land on the second-best token when the
//! two are close. But honest deviations fall where noise puts them — at small gaps, rarely
//! at the end of the answer — while a node that picks among "close enough" tokens on
//! purpose deviates at gaps noise rarely reaches ("wide" deviations) and passes over the
//! end of the answer where the reference stops.
//!
//! Per node, the ledger sums over its verified tasks the wide near-ties and those that
//! passed over the reference's end, each with the most an honest node of the declared
//! format shows ([`Format::honest_wide_rate`], [`Format::honest_end_pass_rate`], per
//! token). [`judge`] flags the node when either count is improbable for an honest node: the
//! Chernoff bound on a sum of independent Bernoulli trials with that mean falls below half
//! the allowance of this judgement, `LIFETIME_FALSE_ALARM / (k (k + 1))` for the k-th
//! (these sum to [`LIFETIME_FALSE_ALARM`]). So an honest node whose near-ties stay within the calibrated
//! rates is flagged with probability at most 10⁻⁴ over its whole life, however long, while
//! a steering node's count outgrows the bound within a few hundred tokens. After
//! Token-DiFR (seeded sampling makes every honest token a function of the logits, so a
//! deviation is evidence), with a bound instead of a fitted threshold.

use serde::Serialize;

use super::format::Format;
use super::verify::Verdict;

/// Largest chance that an honest node is ever flagged, over all its judgements.
pub const LIFETIME_FALSE_ALARM: f64 = 1e-4;

/// What one checked task adds to its node's record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TaskDeviations {
    /// Generated tokens checked.
    pub tokens: u32,
    /// Forgiven near-ties of any size.
    pub forgiven: u32,
    /// Forgiven near-ties with a gap above the format's [`Format::wide_gap`].
    pub wide: u32,
    /// Forgiven near-ties where the reference's pick ended the answer and the node went on.
    pub ends_passed: u32,
    /// Tokens generated past the reference's first end.
    pub tokens_past_end: u32,
    /// The most an honest node in the declared format shows here: wide near-ties and
    /// ends passed over.
    pub expected_wide: f64,
    pub expected_ends_passed: f64,
}

impl TaskDeviations {
    /// How far the task's counts go past an honest node's bounds (wide near-ties and ends
    /// passed over, each beyond its expected most); zero or less within them.
    pub fn excess(&self) -> f64 {
        (self.wide as f64 - self.expected_wide).max(0.0)
            + (self.ends_passed as f64 - self.expected_ends_passed).max(0.0)
    }

    /// The record of a verdict on a proof declaring `format`.
    pub fn of(verdict: &Verdict, format: Format) -> Self {
        // The wide threshold scales with the margin the operator set.
        let wide_gap = verdict.tie_margin / format.tie_margin() * format.wide_gap();
        let ds = &verdict.deviations;
        let tokens = verdict.tokens as f64;
        Self {
            tokens: verdict.tokens as u32,
            forgiven: ds.len() as u32,
            wide: ds.iter().filter(|d| d.gap > wide_gap).count() as u32,
            ends_passed: ds.iter().filter(|d| d.passed_end).count() as u32,
            tokens_past_end: verdict.tokens_past_reference_end as u32,
            expected_wide: tokens * format.honest_wide_rate(),
            expected_ends_passed: tokens * format.honest_end_pass_rate(),
        }
    }
}

/// What a verified task tells about its node's steering: the format it declared, the
/// task's sums, and the forgiven near-ties themselves (kept in the ledger for audit).
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub format: Format,
    pub task: TaskDeviations,
    pub deviations: Vec<super::verify::Deviation>,
}

impl Evidence {
    pub fn of(verdict: &Verdict, format: Format) -> Self {
        Self { format, task: TaskDeviations::of(verdict, format), deviations: verdict.deviations.clone() }
    }
}

/// A node's totals over its verified tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct NodeDeviations {
    pub tasks: u64,
    pub tokens: u64,
    pub wide: u64,
    pub expected_wide: f64,
    pub ends_passed: u64,
    pub expected_ends_passed: f64,
}

impl NodeDeviations {
    pub fn add(&mut self, t: &TaskDeviations) {
        self.tasks += 1;
        self.tokens += t.tokens as u64;
        self.wide += t.wide as u64;
        self.expected_wide += t.expected_wide;
        self.ends_passed += t.ends_passed as u64;
        self.expected_ends_passed += t.expected_ends_passed;
    }
}

/// An upper bound on P(X ≥ `observed`) for X a sum of independent Bernoulli trials with
/// mean `mean` (Chernoff: e^−μ (eμ/k)^k for k > μ; 1 otherwise).
pub fn chernoff_tail(mean: f64, observed: u64) -> f64 {
    let k = observed as f64;
    if k <= mean {
        return 1.0;
    }
    if mean <= 0.0 {
        return 0.0;
    }
    (-mean + k * (1.0 + (mean / k).ln())).exp()
}

/// The false-alarm allowance of a node's `k`-th judgement (k ≥ 1): they sum to
/// [`LIFETIME_FALSE_ALARM`].
pub fn allowance(k: u64) -> f64 {
    let k = k.max(1) as f64;
    LIFETIME_FALSE_ALARM / (k * (k + 1.0))
}

/// Why a node's near-ties are improbable for an honest one, or `None`. Judged after each
/// verified task, on the node's record so far; each of the two counts gets half the
/// judgement's allowance.
pub fn judge(record: &NodeDeviations) -> Option<String> {
    let allowed = allowance(record.tasks) / 2.0;
    let wide = chernoff_tail(record.expected_wide, record.wide);
    if wide < allowed {
        return Some(format!(
            "steering: {} wide near-ties in {} checked tokens, where an honest node shows at most {:.1} (chance ≤ {wide:.1e})",
            record.wide, record.tokens, record.expected_wide
        ));
    }
    let ends = chernoff_tail(record.expected_ends_passed, record.ends_passed);
    (ends < allowed).then(|| {
        format!(
            "steering: went past the end of the answer the reference picked {} times in {} checked tokens, where an honest node does at most {:.1} times (chance ≤ {ends:.1e})",
            record.ends_passed, record.tokens, record.expected_ends_passed
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_excess_counts_only_what_goes_past_the_honest_bounds() {
        let past = TaskDeviations {
            wide: 3,
            expected_wide: 1.5,
            ends_passed: 1,
            expected_ends_passed: 0.25,
            ..Default::default()
        };
        assert!((past.excess() - 2.25).abs() < 1e-9, "{}", past.excess());
        let within = TaskDeviations { wide: 1, expected_wide: 1.5, expected_ends_passed: 0.25, ..Default::default() };
        assert_eq!(within.excess(), 0.0);
    }

    /// The bound is a bound: above the exact binomial tail it stands for.
    #[test]
    fn the_chernoff_bound_is_never_below_the_exact_binomial_tail() {
        fn binomial_tail(n: u64, p: f64, k: u64) -> f64 {
            let mut term = (1.0 - p).powi(n as i32); // P(X = 0)
            let mut total = if k == 0 { term } else { 0.0 };
            for i in 1..=n {
                term *= (n - i + 1) as f64 / i as f64 * p / (1.0 - p);
                if i >= k {
                    total += term;
                }
            }
            total
        }
        for (n, p) in [(300u64, 0.002), (300, 0.006), (2000, 0.0005), (50, 0.05)] {
            for k in 0..=40 {
                let exact = binomial_tail(n, p, k);
                assert!(chernoff_tail(n as f64 * p, k) >= exact * (1.0 - 1e-9), "n {n} p {p} k {k}");
            }
        }
        assert_eq!(chernoff_tail(2.0, 1), 1.0);
        assert_eq!(chernoff_tail(0.0, 1), 0.0);
    }

    #[test]
    fn a_node_is_flagged_only_when_its_near_ties_are_improbable_for_an_honest_one() {
        // 300 tokens of int8: an honest node shows at most 2.1 wide near-ties and 0.45 ends passed.
        let honest = NodeDeviations {
            tasks: 5,
            tokens: 300,
            wide: 4,
            expected_wide: 2.1,
            ends_passed: 1,
            expected_ends_passed: 0.45,
        };
        assert_eq!(judge(&honest), None);
        let steering = NodeDeviations { wide: 20, ..honest };
        assert!(judge(&steering).unwrap().contains("20 wide near-ties in 300 checked tokens"));
        let long = NodeDeviations { ends_passed: 10, ..honest };
        assert!(judge(&long).unwrap().contains("picked 10 times in 300 checked tokens"));
        // The same count weighs less later in a node's life: each judgement's allowance shrinks.
        assert!(judge(&NodeDeviations { tasks: 5_000, ..long }).is_none());
    }

    #[test]
    fn the_allowances_of_a_lifetime_of_judgements_sum_to_the_lifetime_false_alarm() {
        let total: f64 = (1..1_000_000u64).map(allowance).sum();
        assert!(total <= LIFETIME_FALSE_ALARM && total > 0.999 * LIFETIME_FALSE_ALARM);
    }
}
