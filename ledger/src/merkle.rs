//! An RFC 6962 / RFC 9162 Merkle tree with SHA-256.
//!
//! The log stores every complete, aligned subtree hash ([`NodeId`]) that [`Frontier::append`]
//! produces. Roots and proofs for any tree size are computed from those stored nodes only:
//! a range `[lo, hi)` that is not a complete aligned subtree is split at the largest power of
//! two smaller than its width and its halves are hashed, recursively.

use crate::{Error, Hash};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::BuildHasher;

/// The RFC 6962 leaf hash: `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    Sha256::new()
        .chain_update([0u8])
        .chain_update(data)
        .finalize()
        .into()
}

/// The RFC 6962 interior node hash: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Sha256::new()
        .chain_update([1u8])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// The root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// A complete subtree: the hash over leaves `[index << level, (index + 1) << level)`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId {
    /// Height of the subtree: 0 for a leaf.
    pub level: u8,
    /// Position of the subtree among those of its level.
    pub index: u64,
}

/// Read access to stored complete subtree hashes.
pub trait NodeReader {
    /// The hash of the complete subtree `id`, or [`Error::MissingNode`].
    fn node(&mut self, id: NodeId) -> Result<Hash, Error>;
}

impl<S: BuildHasher> NodeReader for HashMap<NodeId, Hash, S> {
    fn node(&mut self, id: NodeId) -> Result<Hash, Error> {
        self.get(&id).copied().ok_or(Error::MissingNode(id))
    }
}

impl<R: NodeReader + ?Sized> NodeReader for &mut R {
    fn node(&mut self, id: NodeId) -> Result<Hash, Error> {
        (**self).node(id)
    }
}

/// The right edge of a tree: the complete subtrees of its size's binary decomposition, left
/// to right. Enough to append leaves and compute the root without the rest of the tree.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    size: u64,
    /// One hash per set bit of `size`, most significant (largest subtree) first.
    nodes: Vec<Hash>,
}

impl Frontier {
    /// The frontier of the empty tree.
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// The complete subtrees a tree of `size` leaves decomposes into, left to right (largest
    /// first).
    pub fn nodes_needed(size: u64) -> Vec<NodeId> {
        let mut out = Vec::with_capacity(size.count_ones() as usize);
        let mut start = 0u64;
        for level in (0..64u8).rev() {
            if size & (1u64 << level) != 0 {
                out.push(NodeId {
                    level,
                    index: start >> level,
                });
                start += 1u64 << level;
            }
        }
        out
    }

    /// Rebuilds a frontier from the hashes of [`Frontier::nodes_needed`]`(size)`, in the same
    /// order.
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Result<Frontier, Error> {
        let expected = size.count_ones() as usize;
        if nodes.len() != expected {
            return Err(Error::BadFrontier {
                size,
                expected,
                got: nodes.len(),
            });
        }
        Ok(Frontier { size, nodes })
    }

    /// The number of leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The hashes of [`Frontier::nodes_needed`]`(self.size())`, in that order.
    pub fn parts(&self) -> &[Hash] {
        &self.nodes
    }

    /// Appends a leaf hash; returns the new leaf (level 0) and every node it completes, in
    /// increasing level, all of which should be stored.
    pub fn append(&mut self, leaf: Hash) -> Vec<(NodeId, Hash)> {
        let mut out = Vec::with_capacity(1 + self.size.trailing_ones() as usize);
        self.append_with(leaf, |id, hash| out.push((id, hash)));
        out
    }

    /// Like [`Frontier::append`], but hands each new node to `store` instead of allocating.
    pub fn append_with(&mut self, leaf: Hash, mut store: impl FnMut(NodeId, Hash)) {
        let index = self.size;
        let mut hash = leaf;
        store(NodeId { level: 0, index }, hash);
        // Each trailing one bit of the old size is a complete subtree of that level which the
        // new node completes into one twice as large.
        for level in 0..index.trailing_ones() {
            let Some(left) = self.nodes.pop() else { break };
            hash = node_hash(&left, &hash);
            let level = level as u8 + 1;
            store(
                NodeId {
                    level,
                    index: index >> level,
                },
                hash,
            );
        }
        self.nodes.push(hash);
        self.size += 1;
    }

