//! The framer must find the same response boundaries however the stream is chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailferry::imap::framer::ResponseFramer;

fn boundaries(data: &[u8], chunk: usize) -> Vec<usize> {
    let mut f = ResponseFramer::new();
    let mut out = Vec::new();
    let mut base = 0;
    for part in data.chunks(chunk.max(1)) {
        let mut pos = 0;
        while pos < part.len() {
            match f.feed_to_boundary(&part[pos..]) {
                Some(0) => {
                    out.push(base + pos);
                    f.feed(&part[pos..pos + 1]);
                    pos += 1;
                }
                Some(n) => pos += n,
                None => pos = part.len(),
            }
        }
        base += part.len();
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else { return };
    assert_eq!(boundaries(data, chunk as usize), boundaries(data, data.len()));
});
