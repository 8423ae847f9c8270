//! Ledger entries and their canonical bytes.

use crate::Hash;
use crate::merkle;
use sha2::{Digest, Sha256};

/// The domain tag that starts [`Entry::canonical_bytes`].
pub const DOMAIN_TAG: &[u8] = b"tally-ledger-entry/v1";

/// One transfer in the log: `amount` moves from `debit` to `credit`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Position in the log (0-based).
    pub index: u64,
    /// The transfer id.
    pub id: String,
    /// The account whose balance decreases.
    pub debit: String,
    /// The account whose balance increases.
    pub credit: String,
    /// The amount moved, always `> 0`.
    pub amount: i64,
    /// What kind of transfer this is (grant, bonus, adjust, reserve, settle, refund, ...).
    pub kind: String,
    /// The user concerned, if any.
    pub user_id: Option<String>,
    /// The reservation concerned, if any.
    pub reservation_id: Option<String>,
    /// The job concerned, if any.
    pub job_id: Option<String>,
    /// A free-form note.
    pub memo: Option<String>,
    /// When the transfer was committed, in milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    // `check` rejects strings longer than u32::MAX bytes, so the saturation never happens
    // for a valid entry.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_opt(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => buf.push(0),
        Some(s) => {
            buf.push(1);
            put_str(buf, s);
        }
    }
}

impl Entry {
    /// The unambiguous encoding that is hashed into the log: the ASCII [`DOMAIN_TAG`], then
    /// every field in declaration order; integers as 8-byte big-endian, strings as a `u32`
    /// big-endian byte length and the UTF-8 bytes, options as a byte 0 (`None`) or 1 followed
    /// by the value.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(128);
        self.write_canonical(&mut buf);
        buf
    }

    /// Appends [`Entry::canonical_bytes`] to `buf` (so a caller can reuse one buffer).
    pub fn write_canonical(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(DOMAIN_TAG);
        buf.extend_from_slice(&self.index.to_be_bytes());
        put_str(buf, &self.id);
        put_str(buf, &self.debit);
        put_str(buf, &self.credit);
        buf.extend_from_slice(&self.amount.to_be_bytes());
        put_str(buf, &self.kind);
        put_opt(buf, self.user_id.as_deref());
        put_opt(buf, self.reservation_id.as_deref());
        put_opt(buf, self.job_id.as_deref());
        put_opt(buf, self.memo.as_deref());
        buf.extend_from_slice(&self.created_at_ms.to_be_bytes());
    }

    /// The RFC 6962 leaf hash of the canonical bytes.
    pub fn leaf_hash(&self) -> Hash {
        merkle::leaf_hash(&self.canonical_bytes())
    }

    /// [`Entry::leaf_hash`] using `buf` as scratch space (its contents are replaced).
    pub fn leaf_hash_with(&self, buf: &mut Vec<u8>) -> Hash {
        buf.clear();
        buf.push(0);
        self.write_canonical(buf);
        Sha256::digest(buf.as_slice()).into()
    }

    /// Checks the entry is well formed: `amount > 0`, `debit != credit`, and non-empty id,
    /// accounts and kind.
    pub fn check(&self) -> Result<(), String> {
        if self.amount <= 0 {
            return Err(format!("amount {} is not positive", self.amount));
        }
        for (field, value) in [
            ("id", &self.id),
            ("debit", &self.debit),
            ("credit", &self.credit),
            ("kind", &self.kind),
        ] {
            if value.is_empty() {
                return Err(format!("{field} is empty"));
            }
        }
        if self.debit == self.credit {
            return Err(format!(
                "debit and credit are the same account {}",
                self.debit
            ));
        }
        let strings = [&self.id, &self.debit, &self.credit, &self.kind];
        let options = [
            &self.user_id,
            &self.reservation_id,
            &self.job_id,
            &self.memo,
        ];
        let too_long = strings
            .into_iter()
            .chain(options.into_iter().flatten())
            .any(|s| u32::try_from(s.len()).is_err());
        if too_long {
            return Err("a field is longer than 4 GiB".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        Entry {
            index: 1,
            id: "t-1".into(),
            debit: "platform:grants".into(),
            credit: "user:u:available".into(),
            amount: 500,
            kind: "grant".into(),
            user_id: Some("u".into()),
            reservation_id: None,
            job_id: None,
            memo: Some("".into()),
            created_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn canonical_bytes_layout() {
        let e = sample();
        let mut want = b"tally-ledger-entry/v1".to_vec();
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0, 3]);
        want.extend_from_slice(b"t-1");
        want.extend_from_slice(&[0, 0, 0, 15]);
        want.extend_from_slice(b"platform:grants");
        want.extend_from_slice(&[0, 0, 0, 16]);
        want.extend_from_slice(b"user:u:available");
        want.extend_from_slice(&500i64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 5]);
        want.extend_from_slice(b"grant");
        want.extend_from_slice(&[1, 0, 0, 0, 1, b'u']);
        want.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0]);
        want.extend_from_slice(&1_700_000_000_000i64.to_be_bytes());
        assert_eq!(e.canonical_bytes(), want);
        assert_eq!(e.leaf_hash(), merkle::leaf_hash(&want));
        let mut buf = b"junk".to_vec();
        assert_eq!(e.leaf_hash_with(&mut buf), e.leaf_hash());
    }

    #[test]
    fn none_and_empty_differ() {
        let a = sample();
        let mut b = sample();
        b.memo = None;
        assert_ne!(a.leaf_hash(), b.leaf_hash());
        let mut c = sample();
        c.id = "t-1x".into();
        c.debit = "latform:grants".into();
        assert_ne!(a.canonical_bytes(), c.canonical_bytes());
    }

    #[test]
    fn check_rules() {
        assert!(sample().check().is_ok());
        let mut e = sample();
        e.amount = 0;
        assert!(e.check().is_err());
        let mut e = sample();
        e.credit = e.debit.clone();
        assert!(e.check().is_err());
        let mut e = sample();
        e.kind.clear();
        assert!(e.check().unwrap_err().contains("kind"));
    }

    #[test]
    fn json_round_trip() {
        let e = sample();
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), e);
    }
}
