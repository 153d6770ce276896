//! The server→client response filter, on any byte stream split anywhere: no panic, no byte
//! invented, nothing changed in a stream without `COMPRESS=`, no `COMPRESS=` left in a
//! capability response it filtered, and the same output however the stream is chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailferry::imap::filter::ResponseFilter;

fn run(data: &[u8], chunk: usize) -> (Vec<u8>, usize) {
    let mut f = ResponseFilter::new();
    let mut out = Vec::new();
    for part in data.chunks(chunk.max(1)) {
        out.extend_from_slice(f.forward(part));
    }
    (out, f.held())
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

fn is_subsequence(small: &[u8], big: &[u8]) -> bool {
    let mut it = big.iter();
    small.iter().all(|b| it.any(|c| c == b))
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else { return };
    let whole = run(data, data.len());
    assert_eq!(run(data, chunk as usize), whole);
    let (out, held) = whole;
    assert!(is_subsequence(&out, data));
    if !contains_ci(data, b"COMPRESS=") {
        assert_eq!([&out[..], &data[data.len() - held..]].concat(), data);
    }
    // One untagged capability response comes out without a COMPRESS= capability.
    let lines = data.iter().filter(|&&b| b == b'\n').count();
    if data.len() < 512
        && data.starts_with(b"* CAPABILITY ")
        && data.ends_with(b"\n")
        && lines == 1
        && !data.contains(&b'[')
    {
        let compress = out
            .split(|&b| b == b' ')
            .any(|t| t.len() >= 9 && t[..9].eq_ignore_ascii_case(b"COMPRESS="));
        assert!(!compress, "{:?}", String::from_utf8_lossy(&out));
    }
});
