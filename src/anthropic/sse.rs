//! Server-sent events framing (WHATWG): linear in the bytes received and
//! bounded in memory.
//!
//! A line ends with CRLF, LF or CR alone (a CR at the end of one read and an
//! LF at the start of the next are one line end); a blank line ends an
//! event; `data:` lines join with `\n`; `event:` names the event; `id:`,
//! `retry:` and comment lines (`:`) are read and ignored. Each byte is
//! scanned once: only new bytes are searched for line ends. One event
//! (its pending line plus its data) may not exceed the limit given.

use std::collections::VecDeque;

/// One complete event.
pub(crate) struct SseEvent {
    /// The `event:` field (empty for the default `message`).
    pub(crate) event: Vec<u8>,
    /// The `data:` lines joined with `\n`.
    pub(crate) data: Vec<u8>,
}

/// An event larger than the parser's limit.
#[derive(Debug)]
pub(crate) struct TooLarge;

pub(crate) struct SseParser {
    max_event: usize,
    line: Vec<u8>,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    skip_lf: bool,
    ready: VecDeque<SseEvent>,
}

impl SseParser {
    pub(crate) fn new(max_event: usize) -> Self {
        Self {
            max_event,
            line: Vec::new(),
            event: Vec::new(),
            data: Vec::new(),
            has_data: false,
            skip_lf: false,
            ready: VecDeque::new(),
        }
    }

    /// The largest event accepted.
    pub(crate) fn max_event(&self) -> usize {
        self.max_event
    }

    /// The next complete event, if one is ready.
    pub(crate) fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    /// Bytes held for an incomplete event.
    pub(crate) fn pending_bytes(&self) -> usize {
        self.line.len() + self.data.len() + self.event.len()
    }

    /// Reads `bytes`; complete events become available to
    /// [`next_event`](Self::next_event).
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(), TooLarge> {
        let mut rest = bytes;
        if self.skip_lf && !rest.is_empty() {
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
            self.skip_lf = false;
        }
        while let Some(i) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let (head, tail) = rest.split_at(i);
            if self.line.is_empty() {
                self.line_done(head)?;
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                let result = self.line_done(&line);
                self.line = line;
                self.line.clear();
                result?;
            }
            let cr = tail[0] == b'\r';
            rest = &tail[1..];
            if cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
        }
        self.line.extend_from_slice(rest);
        if self.pending_bytes() > self.max_event {
            return Err(TooLarge);
        }
        Ok(())
    }

    fn line_done(&mut self, line: &[u8]) -> Result<(), TooLarge> {
        if line.is_empty() {
            if self.has_data {
                self.ready.push_back(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            } else {
                self.event.clear();
            }
            self.has_data = false;
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            _ => {}
        }
        if self.pending_bytes() > self.max_event {
            return Err(TooLarge);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn events(parts: &[&[u8]]) -> Vec<(String, String)> {
        let mut p = SseParser::new(1 << 20);
        let mut out = Vec::new();
        for part in parts {
            p.feed(part).unwrap();
            while let Some(e) = p.next_event() {
                out.push((
                    String::from_utf8(e.event).unwrap(),
                    String::from_utf8(e.data).unwrap(),
                ));
            }
        }
        out
    }

    #[test]
    fn every_line_ending_and_field() {
        let text = b"event: a\r\ndata: 1\r\ndata:2\r\n\r\n: comment\nid: 7\nretry: 10\ndata: x\n\nevent: b\rdata: y\r\r";
        assert_eq!(
            events(&[text]),
            vec![
                ("a".into(), "1\n2".into()),
                (String::new(), "x".into()),
                ("b".into(), "y".into())
            ]
        );
        // A CR at the end of a read and the LF opening the next are one end.
        assert_eq!(
            events(&[b"data: 1\r", b"\n\r", b"\ndata: 2\n\n"]),
            vec![(String::new(), "1".into()), (String::new(), "2".into())]
        );
        // An event without data is not dispatched, and its name is dropped.
        assert_eq!(
            events(&[b"event: ping\n\ndata: z\n\n"]),
            vec![(String::new(), "z".into())]
        );
    }

    #[test]
    fn an_event_over_the_limit_is_refused_even_without_line_ends() {
        let mut p = SseParser::new(16);
        assert!(p.feed(b"data: 0123456789").is_ok());
        assert!(p.feed(b"abcdefgh").is_err());
        let mut p = SseParser::new(16);
        assert!(p.feed(b"data: 0123456789\ndata: 0123456789\n").is_err());
    }

    proptest! {
        #[test]
        fn any_split_of_the_bytes_gives_the_same_events(
            cuts in proptest::collection::vec(0usize..120, 0..8),
            crlf in any::<bool>(),
        ) {
            let nl: &str = if crlf { "\r\n" } else { "\n" };
            let text = format!(
                "event: message_start{nl}data: {{\"a\":1}}{nl}{nl}: keep-alive{nl}data: one{nl}data: two{nl}{nl}event: x\rdata: cr\r\r"
            );
            let bytes = text.as_bytes();
            let whole = events(&[bytes]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut parts: Vec<&[u8]> = Vec::new();
            let mut at = 0;
            for c in cuts {
                parts.push(&bytes[at..c]);
                at = c;
            }
            parts.push(&bytes[at..]);
            prop_assert_eq!(events(&parts), whole.clone());
            prop_assert_eq!(whole.len(), 3);
        }
    }
}
