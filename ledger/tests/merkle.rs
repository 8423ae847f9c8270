//! RFC 6962 Merkle tree: known vectors and properties over random trees.

use proptest::prelude::*;
use std::collections::HashMap;
use tally_ledger::Hash;
use tally_ledger::merkle::{self, Frontier, NodeId};

fn h(hex_str: &str) -> Hash {
    hex::decode(hex_str).unwrap().try_into().unwrap()
}

/// The straightforward recursive RFC 6962 MTH.
fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => merkle::empty_root(),
        1 => leaves[0],
        n => {
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            merkle::node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// Appends `leaves` to a frontier, returning it and every node it asked to store.
fn build(leaves: &[Hash]) -> (Frontier, HashMap<NodeId, Hash>) {
    let mut frontier = Frontier::new();
    let mut store = HashMap::new();
    for leaf in leaves {
        for (id, hash) in frontier.append(*leaf) {
            assert!(store.insert(id, hash).is_none(), "node {id:?} stored twice");
        }
    }
    (frontier, store)
}

fn ct_leaves() -> Vec<Hash> {
    [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
    .iter()
    .map(|d| merkle::leaf_hash(&hex::decode(d).unwrap()))
    .collect()
}

#[test]
fn rfc6962_reference_vectors() {
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    let leaves = ct_leaves();
    let (_, mut store) = build(&leaves);
    for (size, want) in ROOTS.iter().enumerate() {
        assert_eq!(
            merkle::root(&mut store, size as u64).unwrap(),
            h(want),
            "size {size}"
        );
        let (frontier, _) = build(&leaves[..size]);
        assert_eq!(frontier.root(), h(want), "frontier size {size}");
    }
    let inclusion = [
        (
            0,
            [
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            [
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];
    for (index, want) in inclusion {
        let proof = merkle::inclusion_proof(&mut store, index, 8).unwrap();
        assert_eq!(proof, want.map(h).to_vec(), "inclusion of {index}");
    }
    let proof = merkle::consistency_proof(&mut store, 6, 8).unwrap();
    let want = [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ];
    assert_eq!(proof, want.map(h).to_vec());
    merkle::verify_consistency(6, 8, &h(ROOTS[6]), &h(ROOTS[8]), &proof).unwrap();
}

#[test]
fn range_errors() {
    let (_, mut store) = build(&ct_leaves());
    assert!(merkle::inclusion_proof(&mut store, 8, 8).is_err());
    assert!(merkle::consistency_proof(&mut store, 0, 8).is_err());
    assert!(merkle::consistency_proof(&mut store, 5, 3).is_err());
    assert!(matches!(
        merkle::root(&mut store, 9),
        Err(tally_ledger::Error::MissingNode(_))
    ));
    assert!(
        merkle::consistency_proof(&mut store, 3, 3)
            .unwrap()
            .is_empty()
    );
    let r = merkle::root(&mut store, 3).unwrap();
    merkle::verify_consistency(3, 3, &r, &r, &[]).unwrap();
    assert!(merkle::verify_consistency(3, 3, &r, &[0; 32], &[]).is_err());
    assert!(merkle::verify_consistency(0, 3, &r, &r, &[]).is_err());
    assert!(merkle::verify_consistency(4, 3, &r, &r, &[]).is_err());
    assert!(merkle::nodes_for_inclusion(3, 3).is_empty());
    assert!(Frontier::from_parts(3, vec![[0; 32]]).is_err());
    assert_eq!(merkle::nodes_for_root(6), Frontier::nodes_needed(6));
    assert_eq!(
        Frontier::nodes_needed(6),
        vec![NodeId { level: 2, index: 0 }, NodeId { level: 1, index: 2 }]
    );
}

/// A reader of dummy hashes, to learn the length of a proof.
struct Zeros;

impl tally_ledger::NodeReader for Zeros {
    fn node(&mut self, _: NodeId) -> Result<Hash, tally_ledger::Error> {
        Ok([0; 32])
    }
}

fn inclusion_len(index: u64, size: u64) -> usize {
    merkle::inclusion_proof(&mut Zeros, index, size)
        .unwrap()
        .len()
}

fn consistency_len(old: u64, new: u64) -> usize {
    merkle::consistency_proof(&mut Zeros, old, new)
        .unwrap()
        .len()
}

fn flip(mut hash: Hash, byte: usize) -> Hash {
    hash[byte % 32] ^= 1;
    hash
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn roots_and_proofs(seed in any::<u64>(), size in 1u64..300, pick in any::<u64>(), byte in 0usize..32) {
        let leaves: Vec<Hash> =
            (0..size).map(|i| merkle::leaf_hash(&[seed.to_be_bytes(), i.to_be_bytes()].concat())).collect();
        let (frontier, mut store) = build(&leaves);
        let roots: Vec<Hash> = (0..=leaves.len()).map(|n| mth(&leaves[..n])).collect();
        prop_assert_eq!(frontier.size(), size);
        prop_assert_eq!(frontier.root(), roots[size as usize]);

        // A frontier rebuilt from stored nodes continues identically.
        let mid = pick % (size + 1);
        let parts = Frontier::nodes_needed(mid).into_iter().map(|id| store[&id]).collect();
        let mut resumed = Frontier::from_parts(mid, parts).unwrap();
        prop_assert_eq!(resumed.root(), roots[mid as usize]);
        for leaf in &leaves[mid as usize..] {
            resumed.append(*leaf);
        }
        prop_assert_eq!(resumed.root(), frontier.root());

        for n in 1..=size {
            let root = roots[n as usize];
            prop_assert_eq!(merkle::root(&mut store, n).unwrap(), root);
            // Proofs verify and read exactly the nodes the nodes_for_* functions list: every
            // leaf and every old size in the full tree, a few in the smaller ones.
            let all = n == size;
            let indexes: Vec<u64> = if all { (0..n).collect() } else { vec![pick % n, n - 1] };
            for i in indexes {
                let mut only: HashMap<NodeId, Hash> =
                    merkle::nodes_for_inclusion(i, n).into_iter().map(|id| (id, store[&id])).collect();
                let proof = merkle::inclusion_proof(&mut only, i, n).unwrap();
                prop_assert!(merkle::verify_inclusion(&leaves[i as usize], i, n, &proof, &root).is_ok());
            }
            let olds: Vec<u64> = if all { (1..=n).collect() } else { vec![1 + pick % n, n] };
            for old in olds {
                let mut only: HashMap<NodeId, Hash> =
                    merkle::nodes_for_consistency(old, n).into_iter().map(|id| (id, store[&id])).collect();
                let proof = merkle::consistency_proof(&mut only, old, n).unwrap();
                prop_assert!(merkle::verify_consistency(old, n, &roots[old as usize], &root, &proof).is_ok());
            }
        }

        // Tampering with anything makes verification fail.
        let n = size;
        let i = pick % n;
        let root = roots[n as usize];
        let leaf = leaves[i as usize];
        let proof = merkle::inclusion_proof(&mut store, i, n).unwrap();
        for k in 0..proof.len() {
            let mut bad = proof.clone();
            bad[k] = flip(bad[k], byte);
            prop_assert!(merkle::verify_inclusion(&leaf, i, n, &bad, &root).is_err());
        }
        prop_assert!(merkle::verify_inclusion(&flip(leaf, byte), i, n, &proof, &root).is_err());
        prop_assert!(merkle::verify_inclusion(&leaf, i, n, &proof, &flip(root, byte)).is_err());
        prop_assert!(merkle::verify_inclusion(&leaf, n, n, &proof, &root).is_err());
        // A wrong size fails whenever it implies a different proof length. (A size with the
        // same path shape cannot be told apart by the proof alone; the signed checkpoint binds
        // the size to the root.)
        for other in (i + 1..2 * n).filter(|&m| m != n) {
            if inclusion_len(i, other) != proof.len() {
                prop_assert!(merkle::verify_inclusion(&leaf, i, other, &proof, &root).is_err());
            }
        }
        if n > 1 {
            let j = (i + 1 + pick / n % (n - 1)) % n;
            prop_assert!(merkle::verify_inclusion(&leaf, j, n, &proof, &root).is_err());
        }
        let mut longer = proof.clone();
        longer.push(root);
        prop_assert!(merkle::verify_inclusion(&leaf, i, n, &longer, &root).is_err());
        if !proof.is_empty() {
            prop_assert!(merkle::verify_inclusion(&leaf, i, n, &proof[1..], &root).is_err());
        }

        let old = 1 + pick % n;
        let old_root = roots[old as usize];
        let proof = merkle::consistency_proof(&mut store, old, n).unwrap();
        for k in 0..proof.len() {
            let mut bad = proof.clone();
            bad[k] = flip(bad[k], byte);
            prop_assert!(merkle::verify_consistency(old, n, &old_root, &root, &bad).is_err());
        }
        prop_assert!(merkle::verify_consistency(old, n, &flip(old_root, byte), &root, &proof).is_err());
        prop_assert!(merkle::verify_consistency(old, n, &old_root, &flip(root, byte), &proof).is_err());
        for other in (old..2 * n).filter(|&m| m != n) {
            if consistency_len(old, other) != proof.len() {
                prop_assert!(merkle::verify_consistency(old, other, &old_root, &root, &proof).is_err());
            }
        }
        for other in (1..=n).filter(|&m| m != old) {
            if consistency_len(other, n) != proof.len() {
                prop_assert!(merkle::verify_consistency(other, n, &old_root, &root, &proof).is_err());
            }
        }
        let mut longer = proof.clone();
        longer.push(root);
        prop_assert!(merkle::verify_consistency(old, n, &old_root, &root, &longer).is_err());
    }
}
