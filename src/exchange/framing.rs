//! Whole events only: an event stream is forwarded up to its last complete event, and the
//! incomplete tail is held until the rest of it arrives. If the upstream breaks midway, the
//! tail is dropped and Sluice's error event starts on an event boundary, so the caller's SDK
//! parses a well-formed error instead of half an event run into it.

use bytes::{Bytes, BytesMut};

/// Past this, a tail without an event boundary is forwarded anyway: an upstream that never ends
/// an event must not make Sluice buffer its whole answer.
const MAX_HELD: usize = 256 * 1024;

/// The smallest event-stream frame: prelude (12 bytes) and message CRC (4 bytes).
const MIN_FRAME: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Server-sent events: an event ends at a blank line.
    Sse,
    /// AWS event stream (Bedrock): each frame starts with its total length.
    EventStream,
}

impl Framing {
    /// The framing of a response with this `Content-Type`, if it is an event stream.
    pub fn of(content_type: &[u8]) -> Option<Framing> {
        if content_type.starts_with(b"text/event-stream") {
            Some(Framing::Sse)
        } else if content_type.starts_with(b"application/vnd.amazon.eventstream") {
            Some(Framing::EventStream)
        } else {
            None
        }
    }

    /// How many bytes of `buffer` (which starts on an event boundary) are whole events.
    /// `from`: bytes before it were already found to hold no boundary of their own.
    fn complete_len(self, buffer: &[u8], from: usize) -> usize {
        match self {
            Framing::Sse => {
                // A blank line ends an event: `\n` right after `\n` or `\n\r`, or at the start
                // (the buffer begins on a boundary).
                let search = &buffer[from..];
                memchr::memrchr_iter(b'\n', search)
                    .map(|at| from + at)
                    .find(|&at| {
                        let before = &buffer[..at];
                        let before = before.strip_suffix(b"\r").unwrap_or(before);
                        before.is_empty() || before.ends_with(b"\n")
                    })
                    .map_or(0, |at| at + 1)
            }
            Framing::EventStream => {
                let mut end = 0;
                while let Some(prelude) = buffer.get(end..end + 4) {
                    let total = u32::from_be_bytes([prelude[0], prelude[1], prelude[2], prelude[3]])
                        as usize;
                    if total < MIN_FRAME {
                        // Not a frame: the framing is lost, so nothing is held back.
                        return buffer.len();
                    }
                    if buffer.len() - end < total {
                        break;
                    }
                    end += total;
                }
                end
            }
        }
    }
}

/// Splits a body into whole events as it arrives.
#[derive(Debug)]
pub struct EventFramer {
    framing: Framing,
    /// The incomplete event after the last boundary forwarded.
    tail: BytesMut,
}

impl EventFramer {
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            tail: BytesMut::new(),
        }
    }

    /// The whole events `chunk` completes (possibly empty). A chunk that ends on a boundary
    /// with nothing held — the usual case — comes back as it is, without a copy.
    pub fn push(&mut self, mut chunk: Bytes) -> Bytes {
        if self.tail.is_empty() {
            let end = self.framing.complete_len(&chunk, 0);
            if end == chunk.len() {
                return chunk;
            }
            let rest = chunk.split_off(end);
            self.hold(&rest);
            return chunk;
        }
        let searched = self.tail.len();
        self.tail.extend_from_slice(&chunk);
        // An SSE blank line may begin in the held bytes: look back at the last two.
        let from = match self.framing {
            Framing::Sse => searched.saturating_sub(2),
            Framing::EventStream => 0,
        };
        let end = self.framing.complete_len(&self.tail, from);
        let out = self.tail.split_to(end).freeze();
        if self.tail.len() > MAX_HELD {
            let mut all = BytesMut::from(&out[..]);
            all.extend_from_slice(&self.tail.split());
            return all.freeze();
        }
        out
    }

    fn hold(&mut self, rest: &[u8]) {
        self.tail.extend_from_slice(rest);
    }

    /// The bytes held after the upstream finished cleanly: forwarded as they are.
    pub fn finish(&mut self) -> Bytes {
        self.tail.split().freeze()
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Whether an incomplete event is held back (dropped when the stream breaks).
    pub fn holds_partial(&self) -> bool {
        !self.tail.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(framing: Framing, chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut framer = EventFramer::new(framing);
        let out = chunks
            .iter()
            .map(|c| framer.push(Bytes::copy_from_slice(c)).to_vec())
            .collect();
        (out, framer.finish().to_vec())
    }

    #[test]
    fn sse_forwards_whole_events_and_holds_the_rest() {
        let (out, tail) = run(
            Framing::Sse,
            &[
                b"data: {\"a\":1}\n\ndata: {\"cre",
                b"ated\":2}\n",
                b"\ndata: x\r\n\r\n",
                b": ping\n\n",
            ],
        );
        assert_eq!(
            out,
            [
                b"data: {\"a\":1}\n\n".to_vec(),
                Vec::new(),
                b"data: {\"created\":2}\n\ndata: x\r\n\r\n".to_vec(),
                b": ping\n\n".to_vec(),
            ]
        );
        assert!(tail.is_empty());
    }

    #[test]
    fn a_chunk_on_a_boundary_is_not_copied() {
        let mut framer = EventFramer::new(Framing::Sse);
        let chunk = Bytes::from_static(b"event: a\ndata: 1\n\n");
        let out = framer.push(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert!(!framer.holds_partial());
    }

    #[test]
    fn a_partial_event_is_held_until_the_end() {
        let mut framer = EventFramer::new(Framing::Sse);
        assert_eq!(&framer.push(Bytes::from_static(b"data: {\"cre"))[..], b"");
        assert!(framer.holds_partial());
        assert_eq!(&framer.push(Bytes::from_static(b"ated\":1}"))[..], b"");
        assert_eq!(&framer.finish()[..], b"data: {\"created\":1}");
    }

    #[test]
    fn an_endless_event_is_not_buffered_forever() {
        let mut framer = EventFramer::new(Framing::Sse);
        let _ = framer.push(Bytes::from_static(b"data: "));
        let big = Bytes::from(vec![b'x'; MAX_HELD + 1]);
        assert_eq!(framer.push(big).len(), MAX_HELD + 7);
        assert!(!framer.holds_partial());
    }

    #[test]
    fn event_stream_frames_are_split_on_their_lengths() {
        let frame = |n: u8| {
            let mut f = 20u32.to_be_bytes().to_vec();
            f.extend_from_slice(&[n; 16]);
            f
        };
        let (a, b) = (frame(1), frame(2));
        let mut joined = a.clone();
        joined.extend_from_slice(&b[..7]);
        let (out, tail) = run(Framing::EventStream, &[&joined, &b[7..9], &b[9..]]);
        assert_eq!(out, [a, Vec::new(), b]);
        assert!(tail.is_empty());
        // Not frames at all: nothing is held.
        let (out, _) = run(Framing::EventStream, &[b"\0\0\0\x01abc"]);
        assert_eq!(out, [b"\0\0\0\x01abc".to_vec()]);
    }
}
