//! AWS event-stream framing (`application/vnd.amazon.eventstream`), the binary stream format of
//! Bedrock's ConverseStream and InvokeModelWithResponseStream.
//!
//! A message is a 12-byte prelude (total length, headers length, CRC32 of those 8 bytes), the
//! headers, the payload, and a CRC32 of everything before it. Parsing and writing one message
//! is AWS's own code (`aws-smithy-eventstream`: one small crate over `aws-smithy-types`, which
//! `aws-sigv4` brings anyway): CRCs verified, header types handled. What it leaves to its user is
//! the framing over a stream that arrives in arbitrary chunks, and a bound on what may be
//! buffered; that is [`FrameDecoder`].

use aws_smithy_eventstream::frame::{read_message_from, write_message_to};
pub use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::{Bytes, BytesMut};

/// Total length, headers length, prelude CRC.
const PRELUDE_LEN: usize = 12;
/// A prelude and a message CRC, with no headers and no payload.
const MIN_MESSAGE_LEN: usize = 16;
/// AWS's own upper bound for one message.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("an event-stream prelude's checksum does not match")]
    PreludeChecksum,
    #[error("an event-stream message declares {0} bytes, outside {MIN_MESSAGE_LEN}..={1}")]
    Length(usize, usize),
    #[error("invalid event-stream message: {0}")]
    Message(#[from] aws_smithy_eventstream::error::Error),
}

/// Decodes messages from a stream fed chunk by chunk, whatever the chunk boundaries. Whole
/// messages are read straight from the chunk; only a message split across chunks is copied.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    /// The start of a message whose end has not arrived yet.
    pending: BytesMut,
    max_message: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_MESSAGE_LEN)
    }
}

impl FrameDecoder {
    /// `max_message` bounds what one message may make the decoder hold.
    pub fn new(max_message: usize) -> Self {
        Self {
            pending: BytesMut::new(),
            max_message: max_message.clamp(MIN_MESSAGE_LEN, MAX_MESSAGE_LEN),
        }
    }

    /// Feeds the next chunk; `on_message` gets each message it completes, in order. After an
    /// error the stream cannot be resynchronised: the decoder should be dropped.
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        mut on_message: impl FnMut(Message),
    ) -> Result<(), DecodeError> {
        while !chunk.is_empty() {
            if self.pending.is_empty() {
                match self.message_len(chunk)? {
                    Some(len) if chunk.len() >= len => {
                        on_message(read_message_from(&chunk[..len])?);
                        chunk = &chunk[len..];
                    }
                    _ => {
                        self.pending.extend_from_slice(chunk);
                        return Ok(());
                    }
                }
                continue;
            }
            // Complete the prelude first, then the message it announces.
            let wanted = match self.message_len(&self.pending)? {
                Some(len) => len - self.pending.len(),
                None => PRELUDE_LEN - self.pending.len(),
            };
            let (now, later) = chunk.split_at(wanted.min(chunk.len()));
            self.pending.extend_from_slice(now);
            chunk = later;
            if let Some(len) = self.message_len(&self.pending)? {
                if self.pending.len() == len {
                    let message = self.pending.split().freeze();
                    on_message(read_message_from(message)?);
                }
            }
        }
        Ok(())
    }

    /// Bytes held for a message not yet complete.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The length of the message starting at `bytes[0]`, once its prelude is there and checks
    /// out: a corrupt or oversized length is refused before anything is buffered for it.
    fn message_len(&self, bytes: &[u8]) -> Result<Option<usize>, DecodeError> {
        let Some(prelude) = bytes.get(..PRELUDE_LEN) else {
            return Ok(None);
        };
        let word = |at: usize| {
            u32::from_be_bytes([
                prelude[at],
                prelude[at + 1],
                prelude[at + 2],
                prelude[at + 3],
            ])
        };
        if crc32fast::hash(&prelude[..8]) != word(8) {
            return Err(DecodeError::PreludeChecksum);
        }
        let len = word(0) as usize;
        if !(MIN_MESSAGE_LEN..=self.max_message).contains(&len) {
            return Err(DecodeError::Length(len, self.max_message));
        }
        Ok(Some(len))
    }
}

/// The value of a string header, if the message has it.
pub fn header<'m>(message: &'m Message, name: &str) -> Option<&'m str> {
    message
        .headers()
        .iter()
        .find(|header| header.name().as_str() == name)
        .and_then(|header| header.value().as_string().ok())
        .map(|value| value.as_str())
}

