//! Just enough HTTP/1.1 to read one streamed response as it arrives: the head, then the body
//! through a decoder (chunked, `content-length` or until close) that hands out body bytes as
//! soon as they are in, so each read's arrival time stays with the bytes it brought.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("malformed response head")]
    MalformedHead,
    #[error("response head larger than 64 KiB")]
    HeadTooLarge,
    #[error("malformed chunk size line")]
    MalformedChunk,
}

/// The parts of a response head the client needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    UntilClose,
}

const MAX_HEAD: usize = 64 * 1024;

/// Parses a response head at the start of `buffer`: `Ok(None)` while it is incomplete,
/// otherwise the head and how many bytes it took.
pub fn parse_head(buffer: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let Some(end) = find(buffer, b"\r\n\r\n") else {
        return if buffer.len() > MAX_HEAD {
            Err(HttpError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    let text = std::str::from_utf8(&buffer[..end]).map_err(|_| HttpError::MalformedHead)?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().ok_or(HttpError::MalformedHead)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or(HttpError::MalformedHead)?;
    let mut framing = Framing::UntilClose;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(HttpError::MalformedHead)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            framing = Framing::Length(value.parse().map_err(|_| HttpError::MalformedHead)?);
        }
    }
    Ok(Some((Head { status, framing }, end + 4)))
}

/// Turns the bytes after the head into body bytes, whatever the framing.
pub struct BodyDecoder {
    framing: Framing,
    /// Received bytes not yet decoded (a partial chunk size line).
    raw: Vec<u8>,
    /// Body bytes still due in the current chunk (or in the whole body, for `Length`).
    left_in_chunk: u64,
    /// The CRLF after a chunk's data is still to be skipped.
    chunk_crlf_due: bool,
    done: bool,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        let left_in_chunk = match framing {
            Framing::Length(length) => length,
            _ => 0,
        };
        Self {
            framing,
            raw: Vec::new(),
            left_in_chunk,
            chunk_crlf_due: false,
            done: framing == Framing::Length(0),
        }
    }

    /// The body has ended (last chunk or all of `content-length` seen).
    pub fn done(&self) -> bool {
        self.done
    }

    /// Decodes `input`, appending body bytes to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), HttpError> {
        match self.framing {
            Framing::UntilClose => {
                out.extend_from_slice(input);
                Ok(())
            }
            Framing::Length(_) => {
                let take = input.len().min(self.left_in_chunk as usize);
                out.extend_from_slice(&input[..take]);
                self.left_in_chunk -= take as u64;
                self.done = self.left_in_chunk == 0;
                Ok(())
            }
            Framing::Chunked => {
                self.raw.extend_from_slice(input);
                self.decode_chunks(out)
            }
        }
    }

    fn decode_chunks(&mut self, out: &mut Vec<u8>) -> Result<(), HttpError> {
        let mut at = 0;
        while !self.done && at < self.raw.len() {
            if self.left_in_chunk > 0 {
                let take = (self.raw.len() - at).min(self.left_in_chunk as usize);
                out.extend_from_slice(&self.raw[at..at + take]);
                at += take;
                self.left_in_chunk -= take as u64;
                self.chunk_crlf_due = self.left_in_chunk == 0;
                continue;
            }
            if self.chunk_crlf_due {
                if self.raw.len() - at < 2 {
                    break;
                }
                if &self.raw[at..at + 2] != b"\r\n" {
                    return Err(HttpError::MalformedChunk);
                }
                at += 2;
                self.chunk_crlf_due = false;
                continue;
            }
            let Some(line_end) = find(&self.raw[at..], b"\r\n") else {
                break;
            };
            let line = std::str::from_utf8(&self.raw[at..at + line_end])
                .map_err(|_| HttpError::MalformedChunk)?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| HttpError::MalformedChunk)?;
            at += line_end + 2;
            if size == 0 {
                self.done = true; // trailers, if any, are not needed
            } else {
                self.left_in_chunk = size;
            }
        }
        self.raw.drain(..at);
        Ok(())
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_once_complete() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nrest";
        assert_eq!(parse_head(&head[..20]), Ok(None));
        let (parsed, used) = parse_head(head).unwrap().unwrap();
        assert_eq!(
            parsed,
            Head {
                status: 200,
                framing: Framing::Chunked
            }
        );
        assert_eq!(&head[used..], b"rest");
        let (parsed, _) = parse_head(b"HTTP/1.1 429 Too Many\r\nContent-Length: 12\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(parsed.status, 429);
        assert_eq!(parsed.framing, Framing::Length(12));
        assert_eq!(
            parse_head(b"nonsense\r\n\r\n"),
            Err(HttpError::MalformedHead)
        );
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for split in 0..wire.len() {
            let mut decoder = BodyDecoder::new(Framing::Chunked);
            let mut out = Vec::new();
            decoder.feed(&wire[..split], &mut out).unwrap();
            decoder.feed(&wire[split..], &mut out).unwrap();
            assert_eq!(out, b"hello, world", "split at {split}");
            assert!(decoder.done(), "split at {split}");
        }
        let mut decoder = BodyDecoder::new(Framing::Chunked);
        assert_eq!(
            decoder.feed(b"zz\r\n", &mut Vec::new()),
            Err(HttpError::MalformedChunk)
        );
    }

    #[test]
    fn length_bodies_end_at_their_length() {
        let mut decoder = BodyDecoder::new(Framing::Length(4));
        let mut out = Vec::new();
        decoder.feed(b"ab", &mut out).unwrap();
        assert!(!decoder.done());
        decoder.feed(b"cdEXTRA", &mut out).unwrap();
        assert!(decoder.done());
        assert_eq!(out, b"abcd");
    }
}
