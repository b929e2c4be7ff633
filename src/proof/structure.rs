//! The checks of a proof that need no model: that it is there, is for this task and
//! challenge, is signed by the node that ran it, covers exactly the tokens the server
//! relayed, and holds one well-formed commitment per row the challenge selects.
//!
//! They cost microseconds (a signature recovery and a few hundred bytes of hex), so the
//! server runs them on every task that carried a challenge, before its receipt is paid,
//! whether or not the policy samples it for the reference replay ([`super::verify`]).
//! Without them a node could skip its proof, or send one for another task or challenge,
//! and be paid for every task the sampler passes over; it is now caught on the first one.
//! Made-up commitments of the right shape pass them: the numbers are judged only by the
//! replay, on the tasks the policy samples.

use super::commitment::DEFAULT_TOP_K;
use super::format::Format;
use super::signed::Proof;
use super::verify::{claims_match, commitments_of};
use crate::crypto::identity::Address;

/// What the server knows of the task a proof must be about.
pub struct Expected<'a> {
    pub task: u64,
    /// The node that ran it (the proof's signer).
    pub node: Address,
    pub challenge: &'a [u8; 32],
    /// The task's model, as the server named it to the node.
    pub model: &'a str,
    /// Tokens of the node's prompt (a failover continuation's prefix included), when the
    /// server counted them with the model's own tokenizer; else the proof's own count is
    /// checked against its commitments only.
    pub prompt_tokens: Option<usize>,
    /// The node's own completion tokens, as the server relayed them.
    pub completion: &'a [u32],
}

/// Why `proof` cannot be a proof of the expected task; `None` when its structure holds
/// (its numbers are for [`super::verify`] to judge).
pub fn fault(proof: Option<&Proof>, expected: &Expected) -> Option<String> {
    let Some(proof) = proof else {
        return Some("no proof for a task that carried a challenge".into());
    };
    if proof.task != expected.task || proof.challenge != hex::encode(expected.challenge) {
        return Some("the proof is for another task or challenge".into());
    }
    // Else the name is free padding: a rejected proof is kept on disk, whole.
    if proof.model != expected.model {
        return Some(format!("the proof is for another model than the task's `{}`", expected.model));
    }
    match proof.signer() {
        Ok(signer) if signer == expected.node => {}
        _ => return Some("the proof is not signed by the node".into()),
    }
    // The protocol fixes k: with k = 1 a commitment would be a single number.
    if proof.top_k as usize != DEFAULT_TOP_K {
        return Some(format!("the proof commits top-{} values; the protocol fixes {DEFAULT_TOP_K}", proof.top_k));
    }
    if let Err(e) = Format::declared_by(proof) {
        return Some(e.to_string());
    }
    let prompt = expected.prompt_tokens.unwrap_or(proof.prompt_tokens as usize);
    claims_match(proof, prompt, expected.completion)
        .and_then(|()| commitments_of(proof, prompt, expected.completion.len()))
        .err()
        .map(|reasons| reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::identity::Identity;
    use crate::proof::ProofBuilder;

    /// A well-formed proof of `completion` after a `prompt`-token prompt, built the way a
    /// node builds it (hidden states made up: structure is all that is checked here).
    fn proof_of(node: &Identity, task: u64, challenge: [u8; 32], prompt: usize, completion: &[u32]) -> Proof {
        let d = 64;
        let hidden = |seed: usize| (0..d).map(|i| ((i * 7 + seed * 13) % 31) as f32 - 15.0).collect::<Vec<f32>>();
        let mut builder = ProofBuilder::new(challenge, DEFAULT_TOP_K);
        let rows: Vec<f32> = (0..prompt).flat_map(hidden).collect();
        builder.prompt_rows(prompt, &rows);
        for i in 0..completion.len() {
            builder.token_row(&hidden(prompt + i));
        }
        builder.finish(node, task, "m", completion).unwrap()
    }

    #[test]
    fn a_proof_of_the_task_passes_and_every_broken_part_is_named() {
        let node = Identity::generate();
        let challenge = [7u8; 32];
        let completion: Vec<u32> = (0..70).collect();
        let good = proof_of(&node, 42, challenge, 40, &completion);
        let expected = Expected {
            task: 42,
            node: node.address,
            challenge: &challenge,
            model: "m",
            prompt_tokens: Some(40),
            completion: &completion,
        };
        assert_eq!(fault(Some(&good), &expected), None);
        // Without the server's own count, the proof's count is taken (and its commitments
        // must fit it).
        assert_eq!(fault(Some(&good), &Expected { prompt_tokens: None, ..expected }), None);

        let resign = |mut p: Proof| {
            p.signature = hex::encode(node.sign(&p.digest()));
            p
        };
        let faults = [
            (None, "no proof"),
            (Some(proof_of(&node, 43, challenge, 40, &completion)), "another task or challenge"),
            (Some(proof_of(&node, 42, [8; 32], 40, &completion)), "another task or challenge"),
            (Some(proof_of(&Identity::generate(), 42, challenge, 40, &completion)), "not signed by the node"),
            (Some(Proof { chunks: good.chunks[1..].to_vec(), ..good.clone() }), "not signed by the node"),
            (Some(resign(Proof { chunks: good.chunks[1..].to_vec(), ..good.clone() })), "2 chunk commitments for 70"),
            (Some(resign(Proof { prompt: good.prompt[1..].to_vec(), ..good.clone() })), "prompt commitments"),
            (Some(resign(Proof { top_k: 1, ..good.clone() })), "the protocol fixes"),
            (Some(resign(Proof { model: "m".repeat(1 << 20), ..good.clone() })), "another model than the task's `m`"),
            (Some(resign(Proof { quantization: "int3".into(), ..good.clone() })), "int3"),
            (
                Some(proof_of(&node, 42, challenge, 40, &completion[..69])),
                "69 completion tokens; the task has 40 and 70",
            ),
            (Some(proof_of(&node, 42, challenge, 39, &completion)), "39 prompt"),
            (Some(resign(Proof { chunks: vec!["zz".repeat(8); 3], ..good.clone() })), "malformed"),
        ];
        for (proof, why) in faults {
            let got = fault(proof.as_ref(), &expected).unwrap_or_default();
            assert!(got.contains(why), "{why:?} not in {got:?}");
        }
        // A proof that swaps a token for another of the same count is for another output.
        let mut other = completion.clone();
        other[5] = 999;
        let swapped = proof_of(&node, 42, challenge, 40, &other);
        assert!(fault(Some(&swapped), &expected).unwrap_or_default().contains("output hash"));
    }
}
