//! Sluice keys: random secrets handed to callers, stored only as SHA-256 hashes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use sha2::{Digest, Sha256};

/// The SHA-256 of a key: what the policy stores and what a presented key is compared by.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

/// A key hash hashes as its first eight bytes: a SHA-256 digest is uniform already, and no
/// caller can aim at a bucket without a preimage, so hashing all 32 bytes again (SipHash) bought
/// nothing on every lookup and on every key of a reload.
impl Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(prefix));
    }
}

/// A map by key hash, with [`DigestHasher`].
pub type KeyHashMap<V> = HashMap<KeyHash, V, BuildHasherDefault<DigestHasher>>;

/// Passes a [`KeyHash`]'s prefix through as the hash (see its `Hash`).
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for types other than `KeyHash`; FNV-1a keeps it a proper hash.
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

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
