//! Property tests (proptest): Merkle proofs, sampling and money arithmetic hold for
//! arbitrary inputs, not only the examples the unit tests pick.

use ludus::crypto::merkle;
use ludus::inference::sampling::{argmax, candidates, sample, SamplingParams};
use ludus::ledger::{Price, Units};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_leaf_proves_and_no_other_leaf_does(
        leaves in prop::collection::vec(any::<[u8; 32]>(), 1..80),
        pick in any::<prop::sample::Index>(),
        flip in 0usize..256,
    ) {
        let root = merkle::root(&leaves);
        let i = pick.index(leaves.len());
        let proof = merkle::proof(&leaves, i).unwrap();
        prop_assert!(merkle::verify(&leaves[i], &proof, &root));
        let mut forged = leaves[i];
        forged[flip / 8] ^= 1 << (flip % 8);
        prop_assert!(!merkle::verify(&forged, &proof, &root));
        prop_assert!(merkle::proof(&leaves, leaves.len()).is_none());
    }

    #[test]
    fn sampling_is_a_pure_function_that_respects_its_filters(
        logits in prop::collection::vec(-30.0f32..30.0, 2..300),
        seed in any::<u64>(),
        position in 0u64..100_000,
        temperature in 0.05f32..2.0,
        top_k in 0usize..20,
        top_p in 0.05f32..1.0,
    ) {
        let params = SamplingParams { temperature, top_k, top_p, seed, ..Default::default() };
        let token = sample(&logits, &params, position);
        prop_assert_eq!(token, sample(&logits, &params, position), "same inputs, same token");
        let allowed: Vec<u32> = candidates(&logits, &params).iter().map(|c| c.0).collect();
        prop_assert!(allowed.contains(&token), "token {} outside the filtered candidates", token);
        if top_k > 0 {
            prop_assert!(allowed.len() <= top_k);
        }
        let greedy = SamplingParams { temperature: 0.0, ..params };
        prop_assert_eq!(sample(&logits, &greedy, position), argmax(&logits));
    }

    #[test]
    fn amounts_round_trip_and_charges_round_up_never_down(
        amount in any::<u128>(),
        prompt_per_1k in 0u128..1_000_000_000_000_000_000,
        completion_per_1k in 0u128..1_000_000_000_000_000_000,
        prompt in 0u64..1_000_000,
        completion in 0u64..1_000_000,
    ) {
        prop_assert_eq!(Units(amount).to_string().parse::<Units>().unwrap(), Units(amount));
        let price = Price { prompt_per_1k: Units(prompt_per_1k), completion_per_1k: Units(completion_per_1k) };
        let charge = price.charge(prompt, completion).unwrap().0;
        let exact_times_1000 = prompt_per_1k * prompt as u128 + completion_per_1k * completion as u128;
        prop_assert!(charge * 1000 >= exact_times_1000, "never undercharges");
        prop_assert!(charge * 1000 < exact_times_1000 + 1000, "rounds up by less than one unit");
        prop_assert!(price.charge(prompt + 1, completion).unwrap().0 >= charge, "more tokens never cost less");
        prop_assert_eq!(Units(amount).checked_add(Units(1)).ok(), amount.checked_add(1).map(Units));
    }
}
