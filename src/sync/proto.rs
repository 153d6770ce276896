//! Server→client IMAP responses for the sync client: a small tokenizer into a generic value
//! tree, over frames found by `wire::framer`. Pure: bytes in, responses out; no I/O.
//!
//! Why not imap-codec's `ResponseCodec` here: it cannot parse a MULTIAPPEND `APPENDUID` UID set,
//! `ESEARCH` or LIST-EXTENDED data, all of which the sync engine uses. A generic tree is enough
//! because the sync client only ever reads a handful of response kinds.

use bytes::Bytes;

use crate::wire::framer::FrameError;

/// A response the sync client cannot read: unframeable within its bounds, or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Too long a line or literal.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Bytes that are not an IMAP response.
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// One token of a response: IMAP's data model without the distinctions the sync engine never needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// An atom or number, e.g. `FLAGS`, `\Seen`, `BODY[]`, `42`, `1:5,7`.
    Atom(Bytes),
    /// A quoted string (unescaped) or a literal.
    Str(Bytes),
    /// A parenthesized list.
    List(Vec<Value>),
    /// `NIL`.
    Nil,
}

impl Value {
    /// Bytes of an atom or string.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Atom(b) | Value::Str(b) => Some(b),
            _ => None,
        }
    }

    /// The owned bytes of an atom or string (cheap: shares the response buffer).
    pub fn to_bytes(&self) -> Option<Bytes> {
        match self {
            Value::Atom(b) | Value::Str(b) => Some(b.clone()),
            _ => None,
        }
    }

    /// An atom or string as UTF-8 text.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    /// A number.
    pub fn number(&self) -> Option<u64> {
        match self {
            Value::Atom(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// Items of a list.
    pub fn list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    /// Whether this is the atom `name` (case-insensitive).
    pub fn is_atom(&self, name: &str) -> bool {
        matches!(self, Value::Atom(b) if b.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// Status of a tagged or untagged condition response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// OK
    Ok,
    /// NO
    No,
    /// BAD
    Bad,
    /// BYE
    Bye,
    /// PREAUTH
    PreAuth,
}

impl Status {
    fn parse(word: &[u8]) -> Option<Status> {
        Some(match word.to_ascii_uppercase().as_slice() {
            b"OK" => Status::Ok,
            b"NO" => Status::No,
            b"BAD" => Status::Bad,
            b"BYE" => Status::Bye,
            b"PREAUTH" => Status::PreAuth,
            _ => return None,
        })
    }
}

/// A status response's `[CODE args]` and human text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusText {
    /// The response code, as tokens (`[APPENDUID 5 7:9]` → `APPENDUID`, `5`, `7:9`).
    pub code: Vec<Value>,
    /// The text after the code.
    pub text: String,
}

impl StatusText {
    /// The code's name, upper-cased (empty if there is none).
    pub fn code_name(&self) -> String {
        self.code
            .first()
            .and_then(Value::text)
            .map(str::to_ascii_uppercase)
            .unwrap_or_default()
    }

    /// The code argument after its name, as a number.
    pub fn code_number(&self, index: usize) -> Option<u64> {
        self.code.get(index + 1)?.number()
    }
}

/// One complete server response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `TAG OK|NO|BAD [code] text`.
    Tagged {
        /// The tag.
        tag: Bytes,
        /// OK, NO or BAD.
        status: Status,
        /// Code and text.
        info: StatusText,
    },
    /// `* OK|NO|BAD|BYE|PREAUTH [code] text`.
    Condition {
        /// The status word.
        status: Status,
        /// Code and text.
        info: StatusText,
    },
    /// `* n KIND ...`: EXISTS, EXPUNGE, FETCH, RECENT.
    Numbered {
        /// The message number or count.
        n: u32,
        /// The kind, upper-cased.
        kind: String,
        /// What follows, e.g. the FETCH item list.
        items: Vec<Value>,
    },
    /// `* KIND ...`: LIST, LSUB, STATUS, SEARCH, ESEARCH, VANISHED, CAPABILITY, FLAGS, ENABLED.
    Data {
        /// The kind, upper-cased.
        kind: String,
        /// What follows.
        items: Vec<Value>,
    },
    /// `+ text`.
    Continue,
}

/// Deepest list nesting accepted: `value` recurses per level, and a 16 MiB line of `(` would
/// otherwise overflow a tokio worker's stack (none of the responses read here nest beyond ~3).
const MAX_DEPTH: usize = 64;

struct Cursor {
    buf: Bytes,
    pos: usize,
    /// Lists open at `pos`.
    depth: usize,
}

fn malformed(what: &str) -> ProtoError {
    ProtoError::Malformed(what.to_owned())
}

impl Cursor {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        matches!(self.peek(), None | Some(b'\r') | Some(b'\n'))
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.pos += 1;
        }
    }

    /// An atom; `in_code` makes `]` end it (inside `[...]` response codes).
    fn atom(&mut self, in_code: bool) -> Bytes {
        let start = self.pos;
        let mut bracket = 0usize;
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'(' | b')' | b'"' | b'\r' | b'\n' => break,
                b'{' if bracket == 0 => break,
                b'[' => bracket += 1,
                b']' if bracket == 0 && in_code => break,
                b']' if bracket == 0 => {}
                b']' => bracket -= 1,
                _ => {}
            }
            // Inside `BODY[HEADER.FIELDS (A B)]` spaces and parens belong to the atom.
            self.pos += 1;
            if bracket > 0 {
                while let Some(c) = self.peek() {
                    if c == b']' || c == b'\r' || c == b'\n' {
                        break;
                    }
                    self.pos += 1;
                }
            }
        }
        self.buf.slice(start..self.pos)
    }

    fn quoted(&mut self) -> Result<Bytes, ProtoError> {
        self.pos += 1;
        let start = self.pos;
        let mut escaped = false;
        let mut plain = true;
        while let Some(c) = self.peek() {
            match c {
                b'\\' if !escaped => {
                    escaped = true;
                    plain = false;
                }
                b'"' if !escaped => {
                    let raw = self.buf.slice(start..self.pos);
                    self.pos += 1;
                    if plain {
                        return Ok(raw);
                    }
                    let mut out = Vec::with_capacity(raw.len());
                    let mut esc = false;
                    for &b in raw.iter() {
                        if b == b'\\' && !esc {
                            esc = true;
                            continue;
                        }
                        esc = false;
                        out.push(b);
                    }
                    return Ok(Bytes::from(out));
                }
                b'\r' | b'\n' => return Err(malformed("unterminated quoted string")),
                _ => escaped = false,
            }
            self.pos += 1;
        }
        Err(malformed("unterminated quoted string"))
    }

    fn literal(&mut self) -> Result<Bytes, ProtoError> {
        let close = memchr::memchr(b'}', &self.buf[self.pos..])
            .ok_or_else(|| malformed("bad literal"))?
            + self.pos;
        let digits = &self.buf[self.pos + 1..close];
        let digits = digits.strip_suffix(b"+").unwrap_or(digits);
        let n: usize = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| malformed("bad literal length"))?;
        let mut p = close + 1;
        if self.buf.get(p) == Some(&b'\r') {
            p += 1;
        }
        if self.buf.get(p) != Some(&b'\n') {
            return Err(malformed("literal length not at end of line"));
        }
        p += 1;
        if n > self.buf.len() - p {
            return Err(malformed("truncated literal"));
        }
        self.pos = p + n;
        Ok(self.buf.slice(p..p + n))
    }

    fn value(&mut self, in_code: bool) -> Result<Value, ProtoError> {
        match self.peek() {
            Some(b'(') => {
                if self.depth >= MAX_DEPTH {
                    return Err(malformed("lists nested too deeply"));
                }
                self.depth += 1;
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_spaces();
                    match self.peek() {
                        Some(b')') => {
                            self.pos += 1;
                            self.depth -= 1;
                            return Ok(Value::List(items));
                        }
                        None | Some(b'\r') | Some(b'\n') => {
                            return Err(malformed("unterminated list"))
                        }
                        _ => items.push(self.value(in_code)?),
                    }
                }
            }
            Some(b'"') => Ok(Value::Str(self.quoted()?)),
            Some(b'{') => Ok(Value::Str(self.literal()?)),
            Some(b')') => Err(malformed("unbalanced )")),
            _ => {
                let a = self.atom(in_code);
                if a.is_empty() {
                    return Err(malformed("unexpected character"));
                }
                if a.eq_ignore_ascii_case(b"NIL") {
                    Ok(Value::Nil)
                } else {
                    Ok(Value::Atom(a))
                }
            }
        }
    }

    fn values(&mut self) -> Result<Vec<Value>, ProtoError> {
        let mut out = Vec::new();
        loop {
            self.skip_spaces();
            if self.at_end() {
                return Ok(out);
            }
            out.push(self.value(false)?);
        }
    }

    fn word(&mut self) -> Bytes {
        self.skip_spaces();
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == b' ' || c == b'\r' || c == b'\n' {
                break;
            }
            self.pos += 1;
        }
        self.buf.slice(start..self.pos)
    }

    fn status_text(&mut self) -> Result<StatusText, ProtoError> {
        self.skip_spaces();
        let mut code = Vec::new();
        if self.peek() == Some(b'[') {
            self.pos += 1;
            loop {
                self.skip_spaces();
                match self.peek() {
                    Some(b']') => {
                        self.pos += 1;
                        break;
                    }
                    None | Some(b'\r') | Some(b'\n') => {
                        return Err(malformed("unterminated response code"))
                    }
                    _ => code.push(self.value(true)?),
                }
            }
        }
        self.skip_spaces();
        let end = self.buf[self.pos..]
            .iter()
            .position(|&c| c == b'\r' || c == b'\n')
            .map_or(self.buf.len(), |i| self.pos + i);
        let text = String::from_utf8_lossy(&self.buf[self.pos..end]).into_owned();
        self.pos = end;
        Ok(StatusText { code, text })
    }
}

