//! C2SP signed checkpoints: `tlog-checkpoint` bodies in `signed-note` envelopes with Ed25519
//! keys, in exactly the formats of Go's `golang.org/x/mod/sumdb/note`.
//!
//! - verifier key: `{name}+{key id, 8 hex digits}+{base64(0x01 || 32-byte public key)}`
//! - signer key: `PRIVATE+KEY+{name}+{key id}+{base64(0x01 || 32-byte seed)}`
//! - key id: the first 4 bytes, big-endian, of `SHA-256(name || "\n" || 0x01 || public key)`
//! - signed note: the text (ending in `\n`), a blank line, then one line per signature:
//!   `— {name} {base64(key id as 4 bytes big-endian || 64-byte Ed25519 signature of the text)}`
//!   (the dash is U+2014 EM DASH).

use crate::{Error, Hash};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use std::fmt;

/// The algorithm byte of Ed25519 keys.
const ALG_ED25519: u8 = 1;
/// What starts every signature line.
const SIG_PREFIX: &str = "\u{2014} ";
/// Notes with more signature lines than this are rejected, as in Go.
const MAX_SIGNATURES: usize = 100;

/// A signed tree head: the log `origin`, its `size` and the Merkle `root` over that many
/// entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's unique name (first line of the body); a single non-empty line.
    pub origin: String,
    /// The number of entries.
    pub size: u64,
    /// The RFC 6962 root hash of the first `size` entries.
    pub root: Hash,
}

impl Checkpoint {
    /// The note body: `"{origin}\n{size}\n{base64 root}\n"`.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    /// Parses a note body strictly: an origin line, a decimal size without leading zeros, a
    /// base64 root of 32 bytes, every line ending in `\n`; any further (non-empty) extension
    /// lines are ignored.
    pub fn parse(body: &str) -> Result<Checkpoint, Error> {
        let bad = |why: &str| Error::BadCheckpoint(why.to_owned());
        let body = body
            .strip_suffix('\n')
            .ok_or_else(|| bad("body does not end with a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines.next().unwrap_or_default();
        let size = lines.next().ok_or_else(|| bad("no size line"))?;
        let root = lines.next().ok_or_else(|| bad("no root hash line"))?;
        if origin.is_empty() {
            return Err(bad("empty origin"));
        }
        if size.is_empty()
            || !size.bytes().all(|b| b.is_ascii_digit())
            || (size.len() > 1 && size.starts_with('0'))
        {
            return Err(Error::BadCheckpoint(format!(
                "size {size:?} is not a decimal number"
            )));
        }
        let size = size
            .parse::<u64>()
            .map_err(|_| Error::BadCheckpoint(format!("size {size} is too large")))?;
        let root: Hash = B64
            .decode(root)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| bad("root hash is not base64 of 32 bytes"))?;
        if lines.any(str::is_empty) {
            return Err(bad("empty extension line"));
        }
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

/// Whether `name` can name a key: non-empty, without `+` or (Unicode) whitespace.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('+') && !name.chars().any(char::is_whitespace)
}

fn check_name(name: &str) -> Result<(), Error> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(Error::BadKey(format!(
            "key name {name:?} must be non-empty, without '+' or spaces"
        )))
    }
}

/// The key id of an Ed25519 public key under `name`.
fn key_id(name: &str, public: &[u8; 32]) -> u32 {
    let digest = Sha256::new()
        .chain_update(name.as_bytes())
        .chain_update(b"\n")
        .chain_update([ALG_ED25519])
        .chain_update(public)
        .finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Parses `{name}+{keyid hex}+{base64(0x01 || 32 bytes)}`.
fn parse_key_parts(name: &str, id: &str, key: &str) -> Result<(u32, [u8; 32]), Error> {
    check_name(name)?;
    let id = (id.len() == 8)
        .then(|| hex::decode(id).ok())
        .flatten()
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| Error::BadKey(format!("key id {id:?} is not 8 hex digits")))?;
    let key = B64
        .decode(key)
        .map_err(|_| Error::BadKey("key is not valid base64".to_owned()))?;
    match key.split_first() {
        Some((&ALG_ED25519, rest)) => {
            let bytes = <[u8; 32]>::try_from(rest)
                .map_err(|_| Error::BadKey("Ed25519 key is not 32 bytes".to_owned()))?;
            Ok((id, bytes))
        }
        Some((alg, _)) => Err(Error::BadKey(format!("unknown key algorithm {alg}"))),
        None => Err(Error::BadKey("empty key".to_owned())),
    }
}

