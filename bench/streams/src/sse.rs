//! Splits a body into SSE events as bytes come in, reading the mock's send stamp
//! (`: sent_ns=<ns>`) from each.

/// One complete event.
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    pub sent_ns: Option<u64>,
}

#[derive(Default)]
pub struct EventSplitter {
    pending: Vec<u8>,
    done: bool,
}

const STAMP: &[u8] = b": sent_ns=";

impl EventSplitter {
    /// Adds body bytes; returns the events they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(end) = crate::http::find(&self.pending[start..], b"\n\n") {
            let event = &self.pending[start..start + end];
            let mut sent_ns = None;
            for line in event.split(|&b| b == b'\n') {
                if let Some(stamp) = line.strip_prefix(STAMP) {
                    sent_ns = std::str::from_utf8(stamp).ok().and_then(|s| s.parse().ok());
                } else if line == b"data: [DONE]" {
                    self.done = true;
                }
            }
            events.push(Event { sent_ns });
            start += end + 2;
        }
        self.pending.drain(..start);
        events
    }

    /// `data: [DONE]` has been seen.
    pub fn saw_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_complete_only_at_their_blank_line() {
        let mut splitter = EventSplitter::default();
        assert!(splitter.push(b": sent_ns=5\ndata: {\"a\"").is_empty());
        let events = splitter.push(b":1}\n\n: sent_ns=7\ndata: [DONE]\n");
        assert_eq!(events, vec![Event { sent_ns: Some(5) }]);
        assert!(!splitter.saw_done());
        assert_eq!(splitter.push(b"\n"), vec![Event { sent_ns: Some(7) }]);
        assert!(splitter.saw_done());
        assert_eq!(splitter.push(b"data: x\n\n"), vec![Event { sent_ns: None }]);
    }
}
