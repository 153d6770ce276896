//! The sync client's response reader (`sync::proto`) on any bytes, fed the way
//! `sync::client::Client::read` feeds it: chunks appended to one buffer, `Framer::frame` over the
//! whole buffer, each frame split off and parsed. Checks:
//! - the same frames, parse results and error come out however the input is chunked, and the
//!   same as a plain whole-buffer reference framer;
//! - memory stays bounded: every literal within the cap, every line within its cap,
//!   `literal_missing` (what the client reserves) never above the literal cap;
//! - every parsed response re-encodes to bytes that parse back to the same response;
//! - UID sets found anywhere parse within their cap, a larger cap only extends the result, and
//!   what parses formats to a canonical set that parses back to the same members;
//! - FETCH items, APPENDUID/COPYUID codes and CAPABILITY lists go through the engine's parsers.
//!
//! Parsing runs on a thread with a small stack, so recursion that grows with the input shows up.
#![no_main]

use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use mailferry::wire::framer::{literal_at_end, FrameError, Framer};
use mailferry::sync::client::{Caps, Fetched};
use mailferry::sync::proto::{
    format_uid_set, parse, parse_uid_set, ProtoError, Response, Status, StatusText, Value,
};

/// One frame: its bytes and what `parse` made of them.
type Frame = (Bytes, Result<Response, ProtoError>);

#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    /// The framing error that stopped the reader, if any.
    error: Option<FrameError>,
    /// Bytes left unframed at the end (only compared when there was no error).
    rest: Bytes,
}

/// Deterministic chunk sizes from a seed: 0 = everything at once, else 1..=seed bytes each.
fn chunk_sizes(seed: u8) -> impl FnMut() -> usize {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    move || {
        if seed == 0 {
            return usize::MAX;
        }
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        1 + (x as usize % seed as usize)
    }
}

/// What `Client::read` does, over `data` arriving in chunks.
fn incremental(data: &[u8], seed: u8, max_literal: u64, max_line: usize) -> Outcome {
    let mut next = chunk_sizes(seed);
    let mut input = data;
    let mut buf = BytesMut::new();
    let mut framer = Framer::default();
    let mut frames = Vec::new();
    loop {
        match framer.frame(&buf, max_literal, max_line) {
            Err(e) => {
                return Outcome {
                    frames,
                    error: Some(e),
                    rest: Bytes::new(),
                }
            }
            Ok(Some(n)) => {
                assert!(n > 0 && n <= buf.len() && buf[n - 1] == b'\n');
                let frame = buf.split_to(n).freeze();
                frames.push((frame.clone(), parse(frame)));
            }
            Ok(None) => {
                // The client reserves this much at once: bounded by the literal cap.
                let missing = framer.literal_missing(buf.len());
                assert!(missing as u64 <= max_literal, "{missing} > {max_literal}");
                if input.is_empty() {
                    return Outcome {
                        frames,
                        error: None,
                        rest: buf.freeze(),
                    };
                }
                let take = next().min(input.len());
                buf.extend_from_slice(&input[..take]);
                input = &input[take..];
            }
        }
    }
}

/// A plain framer over the whole input: lines, and `{n}` at a line end skips n bytes.
fn reference(data: &[u8], max_literal: u64, max_line: usize) -> Outcome {
    let mut frames = Vec::new();
    let mut start = 0;
    'frames: loop {
        let mut line_start = start;
        loop {
            let Some(i) = data[line_start..].iter().position(|&b| b == b'\n') else {
                let error = (data.len() - line_start > max_line).then_some(FrameError::LineTooLong);
                let rest = Bytes::copy_from_slice(&data[start..]);
                return Outcome {
                    frames,
                    rest: if error.is_some() { Bytes::new() } else { rest },
                    error,
                };
            };
            let end = line_start + i;
            let fail = |e| Outcome {
                frames: frames.clone(),
                error: Some(e),
                rest: Bytes::new(),
            };
            if end - line_start > max_line {
                return fail(FrameError::LineTooLong);
            }
            match literal_at_end(&data[line_start..end]) {
                Some((n, _)) if n > max_literal => return fail(FrameError::LiteralTooLarge(n)),
                Some((n, _)) if (n as usize) > data.len() - end - 1 => {
                    return Outcome {
                        frames,
                        error: None,
                        rest: Bytes::copy_from_slice(&data[start..]),
                    }
                }
                Some((n, _)) => line_start = end + 1 + n as usize,
                None => {
                    let frame = Bytes::copy_from_slice(&data[start..end + 1]);
                    frames.push((frame.clone(), parse(frame)));
                    start = end + 1;
                    continue 'frames;
                }
            }
        }
    }
}

