//! DATA transparency (RFC 5321 §4.5.2), pure: undoing the client's dot-stuffing with a strict
//! `<CRLF>.<CRLF>` end, normalising bare CR and bare LF to CRLF, and stuffing again for a backend.
//!
//! Why strict and normalised: an MTA may pass through a message holding `\n.\n`, `\r.\r\n` or
//! `\n.\r\n`. A backend that ends DATA on any of those (Dovecot accepts a bare-LF end) would
//! read the rest as a second message, or as commands (SMTP smuggling). Here only a real
//! `<CRLF>.<CRLF>` ends the message, and the message handed on holds CRLF line ends only, so
//! that re-stuffing it yields exactly one end marker: a backend always sees one message.
//! Well-formed input (CRLF lines) passes through byte for byte.

use memchr::memchr2;

/// Where the receiver is within the client's DATA stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Right after a real CRLF (or at the start of DATA): a `.` here is stuffing or the end.
    LineStart,
    /// Seen `.` at a line start.
    Dot,
    /// Seen `.\r` at a line start: `\n` ends the message.
    DotCr,
    /// Inside a line.
    Mid,
    /// Seen `\r` inside a line: `\n` makes a real line end, anything else a bare CR.
    Cr,
}

/// What a finished DATA phase produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The message: unstuffed, CRLF line ends only, ending in CRLF unless empty.
    /// Empty when `oversize` (the bytes were dropped as they came).
    pub body: Vec<u8>,
    /// More than the maximum size came; the message must be refused with 552.
    pub oversize: bool,
    /// Bare CRs and LFs that were turned into CRLF.
    pub normalised: u64,
}

/// Consumes the client's DATA stream chunk by chunk, keeping at most `max` bytes of message.
#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    max: u64,
    body: Vec<u8>,
    oversize: bool,
    normalised: u64,
}

const CRLF: &[u8] = b"\r\n";

impl DataReceiver {
    /// A receiver that refuses messages larger than `max` bytes (after unstuffing).
    pub fn new(max: u64) -> Self {
        DataReceiver {
            state: State::LineStart,
            max,
            body: Vec::new(),
            oversize: false,
            normalised: 0,
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        if self.oversize {
            return;
        }
        if self.body.len() as u64 + bytes.len() as u64 > self.max {
            // Keep reading to the end marker (the client is still sending) but hold nothing.
            self.oversize = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(bytes);
    }

    fn bare(&mut self) {
        self.normalised += 1;
        self.emit(CRLF);
    }

    /// Consumes `input` up to and including the end-of-data line. Returns the number of bytes
    /// consumed and whether the end was reached; bytes after the end are not consumed (they
    /// are the next pipelined command).
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            match self.step(&input[i..]) {
                Some(took) => i += took,
                None => return (i + 1, true),
            }
        }
        (i, false)
    }

    /// One move on `rest` (not empty): the bytes consumed, 0 when the first byte is to be
    /// read again in the new state, or `None` when it is the LF of the end-of-data line.
    fn step(&mut self, rest: &[u8]) -> Option<usize> {
        let b = rest[0];
        let (next, took) = match (self.state, b) {
            (State::Mid, _) => return Some(self.line_content(rest)),
            (State::LineStart, b'.') => (State::Dot, 1),
            (State::LineStart, b'\r') => (State::Cr, 1),
            (State::LineStart, b'\n') => {
                self.bare();
                (State::Mid, 1)
            }
            (State::LineStart, _) => {
                self.emit(&[b]);
                (State::Mid, 1)
            }
            (State::Dot, b'\r') => (State::DotCr, 1),
            // A stuffed dot: dropped (RFC 5321 §4.5.2); the byte is read as line content.
            (State::Dot, _) => (State::Mid, 0),
            (State::DotCr, b'\n') => return None,
            // `.\r` then something else: the dot was stuffing, the CR is bare.
            (State::DotCr, _) => {
                self.bare();
                (State::Mid, 0)
            }
            (State::Cr, b'\n') => {
                self.emit(CRLF);
                (State::LineStart, 1)
            }
            (State::Cr, _) => {
                self.bare();
                (State::Mid, 0)
            }
        };
        self.state = next;
        Some(took)
    }

