//! Edits of one field of a JSON object that keep every other byte as the caller sent it.
//!
//! Rewriting a request (a model mapped for a fallback target, `max_tokens` clamped, usage asked
//! for) by parsing and re-serialising it would reorder keys, reformat numbers and strings and
//! drop duplicates: the provider would receive a body the caller never wrote. These functions
//! find the field's value by its byte span and splice only that.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::de::IgnoredAny;

/// The byte span of `key`'s value in the top-level object of `body` (the last one, if the key
/// appears twice — the one JSON parsers keep). `None` if `body` is not an object or lacks it.
pub fn field_span(body: &[u8], key: &str) -> Option<Range<usize>> {
    let mut found = None;
    for_each_field(body, |name, span| {
        if name == key {
            found = Some(span);
        }
    })?;
    found
}

/// `body` with `key` set to `value` (raw JSON): its value replaced where it is, or the field
/// appended at the end of the object. `None` if `body` is not a JSON object.
pub fn with_field(body: &[u8], key: &str, value: &[u8]) -> Option<Bytes> {
    let mut found = None;
    let end = for_each_field(body, |name, span| {
        if name == key {
            found = Some(span);
        }
    })?;
    let mut out = BytesMut::with_capacity(body.len() + key.len() + value.len() + 4);
    match found {
        Some(span) => {
            out.extend_from_slice(&body[..span.start]);
            out.extend_from_slice(value);
            out.extend_from_slice(&body[span.end..]);
        }
        None => {
            // `end` is the closing brace; a comma is needed after any earlier field.
            let before = body[..end].trim_ascii_end();
            out.extend_from_slice(&body[..end]);
            if !before.ends_with(b"{") {
                out.extend_from_slice(b",");
            }
            out.extend_from_slice(&serde_json::to_vec(key).ok()?);
            out.extend_from_slice(b":");
            out.extend_from_slice(value);
            out.extend_from_slice(&body[end..]);
        }
    }
    Some(out.freeze())
}

/// `body` with `key` set to the string `value`.
pub fn with_string_field(body: &[u8], key: &str, value: &str) -> Option<Bytes> {
    with_field(body, key, &serde_json::to_vec(value).ok()?)
}

/// Calls `visit` with each top-level field's name and value span; returns the offset of the
/// object's closing brace, or `None` if `body` is not one well-formed JSON object.
fn for_each_field(body: &[u8], mut visit: impl FnMut(&str, Range<usize>)) -> Option<usize> {
    let mut at = skip_whitespace(body, 0);
    if body.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_whitespace(body, at + 1);
    if body.get(at) == Some(&b'}') {
        return trailing_is_empty(body, at + 1).then_some(at);
    }
    loop {
        let (name, after_name) = parse_one::<std::borrow::Cow<str>>(body, at)?;
        at = skip_whitespace(body, after_name);
        if body.get(at) != Some(&b':') {
            return None;
        }
        let start = skip_whitespace(body, at + 1);
        let (_, end) = parse_one::<IgnoredAny>(body, start)?;
        visit(&name, start..end);
        at = skip_whitespace(body, end);
        match body.get(at) {
            Some(b',') => at = skip_whitespace(body, at + 1),
            Some(b'}') => return trailing_is_empty(body, at + 1).then_some(at),
            _ => return None,
        }
    }
}

/// One JSON value starting at `at`, and the offset just past it.
fn parse_one<'de, T: serde::Deserialize<'de>>(body: &'de [u8], at: usize) -> Option<(T, usize)> {
    let mut values = serde_json::Deserializer::from_slice(body.get(at..)?).into_iter::<T>();
    let value = values.next()?.ok()?;
    Some((value, at + values.byte_offset()))
}

fn skip_whitespace(body: &[u8], mut at: usize) -> usize {
    while body.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

fn trailing_is_empty(body: &[u8], at: usize) -> bool {
    skip_whitespace(body, at) == body.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_replaced_in_place() {
        let body = br#"{ "z": 1.50, "model" : "gpt-4o", "messages":[{"content":"model"}] }"#;
        let edited = with_string_field(body, "model", "gpt-4o-mini").unwrap();
        assert_eq!(
            &edited[..],
            br#"{ "z": 1.50, "model" : "gpt-4o-mini", "messages":[{"content":"model"}] }"#
        );
    }

    #[test]
    fn a_missing_field_is_appended() {
        assert_eq!(
            &with_field(br#"{"a":[1,{"b":2}]}"#, "c", b"true").unwrap()[..],
            br#"{"a":[1,{"b":2}],"c":true}"#
        );
        assert_eq!(
            &with_field(b" { } ", "c", b"1").unwrap()[..],
            br#" { "c":1} "#
        );
    }

    #[test]
    fn spans_cover_whole_values_of_every_kind() {
        let body = br#"{"n":-1.5e3,"s":"a\"b","o":{"x":[1,2]},"t":true,"z":null}"#;
        let text = |key| field_span(body, key).map(|span| &body[span]);
        assert_eq!(text("n"), Some(&b"-1.5e3"[..]));
        assert_eq!(text("s"), Some(&br#""a\"b""#[..]));
        assert_eq!(text("o"), Some(&br#"{"x":[1,2]}"#[..]));
        assert_eq!(text("t"), Some(&b"true"[..]));
        assert_eq!(text("z"), Some(&b"null"[..]));
        assert_eq!(text("missing"), None);
    }

    #[test]
    fn escaped_key_names_are_compared_decoded() {
        let body = br#"{"mod\u0065l":"a"}"#;
        assert_eq!(
            &with_string_field(body, "model", "b").unwrap()[..],
            br#"{"mod\u0065l":"b"}"#
        );
    }

    #[test]
    fn the_last_of_duplicate_keys_is_the_one_edited() {
        let body = br#"{"model":"a","model":"b"}"#;
        assert_eq!(
            &with_string_field(body, "model", "c").unwrap()[..],
            br#"{"model":"a","model":"c"}"#
        );
    }

    #[test]
    fn anything_but_one_object_is_refused() {
        for body in [
            &b""[..],
            b"[]",
            b"{",
            br#"{"a":1"#,
            br#"{"a":1,}"#,
            br#"{"a" 1}"#,
            br#"{"a":1} x"#,
            br#"{a:1}"#,
        ] {
            assert_eq!(with_field(body, "a", b"2"), None, "{body:?}");
        }
    }
}
