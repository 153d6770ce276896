//! The LMTP server state machine (command parser, DATA receiver) and the backend reply parser
//! on any bytes: no panic, bounded buffering, the same transcript however the input is
//! chunked, and every delivered message re-stuffs into exactly one message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailferry::lmtp::data::{stuff, DataReceiver};
use mailferry::lmtp::reply::parse_reply;
use mailferry::lmtp::server::{parse_command, Command, Event, Server, ServerLimits};

const MAX_LINE: usize = 512;

/// Runs the server over `data` cut into pieces of `chunk` bytes, accepting every recipient;
/// returns the transcript (replies, and a marker per delivered message).
fn transcript(data: &[u8], chunk: usize) -> Vec<u8> {
    let limits = ServerLimits {
        max_line: MAX_LINE,
        max_message_size: 4096,
        max_recipients: 5,
        max_errors: 50,
        ..ServerLimits::default()
    };
    let mut s = Server::<()>::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for part in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(part);
        loop {
            match s.poll(&mut buf) {
                Event::Reply(r) => r.encode_into(&mut out),
                Event::Rcpt(a) => {
                    assert!(!a.is_empty() && a.len() <= 256);
                    assert!(a.bytes().all(|b| (0x20..0x7f).contains(&b)));
                    s.accept_rcpt(a, ()).encode_into(&mut out);
                }
                Event::Deliver(m) => {
                    assert!(!m.rcpts.is_empty());
                    check_message(&m.body);
                    out.extend_from_slice(
                        format!("<message {} bytes>\r\n", m.body.len()).as_bytes(),
                    );
                }
                Event::Close(r) => {
                    r.encode_into(&mut out);
                    return out;
                }
                Event::NeedMore => break,
            }
        }
        // Command mode keeps at most one partial line; DATA consumes everything.
        assert!(buf.len() < MAX_LINE + chunk.max(1));
    }
    out
}

/// What a backend receives is one message, and reads back as the same message.
fn check_message(body: &[u8]) {
    for (i, &b) in body.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR");
        }
        if b == b'\n' {
            assert!(i > 0 && body[i - 1] == b'\r', "bare LF");
        }
    }
    let wire = stuff(body);
    let mut r = DataReceiver::new(u64::MAX);
    let (n, done) = r.feed(&wire);
    assert!(
        done && n == wire.len(),
        "exactly one end marker, at the end"
    );
    assert_eq!(r.finish().body, body);
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    for line in data.split(|&b| b == b'\n') {
        if let Ok(Command::Rcpt(a)) = parse_command(line) {
            assert!(!a.is_empty());
        }
    }
    let mut replies = BytesMut::from(data);
    while let Ok(Some(r)) = parse_reply(&mut replies, 1024) {
        assert!((200..600).contains(&r.code));
    }
    assert_eq!(
        transcript(data, chunk as usize),
        transcript(data, data.len())
    );
});