fn value_bytes(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Atom(a) => out.extend_from_slice(a),
        Value::Str(s) => {
            out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
            out.extend_from_slice(s);
        }
        Value::List(l) => {
            out.push(b'(');
            values_bytes(l, out);
            out.push(b')');
        }
        Value::Nil => out.extend_from_slice(b"NIL"),
    }
}

fn values_bytes(l: &[Value], out: &mut Vec<u8>) {
    for (i, v) in l.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        value_bytes(v, out);
    }
}

fn status_word(s: Status) -> &'static [u8] {
    match s {
        Status::Ok => b"OK",
        Status::No => b"NO",
        Status::Bad => b"BAD",
        Status::Bye => b"BYE",
        Status::PreAuth => b"PREAUTH",
    }
}

fn status_bytes(status: Status, info: &StatusText, out: &mut Vec<u8>) {
    out.extend_from_slice(status_word(status));
    // Always a code, even empty: otherwise text starting with `[` would become one.
    out.extend_from_slice(b" [");
    values_bytes(&info.code, out);
    out.extend_from_slice(b"] ");
    out.extend_from_slice(info.text.as_bytes());
}

/// The response on the wire again (literals for all strings); `None` where it has no such form.
fn encode(r: &Response) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match r {
        Response::Continue => out.extend_from_slice(b"+ "),
        Response::Tagged { tag, status, info } => {
            // A line ` *x OK` parses as the tag `*x`; without the leading space it is untagged.
            if matches!(tag.first(), Some(b'*' | b'+')) {
                return None;
            }
            out.extend_from_slice(tag);
            out.push(b' ');
            status_bytes(*status, info, &mut out);
        }
        Response::Condition { status, info } => {
            out.extend_from_slice(b"* ");
            status_bytes(*status, info, &mut out);
        }
        Response::Numbered { n, kind, items } => {
            out.extend_from_slice(format!("* {n} {kind} ").as_bytes());
            values_bytes(items, &mut out);
        }
        Response::Data { kind, items } => {
            out.extend_from_slice(format!("* {kind} ").as_bytes());
            values_bytes(items, &mut out);
        }
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// Every atom and string in `l`, depth first.
fn walk<'a>(l: &'a [Value], f: &mut impl FnMut(&'a Value)) {
    for v in l {
        f(v);
        if let Value::List(inner) = v {
            walk(inner, f);
        }
    }
}

const UID_CAP: usize = 2000;

fn check_uid_set(s: &[u8]) {
    let Some(v) = parse_uid_set(s, UID_CAP) else {
        return;
    };
    assert!(v.len() <= UID_CAP);
    assert!(!v.is_empty(), "{s:?} parsed to no UIDs");
    let small = parse_uid_set(s, UID_CAP / 3).expect("parses with a smaller cap");
    assert_eq!(small[..], v[..small.len()], "smaller cap is not a prefix");
    if v.len() == UID_CAP {
        return;
    }
    let formatted = format_uid_set(&v);
    let back = parse_uid_set(formatted.as_bytes(), UID_CAP).expect("formatted set parses");
    let mut want = v.clone();
    want.sort_unstable();
    want.dedup();
    assert_eq!(back, want, "{s:?} -> {formatted}");
    assert_eq!(format_uid_set(&back), formatted, "format is not canonical");
}

fn check_status_text(info: &StatusText) {
    let name = info.code_name();
    assert_eq!(name, name.to_ascii_uppercase());
    let _ = info.code_number(0);
    assert!(!info.text.contains(['\r', '\n']));
    if matches!(name.as_str(), "APPENDUID" | "COPYUID") {
        for v in info.code.iter().skip(2) {
            if let Some(b) = v.bytes() {
                check_uid_set(b);
            }
        }
    }
}

fn check_response(r: &Response, frame_len: usize, max_literal: u64, max_line: usize) {
    let items: &[Value] = match r {
        Response::Tagged { tag, info, .. } => {
            assert!(!tag.is_empty());
            assert!(!tag.iter().any(|b| matches!(b, b' ' | b'\r' | b'\n')));
            check_status_text(info);
            &info.code
        }
        Response::Condition { info, .. } => {
            check_status_text(info);
            &info.code
        }
        Response::Numbered { kind, items, .. } => {
            assert_eq!(*kind, kind.to_ascii_uppercase());
            items
        }
        Response::Data { kind, items } => {
            assert!(!kind.is_empty());
            assert_eq!(*kind, kind.to_ascii_uppercase());
            if kind == "CAPABILITY" {
                let words: Vec<&str> = items.iter().filter_map(Value::text).collect();
                let caps = Caps::parse(&words.join(" "));
                let plain =
                    |w: &&&str| !w.is_empty() && !w.bytes().any(|b| b.is_ascii_whitespace());
                for w in words.iter().filter(plain) {
                    assert!(caps.has(w), "{w} lost");
                }
            }
            items
        }
        Response::Continue => &[],
    };
    walk(items, &mut |v| match v {
        Value::Atom(a) => {
            assert!(!a.is_empty() && !a.eq_ignore_ascii_case(b"NIL"));
            assert!(a.len() <= max_line);
            check_uid_set(a);
        }
        Value::Str(s) => {
            assert!(s.len() as u64 <= max_literal.max(max_line as u64));
            assert!(s.len() <= frame_len);
            check_uid_set(s);
        }
        Value::List(_) | Value::Nil => {}
    });
    if let Some(f) = Fetched::parse(r) {
        assert_ne!(f.uid, 0);
        if let Some(b) = &f.body {
            assert!(b.len() <= frame_len);
        }
    }
    if let Some(wire) = encode(r) {
        let again = parse(Bytes::from(wire.clone()));
        assert_eq!(
            again.as_ref(),
            Ok(r),
            "re-encoded as {:?}",
            String::from_utf8_lossy(&wire)
        );
    }
}

fn run(data: &[u8]) {
    let [cfg, seed, data @ ..] = data else { return };
    let max_literal = [0u64, 1, 16, 300][usize::from(cfg & 3)];
    let max_line = [16usize, 100, 1000, 1 << 20][usize::from(cfg >> 2 & 3)];
    let whole = incremental(data, 0, max_literal, max_line);
    let chunked = incremental(data, *seed, max_literal, max_line);
    assert_eq!(whole, chunked, "chunking changed the outcome");
    assert_eq!(whole, reference(data, max_literal, max_line));
    for (frame, parsed) in &whole.frames {
        // Every line and literal of a frame within its cap.
        let mut line_start = 0;
        while line_start < frame.len() {
            let i = frame[line_start..]
                .iter()
                .position(|&b| b == b'\n')
                .unwrap();
            assert!(i <= max_line);
            let line_end = line_start + i;
            match literal_at_end(&frame[line_start..line_end]) {
                Some((n, _)) => {
                    assert!(n <= max_literal);
                    line_start = line_end + 1 + n as usize;
                }
                None => {
                    assert_eq!(line_end + 1, frame.len());
                    line_start = frame.len();
                }
            }
        }
        if let Ok(r) = parsed {
            check_response(r, frame.len(), max_literal, max_line);
        }
    }
}

/// A thread with a small stack (64 KiB; a tokio worker has 2 MiB for lines of up to 16 MiB).
fn worker() -> &'static Mutex<Sender<(Vec<u8>, Sender<()>)>> {
    static W: OnceLock<Mutex<Sender<(Vec<u8>, Sender<()>)>>> = OnceLock::new();
    W.get_or_init(|| {
        let (tx, rx) = channel::<(Vec<u8>, Sender<()>)>();
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                for (data, done) in rx {
                    run(&data);
                    let _ = done.send(());
                }
            })
            .unwrap();
        Mutex::new(tx)
    })
}

fuzz_target!(|data: &[u8]| {
    let (done, wait) = channel();
    worker()
        .lock()
        .unwrap()
        .send((data.to_vec(), done))
        .unwrap();
    // A panic on the worker aborts the process (libfuzzer's panic hook), so this only returns.
    wait.recv().unwrap();
});