    /// Inside a line: keeps the bytes up to the next CR or LF in one go and returns how many
    /// bytes it consumed, that CR or LF included.
    fn line_content(&mut self, rest: &[u8]) -> usize {
        let Some(k) = memchr2(b'\r', b'\n', rest) else {
            self.emit(rest);
            return rest.len();
        };
        self.emit(&rest[..k]);
        if rest[k] == b'\r' {
            self.state = State::Cr;
        } else {
            // Bare LF: a line end for the backend, never a place a `.` ends DATA.
            self.bare();
        }
        k + 1
    }

    /// Message bytes held so far (0 once over the limit).
    pub fn held(&self) -> usize {
        self.body.len()
    }

    /// The result, once `feed` has reported the end.
    pub fn finish(self) -> Received {
        Received {
            body: self.body,
            oversize: self.oversize,
            normalised: self.normalised,
        }
    }
}

/// Appends `body` (CRLF lines, as `DataReceiver` produces) dot-stuffed and terminated with
/// `.\r\n`, ready to follow a `354`. A body not ending in CRLF gets one, so that the end
/// marker always stands on its own line.
pub fn stuff_into(body: &[u8], out: &mut Vec<u8>) {
    out.reserve(body.len() + body.len() / 64 + 5);
    let mut line_start = true;
    let mut rest = body;
    while !rest.is_empty() {
        if line_start && rest[0] == b'.' {
            out.push(b'.');
        }
        match memchr::memchr(b'\n', rest) {
            Some(k) => {
                out.extend_from_slice(&rest[..=k]);
                rest = &rest[k + 1..];
                line_start = true;
            }
            None => {
                out.extend_from_slice(rest);
                rest = &[];
                line_start = false;
            }
        }
    }
    if !line_start {
        out.extend_from_slice(CRLF);
    }
    out.extend_from_slice(b".\r\n");
}