/// An Ed25519 key that signs checkpoints under a name. Its text form is a secret.
#[derive(Clone)]
pub struct SignerKey {
    name: String,
    key_id: u32,
    key: SigningKey,
}

impl fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignerKey")
            .field("name", &self.name)
            .field("key_id", &format_args!("{:08x}", self.key_id))
            .finish_non_exhaustive()
    }
}

impl SignerKey {
    /// A new random key named `name`.
    pub fn generate(name: &str) -> Result<SignerKey, Error> {
        Self::from_seed(name, rand::random::<[u8; 32]>())
    }

    fn from_seed(name: &str, seed: [u8; 32]) -> Result<SignerKey, Error> {
        check_name(name)?;
        let key = SigningKey::from_bytes(&seed);
        Ok(SignerKey {
            name: name.to_owned(),
            key_id: key_id(name, key.verifying_key().as_bytes()),
            key,
        })
    }

    /// Parses `PRIVATE+KEY+{name}+{keyid}+{base64(0x01 || seed)}` (surrounding whitespace is
    /// ignored) and checks the key id.
    pub fn parse(text: &str) -> Result<SignerKey, Error> {
        let mut parts = text.trim().splitn(5, '+');
        let (Some("PRIVATE"), Some("KEY"), Some(name), Some(id), Some(key)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Error::BadKey(
                "a signer key has the form PRIVATE+KEY+name+keyid+key".to_owned(),
            ));
        };
        let (id, seed) = parse_key_parts(name, id, key)?;
        let signer = Self::from_seed(name, seed)?;
        if signer.key_id != id {
            return Err(Error::BadKey(format!(
                "key id {id:08x} does not match the key of {name} ({:08x})",
                signer.key_id
            )));
        }
        Ok(signer)
    }

    /// The text form, `PRIVATE+KEY+{name}+{keyid}+{base64(0x01 || seed)}`. Keep it secret.
    pub fn encode(&self) -> String {
        let mut key = Vec::with_capacity(33);
        key.push(ALG_ED25519);
        key.extend_from_slice(self.key.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.key_id,
            B64.encode(&key)
        )
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The matching public key.
    pub fn verifier(&self) -> VerifierKey {
        VerifierKey {
            name: self.name.clone(),
            key_id: self.key_id,
            key: self.key.verifying_key(),
        }
    }

    /// The signature line for `text` (which should end in `\n`):
    /// `"— {name} {base64(keyid || signature)}\n"`.
    pub fn sign_text(&self, text: &str) -> String {
        let signature = self.key.sign(text.as_bytes());
        let mut bytes = Vec::with_capacity(68);
        bytes.extend_from_slice(&self.key_id.to_be_bytes());
        bytes.extend_from_slice(&signature.to_bytes());
        format!("{SIG_PREFIX}{} {}\n", self.name, B64.encode(&bytes))
    }

    /// The signed note of a checkpoint: its body, a blank line and this key's signature line.
    pub fn sign(&self, cp: &Checkpoint) -> String {
        let body = cp.body();
        let line = self.sign_text(&body);
        format!("{body}\n{line}")
    }
}

/// An Ed25519 public key that verifies checkpoints signed under a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key_id: u32,
    key: VerifyingKey,
}

impl VerifierKey {
    /// Parses `{name}+{keyid}+{base64(0x01 || public key)}` (surrounding whitespace is
    /// ignored) and checks the key id.
    pub fn parse(text: &str) -> Result<VerifierKey, Error> {
        let mut parts = text.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::BadKey(
                "a verifier key has the form name+keyid+key".to_owned(),
            ));
        };
        let (id, public) = parse_key_parts(name, id, key)?;
        let expected = key_id(name, &public);
        if expected != id {
            return Err(Error::BadKey(format!(
                "key id {id:08x} does not match the key of {name} ({expected:08x})"
            )));
        }
        let key = VerifyingKey::from_bytes(&public)
            .map_err(|_| Error::BadKey(format!("{name}: not a valid Ed25519 public key")))?;
        Ok(VerifierKey {
            name: name.to_owned(),
            key_id: id,
            key,
        })
    }

    /// The text form, `{name}+{keyid}+{base64(0x01 || public key)}`.
    pub fn encode(&self) -> String {
        let mut key = Vec::with_capacity(33);
        key.push(ALG_ED25519);
        key.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.key_id, B64.encode(&key))
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }
}

