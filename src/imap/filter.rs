//! Server→client filtering after login: removes `COMPRESS=` from every capability list the
//! client sees (`* CAPABILITY ...` and `[CAPABILITY ...]` response codes), since the splice
//! cannot follow a compressed stream, and counts the server's continuation requests (`+`),
//! which tells the command framer whether a synchronizing literal was accepted.
//!
//! Pure: bytes in, bytes out. Only the first bytes of each response are looked at; a read with
//! nothing to change is forwarded as it is, without a copy.

use super::framer::ResponseFramer;

/// Longest tag looked at. Tags are the client's choice: a longer one only means its
/// response is forwarded unfiltered, and its `COMPRESS` would still be refused upstream.
pub(crate) const MAX_TAG: usize = 64;
/// Bytes of a response's start needed to tell whether it carries a capability list:
/// tag, space, and the longest status-and-code prefix.
const MAX_HEAD: usize = MAX_TAG + 1 + 24;
/// Longest capability response held whole to be filtered (Dovecot's are under 1 KiB); a
/// longer one is forwarded unfiltered rather than held without bound.
pub const MAX_CAPABILITY_LINE: usize = 8 * 1024;

/// Response starts after `* ` that carry a capability list.
const UNTAGGED: [&[u8]; 6] = [
    b"CAPABILITY ",
    b"OK [CAPABILITY ",
    b"NO [CAPABILITY ",
    b"BAD [CAPABILITY ",
    b"BYE [CAPABILITY ",
    b"PREAUTH [CAPABILITY ",
];
/// Response starts after `tag ` that carry a capability list.
const TAGGED: [&[u8]; 3] = [b"OK [CAPABILITY ", b"NO [CAPABILITY ", b"BAD [CAPABILITY "];

/// What the bytes of one read become: the read itself while nothing changed (no copy),
/// else a copy with the changes. Shared by both directions' filters. The copy lives only
/// until the next read: an idle session keeps nothing of it.
#[derive(Debug, Default)]
pub(crate) struct Rewrite {
    /// The changed output, once it differs from the read.
    changed: Option<Vec<u8>>,
}

impl Rewrite {
    /// Starts a new read.
    pub(crate) fn reset(&mut self) {
        self.changed = None;
    }

    /// `input[from..to]` goes out unchanged.
    pub(crate) fn pass(&mut self, input: &[u8], from: usize, to: usize) {
        if let Some(out) = &mut self.changed {
            out.extend_from_slice(&input[from..to]);
        }
    }

    /// From `at` on, the output differs from `input`; everything before went out unchanged.
    pub(crate) fn diverge(&mut self, input: &[u8], at: usize) {
        if self.changed.is_none() {
            let mut out = Vec::with_capacity(input.len());
            out.extend_from_slice(&input[..at]);
            self.changed = Some(out);
        }
    }

    /// Bytes of the proxy's own (after `diverge`).
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        debug_assert!(self.changed.is_some(), "push before diverge");
        if let Some(out) = &mut self.changed {
            out.extend_from_slice(bytes);
        }
    }

    /// The output for the first `consumed` bytes of `input`.
    pub(crate) fn result<'a>(&'a self, input: &'a [u8], consumed: usize) -> &'a [u8] {
        match &self.changed {
            Some(out) => out,
            None => &input[..consumed],
        }
    }
}

/// Whether a response start carries a capability list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// It does: hold the whole line and filter it.
    Capabilities,
    /// It does not: forward it.
    Other,
    /// Too few bytes to tell.
    NeedMore,
}

/// A tag character (RFC 9051: ASTRING-CHAR except `+`).
pub(crate) fn is_tag_char(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && !b"(){%*\"\\+".contains(&b)
}

/// Whether `rest` starts with one of `patterns` (case-insensitively), or could once more
/// bytes come (`complete` false).
fn starts_with_any(rest: &[u8], patterns: &[&[u8]], complete: bool) -> Class {
    let mut could = false;
    for p in patterns {
        if rest.len() >= p.len() {
            if rest[..p.len()].eq_ignore_ascii_case(p) {
                return Class::Capabilities;
            }
        } else if p[..rest.len()].eq_ignore_ascii_case(rest) {
            could = true;
        }
    }
    if could && !complete {
        Class::NeedMore
    } else {
        Class::Other
    }
}

