//! Which tokens a node's nucleus (top-k, min-p, top-p) may hold, and which it surely holds,
//! when its logits may differ from the reference's by a room in logits.
//!
//! An honest node computes its logits in its own format and kernels: each one is the
//! reference's give or take a rounding. A nucleus cut where two candidates are close (the
//! token that crosses top-p and the next, say) can then fall on either side, both ways:
//! the node's token may lie outside the reference's nucleus, and the reference's pick
//! outside the node's. Both bounds here come from the room alone: a node whose logits,
//! less the reference's, differ by at most `room` between any two tokens.
//!
//! - [`NucleusBounds::may_hold`]: some such node keeps the token. It is lifted by the
//!   whole room against every token above it, and its competitors lose their mass to the
//!   tokens below (a lower bound on the mass ranked above it).
//! - [`NucleusBounds::surely_held`]: every such node keeps the token: the best tokens,
//!   while even the least favourable rounding keeps them.
//! - [`NucleusBounds::surely_above`]: every such node ranks these above a token, so one
//!   that kept the token kept them too (a nucleus is a prefix of its ranking).
//!
//! A fixed slack on top-p (the rule this replaced, +0.05 of mass) covered a cut between
//! tokens of small mass but not one between two large ones: at top-p 0.3–0.5 and
//! temperature 0.7–1.3, 9 of 36 honest int4 tasks were rejected
//! (docs/proof-of-inference.md, "Nucleus edges").

use crate::inference::sampling::CANDIDATE_WINDOW;
use crate::inference::SamplingParams;

/// The reference's logits ordered for the bounds (only built when a filter is on).
pub struct NucleusBounds<'a> {
    logits: &'a [f32],
    params: &'a SamplingParams,
    /// The room in logits (> 0).
    room: f32,
    /// 1 / temperature, as the sampler floors it.
    inv_t: f64,
    /// The best finite logit.
    max: f32,
    /// Token ids with finite logits, best first (ties by id), when a filter is on.
    order: Vec<u32>,
    /// Their logits, in the same order.
    sorted: Vec<f32>,
    /// `prefix[i]`: the tempered weight of the first `i` of `order`, relative to the best.
    prefix: Vec<f64>,
    /// `suffix[i]`: the weight of the rest, from the `i`-th on, summed on its own (as
    /// `total - prefix[i]` it would vanish where the best token's weight dwarfs the rest).
    suffix: Vec<f64>,
}

impl<'a> NucleusBounds<'a> {
    /// Bounds for a sampled token (temperature > 0) of `params` over `logits`.
    pub fn new(logits: &'a [f32], params: &'a SamplingParams, room: f32) -> Self {
        let inv_t = 1.0 / params.temperature.max(1e-6) as f64;
        let max = logits.iter().copied().filter(|l| l.is_finite()).fold(f32::NEG_INFINITY, f32::max);
        let mut bounds =
            Self { logits, params, room, inv_t, max, order: vec![], sorted: vec![], prefix: vec![], suffix: vec![] };
        if bounds.filtered() {
            let mut order: Vec<u32> = (0..logits.len() as u32).filter(|&t| logits[t as usize].is_finite()).collect();
            order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
            bounds.sorted = order.iter().map(|&t| logits[t as usize]).collect();
            let weights: Vec<f64> = bounds.sorted.iter().map(|&l| bounds.weight(l)).collect();
            let mut sum = 0.0;
            bounds.prefix = std::iter::once(0.0)
                .chain(weights.iter().map(|w| {
                    sum += w;
                    sum
                }))
                .collect();
            sum = 0.0;
            bounds.suffix = weights
                .iter()
                .rev()
                .map(|w| {
                    sum += w;
                    sum
                })
                .collect();
            bounds.suffix.reverse();
            bounds.suffix.push(0.0);
            bounds.order = order;
        }
        bounds
    }

    fn filtered(&self) -> bool {
        self.params.top_k > 0 || self.params.top_p < 1.0 || self.params.min_p > 0.0
    }

    /// A logit's tempered weight relative to the best one's.
    fn weight(&self, logit: f32) -> f64 {
        ((logit - self.max) as f64 * self.inv_t).exp()
    }

    /// How many tokens have a logit above `x`.
    fn above(&self, x: f32) -> usize {
        self.sorted.partition_point(|&l| l > x)
    }

    /// How many tokens have a logit of `x` or more.
    fn at_least(&self, x: f32) -> usize {
        self.sorted.partition_point(|&l| l >= x)
    }

    /// The tempered factor the room makes between two tokens' weights.
    fn stretch(&self) -> f64 {
        (self.room as f64 * self.inv_t).exp()
    }