/// Parses one complete response as framed by [`crate::wire::framer::Framer`].
pub fn parse(frame: Bytes) -> Result<Response, ProtoError> {
    let mut c = Cursor {
        buf: frame,
        pos: 0,
        depth: 0,
    };
    match c.peek() {
        Some(b'+') => Ok(Response::Continue),
        Some(b'*') => {
            c.pos += 1;
            let first = c.word();
            if let Some(status) = Status::parse(&first) {
                return Ok(Response::Condition {
                    status,
                    info: c.status_text()?,
                });
            }
            if !first.is_empty() && first.iter().all(u8::is_ascii_digit) {
                let n = std::str::from_utf8(&first)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| malformed("bad message number"))?;
                let kind = String::from_utf8_lossy(&c.word()).to_ascii_uppercase();
                let items = c.values()?;
                return Ok(Response::Numbered { n, kind, items });
            }
            let kind = String::from_utf8_lossy(&first).to_ascii_uppercase();
            if kind.is_empty() {
                return Err(malformed("empty untagged response"));
            }
            // CAPABILITY and ENABLED carry atoms only; everything else is generic data.
            let items = c.values()?;
            Ok(Response::Data { kind, items })
        }
        Some(_) => {
            let tag = c.word();
            let status_word = c.word();
            let status = Status::parse(&status_word)
                .ok_or_else(|| malformed("tagged response without status"))?;
            Ok(Response::Tagged {
                tag,
                status,
                info: c.status_text()?,
            })
        }
        None => Err(malformed("empty response")),
    }
}

