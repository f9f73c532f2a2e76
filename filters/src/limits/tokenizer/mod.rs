//! Counting an OpenAI prompt's tokens exactly as tiktoken does, from vocabularies compiled into
//! the binary (`filters/build.rs`): o200k_base (GPT-4o, GPT-4.1, o-series, gpt-oss) and
//! cl100k_base (GPT-4, GPT-3.5, embeddings). The model → encoding mapping is tiktoken-rs's.
//!
//! Only the count is needed, so only the count is computed: the text is split into pieces by
//! the encoding's pattern, a piece that is itself a token counts one, and any other piece is
//! merged byte pair by byte pair, lowest rank first, as tiktoken's `byte_pair_merge` does. The
//! tables are read in place (no start-up work, no heap); `tests` checks every count against
//! tiktoken-rs itself.

mod table;

use std::sync::LazyLock;

use fancy_regex::Regex;
use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};

use super::estimate_from_bytes;

/// A vocabulary laid out as `table.rs` describes, borrowed from the binary's read-only data.
struct Vocabulary {
    offsets: &'static [u8],
    index: &'static [u8],
    slot_mask: usize,
    bytes: &'static [u8],
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at * 4..at * 4 + 4].try_into().expect("four bytes"))
}

impl Vocabulary {
    fn new(table: &'static [u8]) -> Self {
        let tokens = word(table, 0) as usize;
        let slots = word(table, 1) as usize;
        let (offsets, rest) = table[8..].split_at((tokens + 1) * 4);
        let (index, bytes) = rest.split_at(slots * 4);
        Self {
            offsets,
            index,
            slot_mask: slots - 1,
            bytes,
        }
    }

    fn token(&self, rank: u32) -> &'static [u8] {
        let rank = rank as usize;
        &self.bytes[word(self.offsets, rank) as usize..word(self.offsets, rank + 1) as usize]
    }

    /// The rank of the token spelled `piece`, if it is one.
    fn rank(&self, piece: &[u8]) -> Option<u32> {
        let mut slot = table::hash(piece) as usize & self.slot_mask;
        loop {
            let rank = word(self.index, slot);
            if rank == table::EMPTY {
                return None;
            }
            if self.token(rank) == piece {
                return Some(rank);
            }
            slot = (slot + 1) & self.slot_mask;
        }
    }
}

/// One encoding: its vocabulary and the pattern that splits text into pieces.
pub struct Encoding {
    vocabulary: Vocabulary,
    pieces: Regex,
}

/// tiktoken's own switch point: below it the quadratic merge is faster than the heap.
const LARGE_PIECE: usize = 100;

impl Encoding {
    fn new(table: &'static [u8], pattern: &str) -> Self {
        Self {
            vocabulary: Vocabulary::new(table),
            pieces: Regex::new(pattern).expect("tiktoken's pattern compiles"),
        }
    }

    /// Tokens in `text`, special-token spellings counted as ordinary text (as the provider counts
    /// a prompt).
    pub fn count(&self, text: &str) -> u64 {
        let (mut tokens, mut counted) = (0, 0);
        for piece in self.pieces.find_iter(text) {
            // The patterns have no construct that fails at match time short of fancy-regex's
            // backtracking limit; past such a failure the rest is estimated, never lost.
            let Ok(piece) = piece else {
                return tokens + estimate_from_bytes(text.len() - counted);
            };
            tokens += self.count_piece(piece.as_str().as_bytes()) as u64;
            counted = piece.end();
        }
        tokens
    }

    fn count_piece(&self, piece: &[u8]) -> usize {
        if piece.len() <= 1 || self.vocabulary.rank(piece).is_some() {
            piece.len().min(1)
        } else if piece.len() < LARGE_PIECE {
            self.merge_small(piece)
        } else {
            self.merge_large(piece)
        }
    }

    fn pair_rank(&self, piece: &[u8], start: usize, end: usize) -> u32 {
        self.vocabulary.rank(&piece[start..end]).unwrap_or(u32::MAX)
    }

