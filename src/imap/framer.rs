//! Server→client response framing: knows, without parsing IMAP, whether the byte stream is
//! between two responses, so that a kick (`* BYE`) is never injected inside a line or literal.
//!
//! Pure: bytes in, positions out. The splice feeds every byte it forwards.

use crate::wire::framer::literal_at_end;

/// Longest tail of a line kept to recognise `{n+}` across reads: `{` + 19 digits + `+}\r`.
const TAIL: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the first byte of a response.
    Boundary,
    /// Inside a line.
    Line,
    /// Inside a literal with this many bytes left.
    Literal(u64),
}

/// The last bytes of a line seen so far, so that a literal announcement split across reads
/// is still recognised at the line's end. Shared by the response and command framers.
#[derive(Debug, Clone)]
pub(crate) struct LineTail {
    tail: [u8; TAIL],
    len: usize,
}

impl LineTail {
    pub(crate) fn new() -> Self {
        LineTail {
            tail: [0; TAIL],
            len: 0,
        }
    }

    /// Forgets the line (it ended).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// The literal announced at the end of the line whose last bytes in this read are
    /// `chunk` (the line's end, without LF): its length and whether it is non-synchronizing.
    pub(crate) fn line_ends(&self, chunk: &[u8]) -> Option<(u64, bool)> {
        if chunk.len() >= TAIL || self.len == 0 {
            return literal_at_end(chunk);
        }
        let mut joined = [0u8; 2 * TAIL];
        joined[..self.len].copy_from_slice(&self.tail[..self.len]);
        joined[self.len..self.len + chunk.len()].copy_from_slice(chunk);
        literal_at_end(&joined[..self.len + chunk.len()])
    }

    /// Keeps the end of `chunk`, a part of the current line without its end.
    pub(crate) fn remember(&mut self, chunk: &[u8]) {
        if chunk.len() >= TAIL {
            self.tail.copy_from_slice(&chunk[chunk.len() - TAIL..]);
            self.len = TAIL;
            return;
        }
        let keep = (TAIL - chunk.len()).min(self.len);
        self.tail.copy_within(self.len - keep..self.len, 0);
        self.tail[keep..keep + chunk.len()].copy_from_slice(chunk);
        self.len = keep + chunk.len();
    }
}

/// Tracks response boundaries in a server→client byte stream.
#[derive(Debug, Clone)]
pub struct ResponseFramer {
    state: State,
    tail: LineTail,
}

impl Default for ResponseFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseFramer {
    /// A framer positioned at the start of a response.
    pub fn new() -> Self {
        ResponseFramer {
            state: State::Boundary,
            tail: LineTail::new(),
        }
    }

    /// True when the next byte would start a new response.
    pub fn at_boundary(&self) -> bool {
        self.state == State::Boundary
    }

    /// Advances over all of `buf`.
    pub fn feed(&mut self, buf: &[u8]) {
        let mut pos = 0;
        while pos < buf.len() {
            pos += self.step(&buf[pos..]);
        }
    }

    /// Advances until the first response boundary inside `buf` and returns its offset
    /// (bytes `..offset` complete a response), or `None` if `buf` ends mid-response
    /// (all of it consumed). Returns `Some(0)` when already at a boundary.
    pub fn feed_to_boundary(&mut self, buf: &[u8]) -> Option<usize> {
        let mut pos = 0;
        loop {
            if self.state == State::Boundary {
                return Some(pos);
            }
            if pos == buf.len() {
                return None;
            }
            pos += self.step(&buf[pos..]);
        }
    }

    /// Consumes a prefix of `buf` (at least one byte) and returns its length.
    fn step(&mut self, buf: &[u8]) -> usize {
        match self.state {
            State::Literal(left) => {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let left = left - take as u64;
                self.state = if left == 0 {
                    State::Line
                } else {
                    State::Literal(left)
                };
                take
            }
            State::Boundary | State::Line => match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    let literal = self.tail.line_ends(&buf[..i]).map(|(n, _)| n);
                    self.tail.clear();
                    self.state = match literal {
                        Some(0) => State::Line,
                        Some(n) => State::Literal(n),
                        None => State::Boundary,
                    };
                    i + 1
                }
                None => {
                    self.tail.remember(buf);
                    self.state = State::Line;
                    buf.len()
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn boundaries(stream: &[u8], chunk: usize) -> Vec<usize> {
        let mut f = ResponseFramer::new();
        let mut out = Vec::new();
        let mut base = 0;
        for part in stream.chunks(chunk.max(1)) {
            let mut pos = 0;
            while pos < part.len() {
                match f.feed_to_boundary(&part[pos..]) {
                    Some(0) => {
                        // At a boundary: record it and consume one byte of the next response.
                        out.push(base + pos);
                        let mut one = f.clone();
                        one.feed(&part[pos..pos + 1]);
                        f = one;
                        pos += 1;
                    }
                    Some(n) => pos += n,
                    None => pos = part.len(),
                }
            }
            base += part.len();
        }
        if f.at_boundary() {
            out.push(base);
        }
        out
    }

    #[test]
    fn literal_contents_do_not_end_a_response() {
        let stream = b"* 1 FETCH (BODY[] {9}\r\nA OK x\r\n)\r\na OK done\r\n";
        assert_eq!(boundaries(stream, 1000), vec![0, 34, 45]);
        for chunk in 1..stream.len() {
            assert_eq!(boundaries(stream, chunk), vec![0, 34, 45], "chunk {chunk}");
        }
    }

    #[test]
    fn zero_length_literal_continues_the_line() {
        let stream = b"* 1 FETCH (BODY[] {0}\r\n)\r\n";
        assert_eq!(boundaries(stream, 4), vec![0, stream.len()]);
    }

    proptest! {
        #[test]
        fn chunking_never_changes_boundaries(
            parts in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..40), 0usize..3), 1..8),
            chunk in 1usize..50,
        ) {
            // Build a stream of responses: text lines (no LF) optionally carrying a literal.
            let mut stream = Vec::new();
            for (body, kind) in &parts {
                let text: Vec<u8> = body.iter().map(|b| if *b == b'\n' || *b == b'\r' { b'x' } else { *b }).collect();
                stream.extend_from_slice(b"* ");
                stream.extend_from_slice(&text);
                if kind % 2 == 1 {
                    stream.extend_from_slice(format!(" {{{}}}\r\n", body.len()).as_bytes());
                    stream.extend_from_slice(body);
                    stream.extend_from_slice(b")");
                }
                stream.extend_from_slice(b"\r\n");
            }
            prop_assert_eq!(boundaries(&stream, chunk), boundaries(&stream, stream.len()));
        }
    }
}