/// Parses an IMAP sequence set of UIDs (`1:3,7,9:8`) into its members; `*` is not allowed.
/// At most `cap` members are returned, so a hostile `1:4294967295` cannot exhaust memory.
pub fn parse_uid_set(s: &[u8], cap: usize) -> Option<Vec<u32>> {
    let text = std::str::from_utf8(s).ok()?;
    let mut out = Vec::new();
    for part in text.split(',') {
        let (a, b) = match part.split_once(':') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let a = part.parse::<u32>().ok()?;
                (a, a)
            }
        };
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        for u in lo..=hi {
            if out.len() >= cap {
                return Some(out);
            }
            out.push(u);
        }
    }
    Some(out)
}

/// Formats UIDs (sorted or not) as a compact sequence set, e.g. `1:3,7`.
pub fn format_uid_set(uids: &[u32]) -> String {
    let mut v: Vec<u32> = uids.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        let mut end = start;
        while i + 1 < v.len() && v[i + 1] == end + 1 {
            i += 1;
            end = v[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// Quotes a string for a command (mailbox names are ASCII after modified UTF-7).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::framer::Framer;

    fn one(s: &[u8]) -> Response {
        let mut f = Framer::default();
        let n = f.frame(s, 1 << 20, 1 << 16).unwrap().unwrap();
        assert_eq!(n, s.len());
        parse(Bytes::copy_from_slice(s)).unwrap()
    }

    #[test]
    fn frames_literals_and_waits_for_them() {
        let msg = b"* 1 FETCH (UID 7 BODY[] {11}\r\nA OK {3}\r\n.)\r\nt1 OK done\r\n";
        let mut f = Framer::default();
        for cut in 0..40 {
            let mut f2 = Framer::default();
            assert_eq!(
                f2.frame(&msg[..cut], 1 << 20, 1 << 16).unwrap(),
                None,
                "cut {cut}"
            );
        }
        let n = f.frame(msg, 1 << 20, 1 << 16).unwrap().unwrap();
        assert_eq!(&msg[n..], b"t1 OK done\r\n");
        let Response::Numbered { n, kind, items } =
            parse(Bytes::copy_from_slice(&msg[..n])).unwrap()
        else {
            panic!()
        };
        assert_eq!((n, kind.as_str()), (1, "FETCH"));
        let l = items[0].list().unwrap();
        assert!(l[2].is_atom("BODY[]"));
        assert_eq!(l[3].bytes().unwrap(), b"A OK {3}\r\n.");
    }

    #[test]
    fn an_open_first_literal_is_reported_and_a_second_is_not() {
        let msg = b"* 1 FETCH (UID 7 BODY[] {11}\r\nA OK {3}\r\n. X {2}\r\nab)\r\n";
        let head = b"* 1 FETCH (UID 7 BODY[] {11}\r\n".len();
        let mut f = Framer::default();
        assert_eq!(f.frame(&msg[..head - 2], 1 << 20, 1 << 16).unwrap(), None);
        assert_eq!(f.open_literal(head - 2), None, "no literal yet");
        assert_eq!(f.frame(&msg[..head + 4], 1 << 20, 1 << 16).unwrap(), None);
        assert_eq!(f.open_literal(head + 4), Some((head, 11)));
        let second = msg.len() - 4;
        assert_eq!(f.frame(&msg[..second], 1 << 20, 1 << 16).unwrap(), None);
        assert_eq!(
            f.open_literal(second),
            None,
            "the second literal is not the first"
        );
        assert_eq!(f.frame(msg, 1 << 20, 1 << 16).unwrap(), Some(msg.len()));
        assert_eq!(f.open_literal(0), None, "a new frame");
    }

    #[test]
    fn literal_needs_exactly_one_cr() {
        // Found by fuzz/fuzz_targets/sync_proto.rs: `{4}\r\r\n` is no literal, so the frame ends
        // there (and the parser rejects it) instead of swallowing the next four bytes.
        let msg = b"* 2 FETCH (BODY[] {4}\r\r\nab\r\nt1 OK done\r\n";
        let mut f = Framer::default();
        assert_eq!(f.frame(msg, 100, 100).unwrap(), Some(24));
        assert!(parse(Bytes::copy_from_slice(&msg[..24])).is_err());
        let mut f = Framer::default();
        let lf_only = b"* 2 FETCH (BODY[] {2}\nab)\r\n";
        assert_eq!(f.frame(lf_only, 100, 100).unwrap(), Some(lf_only.len()));
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        // Found with fuzz/fuzz_targets/sync_proto.rs (parses on a 64 KiB stack): one recursion
        // per `(` overflowed the stack long before the 16 MiB line cap.
        let deep = |n: usize| {
            let mut v = b"* 1 FETCH ".to_vec();
            v.extend(std::iter::repeat_n(b'(', n));
            v.extend(std::iter::repeat_n(b')', n));
            v.extend_from_slice(b"\r\n");
            Bytes::from(v)
        };
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                assert!(parse(deep(MAX_DEPTH)).is_ok());
                assert_eq!(
                    parse(deep(MAX_DEPTH + 1)),
                    Err(malformed("lists nested too deeply"))
                );
                assert!(parse(deep(1_000_000)).is_err());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn tagged_with_codes() {
        match one(b"a3 OK [APPENDUID 1699 12:14] Append completed.\r\n") {
            Response::Tagged { tag, status, info } => {
                assert_eq!(&tag[..], b"a3");
                assert_eq!(status, Status::Ok);
                assert_eq!(info.code_name(), "APPENDUID");
                assert_eq!(info.code_number(0), Some(1699));
                assert_eq!(
                    parse_uid_set(info.code[2].bytes().unwrap(), 100).unwrap(),
                    vec![12, 13, 14]
                );
                assert_eq!(info.text, "Append completed.");
            }
            other => panic!("{other:?}"),
        }
        match one(b"* OK [PERMANENTFLAGS (\\Answered \\Seen \\*)] Flags permitted.\r\n") {
            Response::Condition { info, .. } => {
                assert_eq!(info.code_name(), "PERMANENTFLAGS");
                assert_eq!(info.code[1].list().unwrap().len(), 3);
            }
            other => panic!("{other:?}"),
        }
        match one(b"x NO [LIMIT] Too many\r\n") {
            Response::Tagged { status, info, .. } => {
                assert_eq!(status, Status::No);
                assert_eq!(info.code_name(), "LIMIT");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn list_status_and_search() {
        match one(b"* LIST (\\HasNoChildren \\Sent) \"/\" \"Sent \\\"x\\\"\"\r\n") {
            Response::Data { kind, items } => {
                assert_eq!(kind, "LIST");
                assert_eq!(items[1].bytes().unwrap(), b"/");
                assert_eq!(items[2].bytes().unwrap(), b"Sent \"x\"");
            }
            other => panic!("{other:?}"),
        }
        match one(b"* LIST (\\Noselect) NIL {5}\r\nab cd\r\n") {
            Response::Data { items, .. } => {
                assert_eq!(items[1], Value::Nil);
                assert_eq!(items[2].bytes().unwrap(), b"ab cd");
            }
            other => panic!("{other:?}"),
        }
        match one(b"* STATUS INBOX (MESSAGES 3 UIDNEXT 9 UIDVALIDITY 17 HIGHESTMODSEQ 4)\r\n") {
            Response::Data { kind, items } => {
                assert_eq!(kind, "STATUS");
                assert_eq!(items[1].list().unwrap()[5].number(), Some(17));
            }
            other => panic!("{other:?}"),
        }
        match one(b"* SEARCH 1 2 5\r\n") {
            Response::Data { items, .. } => assert_eq!(items.len(), 3),
            other => panic!("{other:?}"),
        }
        assert!(matches!(one(b"+ go ahead\r\n"), Response::Continue));
    }

    #[test]
    fn uid_sets() {
        assert_eq!(format_uid_set(&[5, 1, 2, 3, 9, 10]), "1:3,5,9:10");
        assert_eq!(parse_uid_set(b"3:1,7", 10).unwrap(), vec![1, 2, 3, 7]);
        assert_eq!(parse_uid_set(b"1:4294967295", 5).unwrap().len(), 5);
        assert!(parse_uid_set(b"1:*", 5).is_none());
    }

    proptest::proptest! {
        #[test]
        fn uid_set_round_trip(mut v in proptest::collection::vec(1u32..5000, 0..200)) {
            let s = format_uid_set(&v);
            v.sort_unstable();
            v.dedup();
            let back = if s.is_empty() { vec![] } else { parse_uid_set(s.as_bytes(), 100_000).unwrap() };
            proptest::prop_assert_eq!(back, v);
        }

        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut f = Framer::default();
            if let Ok(Some(n)) = f.frame(&bytes, 1000, 1000) {
                let _ = parse(Bytes::copy_from_slice(&bytes[..n]));
            }
            let _ = parse(Bytes::from(bytes));
        }
    }
}