/// Verifies a signed note of any text (the low-level part of [`open`]): returns the text
/// (ending in `\n`) and the keyring keys that signed it.
///
/// The note is split at its last blank line; every signature line must be well formed; a
/// signature by a keyring key (same name and key id) must verify, else
/// [`Error::BadSignature`]; signatures by other keys are ignored; at least one keyring key
/// must have signed, else [`Error::NoTrustedSignature`].
pub fn open_text<'a>(
    note: &'a str,
    keyring: &[VerifierKey],
) -> Result<(&'a str, Vec<VerifierKey>), Error> {
    let bad = |why: &str| Error::BadNote(why.to_owned());
    if note.chars().any(|c| c < ' ' && c != '\n') {
        return Err(bad("control character in note"));
    }
    let split = note
        .rfind("\n\n")
        .ok_or_else(|| bad("no blank line before the signatures"))?;
    let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
    let sigs = sigs
        .strip_suffix('\n')
        .ok_or_else(|| bad("signature block does not end with a newline"))?;
    let mut signed: Vec<VerifierKey> = Vec::new();
    let mut others: Vec<String> = Vec::new();
    for (count, line) in sigs.split('\n').enumerate() {
        if count >= MAX_SIGNATURES {
            return Err(bad("too many signatures"));
        }
        let (name, b64) = line
            .strip_prefix(SIG_PREFIX)
            .and_then(|l| l.split_once(' '))
            .ok_or_else(|| bad("signature line is not \"— name signature\""))?;
        let bytes = B64
            .decode(b64)
            .map_err(|_| Error::BadNote(format!("signature by {name} is not base64")))?;
        if !valid_name(name) || bytes.len() < 5 {
            return Err(Error::BadNote(format!("malformed signature by {name:?}")));
        }
        let id = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let Some(key) = keyring.iter().find(|k| k.name == name && k.key_id == id) else {
            let who = format!("{name}+{id:08x}");
            if !others.contains(&who) {
                others.push(who);
            }
            continue;
        };
        if signed.iter().any(|k| k.name == name && k.key_id == id) {
            continue;
        }
        let ok = Signature::from_slice(&bytes[4..])
            .is_ok_and(|sig| key.key.verify(text.as_bytes(), &sig).is_ok());
        if !ok {
            return Err(Error::BadSignature {
                name: name.to_owned(),
                key_id: id,
            });
        }
        signed.push(key.clone());
    }
    if signed.is_empty() {
        let signers = if others.is_empty() {
            "nobody".to_owned()
        } else {
            others.join(", ")
        };
        return Err(Error::NoTrustedSignature { signers });
    }
    Ok((text, signed))
}

