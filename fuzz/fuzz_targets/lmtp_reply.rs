//! The LMTP client's parser of backend replies (`lmtp::reply::parse_reply`) on any bytes, fed
//! the way the client reads them: chunks appended to one buffer, whole replies taken off its
//! front. Checks: no panic; the same replies and error however the input is chunked; the
//! buffer never holds more than the bound plus one chunk; every reply is well formed (code
//! 200–599, at least one line, no CR or LF in its text) and re-encodes to bytes that parse
//! back to the same reply.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailferry::lmtp::reply::{parse_reply, Reply, ReplyError};

const MAX: usize = 1024;

/// Parses `data` arriving in chunks of `chunk` bytes.
fn replies(data: &[u8], chunk: usize) -> (Vec<Reply>, Option<ReplyError>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for part in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(part);
        loop {
            match parse_reply(&mut buf, MAX) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        assert!(buf.len() <= MAX + chunk.max(1), "unbounded buffer");
    }
    (out, None)
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    let whole = replies(data, data.len().max(1));
    let chunked = replies(data, usize::from(seed % 17) + 1);
    assert_eq!(whole, chunked, "chunking changed the result");
    for r in &whole.0 {
        assert!((200..600).contains(&r.code));
        assert!(!r.lines.is_empty());
        assert!(r.lines.iter().all(|l| !l.contains(['\r', '\n'])));
        let mut again = BytesMut::from(r.to_bytes().as_slice());
        assert_eq!(parse_reply(&mut again, usize::MAX), Ok(Some(r.clone())));
        assert!(again.is_empty());
    }
});