    /// tiktoken's `_byte_pair_merge` on a stack array: `parts[i]` is a part's start and the rank
    /// of merging it with the next part. Returns the number of parts left.
    fn merge_small(&self, piece: &[u8]) -> usize {
        let mut parts = [(0usize, u32::MAX); LARGE_PIECE + 1];
        let mut len = piece.len() + 1;
        for (i, part) in parts[..len].iter_mut().enumerate() {
            let rank = if i + 2 <= piece.len() {
                self.pair_rank(piece, i, i + 2)
            } else {
                u32::MAX
            };
            *part = (i, rank);
        }
        // The rank of merging part i with part i + 1 once part i + 1 is gone.
        let rank_after = |parts: &[(usize, u32)], len: usize, i: usize| {
            if i + 3 < len {
                self.pair_rank(piece, parts[i].0, parts[i + 3].0)
            } else {
                u32::MAX
            }
        };
        loop {
            let Some((i, _)) = parts[..len - 1]
                .iter()
                .enumerate()
                .filter(|(_, part)| part.1 != u32::MAX)
                .min_by_key(|(i, part)| (part.1, *i))
            else {
                return len - 1;
            };
            if i > 0 {
                parts[i - 1].1 = rank_after(&parts, len, i - 1);
            }
            parts[i].1 = rank_after(&parts, len, i);
            parts.copy_within(i + 2..len, i + 1);
            len -= 1;
        }
    }

    /// tiktoken's `_byte_pair_merge_large`: a heap of candidate merges, O(n log n), for long
    /// pieces (a run of whitespace, a long word) where the quadratic merge would be slow.
    fn merge_large(&self, piece: &[u8]) -> usize {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;

        // Per start of a live part: where it ends, where the part after it ends, the rank of
        // merging the two (MAX: none), and the start of the part before it.
        struct Part {
            end: usize,
            next_end: usize,
            next_rank: u32,
            prev: usize,
        }
        let n = piece.len();
        let mut parts: Vec<Part> = (0..n)
            .map(|i| Part {
                end: i + 1,
                next_end: i + 2,
                next_rank: if i + 2 <= n {
                    self.pair_rank(piece, i, i + 2)
                } else {
                    u32::MAX
                },
                prev: i.wrapping_sub(1),
            })
            .collect();
        let mut heap: BinaryHeap<_> = parts
            .iter()
            .enumerate()
            .filter(|(_, part)| part.next_rank != u32::MAX)
            .map(|(i, part)| Reverse((part.next_rank, i)))
            .collect();
        let mut live = n;
        let candidate =
            |parts: &mut Vec<Part>, heap: &mut BinaryHeap<_>, start: usize, next_end: usize| {
                parts[start].next_end = next_end;
                parts[start].next_rank = u32::MAX;
                if next_end <= n {
                    let rank = self.pair_rank(piece, start, next_end);
                    if rank != u32::MAX {
                        parts[start].next_rank = rank;
                        heap.push(Reverse((rank, start)));
                    }
                }
            };
        while let Some(Reverse((rank, left))) = heap.pop() {
            if rank != parts[left].next_rank {
                continue; // superseded by a later merge
            }
            let right = parts[left].end;
            let right_end = parts[left].next_end;
            let right_next_end = parts[right].next_end;
            parts[left].end = right_end;
            candidate(&mut parts, &mut heap, left, right_next_end);
            if right_end < n {
                parts[right_end].prev = left;
            }
            if left > 0 {
                let prev = parts[left].prev;
                candidate(&mut parts, &mut heap, prev, right_end);
            }
            parts[right].next_rank = u32::MAX;
            live -= 1;
        }
        live
    }
}

static O200K_BASE: LazyLock<Encoding> = LazyLock::new(|| {
    Encoding::new(
        include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.table")),
        tiktoken_rs::O200K_BASE_PAT_STR,
    )
});

/// cl100k_base's pattern, as tiktoken-rs builds it (it keeps no constant for it).
const CL100K_BASE_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

static CL100K_BASE: LazyLock<Encoding> = LazyLock::new(|| {
    Encoding::new(
        include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_base.table")),
        CL100K_BASE_PATTERN,
    )
});

/// The encoding OpenAI counts `model`'s prompts in, if it is one compiled in. Models of the
/// retired completions era (p50k, r50k, gpt2 encodings) have none and are estimated from bytes.
pub fn encoding_for_model(model: &str) -> Option<&'static Encoding> {
    match get_tokenizer(model)? {
        Tokenizer::O200kBase | Tokenizer::O200kHarmony => Some(&O200K_BASE),
        Tokenizer::Cl100kBase => Some(&CL100K_BASE),
        Tokenizer::P50kBase | Tokenizer::R50kBase | Tokenizer::P50kEdit | Tokenizer::Gpt2 => None,
    }
}

/// Compiles the encodings' patterns (tens of milliseconds, more in a debug build) off the
/// request path, so the first request that measures a prompt does not wait.
pub fn warm_up_tokenizers() {
    std::thread::spawn(|| {
        LazyLock::force(&O200K_BASE);
        LazyLock::force(&CL100K_BASE);
    });
}

#[cfg(test)]
mod tests;
