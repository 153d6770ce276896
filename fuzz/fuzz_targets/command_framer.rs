//! The client→server command framer, on any byte stream split anywhere: no panic, no byte
//! invented, at most whole `tag COMPRESS DEFLATE` lines taken out (one reply each), and the
//! same result however the stream is chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailferry::imap::command::CommandFramer;

/// Forwarded bytes, replies and bytes still held, for `data` in pieces of `chunk` bytes.
/// No continuation request ever comes, so every `{n}` is refused whatever the chunking.
fn run(data: &[u8], chunk: usize) -> (Vec<u8>, Vec<u8>, usize) {
    let mut f = CommandFramer::new();
    let (mut out, mut replies) = (Vec::new(), Vec::new());
    for part in data.chunks(chunk.max(1)) {
        out.extend_from_slice(f.forward(part, 0));
        replies.extend(f.take_replies().unwrap_or_default());
    }
    (out, replies, f.held())
}

fn is_subsequence(small: &[u8], big: &[u8]) -> bool {
    let mut it = big.iter();
    small.iter().all(|b| it.any(|c| c == b))
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else { return };
    let whole = run(data, data.len());
    assert_eq!(run(data, chunk as usize), whole);
    let (out, replies, held) = whole;
    assert!(is_subsequence(&out, data));
    let taken = data.len() - out.len() - held;
    let answered = replies.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
    // Each answered command is a line of at least `t COMPRESS DEFLATE\n` (19 bytes).
    assert!(taken >= answered * 19, "{taken} bytes taken for {answered} replies");
    if answered == 0 {
        assert_eq!(taken, 0);
    }
});
