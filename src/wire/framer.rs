//! Framing of server responses, shared by the proxy's backend login and the sync client: where
//! a response ends, given lines and `{n}` literals. Pure: bytes in, lengths out.

/// Parses a literal announcement `{n}` or `{n+}` ending `line` (which excludes CR LF).
/// Returns the length and whether the literal is non-synchronizing.
pub fn literal_at_end(line: &[u8]) -> Option<(u64, bool)> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let body = line.strip_suffix(b"}")?;
    let (body, non_sync) = match body.strip_suffix(b"+") {
        Some(b) => (b, true),
        None => (body, false),
    };
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for d in digits {
        n = n * 10 + u64::from(d - b'0');
    }
    Some((n, non_sync))
}

/// Why a server's bytes cannot be framed within the reader's bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A literal larger than the configured cap.
    #[error("literal of {0} bytes exceeds the limit")]
    LiteralTooLarge(u64),
    /// A line without literal longer than the configured cap.
    #[error("response line too long")]
    LineTooLong,
}

/// Finds complete responses in a growing buffer without rescanning literals already skipped.
#[derive(Debug, Default)]
pub struct Framer {
    /// Offset from which to look for the next line end.
    scan: usize,
    /// Offset where the current line (after the last literal) starts.
    line_start: usize,
    /// Where the frame's first literal starts and its length.
    first_literal: Option<(usize, u64)>,
}

impl Framer {
    /// Bytes still missing from a literal being skipped, when `buf_len` bytes are buffered:
    /// lets the reader reserve a large literal once instead of growing (and copying) in steps.
    pub fn literal_missing(&self, buf_len: usize) -> usize {
        self.scan.saturating_sub(buf_len)
    }

    /// The literal being waited for, as (offset of its first byte, length), when it is the
    /// frame's first: the line before it is the whole response so far, which lets a reader
    /// take the rest of a large literal as it comes instead of holding it whole.
    pub fn open_literal(&self, buf_len: usize) -> Option<(usize, u64)> {
        // Still skipping it: the scan stops at its end until it has arrived.
        self.first_literal
            .filter(|&(start, n)| self.scan == start + n as usize && self.scan > buf_len)
    }

    /// Length of the first complete response in `buf` (including its final CRLF), if there is one.
    /// `max_literal` bounds each literal, `max_line` each line between literals.
    pub fn frame(
        &mut self,
        buf: &[u8],
        max_literal: u64,
        max_line: usize,
    ) -> Result<Option<usize>, FrameError> {
        loop {
            if self.scan > buf.len() {
                // The literal being skipped has not fully arrived yet.
                return Ok(None);
            }
            let Some(i) = memchr::memchr(b'\n', &buf[self.scan..]) else {
                if buf.len() - self.line_start > max_line {
                    return Err(FrameError::LineTooLong);
                }
                self.scan = buf.len();
                return Ok(None);
            };
            let end = self.scan + i;
            if end - self.line_start > max_line {
                return Err(FrameError::LineTooLong);
            }
            // `literal_at_end` strips the one `\r` itself (stripping here too took `{4}\r\r\n`
            // for a literal, which the parser then rejected).
            let line = &buf[self.line_start..end];
            match literal_at_end(line).map(|(n, _)| n) {
                Some(n) => {
                    if n > max_literal {
                        return Err(FrameError::LiteralTooLarge(n));
                    }
                    let next = end + 1 + n as usize;
                    self.first_literal.get_or_insert((end + 1, n));
                    self.scan = next;
                    self.line_start = next;
                }
                None => {
                    *self = Framer::default();
                    return Ok(Some(end + 1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_announcements() {
        assert_eq!(literal_at_end(b"* 1 FETCH (BODY[] {12}"), Some((12, false)));
        assert_eq!(literal_at_end(b"a APPEND x {3+}\r"), Some((3, true)));
        assert_eq!(literal_at_end(b"* OK {x}"), None);
        assert_eq!(literal_at_end(b"* OK {}"), None);
        assert_eq!(literal_at_end(b"* OK {99999999999999999999}"), None);
    }

    #[test]
    fn literal_cap_is_enforced() {
        let mut f = Framer::default();
        assert_eq!(
            f.frame(b"* 1 FETCH (BODY[] {999999}\r\n", 1000, 1000),
            Err(FrameError::LiteralTooLarge(999999))
        );
    }
}
