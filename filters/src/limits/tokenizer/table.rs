//! The byte layout of a BPE vocabulary compiled into the binary: written by `filters/build.rs`,
//! read in place by [`super::Vocabulary`]. Shared by both so they cannot disagree.
//!
//! All integers are little-endian `u32`:
//!
//! ```text
//! tokens  slots  offsets[tokens + 1]  index[slots]  bytes…
//! ```
//!
//! A token's rank is its position: its bytes are `bytes[offsets[rank]..offsets[rank + 1]]` (empty
//! for a rank the vocabulary skips). `index` is an open-addressing hash table of ranks keyed by
//! the token's bytes, probed linearly from `hash(bytes) & (slots - 1)`; [`EMPTY`] ends a probe.

/// An index slot that holds no rank.
pub const EMPTY: u32 = u32::MAX;

/// FNV-1a, 64-bit: tokens are a few bytes long, where it is as good as any.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
