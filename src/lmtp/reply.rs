//! SMTP/LMTP replies (RFC 5321 §4.2), pure: the type, its encoding, and a parser for the
//! replies a backend sends, bounded in size.

use std::fmt;

use bytes::{Buf, BytesMut};

/// One reply: a three-digit code and one or more text lines (the text of each line excludes
/// the code and the separator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 200–599.
    pub code: u16,
    /// Text lines, at least one (possibly empty); never holding CR or LF.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply; `text` usually starts with an enhanced status code.
    pub fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            lines: vec![sanitize(&text.into())],
        }
    }

    /// 2xx: the command (or, after DATA, the delivery to this recipient) succeeded.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: permanent failure.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// Appends the wire form (`250-a\r\n250 b\r\n`).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map_or("", String::as_str);
            let sep = if i + 1 == n { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{}{}\r\n", self.code, sep, text).as_bytes());
        }
    }

    /// The wire form as a vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

/// Replaces control characters, so text taken from elsewhere cannot break reply framing.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A reply that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// A line does not start with a code in 200–599 and a separator.
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    /// Lines of one multi-line reply carry different codes.
    #[error("multi-line reply changes code from {0} to {1}")]
    CodeChanged(u16, u16),
    /// The reply is longer than allowed.
    #[error("reply longer than {0} bytes")]
    TooLong(usize),
}

/// Parses one complete reply from the front of `buf` and consumes it; `Ok(None)` when more
/// input is needed. Lines may end in CRLF or LF. A reply larger than `max` is an error, so a
/// misbehaving backend cannot make the proxy buffer without bound.
pub fn parse_reply(buf: &mut BytesMut, max: usize) -> Result<Option<Reply>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) else {
            if buf.len() > max {
                return Err(ReplyError::TooLong(max));
            }
            return Ok(None);
        };
        let end = pos + nl;
        if end + 1 > max {
            return Err(ReplyError::TooLong(max));
        }
        let raw = &buf[pos..end];
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = String::from_utf8_lossy(line);
        let malformed = || ReplyError::Malformed(text.chars().take(80).collect());
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(malformed());
        }
        let c =
            (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
        if !(200..600).contains(&c) {
            return Err(malformed());
        }
        if let Some(prev) = code {
            if prev != c {
                return Err(ReplyError::CodeChanged(prev, c));
            }
        }
        code = Some(c);
        let (last, rest) = match line.get(3) {
            None => (true, ""),
            Some(b' ') => (true, text.get(4..).unwrap_or("")),
            Some(b'-') => (false, text.get(4..).unwrap_or("")),
            Some(_) => return Err(malformed()),
        };
        lines.push(sanitize(rest));
        pos = end + 1;
        if last {
            buf.advance(pos);
            return Ok(Some(Reply { code: c, lines }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_and_partial() {
        let mut b = BytesMut::from(&b"250-a\r\n250-PIPELINING\r\n250 SIZE"[..]);
        assert_eq!(parse_reply(&mut b, 512), Ok(None));
        b.extend_from_slice(b"\r\n354 go\r\n");
        let r = parse_reply(&mut b, 512).unwrap().unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.lines, vec!["a", "PIPELINING", "SIZE"]);
        assert_eq!(r.to_bytes(), b"250-a\r\n250-PIPELINING\r\n250 SIZE\r\n");
        let r = parse_reply(&mut b, 512).unwrap().unwrap();
        assert_eq!((r.code, r.lines[0].as_str()), (354, "go"));
        assert!(b.is_empty());
    }

    #[test]
    fn bad_replies() {
        for bad in [
            &b"hello\r\n"[..],
            b"25\r\n",
            b"250xok\r\n",
            b"999 x\r\n",
            b"250-a\r\n251 b\r\n",
        ] {
            let mut b = BytesMut::from(bad);
            assert!(parse_reply(&mut b, 512).is_err(), "{bad:?}");
        }
        let mut b = BytesMut::from(&[b'2'; 600][..]);
        assert_eq!(parse_reply(&mut b, 512), Err(ReplyError::TooLong(512)));
    }

    #[test]
    fn text_cannot_inject_lines() {
        let r = Reply::new(451, "4.4.2 a\r\n250 b");
        assert_eq!(r.to_bytes(), b"451 4.4.2 a  250 b\r\n");
    }
}
