//! Client→server command framing after login: where each command starts, across lines and
//! `{n}`/`{n+}` literals, so that the splice can answer `tag COMPRESS DEFLATE` itself
//! (`NO [CANNOT]`) instead of letting the backend compress a stream the splice must read.
//!
//! Pure: bytes in, bytes to forward out. Only the first bytes of each command are looked at;
//! a read with nothing to change is forwarded as it is, without a copy.
//!
//! A synchronizing literal `{n}` is sent only after the server's `+`; if the server refuses
//! it instead, the client's next bytes are a new command. The splice tells the framer how
//! many `+` the server has sent (the response filter counts them before the client can see
//! them), so the framer knows which of the two follows.

use super::filter::{is_tag_char, Rewrite, MAX_TAG};
use super::framer::LineTail;

/// The command answered here, after `tag `.
const COMPRESS: &[u8] = b"COMPRESS DEFLATE";
/// Bytes of a command's start needed to recognise it: tag, space, verb, CR.
const MAX_HEAD: usize = MAX_TAG + 1 + COMPRESS.len() + 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the first byte of a command (its first bytes may be held in `head`).
    Start,
    /// Inside a command line.
    Line,
    /// Inside a literal with this many bytes left.
    Literal(u64),
    /// A synchronizing literal of `len` bytes was announced when the server had sent `seen`
    /// continuation requests: its bytes follow only if the server has sent another since.
    Sync { len: u64, seen: u64 },
}

/// What the start of a command is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Class {
    /// `tag COMPRESS DEFLATE`, whole: answered here.
    Compress(Vec<u8>),
    /// Anything else: forwarded.
    Other,
    /// Too few bytes to tell.
    NeedMore,
}

fn classify_prefix(b: &[u8], complete: bool) -> Class {
    let Some(sp) = b.iter().position(|&c| c == b' ') else {
        let maybe_tag = b.len() <= MAX_TAG && b.iter().all(|&c| is_tag_char(c));
        return if maybe_tag && !complete {
            Class::NeedMore
        } else {
            Class::Other
        };
    };
    let (tag, rest) = (&b[..sp], &b[sp + 1..]);
    if tag.is_empty() || tag.len() > MAX_TAG || !tag.iter().all(|&c| is_tag_char(c)) {
        return Class::Other;
    }
    if complete {
        let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
        return if rest.eq_ignore_ascii_case(COMPRESS) {
            Class::Compress(tag.to_vec())
        } else {
            Class::Other
        };
    }
    let whole = [COMPRESS, b"\r"].concat();
    if rest.len() <= whole.len() && rest.eq_ignore_ascii_case(&whole[..rest.len()]) {
        Class::NeedMore
    } else {
        Class::Other
    }
}

/// Classifies a command start made of the bytes held so far and the `line` bytes read now
/// (`complete`: the line ends within them).
fn classify(head: &[u8], line: &[u8], complete: bool) -> Class {
    if head.len() + line.len() > MAX_HEAD {
        // Longer than any `tag COMPRESS DEFLATE` line.
        return Class::Other;
    }
    if head.is_empty() {
        return classify_prefix(line, complete);
    }
    let mut joined = [0u8; MAX_HEAD];
    joined[..head.len()].copy_from_slice(head);
    joined[head.len()..head.len() + line.len()].copy_from_slice(line);
    classify_prefix(&joined[..head.len() + line.len()], complete)
}

/// The client→server framer of one spliced session.
#[derive(Debug)]
pub struct CommandFramer {
    state: State,
    tail: LineTail,
    /// A command's first bytes, held while they may still be `tag COMPRESS DEFLATE`.
    head: Vec<u8>,
    out: Rewrite,
    /// Replies owed to the client for commands answered here.
    replies: Vec<u8>,
}

impl Default for CommandFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl CommandFramer {
    /// A framer positioned at the start of a command.
    pub fn new() -> Self {
        CommandFramer {
            state: State::Start,
            tail: LineTail::new(),
            head: Vec::new(),
            out: Rewrite::default(),
            replies: Vec::new(),
        }
    }

    /// Bytes held back (a command start being recognised).
    pub fn held(&self) -> usize {
        self.head.len()
    }

    /// The replies owed to the client for commands answered here, if any (taken).
    pub fn take_replies(&mut self) -> Option<Vec<u8>> {
        (!self.replies.is_empty()).then(|| std::mem::take(&mut self.replies))
    }

    /// Advances over `buf`, read from the client, when the server has sent `continuations`
    /// continuation requests so far; returns what to forward to the backend.
    pub fn forward<'a>(&'a mut self, buf: &'a [u8], continuations: u64) -> &'a [u8] {
        self.out.reset();
        let mut pos = 0;
        while pos < buf.len() {
            pos += match self.state {
                State::Start => self.command_start(buf, pos),
                State::Line => self.line(buf, pos, continuations),
                State::Literal(left) => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(buf.len() - pos);
                    self.state = literal(left - take as u64);
                    self.out.pass(buf, pos, pos + take);
                    take
                }
                State::Sync { len, seen } => {
                    // The server answered the announcement before the client sent this.
                    self.state = if continuations > seen {
                        literal(len)
                    } else {
                        State::Start
                    };
                    0
                }
            };
        }
        self.out.result(buf, buf.len())
    }

    /// Inside a command line: finds its end and what follows it.
    fn line(&mut self, buf: &[u8], pos: usize, continuations: u64) -> usize {
        let avail = &buf[pos..];
        let Some(i) = memchr::memchr(b'\n', avail) else {
            self.tail.remember(avail);
            self.out.pass(buf, pos, buf.len());
            return avail.len();
        };
        let announced = self.tail.line_ends(&avail[..i]);
        self.tail.clear();
        self.state = match announced {
            None => State::Start,
            Some((len, true)) => literal(len),
            Some((len, false)) => State::Sync {
                len,
                seen: continuations,
            },
        };
        self.out.pass(buf, pos, pos + i + 1);
        i + 1
    }

    /// At the start of a command: forwards it, holds it, or answers it.
    fn command_start(&mut self, buf: &[u8], pos: usize) -> usize {
        let avail = &buf[pos..];
        let lf = memchr::memchr(b'\n', avail);
        let line = &avail[..lf.unwrap_or(avail.len())];
        match classify(&self.head, line, lf.is_some()) {
            Class::Other => {
                if !self.head.is_empty() {
                    let head = std::mem::take(&mut self.head);
                    self.out.diverge(buf, pos);
                    self.out.push(&head);
                    self.tail.remember(&head);
                }
                self.state = State::Line;
                0
            }
            Class::NeedMore => {
                self.out.diverge(buf, pos);
                self.head.extend_from_slice(avail);
                avail.len()
            }
            Class::Compress(tag) => {
                self.out.diverge(buf, pos);
                self.head = Vec::new();
                self.replies.extend_from_slice(&tag);
                self.replies.extend_from_slice(
                    b" NO [CANNOT] COMPRESS is not supported through this proxy\r\n",
                );
                line.len() + 1
            }
        }
    }
}

