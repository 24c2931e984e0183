//! Capsule identifiers.

use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "cl-";
const RANDOM_LEN: usize = 12;
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A capsule's id: `cl-` followed by random lowercase letters and digits, e.g. `cl-7k2m9q4x1abc`.
/// Parse one from text with [`str::parse`]. With the `serde` feature it serializes as that
/// text (and deserializing checks it).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapsuleId(String);

/// The text given to [`CapsuleId::from_str`] is not a capsule id (`cl-` followed by 1 to 64
/// lowercase letters and digits). Converts into [`crate::Error::InvalidId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a capsule id")]
pub struct InvalidId(pub String);

impl CapsuleId {
    /// A fresh random id.
    pub(crate) fn generate() -> Self {
        let mut bytes = [0u8; RANDOM_LEN];
        if getrandom::fill(&mut bytes).is_err() {
            // No OS randomness (extremely unusual): fall back to time and a counter, which is
            // still unique within this process.
            use std::sync::atomic::{AtomicU64, Ordering};
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let mut x = nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32);
            for b in bytes.iter_mut() {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (x >> 56) as u8;
            }
        }
        let mut id = String::with_capacity(PREFIX.len() + RANDOM_LEN);
        id.push_str(PREFIX);
        id.extend(
            bytes
                .iter()
                .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char),
        );
        CapsuleId(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CapsuleId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, InvalidId> {
        let valid = s.strip_prefix(PREFIX).is_some_and(|rest| {
            !rest.is_empty()
                && rest.len() <= 64
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
        if valid {
            Ok(CapsuleId(s.to_owned()))
        } else {
            Err(InvalidId(s.to_owned()))
        }
    }
}

impl fmt::Display for CapsuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CapsuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CapsuleId({})", self.0)
    }
}

/// The id as its text, for the data directory's records (always compiled: the engine stores
/// ids whether or not the public `serde` feature is on).
pub(crate) mod as_text {
    use super::CapsuleId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(id: &CapsuleId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.as_str())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CapsuleId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for CapsuleId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        as_text::serialize(self, s)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for CapsuleId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        as_text::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_differ() {
        let a = CapsuleId::generate();
        let b = CapsuleId::generate();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("cl-"));
        assert_eq!(a.as_str().len(), 3 + RANDOM_LEN);
        assert_eq!(a.as_str().parse::<CapsuleId>().unwrap(), a);
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in ["", "cl-", "xx-abc", "cl-ABC", "cl-a b", "cl-é", "cl-../etc"] {
            assert!(
                bad.parse::<CapsuleId>() == Err(InvalidId(bad.to_owned())),
                "{bad}"
            );
        }
    }
}
