//! The pure part of Tally's signed credit ledger.
//!
//! Everything here works without a database:
//!
//! - [`accounts`]: account naming and which accounts may not be overdrawn;
//! - [`entry`]: a ledger [`Entry`] and its canonical, hashable bytes;
//! - [`merkle`]: an RFC 6962 / RFC 9162 Merkle tree over the entries: an append-only
//!   [`Frontier`], roots and proofs computed from stored complete subtrees, and proof
//!   verification;
//! - [`note`]: C2SP signed checkpoints (`tlog-checkpoint` in a `signed-note`), byte for byte
//!   compatible with Go's `golang.org/x/mod/sumdb/note`;
//! - [`audit`]: a streaming [`Auditor`] that replays entries and checks them against signed
//!   checkpoints and stored balances;
//! - [`export`]: the export directory format and [`export::verify_export`].

pub mod accounts;
pub mod audit;
pub mod entry;
pub mod export;
pub mod merkle;
pub mod note;

pub use audit::{Auditor, Finding, Report};
pub use entry::Entry;
pub use merkle::{Frontier, NodeId, NodeReader};
pub use note::{Checkpoint, SignerKey, VerifierKey};

/// A SHA-256 digest: a leaf hash, an interior node hash or a tree root.
pub type Hash = [u8; 32];

/// Errors from the Merkle tree, proof and signed-note functions of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node needed to compute a root or proof is not stored.
    #[error("merkle node at level {} index {} is missing", .0.level, .0.index)]
    MissingNode(NodeId),
    /// The arguments of a tree operation are out of range (e.g. a leaf index beyond the tree).
    #[error("invalid tree range: {0}")]
    BadRange(String),
    /// [`Frontier::from_parts`] got the wrong number of hashes.
    #[error("a frontier of size {size} needs {expected} node hashes, got {got}")]
    BadFrontier {
        /// The tree size.
        size: u64,
        /// How many hashes that size needs.
        expected: usize,
        /// How many were given.
        got: usize,
    },
    /// A proof does not verify.
    #[error("invalid proof: {0}")]
    BadProof(&'static str),
    /// Key text (signer or verifier) is malformed or its key id does not match.
    #[error("bad key: {0}")]
    BadKey(String),
    /// A signed note is malformed.
    #[error("malformed note: {0}")]
    BadNote(String),
    /// A note body is not a valid checkpoint.
    #[error("malformed checkpoint: {0}")]
    BadCheckpoint(String),
    /// A trusted key's signature on a note does not verify.
    #[error("invalid signature by trusted key {name}+{key_id:08x}")]
    BadSignature {
        /// The key's name.
        name: String,
        /// The key's id.
        key_id: u32,
    },
    /// A note has no signature by any key of the keyring.
    #[error("note has no signature by a trusted key (signed by: {signers})")]
    NoTrustedSignature {
        /// The `name+keyid` of every key that did sign, comma separated, or "nobody".
        signers: String,
    },
}