/// Classifies the first bytes of a response (`complete`: the line ends within them).
fn classify_prefix(b: &[u8], complete: bool) -> Class {
    let need_more = if complete {
        Class::Other
    } else {
        Class::NeedMore
    };
    match b {
        [] => need_more,
        [b'+', ..] => Class::Other,
        [b'*'] => need_more,
        [b'*', b' ', rest @ ..] => starts_with_any(rest, &UNTAGGED, complete),
        [b'*', ..] => Class::Other,
        _ => match b.iter().position(|&c| c == b' ') {
            Some(sp) if sp > 0 && sp <= MAX_TAG && b[..sp].iter().all(|&c| is_tag_char(c)) => {
                starts_with_any(&b[sp + 1..], &TAGGED, complete)
            }
            None if b.len() <= MAX_TAG && b.iter().all(|&c| is_tag_char(c)) => need_more,
            _ => Class::Other,
        },
    }
}

/// Classifies a response start made of the bytes held so far and the `line` bytes read now.
fn classify(head: &[u8], line: &[u8], complete: bool) -> Class {
    let class = if head.is_empty() {
        let take = line.len().min(MAX_HEAD);
        classify_prefix(&line[..take], complete && take == line.len())
    } else {
        let mut joined = [0u8; MAX_HEAD];
        let held = head.len().min(MAX_HEAD);
        let take = line.len().min(MAX_HEAD - held);
        joined[..held].copy_from_slice(&head[..held]);
        joined[held..held + take].copy_from_slice(&line[..take]);
        classify_prefix(&joined[..held + take], complete && take == line.len())
    };
    match class {
        // Every pattern is decided within MAX_HEAD bytes; this only bounds the hold.
        Class::NeedMore if head.len() + line.len() >= MAX_HEAD => Class::Other,
        c => c,
    }
}