/// One message with string headers, as bytes on the wire.
pub fn encode(headers: &[(&'static str, &str)], payload: Bytes) -> Result<Bytes, EncodeError> {
    let message = headers
        .iter()
        .fold(Message::new(payload), |message, (name, value)| {
            message.add_header(Header::new(
                *name,
                HeaderValue::String(value.to_string().into()),
            ))
        });
    let mut out = BytesMut::new();
    write_message_to(&message, &mut out).map_err(EncodeError)?;
    Ok(out.freeze())
}

/// A header or payload beyond what a message can carry.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode an event-stream message: {0}")]
pub struct EncodeError(aws_smithy_eventstream::error::Error);

/// The exception message that ends a stream with an error: `:message-type: exception` and the
/// name of the exception's member in the operation's event union (`throttlingException`), which
/// is what AWS SDKs look up to raise the modelled error.
pub fn exception(exception_type: &str, json: Bytes) -> Result<Bytes, EncodeError> {
    encode(
        &[
            (":message-type", "exception"),
            (":exception-type", exception_type),
            (":content-type", "application/json"),
        ],
        json,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, payload: &str) -> Bytes {
        encode(
            &[
                (":message-type", "event"),
                (":event-type", kind),
                (":content-type", "application/json"),
            ],
            Bytes::from(payload.to_owned()),
        )
        .unwrap()
    }

    fn decode_all(
        decoder: &mut FrameDecoder,
        chunks: &[&[u8]],
    ) -> Result<Vec<Message>, DecodeError> {
        let mut messages = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk, |m| messages.push(m))?;
        }
        Ok(messages)
    }

    #[test]
    fn a_message_round_trips() {
        let bytes = event("metadata", r#"{"usage":{"inputTokens":3}}"#);
        // Prelude: total length and CRC as the format defines them.
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        let messages = decode_all(&mut FrameDecoder::default(), &[&bytes]).unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(header(&messages[0], ":event-type"), Some("metadata"));
        assert_eq!(header(&messages[0], ":message-type"), Some("event"));
        assert_eq!(header(&messages[0], ":nope"), None);
        assert_eq!(
            &messages[0].payload()[..],
            br#"{"usage":{"inputTokens":3}}"#
        );
    }

    #[test]
    fn messages_split_at_every_byte_boundary_decode_the_same() {
        let stream: Vec<u8> = [event("a", "{}"), event("b", r#"{"x":1}"#), event("c", "")].concat();
        for split in 0..=stream.len() {
            let mut decoder = FrameDecoder::default();
            let (one, two) = stream.split_at(split);
            let names: Vec<String> = decode_all(&mut decoder, &[one, two])
                .unwrap()
                .iter()
                .map(|m| header(m, ":event-type").unwrap().to_owned())
                .collect();
            assert_eq!(names, ["a", "b", "c"], "split at {split}");
            assert_eq!(decoder.pending(), 0);
        }
        // One byte at a time.
        let mut decoder = FrameDecoder::default();
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(decode_all(&mut decoder, &bytes).unwrap().len(), 3);
    }

    #[test]
    fn a_corrupt_message_is_refused() {
        let good = event("a", r#"{"x":1}"#);
        let mut payload_flipped = good.to_vec();
        let last_payload_byte = payload_flipped.len() - 5;
        payload_flipped[last_payload_byte] ^= 1;
        let error = decode_all(&mut FrameDecoder::default(), &[&payload_flipped]).unwrap_err();
        assert!(matches!(error, DecodeError::Message(_)), "{error}");

        let mut length_flipped = good.to_vec();
        length_flipped[3] ^= 0x10;
        let error = decode_all(&mut FrameDecoder::default(), &[&length_flipped]).unwrap_err();
        assert!(matches!(error, DecodeError::PreludeChecksum), "{error}");
    }

    #[test]
    fn an_oversized_message_is_refused_before_it_is_buffered() {
        let big = event("a", &"x".repeat(2000));
        let mut decoder = FrameDecoder::new(1024);
        let error = decode_all(&mut decoder, &[&big[..100]]).unwrap_err();
        assert!(matches!(error, DecodeError::Length(_, 1024)), "{error}");
    }

    #[test]
    fn exceptions_carry_their_type() {
        let bytes = exception(
            "throttlingException",
            Bytes::from_static(br#"{"message":"slow down"}"#),
        )
        .unwrap();
        let messages = decode_all(&mut FrameDecoder::default(), &[&bytes]).unwrap();
        assert_eq!(header(&messages[0], ":message-type"), Some("exception"));
        assert_eq!(
            header(&messages[0], ":exception-type"),
            Some("throttlingException")
        );
    }
}