    /// The RFC 6962 Merkle tree hash of the leaves so far ([`empty_root`] when empty).
    pub fn root(&self) -> Hash {
        let mut iter = self.nodes.iter().rev();
        let Some(last) = iter.next() else {
            return empty_root();
        };
        iter.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

/// The largest power of two strictly smaller than `n` (`n >= 2`).
fn split_point(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The Merkle tree hash of leaves `[lo, hi)` (`lo < hi`), from complete aligned nodes.
fn subtree(reader: &mut impl NodeReader, lo: u64, hi: u64) -> Result<Hash, Error> {
    let width = hi - lo;
    if width.is_power_of_two() && lo.is_multiple_of(width) {
        let level = width.trailing_zeros() as u8;
        return reader.node(NodeId {
            level,
            index: lo >> level,
        });
    }
    let k = split_point(width);
    let left = subtree(reader, lo, lo + k)?;
    let right = subtree(reader, lo + k, hi)?;
    Ok(node_hash(&left, &right))
}

/// The Merkle tree hash of the first `size` leaves, from stored complete nodes only.
pub fn root(reader: &mut impl NodeReader, size: u64) -> Result<Hash, Error> {
    if size == 0 {
        return Ok(empty_root());
    }
    subtree(reader, 0, size)
}

/// RFC 6962 `PATH(index, D[0:size])`: the inclusion proof of leaf `index` in the tree of
/// `size` leaves, from the leaf's sibling up.
pub fn inclusion_proof(
    reader: &mut impl NodeReader,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, Error> {
    if index >= size {
        return Err(Error::BadRange(format!(
            "leaf {index} is not in a tree of size {size}"
        )));
    }
    let mut proof = Vec::new();
    path(reader, index, 0, size, &mut proof)?;
    Ok(proof)
}

fn path(
    reader: &mut impl NodeReader,
    m: u64,
    lo: u64,
    hi: u64,
    out: &mut Vec<Hash>,
) -> Result<(), Error> {
    if hi - lo <= 1 {
        return Ok(());
    }
    let k = split_point(hi - lo);
    if m - lo < k {
        path(reader, m, lo, lo + k, out)?;
        out.push(subtree(reader, lo + k, hi)?);
    } else {
        path(reader, m, lo + k, hi, out)?;
        out.push(subtree(reader, lo, lo + k)?);
    }
    Ok(())
}

/// RFC 6962 `PROOF(old, D[0:new])`: the consistency proof between tree sizes `old` and `new`.
/// Requires `0 < old <= new`; `old == new` gives the empty proof.
pub fn consistency_proof(
    reader: &mut impl NodeReader,
    old: u64,
    new: u64,
) -> Result<Vec<Hash>, Error> {
    if old == 0 || old > new {
        return Err(Error::BadRange(format!(
            "no consistency proof from size {old} to size {new}"
        )));
    }
    let mut proof = Vec::new();
    subproof(reader, old, 0, new, true, &mut proof)?;
    Ok(proof)
}

fn subproof(
    reader: &mut impl NodeReader,
    m: u64,
    lo: u64,
    hi: u64,
    complete: bool,
    out: &mut Vec<Hash>,
) -> Result<(), Error> {
    let n = hi - lo;
    if m == n {
        if !complete {
            out.push(subtree(reader, lo, hi)?);
        }
        return Ok(());
    }
    let k = split_point(n);
    if m <= k {
        subproof(reader, m, lo, lo + k, complete, out)?;
        out.push(subtree(reader, lo + k, hi)?);
    } else {
        subproof(reader, m - k, lo + k, hi, false, out)?;
        out.push(subtree(reader, lo, lo + k)?);
    }
    Ok(())
}

/// A reader that records what is read and returns a dummy hash.
#[derive(Default)]
struct Recorder(Vec<NodeId>);

impl NodeReader for Recorder {
    fn node(&mut self, id: NodeId) -> Result<Hash, Error> {
        self.0.push(id);
        Ok([0; 32])
    }
}

/// Every node [`inclusion_proof`]`(_, index, size)` reads, in reading order (empty if the
/// arguments are out of range).
pub fn nodes_for_inclusion(index: u64, size: u64) -> Vec<NodeId> {
    let mut rec = Recorder::default();
    match inclusion_proof(&mut rec, index, size) {
        Ok(_) => rec.0,
        Err(_) => Vec::new(),
    }
}

/// Every node [`consistency_proof`]`(_, old, new)` reads, in reading order (empty if the
/// arguments are out of range).
pub fn nodes_for_consistency(old: u64, new: u64) -> Vec<NodeId> {
    let mut rec = Recorder::default();
    match consistency_proof(&mut rec, old, new) {
        Ok(_) => rec.0,
        Err(_) => Vec::new(),
    }
}

/// Every node [`root`]`(_, size)` reads (which is [`Frontier::nodes_needed`]`(size)`).
pub fn nodes_for_root(size: u64) -> Vec<NodeId> {
    let mut rec = Recorder::default();
    match root(&mut rec, size) {
        Ok(_) => rec.0,
        Err(_) => Vec::new(),
    }
}

/// Verifies that `leaf` is leaf `index` of the tree of `size` leaves with root `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), Error> {
    if index >= size {
        return Err(Error::BadProof("leaf index is not below the tree size"));
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(Error::BadProof("inclusion proof is too long"));
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(Error::BadProof("inclusion proof is too short"));
    }
    if r != *root {
        return Err(Error::BadProof("inclusion proof does not lead to the root"));
    }
    Ok(())
}

/// Verifies that the tree of `old` leaves with root `old_root` is a prefix of the tree of
/// `new` leaves with root `new_root` (RFC 9162 §2.1.4.2). Requires `0 < old <= new`; for
/// `old == new` the proof must be empty and the roots equal.
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), Error> {
    if old == 0 || old > new {
        return Err(Error::BadProof(
            "consistency needs 0 < old size <= new size",
        ));
    }
    if old == new {
        if !proof.is_empty() {
            return Err(Error::BadProof(
                "consistency proof between equal sizes must be empty",
            ));
        }
        if old_root != new_root {
            return Err(Error::BadProof("roots of equal tree sizes differ"));
        }
        return Ok(());
    }
    // If `old` is a power of two, the old root is the first node of the path and is implied.
    let (first, rest) = match proof.split_first() {
        None => return Err(Error::BadProof("consistency proof is empty")),
        Some(_) if old.is_power_of_two() => (old_root, proof),
        Some(split) => split,
    };
    let (mut fn_, mut sn) = (old - 1, new - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if sn == 0 {
            return Err(Error::BadProof("consistency proof is too long"));
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(Error::BadProof("consistency proof is too short"));
    }
    if fr != *old_root {
        return Err(Error::BadProof(
            "consistency proof does not lead to the old root",
        ));
    }
    if sr != *new_root {
        return Err(Error::BadProof(
            "consistency proof does not lead to the new root",
        ));
    }
    Ok(())
}
