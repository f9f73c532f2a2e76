//! Sluice keys: random secrets handed to callers, stored only as SHA-256 hashes.

use sha2::{Digest, Sha256};

/// The SHA-256 of a key: what the policy stores and what a presented key is compared by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}…", hex::encode(&self.0[..4]))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a key hash is written `sha256:` and 64 hex digits")]
pub struct BadKeyHash;

/// Prefix of generated keys, so a leaked one is recognisable (secret scanners, logs review).
pub const KEY_PREFIX: &str = "sk-sluice-";

impl KeyHash {
    pub fn of(key: &str) -> Self {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Reads `sha256:<64 hex digits>`.
    pub fn parse(text: &str) -> Result<Self, BadKeyHash> {
        let digits = text.trim().strip_prefix("sha256:").ok_or(BadKeyHash)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digits, &mut bytes).map_err(|_| BadKeyHash)?;
        Ok(KeyHash(bytes))
    }

    pub fn to_text(self) -> String {
        format!("sha256:{}", hex::encode(self.0))
    }
}

/// A new key: the prefix and 32 random bytes in hex (256 bits of entropy).
pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha256_and_round_trip_as_text() {
        let hash = KeyHash::of("abc");
        assert_eq!(
            hash.to_text(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(KeyHash::parse(&hash.to_text()).unwrap(), hash);
        assert_eq!(
            KeyHash::parse(&hash.to_text().to_uppercase().replace("SHA256", "sha256")).unwrap(),
            hash
        );
    }

    #[test]
    fn malformed_hashes_are_refused() {
        for text in [
            "",
            "sha256:",
            "sha256:abc",
            "md5:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:zz7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ] {
            assert_eq!(KeyHash::parse(text), Err(BadKeyHash), "{text}");
        }
    }

    #[test]
    fn generated_keys_are_distinct_and_prefixed() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), KEY_PREFIX.len() + 64);
        assert!(!format!("{:?}", KeyHash::of(&a)).contains(&KeyHash::of(&a).to_text()[7..]));
    }
}