/// `line` (a whole capability response, CRLF included) without `COMPRESS=` capabilities.
pub fn strip_compress(line: &[u8]) -> Vec<u8> {
    let body_end = line.len()
        - line
            .iter()
            .rev()
            .take_while(|&&b| b == b'\n' || b == b'\r')
            .count();
    let (start, end) = match find_ci(&line[..body_end], b"[CAPABILITY ") {
        Some(i) => {
            let start = i + b"[CAPABILITY ".len();
            let end = line[start..body_end]
                .iter()
                .position(|&b| b == b']')
                .map_or(body_end, |e| start + e);
            (start, end)
        }
        // `* CAPABILITY `: the list runs to the end of the line.
        None => (
            find_ci(&line[..body_end], b"CAPABILITY ").map_or(body_end, |i| i + 11),
            body_end,
        ),
    };
    let kept: Vec<&[u8]> = line[start..end]
        .split(|&b| b == b' ')
        .filter(|c| !c.is_empty() && !starts_with_ci(c, b"COMPRESS="))
        .collect();
    let mut out = Vec::with_capacity(line.len());
    out.extend_from_slice(&line[..start]);
    out.extend_from_slice(&kept.join(&b' '));
    out.extend_from_slice(&line[end..]);
    out
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

/// The server→client filter of one spliced session.
#[derive(Debug)]
pub struct ResponseFilter {
    /// Framing of the bytes already forwarded: held bytes are fed to it once released, so
    /// its boundaries are the ones the client sees.
    raw: ResponseFramer,
    /// The start of a response not forwarded yet: while it may still begin a capability
    /// list (`caps` false), or a whole capability line being collected (`caps` true).
    head: Vec<u8>,
    caps: bool,
    out: Rewrite,
    continuations: u64,
}

impl Default for ResponseFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseFilter {
    /// A filter positioned at the start of a response.
    pub fn new() -> Self {
        ResponseFilter {
            raw: ResponseFramer::new(),
            head: Vec::new(),
            caps: false,
            out: Rewrite::default(),
            continuations: 0,
        }
    }

    /// True when everything forwarded so far ends with a complete response: a kick or a
    /// reply of the proxy's own may be written now (bytes held back are not forwarded yet).
    pub fn at_boundary(&self) -> bool {
        self.raw.at_boundary()
    }

    /// Continuation requests (`+ ...`) the server has sent so far.
    pub fn continuations(&self) -> u64 {
        self.continuations
    }

    /// Bytes held back (a response start being classified, or a capability line).
    pub fn held(&self) -> usize {
        self.head.len()
    }

    /// Advances over all of `buf` and returns what to forward to the client.
    pub fn forward<'a>(&'a mut self, buf: &'a [u8]) -> &'a [u8] {
        let n = self.advance(buf, false);
        self.output(buf, n)
    }

    /// Advances over `buf` until the first boundary (see `at_boundary`) and returns how many
    /// bytes were consumed and what to forward for them; consumes all of `buf` when no
    /// boundary comes, and nothing when already at one.
    pub fn forward_to_boundary<'a>(&'a mut self, buf: &'a [u8]) -> (usize, &'a [u8]) {
        let n = self.advance(buf, true);
        (n, self.output(buf, n))
    }

    /// What to forward for the first `consumed` bytes of `buf`, after `advance` over it.
    pub fn output<'a>(&'a self, buf: &'a [u8], consumed: usize) -> &'a [u8] {
        self.out.result(buf, consumed)
    }

    /// Advances over `buf` (until the first boundary when `stop`); returns the bytes consumed.
    /// `output` then gives what to forward for them.
    pub fn advance(&mut self, buf: &[u8], stop: bool) -> usize {
        self.out.reset();
        let mut pos = 0;
        while pos < buf.len() {
            if !self.raw.at_boundary() {
                let n = self
                    .raw
                    .feed_to_boundary(&buf[pos..])
                    .unwrap_or(buf.len() - pos);
                self.out.pass(buf, pos, pos + n);
                pos += n;
            } else if stop {
                break;
            } else if self.caps {
                pos += self.collect_capabilities(buf, pos);
            } else {
                pos += self.response_start(buf, pos);
            }
        }
        pos
    }

    /// At the start of a response: forwards it, holds it, or starts collecting it.
    fn response_start(&mut self, buf: &[u8], pos: usize) -> usize {
        let avail = &buf[pos..];
        if self.head.is_empty() && avail[0] == b'+' {
            self.continuations += 1;
        }
        let lf = memchr::memchr(b'\n', avail);
        let line = &avail[..lf.unwrap_or(avail.len())];
        match classify(&self.head, line, lf.is_some()) {
            Class::Other if self.head.is_empty() => {
                // Step the framer off the boundary; the rest of the response passes below.
                self.raw.feed(&avail[..1]);
                self.out.pass(buf, pos, pos + 1);
                1
            }
            Class::Other => {
                let head = std::mem::take(&mut self.head);
                self.out.diverge(buf, pos);
                self.out.push(&head);
                self.raw.feed(&head);
                0
            }
            Class::NeedMore => {
                self.out.diverge(buf, pos);
                self.head.extend_from_slice(avail);
                avail.len()
            }
            Class::Capabilities => {
                self.out.diverge(buf, pos);
                self.caps = true;
                0
            }
        }
    }

    /// Collects a capability response's line and forwards it filtered once whole.
    fn collect_capabilities(&mut self, buf: &[u8], pos: usize) -> usize {
        // Held or rewritten, the output differs from the read from here on.
        self.out.diverge(buf, pos);
        let avail = &buf[pos..];
        let room = MAX_CAPABILITY_LINE.saturating_sub(self.head.len());
        match memchr::memchr(b'\n', avail) {
            Some(i) if i < room => {
                self.head.extend_from_slice(&avail[..=i]);
                let line = std::mem::take(&mut self.head);
                self.raw.feed(&line);
                self.out.push(&strip_compress(&line));
                self.caps = false;
                i + 1
            }
            None if avail.len() <= room => {
                self.head.extend_from_slice(avail);
                avail.len()
            }
            _ => {
                // Too long to hold: forwarded as it is (a COMPRESS is still refused upstream).
                let head = std::mem::take(&mut self.head);
                self.caps = false;
                self.out.push(&head);
                self.raw.feed(&head);
                if !head.is_empty() {
                    return 0;
                }
                // Nothing was held: step the framer off the boundary with the first byte.
                self.raw.feed(&avail[..1]);
                self.out.pass(buf, pos, pos + 1);
                1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Everything forwarded for `stream` read in pieces of `chunk` bytes.
    fn filtered(stream: &[u8], chunk: usize) -> Vec<u8> {
        let mut f = ResponseFilter::new();
        let mut out = Vec::new();
        for part in stream.chunks(chunk.max(1)) {
            out.extend_from_slice(f.forward(part));
        }
        out
    }

    #[test]
    fn compress_leaves_every_capability_list() {
        let stream = b"* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE\r\n\
            c1 OK done\r\n\
            * OK [CAPABILITY IMAP4rev1 compress=deflate COMPRESS=ZSTD] ready\r\n\
            tag2 OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n\
            * 1 FETCH (BODY[] {39}\r\n* CAPABILITY COMPRESS=DEFLATE IMAP4rev1)\r\n\
            + idling\r\n";
        let want = b"* CAPABILITY IMAP4rev1 IDLE\r\n\
            c1 OK done\r\n\
            * OK [CAPABILITY IMAP4rev1] ready\r\n\
            tag2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n\
            * 1 FETCH (BODY[] {39}\r\n* CAPABILITY COMPRESS=DEFLATE IMAP4rev1)\r\n\
            + idling\r\n";
        for chunk in 1..=stream.len() {
            assert_eq!(
                String::from_utf8_lossy(&filtered(stream, chunk)),
                String::from_utf8_lossy(want),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn reads_without_capabilities_pass_without_a_copy() {
        let mut f = ResponseFilter::new();
        let read = b"* 1 FETCH (FLAGS (\\Seen))\r\na OK done\r\n* 2 EXISTS\r\n";
        let out = f.forward(read);
        assert_eq!(out.as_ptr(), read.as_ptr(), "forwarded in place");
        assert!(f.at_boundary());
    }

    #[test]
    fn continuation_requests_are_counted() {
        let mut f = ResponseFilter::new();
        f.forward(b"+ Ready for literal data\r\n* 3 EXISTS\r\n+ idling\r\n");
        assert_eq!(f.continuations(), 2);
    }

    #[test]
    fn a_held_start_is_a_boundary_and_stops_there() {
        let mut f = ResponseFilter::new();
        assert_eq!(
            f.forward(b"* 1 FETCH (BODY[] {3}\r\nab"),
            b"* 1 FETCH (BODY[] {3}\r\nab"
        );
        assert!(!f.at_boundary());
        let (used, out) = f.forward_to_boundary(b"c)\r\n* CAPA");
        assert_eq!((used, out), (4, &b"c)\r\n"[..]));
        assert!(f.at_boundary());
        assert_eq!(f.forward(b"* CAPA").len(), 0, "held while undecided");
        assert!(f.at_boundary());
        assert_eq!(f.held(), 6);
        let out = f.forward(b"BILITY IMAP4rev1 COMPRESS=DEFLATE\r\n");
        assert_eq!(out, b"* CAPABILITY IMAP4rev1\r\n");
    }

    #[test]
    fn an_overlong_capability_line_is_forwarded_unfiltered() {
        let mut line = b"* CAPABILITY COMPRESS=DEFLATE".to_vec();
        line.extend(std::iter::repeat_n(b'X', MAX_CAPABILITY_LINE));
        line.extend_from_slice(b"\r\n* 1 EXISTS\r\n");
        assert_eq!(filtered(&line, 1000), line);
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_output(
            parts in proptest::collection::vec((0usize..6, proptest::collection::vec(any::<u8>(), 0..30)), 1..10),
            chunk in 1usize..60,
        ) {
            let starts: [&[u8]; 6] = [b"* CAPABILITY ", b"a1 OK [CAPABILITY ", b"* 1 FETCH (", b"+ ", b"x NO ", b"* OK [capability "];
            let mut stream = Vec::new();
            for (kind, body) in &parts {
                stream.extend_from_slice(starts[*kind]);
                let text: Vec<u8> = body.iter().map(|b| if *b == b'\n' { b' ' } else { *b }).collect();
                stream.extend_from_slice(&text);
                if kind % 2 == 0 {
                    stream.extend_from_slice(b" COMPRESS=DEFLATE");
                }
                stream.extend_from_slice(b"\r\n");
            }
            prop_assert_eq!(filtered(&stream, chunk), filtered(&stream, stream.len()));
        }
    }
}
