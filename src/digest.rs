//! Content digests (`sha256:<64 hex>`), short-prefix resolution, and the canonical hashing shared by recipe keys
//! and the ledger.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// The fewest hex characters accepted as a short digest, as in `git`'s abbreviated ids.
pub const MIN_PREFIX: usize = 12;

/// A sha256 digest, written `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("`{input}` is not a digest: {reason} (expected sha256:<64 hex> or at least {MIN_PREFIX} hex characters)")]
    Malformed { input: String, reason: &'static str },
    #[error("no image matches digest `{input}`")]
    NotFound { input: String },
    #[error("digest prefix `{input}` is ambiguous: it matches {}", candidates.join(", "))]
    Ambiguous { input: String, candidates: Vec<String> },
}

impl Digest {
    /// The all-zero digest: the `prev` of the first ledger event.
    pub const ZERO: Digest = Digest([0; 32]);

    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, enough to name an image in human output.
    pub fn short(&self) -> String {
        self.hex()[..MIN_PREFIX].to_string()
    }

    /// Parses the full form `sha256:<64 hex>` (bare 64 hex is accepted too).
    pub fn parse(input: &str) -> Result<Self, DigestError> {
        let hex_part = input.strip_prefix("sha256:").unwrap_or(input);
        let malformed = |reason| DigestError::Malformed { input: input.to_string(), reason };
        if hex_part.len() != 64 {
            return Err(malformed("a full digest has 64 hex characters"));
        }
        if !hex_part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(malformed("only lowercase hex characters are allowed"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| malformed("invalid hex"))?;
        Ok(Digest(out))
    }
}

/// A digest as a user typed it: full, or a prefix of at least [`MIN_PREFIX`] hex characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestQuery {
    input: String,
    hex_prefix: String,
}

impl DigestQuery {
    /// Uppercase hex is accepted (some tools print digests that way) and normalised to lowercase.
    pub fn parse(input: &str) -> Result<Self, DigestError> {
        let hex_prefix = input.strip_prefix("sha256:").unwrap_or(input).to_ascii_lowercase();
        let malformed = |reason| DigestError::Malformed { input: input.to_string(), reason };
        if !hex_prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed("only hex characters (0-9, a-f) are allowed"));
        }
        if hex_prefix.len() < MIN_PREFIX {
            return Err(malformed("too short"));
        }
        if hex_prefix.len() > 64 {
            return Err(malformed("longer than 64 hex characters"));
        }
        Ok(DigestQuery { input: input.to_string(), hex_prefix })
    }

    pub fn input(&self) -> &str {
        &self.input
    }

    /// The hex characters typed, without `sha256:`; at least [`MIN_PREFIX`] of them.
    pub fn hex_prefix(&self) -> &str {
        &self.hex_prefix
    }

    pub fn matches(&self, digest: &Digest) -> bool {
        digest.hex().starts_with(&self.hex_prefix)
    }

    /// Resolves against known digests as git resolves abbreviated ids: exactly one match, or an error naming all.
    pub fn resolve<'a>(&self, known: impl IntoIterator<Item = &'a Digest>) -> Result<Digest, DigestError> {
        let mut found: Vec<Digest> = known.into_iter().filter(|d| self.matches(d)).copied().collect();
        found.sort();
        found.dedup();
        match found.len() {
            0 => Err(DigestError::NotFound { input: self.input.clone() }),
            1 => Ok(found[0]),
            _ => Err(DigestError::Ambiguous {
                input: self.input.clone(),
                candidates: found.iter().map(|d| d.short()).collect(),
            }),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Canonical JSON: object keys sorted, no insignificant whitespace. `serde_json::Value` keeps keys in a BTreeMap
/// (the `preserve_order` feature is off), so re-encoding a value sorts them.
pub fn canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&serde_json::to_value(value)?)
}

/// The digest of a value's canonical JSON.
pub fn digest_canonical<T: Serialize>(value: &T) -> Result<Digest, serde_json::Error> {
    Ok(Digest::of(&canonical_json(value)?))
}

/// Incremental sha256 for streams (files, tar layers).
#[derive(Default, Clone)]
pub struct StreamHasher(Sha256);

impl StreamHasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

impl std::io::Write for StreamHasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let d = Digest::of(b"hello");
        assert_eq!(d.to_string(), "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert_eq!(Digest::parse(&d.hex()).unwrap(), d);
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in ["", "sha256:", "sha256:abc", "md5:00", &"A".repeat(64), &"g".repeat(64), &"a".repeat(65)] {
            assert!(Digest::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn short_prefixes_resolve_like_git() {
        let a = Digest::parse(&format!("{}{}", "abcdef012345", "0".repeat(52))).unwrap();
        let b = Digest::parse(&format!("{}{}", "abcdef012345", "1".repeat(52))).unwrap();
        let c = Digest::parse(&"f".repeat(64)).unwrap();
        let known = [a, b, c];
        assert_eq!(DigestQuery::parse("ffffffffffff").unwrap().resolve(&known).unwrap(), c);
        assert_eq!(DigestQuery::parse("sha256:abcdef0123450").unwrap().resolve(&known).unwrap(), a);
        let err = DigestQuery::parse("abcdef012345").unwrap().resolve(&known).unwrap_err();
        assert!(matches!(err, DigestError::Ambiguous { ref candidates, .. } if candidates.len() == 2), "{err}");
        assert!(matches!(
            DigestQuery::parse("0123456789ab").unwrap().resolve(&known),
            Err(DigestError::NotFound { .. })
        ));
        assert!(DigestQuery::parse("abcdef").is_err(), "shorter than 12 is refused");
        assert_eq!(DigestQuery::parse("ABCDEF0123450").unwrap().resolve(&known).unwrap(), a, "uppercase is normalised");
        assert_eq!(DigestQuery::parse(&format!("sha256:{}", "F".repeat(64))).unwrap().resolve(&known).unwrap(), c);
        assert!(DigestQuery::parse("ABCDEF01234G").is_err(), "non-hex is refused");
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let v = serde_json::json!({"b": 1, "a": {"d": 2, "c": [3, 1]}});
        assert_eq!(canonical_json(&v).unwrap(), br#"{"a":{"c":[3,1],"d":2},"b":1}"#);
    }
}