/// `stuff_into` to a fresh vector.
pub fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    stuff_into(body, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn receive(input: &[u8]) -> (Received, usize, bool) {
        let mut r = DataReceiver::new(1 << 20);
        let (n, done) = r.feed(input);
        (r.finish(), n, done)
    }

    #[test]
    fn well_formed_mail_passes_unchanged() {
        let (r, n, done) = receive(b"Subject: x\r\n\r\n..hidden\r\nbody\r\n.\r\nQUIT\r\n");
        assert!(done);
        assert_eq!(n, b"Subject: x\r\n\r\n..hidden\r\nbody\r\n.\r\n".len());
        assert_eq!(r.body, b"Subject: x\r\n\r\n.hidden\r\nbody\r\n");
        assert_eq!(r.normalised, 0);
        assert_eq!(
            stuff(&r.body),
            b"Subject: x\r\n\r\n..hidden\r\nbody\r\n.\r\n"
        );
    }

    #[test]
    fn empty_message() {
        let (r, n, done) = receive(b".\r\n");
        assert!(done && n == 3 && r.body.is_empty());
        assert_eq!(stuff(b""), b".\r\n");
    }

    #[test]
    fn smuggling_sequences_do_not_end_the_message() {
        for evil in [
            &b"a\r\n\n.\nMAIL FROM:<x>\r\n"[..],
            b"a\n.\nMAIL FROM:<x>\r\n",
            b"a\r.\r\nMAIL FROM:<x>\r\n",
            b"a\n.\r\nMAIL FROM:<x>\r\n",
            b"a\r\n.\nMAIL FROM:<x>\r\n",
            b"a\r\n.\rMAIL FROM:<x>\r\n",
        ] {
            let mut input = evil.to_vec();
            input.extend_from_slice(b".\r\n");
            let (r, n, done) = receive(&input);
            assert!(done, "{evil:?}");
            assert_eq!(n, input.len(), "ends only at the real end: {evil:?}");
            assert!(r.normalised > 0, "{evil:?}");
            assert!(!has_bare_cr_or_lf(&r.body), "{:?}", r.body);
            assert!(r.body.windows(9).any(|w| w == b"MAIL FROM"), "{:?}", r.body);
            // Stuffed again, the only end marker is the last line.
            let wire = stuff(&r.body);
            assert_eq!(find_end(&wire), Some(wire.len()), "{wire:?}");
        }
    }

    #[test]
    fn split_anywhere_gives_the_same_result() {
        let input = b"x\r\n..y\r\n\r\r\n.z\n.\r.\r\n\r\n.\r\nNOOP\r\n";
        let (whole, n_whole, _) = receive(input);
        for cut in 0..input.len() {
            let mut r = DataReceiver::new(1 << 20);
            let (a, done_a) = r.feed(&input[..cut]);
            assert!(!done_a || a <= cut);
            let (b, done) = if done_a {
                (0, true)
            } else {
                r.feed(&input[a..])
            };
            assert!(done);
            assert_eq!(a + b, n_whole, "cut at {cut}");
            assert_eq!(r.finish(), whole, "cut at {cut}");
        }
    }

    #[test]
    fn oversize_is_dropped_but_read_to_the_end() {
        let mut r = DataReceiver::new(10);
        let (n, done) = r.feed(b"0123456789abcdef\r\nmore\r\n.\r\n");
        assert!(done);
        assert_eq!(n, 27);
        assert_eq!(r.held(), 0);
        let got = r.finish();
        assert!(got.oversize && got.body.is_empty());
    }

    fn has_bare_cr_or_lf(b: &[u8]) -> bool {
        b.iter().enumerate().any(|(i, &c)| {
            (c == b'\r' && b.get(i + 1) != Some(&b'\n'))
                || (c == b'\n' && (i == 0 || b[i - 1] != b'\r'))
        })
    }

    /// Where a strict reader would see `<CRLF>.<CRLF>` end (offset after it), or a lenient one
    /// (`\n.\n`, `\n.\r\n`) — the first of either.
    fn find_end(wire: &[u8]) -> Option<usize> {
        let mut prev_nl = true;
        for i in 0..wire.len() {
            if prev_nl && wire[i] == b'.' {
                if wire[i + 1..].starts_with(b"\r\n") {
                    return Some(i + 3);
                }
                if wire[i + 1..].starts_with(b"\n") || wire[i + 1..].starts_with(b"\r") {
                    return Some(i + 2);
                }
            }
            prev_nl = wire[i] == b'\n' || wire[i] == b'\r';
        }
        None
    }

    proptest! {
        /// Whatever the client sends, what a backend gets holds one end marker, at its end,
        /// even for a reader that also ends on bare CR/LF sequences.
        #[test]
        fn any_input_yields_exactly_one_message(data in proptest::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a')], 0..64)) {
            let mut input = data.clone();
            input.extend_from_slice(b"\r\n.\r\n");
            let (r, n, done) = receive(&input);
            prop_assert!(done);
            prop_assert!(n <= input.len());
            prop_assert!(!has_bare_cr_or_lf(&r.body));
            let wire = stuff(&r.body);
            prop_assert_eq!(find_end(&wire), Some(wire.len()));
            // And the backend's (strict) reading gives back the same message.
            let (again, m, done2) = receive(&wire);
            prop_assert!(done2);
            prop_assert_eq!(m, wire.len());
            prop_assert_eq!(again.body, r.body);
        }

        /// Canonical messages survive stuff → receive unchanged.
        #[test]
        fn canonical_round_trip(lines in proptest::collection::vec("[.a-z ]{0,8}", 0..12)) {
            let body: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\r\n").into_bytes()).collect();
            let wire = stuff(&body);
            let (r, n, done) = receive(&wire);
            prop_assert!(done);
            prop_assert_eq!(n, wire.len());
            prop_assert_eq!(r.normalised, 0);
            prop_assert_eq!(r.body, body);
        }
    }
}
