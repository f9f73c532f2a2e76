//! Every count checked against tiktoken-rs, the reference the tables were built from.

use proptest::prelude::*;
use tiktoken_rs::CoreBPE;

use super::*;

fn reference(model: &str) -> &'static CoreBPE {
    match get_tokenizer(model).unwrap() {
        Tokenizer::O200kBase => tiktoken_rs::o200k_base_singleton(),
        Tokenizer::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        other => panic!("no reference for {other:?}"),
    }
}

const MODELS: [&str; 2] = ["gpt-4o", "gpt-4"];

fn assert_same(text: &str) {
    for model in MODELS {
        let expected = reference(model).encode_ordinary(text).len() as u64;
        let counted = encoding_for_model(model).unwrap().count(text);
        assert_eq!(counted, expected, "{model}: {text:?}");
    }
}

#[test]
fn known_texts_count_as_tiktoken_counts_them() {
    let texts = [
        "",
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog. It's 12:30 — isn't it?",
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n\n\n",
        "日本語のテキストと中文文本，还有한국어.",
        "emoji 🦀🚀👩‍👩‍👧‍👦 and accents: café naïve Ångström",
        "<|endoftext|> is ordinary text here <|endofprompt|>",
        "   leading and trailing spaces   \t\r\n",
        "1234567890 3.14159 -42 1e10 0xdeadbeef",
        "SGVsbG8gd29ybGQhIFRoaXMgaXMgYmFzZTY0IGVuY29kZWQgZGF0YQ==",
    ];
    for text in texts {
        assert_same(text);
    }
}

#[test]
fn long_pieces_take_the_heap_merge_and_agree() {
    // Each is one piece of at least 100 bytes, which neither is a token nor merges small.
    for text in [
        " ".repeat(1000),
        "a".repeat(257),
        "abcdefghij".repeat(40),
        "Pneumonoultramicroscopicsilicovolcanoconiosis".repeat(5),
        "\n".repeat(300),
        "ありがとう".repeat(30),
    ] {
        assert_same(&text);
    }
}

#[test]
fn retired_encodings_and_unknown_models_have_no_encoding() {
    assert!(encoding_for_model("text-davinci-003").is_none());
    assert!(encoding_for_model("claude-sonnet-4").is_none());
    assert!(encoding_for_model("gpt-4o-mini").is_some());
    assert!(encoding_for_model("gpt-oss-120b").is_some());
    assert!(encoding_for_model("gpt-3.5-turbo").is_some());
}

#[test]
fn every_token_is_found_at_its_rank() {
    for (encoding, reference) in [
        (&*O200K_BASE, tiktoken_rs::o200k_base_singleton()),
        (&*CL100K_BASE, tiktoken_rs::cl100k_base_singleton()),
    ] {
        let vocabulary = &encoding.vocabulary;
        let mut found = 0;
        for rank in 0..(vocabulary.offsets.len() / 4 - 1) as u32 {
            let token = vocabulary.token(rank);
            if token.is_empty() {
                continue;
            }
            assert_eq!(reference.decode_bytes(&[rank]).unwrap(), token);
            assert_eq!(vocabulary.rank(token), Some(rank));
            found += 1;
        }
        assert!(found > 100_000, "{found} tokens");
    }
}

fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z]{1,12}",
        "[a-z]{90,300}",
        "[ \t\r\n]{1,8}",
        " {100,200}",
        "[0-9]{1,9}",
        "[[:punct:]]{1,4}",
        "'(s|t|re|ve|m|ll|d|S|LL)",
        "[\u{4e00}-\u{4e80}\u{3040}-\u{30ff}\u{ac00}-\u{ac40}]{1,6}",
        "[\u{1f300}-\u{1f64f}\u{200d}]{1,3}",
        "[àéîõüßÅÇ]{1,5}",
        ".{1,6}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn generated_texts_count_as_tiktoken_counts_them(
        parts in proptest::collection::vec(fragment(), 1..24)
    ) {
        assert_same(&parts.concat());
    }
}

#[test]
fn a_pattern_that_gives_up_leaves_the_rest_estimated() {
    let table = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.table"));
    let gives_up = Encoding {
        vocabulary: Vocabulary::new(table),
        pieces: fancy_regex::RegexBuilder::new(tiktoken_rs::O200K_BASE_PAT_STR)
            .backtrack_limit(1)
            .build()
            .unwrap(),
    };
    // "Hello" is one token; the run of spaces before a word makes the lookahead backtrack.
    let text = format!("Hello{}world", " ".repeat(40));
    assert_eq!(
        gives_up.count(&text),
        1 + estimate_from_bytes(text.len() - 5)
    );
}