/// Opens a signed checkpoint note: verifies it with [`open_text`], then parses the text as a
/// [`Checkpoint`]. Returns the checkpoint and the keyring keys that signed it.
pub fn open(note: &str, keyring: &[VerifierKey]) -> Result<(Checkpoint, Vec<VerifierKey>), Error> {
    let (text, signed) = open_text(note, keyring)?;
    Ok((Checkpoint::parse(text)?, signed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_SIGNER: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_VERIFIER: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n";
    const GO_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    fn cp(size: u64) -> Checkpoint {
        Checkpoint {
            origin: "example.com/tally".into(),
            size,
            root: [size as u8; 32],
        }
    }

    #[test]
    fn go_note_vector() {
        let signer = SignerKey::parse(GO_SIGNER).unwrap();
        assert_eq!(signer.name(), "PeterNeumann");
        assert_eq!(signer.key_id(), 0xc74f20a3);
        assert_eq!(signer.encode(), GO_SIGNER);
        assert_eq!(signer.verifier().encode(), GO_VERIFIER);
        let verifier = VerifierKey::parse(GO_VERIFIER).unwrap();
        assert_eq!(verifier, signer.verifier());
        assert_eq!(signer.sign_text(GO_TEXT), GO_SIG);
        let note = format!("{GO_TEXT}\n{GO_SIG}");
        let (text, keys) = open_text(&note, &[verifier]).unwrap();
        assert_eq!(text, GO_TEXT);
        assert_eq!(keys.len(), 1);
    }

    #[test]
    fn key_round_trip_and_errors() {
        let signer = SignerKey::generate("example.com/tally").unwrap();
        let text = format!("  {}\n", signer.encode());
        let again = SignerKey::parse(&text).unwrap();
        assert_eq!(again.encode(), signer.encode());
        assert_eq!(again.verifier(), signer.verifier());
        let v = signer.verifier();
        assert_eq!(VerifierKey::parse(&v.encode()).unwrap(), v);
        assert!(format!("{signer:?}").contains("SignerKey"));
        assert!(!format!("{signer:?}").contains(&signer.encode()[30..]));

        assert!(SignerKey::generate("has space").is_err());
        assert!(SignerKey::generate("a+b").is_err());
        assert!(SignerKey::generate("").is_err());
        // Wrong key id, wrong prefix, wrong algorithm byte, truncated key.
        let wrong_id = GO_VERIFIER.replace("c74f20a3", "c74f20a4");
        assert!(VerifierKey::parse(&wrong_id).is_err());
        assert!(SignerKey::parse(&GO_SIGNER.replace("PRIVATE", "SECRET")).is_err());
        assert!(VerifierKey::parse(&GO_VERIFIER.replace("+AR", "+Ah")).is_err());
        assert!(VerifierKey::parse(&GO_VERIFIER[..GO_VERIFIER.len() - 4]).is_err());
        assert!(VerifierKey::parse("PeterNeumann+c74f20a3").is_err());
        assert!(SignerKey::parse(GO_VERIFIER).is_err());
    }

    #[test]
    fn checkpoint_body_parse() {
        let c = cp(12);
        assert_eq!(Checkpoint::parse(&c.body()).unwrap(), c);
        let with_ext = format!("{}ext line\n", c.body());
        assert_eq!(Checkpoint::parse(&with_ext).unwrap(), c);
        let root = B64.encode([0u8; 32]);
        for bad in [
            format!("o\n12\n{root}"),
            format!("\n12\n{root}\n"),
            format!("o\n012\n{root}\n"),
            format!("o\n+12\n{root}\n"),
            format!("o\n\n{root}\n"),
            format!("o\n99999999999999999999\n{root}\n"),
            "o\n12\nAAAA\n".to_owned(),
            "o\n12\n".to_owned(),
            format!("o\n12\n{root}\n\n"),
        ] {
            assert!(Checkpoint::parse(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Checkpoint::parse(&format!("o\n0\n{root}\n")).unwrap().size,
            0
        );
    }

    #[test]
    fn sign_open_and_tamper() {
        let signer = SignerKey::generate("example.com/tally").unwrap();
        let ring = vec![signer.verifier()];
        let note = signer.sign(&cp(7));
        let (got, keys) = open(&note, &ring).unwrap();
        assert_eq!(got, cp(7));
        assert_eq!(keys, ring);

        // Modified body.
        let forged = note.replacen("\n7\n", "\n8\n", 1);
        assert!(matches!(
            open(&forged, &ring),
            Err(Error::BadSignature { .. })
        ));
        // Modified signature.
        let sig_at = note.find('\u{2014}').unwrap() + SIG_PREFIX.len() + signer.name().len() + 10;
        let mut bytes = note.clone().into_bytes();
        bytes[sig_at] = if bytes[sig_at] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(bytes).unwrap();
        assert!(matches!(
            open(&forged, &ring),
            Err(Error::BadSignature { .. })
        ));
        // Another key with the same name: unknown key id, so no trusted signature.
        let other = SignerKey::generate("example.com/tally").unwrap();
        let err = open(&other.sign(&cp(7)), &ring).unwrap_err();
        assert!(matches!(err, Error::NoTrustedSignature { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{:08x}", other.key_id())));
        // Malformed envelopes.
        assert!(matches!(open(&cp(7).body(), &ring), Err(Error::BadNote(_))));
        assert!(open(note.trim_end(), &ring).is_err());
        assert!(open(&note.replace('\n', "\r\n"), &ring).is_err());
        assert!(open(&format!("{note}garbage\n"), &ring).is_err());
    }

    #[test]
    fn rotation_and_cosigning() {
        let old = SignerKey::generate("example.com/tally").unwrap();
        let new = SignerKey::generate("example.com/tally").unwrap();
        let ring = vec![new.verifier(), old.verifier()];
        let old_note = old.sign(&cp(3));
        let (got, keys) = open(&old_note, &ring).unwrap();
        assert_eq!((got, keys), (cp(3), vec![old.verifier()]));
        assert!(open(&new.sign(&cp(9)), &ring).is_ok());
        assert!(open(&old_note, &[new.verifier()]).is_err());

        // A note with both signatures, plus one by an unknown witness, is signed by both.
        let body = cp(9).body();
        let witness = SignerKey::generate("witness").unwrap();
        let note = format!(
            "{body}\n{}{}{}",
            witness.sign_text(&body),
            old.sign_text(&body),
            new.sign_text(&body)
        );
        let (_, keys) = open(&note, &ring).unwrap();
        assert_eq!(keys.len(), 2);
    }
}