/// The state after a literal announcement of `len` bytes.
fn literal(len: u64) -> State {
    if len == 0 {
        State::Line
    } else {
        State::Literal(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Forwarded bytes and replies for `stream` read in pieces of `chunk` bytes, the server
    /// having sent `continuations` continuation requests by each read.
    fn run(
        stream: &[u8],
        chunk: usize,
        continuations: impl Fn(usize) -> u64,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut f = CommandFramer::new();
        let (mut out, mut replies) = (Vec::new(), Vec::new());
        for (i, part) in stream.chunks(chunk.max(1)).enumerate() {
            out.extend_from_slice(f.forward(part, continuations(i)));
            replies.extend(f.take_replies().unwrap_or_default());
        }
        (out, replies)
    }

    #[test]
    fn compress_is_answered_and_not_forwarded() {
        let stream = b"a1 NOOP\r\nc1 COMPRESS DEFLATE\r\nc2 compress deflate\nb2 NOOP\r\n";
        for chunk in 1..=stream.len() {
            let (out, replies) = run(stream, chunk, |_| 0);
            assert_eq!(out, b"a1 NOOP\r\nb2 NOOP\r\n", "chunk {chunk}");
            assert_eq!(
                String::from_utf8_lossy(&replies),
                "c1 NO [CANNOT] COMPRESS is not supported through this proxy\r\n\
                 c2 NO [CANNOT] COMPRESS is not supported through this proxy\r\n"
            );
        }
    }

    #[test]
    fn other_compress_forms_and_literal_contents_are_forwarded() {
        let stream = b"c1 COMPRESS DEFLATE x\r\nc2 COMPRESS\r\n\
            a APPEND INBOX {21+}\r\nc3 COMPRESS DEFLATE\r\n\r\n\
            i IDLE\r\nDONE\r\n";
        let (out, replies) = run(stream, 5, |_| 0);
        assert_eq!(out, stream.to_vec());
        assert!(replies.is_empty());
    }

    #[test]
    fn a_synchronizing_literal_follows_only_after_the_servers_go_ahead() {
        let announce = b"a APPEND INBOX {21}\r\n";
        let data = b"x COMPRESS DEFLATE\r\n)";
        let mut f = CommandFramer::new();
        assert_eq!(f.forward(announce, 0), announce);
        // The server sent `+`: the bytes are the literal, forwarded untouched.
        assert_eq!(f.forward(data, 1), data);
        assert!(f.take_replies().is_none());

        // The server refused the literal (tagged NO, no `+`): a new command starts.
        let mut f = CommandFramer::new();
        assert_eq!(f.forward(announce, 0), announce);
        assert_eq!(f.forward(b"x COMPRESS DEFLATE\r\n", 0), b"");
        assert!(f.take_replies().is_some());
    }

    #[test]
    fn a_split_start_is_held_then_released() {
        let mut f = CommandFramer::new();
        assert_eq!(f.forward(b"t1 COMPR", 0), b"");
        assert_eq!(f.held(), 8);
        assert_eq!(
            f.forward(b"ESS DEFLATE now\r\n", 0),
            b"t1 COMPRESS DEFLATE now\r\n"
        );
        let read = b"t2 FETCH 1 (FLAGS)\r\n";
        assert_eq!(
            f.forward(read, 0).as_ptr(),
            read.as_ptr(),
            "forwarded in place"
        );
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_output(
            parts in proptest::collection::vec((0usize..5, proptest::collection::vec(any::<u8>(), 0..20)), 1..10),
            chunk in 1usize..40,
        ) {
            let mut stream = Vec::new();
            for (kind, body) in &parts {
                let text: Vec<u8> = body.iter().map(|b| if *b == b'\n' { b'.' } else { *b }).collect();
                match kind {
                    0 => stream.extend_from_slice(b"c COMPRESS DEFLATE\r\n"),
                    1 => stream.extend_from_slice(format!("a APPEND x {{{}+}}\r\n", text.len()).as_bytes()),
                    2 => stream.extend_from_slice(format!("a APPEND x {{{}}}\r\n", text.len()).as_bytes()),
                    _ => stream.extend_from_slice(b"a NOOP "),
                }
                stream.extend_from_slice(&text);
                stream.extend_from_slice(b"\r\n");
            }
            // No continuation ever: chunking cannot change how a `{n}` is resolved.
            prop_assert_eq!(run(&stream, chunk, |_| 0), run(&stream, stream.len(), |_| 0));
        }
    }
}
