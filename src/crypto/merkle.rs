//! Keccak-256 Merkle trees with sorted pairs (the convention of OpenZeppelin's
//! `MerkleProof`), so a proof built here verifies in a Solidity contract unchanged.
//! Used for block roots (over receipt hashes), node confirmations (over task ids) and,
//! at settlement, payout roots.

use super::identity::keccak;

pub type Hash = [u8; 32];

/// The root of an empty tree.
pub const EMPTY_ROOT: Hash = [0u8; 32];

fn hash_pair(a: &Hash, b: &Hash) -> Hash {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(lo);
    buf[32..].copy_from_slice(hi);
    keccak(&buf)
}

/// The leaf that stands for a task id in a node's block confirmation.
pub fn task_leaf(task: u64) -> Hash {
    keccak(&task.to_be_bytes())
}

/// The leaf of registry block `number` with Merkle root `root` in a chain anchor's tree:
/// keccak(keccak(abi.encode(uint64, bytes32))), exactly as `Settlement.blockLeaf`
/// computes it (hashed twice, so no inner node can pass for a leaf).
pub fn block_leaf(number: u64, root: &Hash) -> Hash {
    let mut encoded = [0u8; 64];
    encoded[24..32].copy_from_slice(&number.to_be_bytes());
    encoded[32..].copy_from_slice(root);
    keccak(&keccak(&encoded))
}

/// The leaf of a payout of `amount` base units to `node` in an epoch's tree:
/// keccak(keccak(abi.encode(address, uint256))), exactly as `Settlement.payoutLeaf`
/// computes it.
pub fn payout_leaf(node: &[u8; 20], amount: u128) -> Hash {
    let mut encoded = [0u8; 64];
    encoded[12..32].copy_from_slice(node);
    encoded[48..64].copy_from_slice(&amount.to_be_bytes());
    keccak(&keccak(&encoded))
}

/// The root a node signs to confirm its tasks in a block: over its task ids, ascending,
/// each once. Node and registry compute it the same way.
pub fn task_root(tasks: &[u64]) -> Hash {
    let mut sorted = tasks.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    root(&sorted.iter().map(|&t| task_leaf(t)).collect::<Vec<_>>())
}

/// The next level up: pairs hashed, an odd last node carried up unchanged.
fn parent_level(level: &[Hash]) -> Vec<Hash> {
    level.chunks(2).map(|pair| if pair.len() == 2 { hash_pair(&pair[0], &pair[1]) } else { pair[0] }).collect()
}

/// The root over `leaves` in the order given ([`EMPTY_ROOT`] for none).
pub fn root(leaves: &[Hash]) -> Hash {
    if leaves.is_empty() {
        return EMPTY_ROOT;
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = parent_level(&level);
    }
    level[0]
}

/// The sibling path from leaf `index` to the root; `None` when out of range.
pub fn proof(leaves: &[Hash], mut index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut path = Vec::new();
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        let sibling = index ^ 1;
        if sibling < level.len() {
            path.push(level[sibling]);
        }
        level = parent_level(&level);
        index /= 2;
    }
    Some(path)
}

/// Whether `proof` leads from `leaf` to `root`.
pub fn verify(leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    proof.iter().fold(*leaf, |acc, sibling| hash_pair(&acc, sibling)) == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payout_leaves_hash_the_abi_encoding_twice() {
        let node = [0x11u8; 20];
        let mut encoded = Vec::new();
        encoded.extend_from_slice(&[0u8; 12]);
        encoded.extend_from_slice(&node);
        encoded.extend_from_slice(&[0u8; 31]);
        encoded.push(7);
        assert_eq!(payout_leaf(&node, 7), keccak(&keccak(&encoded)));
        assert_ne!(payout_leaf(&node, 7), payout_leaf(&node, 8));
        assert_ne!(payout_leaf(&node, 7), payout_leaf(&[0x12; 20], 7));
    }

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(task_leaf).collect()
    }

    #[test]
    fn every_leaf_proves_against_the_root_for_every_size() {
        for n in 1..=33 {
            let l = leaves(n);
            let r = root(&l);
            for i in 0..l.len() {
                let p = proof(&l, i).unwrap();
                assert!(verify(&l[i], &p, &r), "n={n} i={i}");
                // A proof for one leaf does not prove another.
                let other = task_leaf(1000 + i as u64);
                assert!(!verify(&other, &p, &r), "n={n} i={i}");
            }
            assert!(proof(&l, l.len()).is_none());
        }
    }

    #[test]
    fn the_root_depends_on_every_leaf_and_pairs_are_sorted() {
        let l = leaves(5);
        let r = root(&l);
        for i in 0..5 {
            let mut changed = l.clone();
            changed[i][0] ^= 1;
            assert_ne!(root(&changed), r, "leaf {i}");
        }
        // Two leaves: the root is the same whichever comes first (sorted-pair hashing).
        assert_eq!(root(&[l[0], l[1]]), root(&[l[1], l[0]]));
        assert_eq!(root(&[]), EMPTY_ROOT);
        assert_eq!(root(&[l[3]]), l[3]);
    }

    #[test]
    fn block_leaves_bind_the_number_and_the_root() {
        let root = [9u8; 32];
        let mut encoded = vec![0u8; 24];
        encoded.extend_from_slice(&5u64.to_be_bytes());
        encoded.extend_from_slice(&root);
        assert_eq!(block_leaf(5, &root), keccak(&keccak(&encoded)));
        assert_ne!(block_leaf(5, &root), block_leaf(6, &root));
        assert_ne!(block_leaf(5, &root), block_leaf(5, &[8u8; 32]));
    }

    #[test]
    fn task_roots_ignore_order_and_repeats() {
        assert_eq!(task_root(&[3, 1, 2]), task_root(&[1, 2, 3, 3]));
        assert_ne!(task_root(&[1, 2]), task_root(&[1, 2, 3]));
    }
}
