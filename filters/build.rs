//! Compiles the OpenAI tokenizers' vocabularies (o200k_base, cl100k_base, taken from tiktoken-rs)
//! into read-only tables the binary maps from its own file (layout: `src/limits/tokenizer/table.rs`).
//! Loading them at run time, as tiktoken-rs does, made 50 MiB of private heap in every sidecar;
//! mapped from the file they cost nothing until a prompt is measured, and the pages a sidecar does
//! touch are shared with every other sidecar on the node running the same image.

#[path = "src/limits/tokenizer/table.rs"]
mod table;

use std::collections::HashSet;
use std::path::Path;

use tiktoken_rs::CoreBPE;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/limits/tokenizer/table.rs");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let out = Path::new(&out);
    write_table(
        &tiktoken_rs::o200k_base().expect("o200k_base loads"),
        &out.join("o200k_base.table"),
    );
    write_table(
        &tiktoken_rs::cl100k_base().expect("cl100k_base loads"),
        &out.join("cl100k_base.table"),
    );
}

fn write_table(bpe: &CoreBPE, path: &Path) {
    let specials: HashSet<u32> = bpe
        .special_tokens()
        .into_iter()
        .flat_map(|special| bpe.encode_with_special_tokens(special))
        .collect();
    // Ordinary ranks are dense from 0 and end below the last special; past that, the first
    // rank that does not decode ends the vocabulary.
    let last_special = specials.iter().copied().max().unwrap_or(0);
    let mut tokens: Vec<Vec<u8>> = Vec::new();
    for rank in 0u32.. {
        let bytes = if specials.contains(&rank) {
            Vec::new()
        } else {
            match bpe.decode_bytes(&[rank]) {
                Ok(bytes) => bytes,
                Err(_) if rank > last_special => break,
                Err(_) => Vec::new(),
            }
        };
        tokens.push(bytes);
    }
    while tokens.last().is_some_and(Vec::is_empty) {
        tokens.pop();
    }

    // A power of two, at most half full, so probes stay short.
    let slots = (tokens.len() * 2).next_power_of_two();
    let mut index = vec![table::EMPTY; slots];
    for (rank, bytes) in tokens.iter().enumerate() {
        if bytes.is_empty() {
            continue;
        }
        let mut slot = table::hash(bytes) as usize & (slots - 1);
        while index[slot] != table::EMPTY {
            slot = (slot + 1) & (slots - 1);
        }
        index[slot] = rank as u32;
    }

    let mut out = Vec::new();
    let mut put = |value: usize| out.extend_from_slice(&(value as u32).to_le_bytes());
    put(tokens.len());
    put(slots);
    let mut offset = 0;
    put(offset);
    for bytes in &tokens {
        offset += bytes.len();
        put(offset);
    }
    for &rank in &index {
        put(rank as usize);
    }
    for bytes in &tokens {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).expect("OUT_DIR is writable");
}
