//! The fuzz targets (`fuzz/src/lib.rs`) on stable Rust, in every `make test`: each replays its
//! seed corpus (`fuzz/corpus/<target>/`) and the inputs that once crashed it
//! (`fuzz/regressions/<target>/`), then runs a short, seeded mutation pass over the corpus.
//! `make harden` runs the same targets under libFuzzer, coverage-guided, for minutes each.
//!
//! `SLUICE_FUZZ_MUTATIONS` sets the mutations per target (default 3000).

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::{Path, PathBuf};

fn inputs(folder: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    files.sort();
    files
}

/// xorshift64*: a fixed seed, so a failing mutation is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that matter to the parsers under test, spliced in by the mutator.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\n",
    b"\r\n",
    b"data: ",
    b"\n\n",
    b"[DONE]",
    b"\"usage\"",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"\\u0000",
    b"\xff",
    b"_",
    b"${",
    b"}",
    b"transfer-encoding: ",
    b"chunked",
    b"connection: ",
    b"\t",
    b"  - ",
    b": &a",
    b"*a",
    b"!!binary",
    b"---",
    b"\x00",
];

fn mutate(rng: &mut Rng, input: &[u8], corpus: &[(PathBuf, Vec<u8>)]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(6) {
            0 if !out.is_empty() => {
                let end = (at + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            2 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            3 if !out.is_empty() => {
                // Duplicate a slice: repeated fields, nested depth.
                let start = rng.below(out.len());
                let end = (start + rng.below(64)).min(out.len());
                let piece = out[start..end].to_vec();
                out.splice(at..at, piece);
            }
            4 if !corpus.is_empty() => {
                // Splice in part of another input.
                let other = &corpus[rng.below(corpus.len())].1;
                let start = rng.below(other.len());
                let end = (start + rng.below(128)).min(other.len());
                out.splice(at..at, other[start..end].iter().copied());
            }
            _ => out.truncate(at),
        }
    }
    out
}

#[test]
fn fuzz_targets_hold_on_corpus_regressions_and_mutations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mutations: usize = std::env::var("SLUICE_FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    for (name, target) in targets::TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "{name} has a seed corpus");
        let regressions = inputs(&root.join("regressions").join(name));
        for (path, bytes) in corpus.iter().chain(&regressions) {
            let held = std::panic::catch_unwind(|| target(bytes));
            assert!(held.is_ok(), "{name} fails on {}", path.display());
        }
        let mut rng = Rng(0x5eed_0000 ^ name.len() as u64);
        for round in 0..mutations {
            let base = &corpus[round % corpus.len()].1;
            let input = mutate(&mut rng, base, &corpus);
            let held = std::panic::catch_unwind(|| target(&input));
            assert!(
                held.is_ok(),
                "{name} fails on mutation {round}: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
        eprintln!(
            "{name}: {} corpus, {} regressions, {mutations} mutations held",
            corpus.len(),
            regressions.len()
        );
    }
}
