//! The backend login's reader (`backend::reply`) on any bytes, as a backend's side of the
//! conversation: responses taken off one buffer as chunks arrive, the first read as the
//! greeting, the rest as replies to the login's tags. Checks: no panic; the same responses
//! however the input is chunked; the buffer stays within its bound; every response is whole
//! (it ends where a line without a pending literal ends); a greeting other than `* OK` never
//! counts as ready; a reply counts as ours only after our exact tag and a space.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailferry::backend::reply::{
    self, filter_capabilities, Greeting, LoginReply, Reply, ResponseReader, TooLarge,
    MAX_RESPONSE,
};

/// The responses of `data` arriving in chunks of `chunk` bytes, and whether the bound stopped it.
fn responses(data: &[u8], chunk: usize) -> (Vec<Vec<u8>>, Option<TooLarge>) {
    let mut reader = ResponseReader::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for part in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(part);
        loop {
            match reader.next(&mut buf) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        assert!(buf.len() <= MAX_RESPONSE, "unbounded buffer");
    }
    (out, None)
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    let whole = responses(data, data.len().max(1));
    let chunked = responses(data, usize::from(seed % 31) + 1);
    assert_eq!(whole, chunked, "chunking changed the result");
    let mut untagged = Vec::new();
    for (i, resp) in whole.0.iter().enumerate() {
        assert!(resp.len() <= MAX_RESPONSE);
        if i == 0 {
            match reply::greeting(resp) {
                Greeting::Ready { .. } => assert!(resp.starts_with(b"* OK")),
                Greeting::Bye(t) => assert!(t.starts_with("* BYE")),
                Greeting::Unexpected => {}
            }
            continue;
        }
        match reply::reply(resp, "m2") {
            Reply::Tagged(status) => {
                assert!(resp.starts_with(b"m2 "));
                match reply::login_reply(&status, &untagged) {
                    LoginReply::Ok { capabilities, .. } => {
                        assert!(status.starts_with("OK"));
                        if let Some(c) = capabilities {
                            let kept = filter_capabilities(&c, &["COMPRESS=DEFLATE".into()]);
                            assert!(!kept
                                .split(' ')
                                .any(|c| c.eq_ignore_ascii_case("COMPRESS=DEFLATE")));
                        }
                    }
                    LoginReply::AuthFailed | LoginReply::Refused => {
                        assert!(status.starts_with("NO"))
                    }
                    LoginReply::Unexpected(_) => {}
                }
                let _ = mailferry::backend::error::refusal_code(&status);
            }
            Reply::Continuation => assert!(resp.starts_with(b"+")),
            Reply::Untagged => untagged.push(resp.clone()),
        }
    }
});
