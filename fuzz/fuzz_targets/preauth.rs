//! Any byte stream, split anywhere, fed to the pre-auth state machine: no panic, bounded
//! buffering, and every event well-formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailferry::imap::preauth::{Event, PreAuth, PreAuthLimits};
use mailferry::limits::Limits;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let limits = Limits::default();
    let mut p = PreAuth::new(split & 1 == 0, split & 2 == 0, "*", PreAuthLimits::from(&limits));
    let cut = (split as usize * 7) % (data.len() + 1);
    for chunk in [&data[..cut], &data[cut..]] {
        p.feed(chunk);
        while let Some(ev) = p.next_event() {
            match ev {
                Event::Reply(b) | Event::StartTls(b) => assert!(b.ends_with(b"\r\n")),
                Event::Close(_) => return,
                Event::Login(_) => p.login_failed(),
            }
        }
        // Input is bounded: a line over the limit closes the session.
        assert!(p.buffered() <= data.len());
    }
});
