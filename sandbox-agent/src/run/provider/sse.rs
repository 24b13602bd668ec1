//! An incremental decoder of `text/event-stream` (server-sent events): bytes in, whole events out.
//!
//! Chunks may split anywhere (inside a line, between `\r` and `\n`, inside a UTF-8 sequence). Lines end
//! with `\n`, `\r\n` or `\r`; a blank line dispatches the event; `:` starts a comment; only `event` and
//! `data` fields matter to us (`id` and `retry` are ignored).

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if the event had one.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Turns a byte stream into [`SseEvent`]s.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a leading `\n` in the next chunk belongs to it.
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
    /// The very first line may start with a byte order mark.
    started: bool,
}

impl SseDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed a chunk; returns the events it completed, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &byte in chunk {
            if self.after_cr {
                self.after_cr = false;
                if byte == b'\n' {
                    continue;
                }
            }
            match byte {
                b'\n' => self.end_line(&mut out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut out);
                }
                _ => self.line.push(byte),
            }
        }
        out
    }

    /// The stream ended: an event still waiting for its blank line is dispatched too (recorded streams
    /// often lack the final separator).
    pub fn finish(&mut self) -> Option<SseEvent> {
        let mut out = Vec::new();
        if !self.line.is_empty() {
            self.end_line(&mut out);
        }
        self.dispatch(&mut out);
        out.pop()
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let raw = std::mem::take(&mut self.line);
        let mut line = String::from_utf8_lossy(&raw).into_owned();
        if !self.started {
            self.started = true;
            if let Some(rest) = line.strip_prefix('\u{feff}') {
                line = rest.to_owned();
            }
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if let Some(data) = self.data.take() {
            out.push(SseEvent { event, data });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_chunks(input: &[u8], chunk_len: usize) -> Vec<SseEvent> {
        let mut decoder = SseDecoder::new();
        let mut events = Vec::new();
        for chunk in input.chunks(chunk_len) {
            events.extend(decoder.feed(chunk));
        }
        events.extend(decoder.finish());
        events
    }

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
        }
    }

    #[test]
    fn fields_comments_and_multiline_data() {
        let input =
            b": comment\nevent: a\ndata: one\ndata:two\nid: 7\n\ndata: x\n\nevent: empty\n\n";
        let expected = vec![ev(Some("a"), "one\ntwo"), ev(None, "x")];
        assert_eq!(decode_in_chunks(input, input.len()), expected);
    }

    #[test]
    fn every_split_point_and_line_ending_gives_the_same_events() {
        let text = "event: a\ndata: {\"t\":\"h\u{e9}llo\"}\n\nevent: b\ndata: 2\n\n";
        let expected = vec![ev(Some("a"), "{\"t\":\"h\u{e9}llo\"}"), ev(Some("b"), "2")];
        for ending in ["\n", "\r\n", "\r"] {
            let input = text.replace('\n', ending);
            for chunk_len in 1..input.len() {
                assert_eq!(
                    decode_in_chunks(input.as_bytes(), chunk_len),
                    expected,
                    "ending {ending:?}, chunk length {chunk_len}"
                );
            }
        }
    }

    #[test]
    fn last_event_without_separator_is_dispatched_at_the_end() {
        assert_eq!(
            decode_in_chunks(b"event: end\ndata: z", 3),
            vec![ev(Some("end"), "z")]
        );
        assert_eq!(decode_in_chunks(b"event: only-name\n", 3), vec![]);
    }
}