    /// `mass` stretched by the room: `mass × e^(room / T)`, where no mass stays none even
    /// when the factor overflows (a room far wider than the temperature).
    fn stretched(&self, mass: f64) -> f64 {
        if mass <= 0.0 {
            0.0
        } else {
            mass * self.stretch()
        }
    }

    /// `top / (top + rest)`: 0 when `rest` is infinite, and 1 when both are empty (a token
    /// whose own weight underflowed, below everything ranked above it).
    fn share(top: f64, rest: f64) -> f64 {
        if top.is_infinite() {
            1.0
        } else if rest.is_infinite() {
            0.0
        } else if top + rest <= 0.0 {
            1.0
        } else {
            top / (top + rest)
        }
    }

    /// Whether some node within the room keeps `token` in its nucleus. The sampler's
    /// window is not applied: a token that far below the best is refused by the gap.
    pub fn may_hold(&self, token: u32) -> bool {
        let Some(&logit) = self.logits.get(token as usize).filter(|l| l.is_finite()) else { return false };
        if !self.filtered() {
            return true;
        }
        let lifted = logit + self.room;
        let p = self.params;
        if p.top_k > 0 && self.above(lifted) >= p.top_k {
            return false;
        }
        if p.min_p > 0.0 && ((lifted - self.max) as f64 * self.inv_t) < (p.min_p as f64).ln() {
            return false;
        }
        if p.top_p < 1.0 {
            // The mass ranked above it, as low as the room can make it: those tokens lose
            // the room against it and against every token below them.
            let above = self.above(lifted);
            if Self::share(self.prefix[above], self.stretched(self.suffix[above])) >= p.top_p as f64 {
                return false;
            }
        }
        true
    }

    /// The tokens that may be a node's best (within the room of the reference's best): its
    /// own best token is always in its nucleus, and is one of these.
    pub fn possible_best(&self) -> impl Iterator<Item = u32> + '_ {
        let floor = self.max - self.room;
        self.logits.iter().enumerate().filter(move |(_, &l)| l.is_finite() && l >= floor).map(|(t, _)| t as u32)
    }

    /// The best finite logit of the reference.
    pub fn best_logit(&self) -> f32 {
        self.max
    }

    /// The tokens every node within the room ranks above `token`: the whole room below
    /// them. A node that keeps `token` keeps them too.
    pub fn surely_above(&self, token: u32) -> Vec<u32> {
        let Some(&logit) = self.logits.get(token as usize) else { return Vec::new() };
        let floor = logit + self.room;
        let above = self.logits.iter().enumerate().filter(|(_, &l)| l.is_finite() && l > floor);
        above.map(|(t, _)| t as u32).collect()
    }

    /// The tokens every node within the room keeps in its nucleus: the best ones, in order,
    /// while even the least favourable rounding keeps them (a prefix of the ranking: a
    /// lower token never has a better bound).
    pub fn surely_held(&self) -> Vec<u32> {
        let floor = self.max + self.room - CANDIDATE_WINDOW / self.inv_t as f32;
        if !self.filtered() {
            let open = self.logits.iter().enumerate().filter(|(_, &l)| l.is_finite() && l >= floor);
            return open.map(|(t, _)| t as u32).collect();
        }
        let p = self.params;
        let mut held = Vec::new();
        for (i, (&token, &logit)) in self.order.iter().zip(&self.sorted).enumerate() {
            // The tokens within the room of it, or above: any of them may rank above it.
            let near = self.at_least(logit - self.room);
            if near == 1 {
                // No other token can rank above it: every node's best, which each keeps.
                held.push(token);
                continue;
            }
            let own = self.weight(logit);
            let kept = logit >= floor
                && (p.top_k == 0 || near - 1 < p.top_k)
                && (p.min_p <= 0.0 || ((logit - self.room - self.max) as f64 * self.inv_t) >= (p.min_p as f64).ln())
                && (p.top_p >= 1.0 || {
                    // As much mass above it as the room allows; of the rest, with top-k on,
                    // only its own weight is sure to count towards the node's total.
                    let ahead = self.stretched(self.prefix[i] + (self.suffix[i + 1] - self.suffix[near]));
                    let rest = if p.top_k > 0 { own } else { self.suffix[near] + own };
                    Self::share(ahead, rest) < p.top_p as f64
                });
            if !kept {
                break;
            }
            held.push(token);
        }
        held
    }
}

/// Uniform draws in [0, 1) from `seed`, for property tests (a linear congruential
/// generator: reproducible, no dependency).
#[cfg(test)]
pub(crate) fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::sampling::candidates;

    fn params(top_p: f32, top_k: usize, min_p: f32, temperature: f32) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, min_p, seed: 1, ..Default::default() }
    }

    /// Whether the sampler's own nucleus over `logits` holds `token`.
    fn in_nucleus(logits: &[f32], p: &SamplingParams, token: u32) -> bool {
        candidates(logits, p).iter().any(|&(t, _)| t == token)
    }

    /// The bounds hold for every rounding within the room: a token some node's nucleus
    /// keeps is never refused by `may_hold`, a token `surely_held` names is in every
    /// node's nucleus, and so is every token `surely_above` names above one it kept.
    /// Random logits (close leaders over a tail, as a language model's often are, with
    /// ties), nodes off by at most half the room each way (half of them at the extremes),
    /// every filter, temperatures down to where the sampler's window binds.
    #[test]
    fn the_bounds_hold_for_every_node_within_the_room() {
        const ROOM: f32 = 0.8;
        let mut uniform = uniform(0x9e37_79b9_7f4a_7c15);
        let filters = [
            params(0.3, 0, 0.0, 1.0),
            params(0.5, 0, 0.0, 0.7),
            params(0.8, 0, 0.0, 1.3),
            params(0.9, 0, 0.0, 0.2),
            params(0.9, 0, 0.0, 0.01),
            params(1.0, 3, 0.0, 1.0),
            params(1.0, 1, 0.0, 0.8),
            params(1.0, 0, 0.3, 0.8),
            params(1.0, 0, 0.95, 1.0),
            params(0.6, 4, 0.1, 1.0),
            params(1.0, 0, 0.0, 0.005),
        ];
        // Per filter: tokens kept outside the reference's nucleus, surely-held checks,
        // surely-above checks.
        let mut seen = vec![(0usize, 0usize, 0usize); filters.len()];
        for round in 0..1_100 {
            let mut logits: Vec<f32> =
                (0..30).map(|i| if i < 5 { 4.0 + uniform() * 1.5 } else { uniform() * 3.0 }).collect();
            logits[7] = logits[3]; // a tie
            logits[29] = f32::NEG_INFINITY; // a masked token
            let which = round % filters.len();
            let p = &filters[which];
            let bounds = NucleusBounds::new(&logits, p, ROOM);
            let held = bounds.surely_held();
            for n in 0..20 {
                let extreme = n % 2 == 0;
                let node: Vec<f32> = logits
                    .iter()
                    .map(|l| {
                        let u = uniform();
                        l + if extreme {
                            if u < 0.5 {
                                -0.5
                            } else {
                                0.5
                            }
                        } else {
                            u - 0.5
                        } * ROOM
                    })
                    .collect();
                for token in 0..logits.len() as u32 {
                    let kept = in_nucleus(&node, p, token);
                    if kept {
                        assert!(
                            bounds.may_hold(token),
                            "round {round}: a node kept {token}, refused: {logits:?} {node:?}"
                        );
                        seen[which].0 += usize::from(!in_nucleus(&logits, p, token));
                        for above in bounds.surely_above(token) {
                            seen[which].2 += 1;
                            assert!(in_nucleus(&node, p, above), "round {round}: {above} above {token}, dropped");
                        }
                    }
                    if held.contains(&token) {
                        seen[which].1 += 1;
                        assert!(kept, "round {round}: {token} named surely held, a node dropped it");
                    }
                }
            }
        }
        // Not vacuous: under every filter nodes kept tokens the reference's nucleus left
        // out, and the sure sets were checked thousands of times.
        assert!(seen.iter().all(|s| s.0 > 100), "{seen:?}");
        assert!(seen.iter().map(|s| s.1).sum::<usize>() > 10_000, "{seen:?}");
        assert!(seen.iter().map(|s| s.2).sum::<usize>() > 10_000, "{seen:?}");
    }

    /// The bounds are not open doors: a token far outside the nucleus stays out, and the
    /// best token of a clear leader is surely held.
    #[test]
    fn a_token_far_outside_the_nucleus_stays_out() {
        let logits = [6.0f32, 3.0, 2.9, 0.0, -1.0];
        let p = params(0.5, 0, 0.0, 1.0);
        let bounds = NucleusBounds::new(&logits, &p, 0.8);
        assert!(bounds.may_hold(0));
        assert!(!bounds.may_hold(1), "0.95 of the mass sits above it");
        assert!(!bounds.may_hold(4));
        assert_eq!(bounds.surely_held(), vec![0]);
        // Two leaders within the room: either may be the node's only token, so neither is
        // sure, and both may be held.
        let close = [5.0f32, 4.7, 0.0];
        let tight = params(0.3, 0, 0.0, 1.0);
        let bounds = NucleusBounds::new(&close, &tight, 0.8);
        assert!(bounds.may_hold(0) && bounds.may_hold(1) && !bounds.may_hold(2));
        assert!(bounds.surely_held().is_empty());
        // Masked tokens are never held.
        let (masked, open) = ([1.0f32, f32::NEG_INFINITY], params(1.0, 0, 0.0, 1.0));
        assert!(!NucleusBounds::new(&masked, &open, 0.8).may_hold(1));
    }
}
