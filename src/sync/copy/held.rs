//! Nothing reaches new whole before its intent is committed: an APPEND goes out at once, but
//! the last bytes of its command (`HELD_BACK`: the last byte of its last literal and the CRLF
//! after it) wait for the commit. Until they go, new cannot hold the message whole (nor, for
//! MULTIAPPEND, any of the command's messages), so a crash before the commit leaves new a
//! partial command, which it discards when the connection drops.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::intents::waited_for;
use super::msg::{Msg, Part};
use crate::backend::error::BackendError;
use crate::sync::client::Client;

/// Bytes at the end of an APPEND command held back until its messages' intents are committed.
pub(super) const HELD_BACK: usize = 3;

/// Writes `m`'s body (taking the rest as it arrives from legacy) and the line end after it,
/// the last [`HELD_BACK`] bytes once `m`'s intent is committed; returns how long that took.
/// None if legacy stopped before all of it arrived (the fetcher reports why) or the intent
/// will never be committed (the intent stage reports why): the literal is then left open on
/// `tgt`, whose session can only be dropped, which makes new discard it.
pub(super) async fn send_body(
    tgt: &mut Client,
    m: &mut Msg,
    committed: &mut watch::Receiver<u32>,
) -> Result<Option<Duration>, BackendError> {
    tgt.set_literal_open(true);
    let mut end = Tail::new(m.size);
    for p in &m.parts {
        end.write(tgt, p).await?;
    }
    if let Some(mut rest) = m.rest.take() {
        loop {
            match rest.recv().await {
                Some(Part::Data(p)) => {
                    end.write(tgt, &p).await?;
                    m.parts.push(p);
                }
                Some(Part::End { hash, tail }) => {
                    m.hash = hash;
                    m.tail = Some(tail);
                    break;
                }
                None => return Ok(None),
            }
        }
    }
    let end = end.end(tgt)?;
    let Some(waited) = waited_for(committed, m.uid).await else {
        return Ok(None);
    };
    tgt.write_literal(&end).await?;
    tgt.set_literal_open(false);
    Ok(Some(waited))
}

/// The end of one literal and its command's CRLF, kept from the pieces written before it.
struct Tail {
    /// Body bytes not written yet.
    left: u64,
    /// The held-back end, once the body's last byte has come.
    held: Option<Vec<u8>>,
}

impl Tail {
    fn new(size: u64) -> Tail {
        Tail {
            left: size,
            // An empty body holds no byte back: the CRLF alone keeps the command open.
            held: (size == 0).then(|| b"\r\n".to_vec()),
        }
    }

    /// Writes `piece` of the body but what belongs to the held-back end.
    async fn write(&mut self, tgt: &mut Client, piece: &[u8]) -> Result<(), BackendError> {
        if piece.is_empty() {
            return Ok(());
        }
        let n = piece.len() as u64;
        if n > self.left {
            return Err(tgt.protocol("message body longer than its announced size"));
        }
        self.left -= n;
        // The last byte of the body stays back with the CRLF after it.
        let keep = if self.left == 0 { HELD_BACK - 2 } else { 0 };
        let (now, later) = piece.split_at(piece.len() - keep);
        if !now.is_empty() {
            tgt.write_literal(now).await?;
        }
        if self.left == 0 {
            self.held = Some([later, b"\r\n"].concat());
        }
        Ok(())
    }

    /// The held-back end; an error if the body fell short of its announced size (the literal
    /// stays open, so the session is dropped).
    fn end(self, tgt: &Client) -> Result<Vec<u8>, BackendError> {
        self.held
            .ok_or_else(|| tgt.protocol("message body shorter than its announced size"))
    }
}

/// Splits the last `n` bytes off `parts` (fewer if they hold fewer).
pub(super) fn hold_back(parts: &mut Vec<Bytes>, mut n: usize) -> Vec<Bytes> {
    let mut held = Vec::new();
    while n > 0 {
        let Some(last) = parts.last_mut() else { break };
        if last.len() <= n {
            n -= last.len();
            if let Some(p) = parts.pop() {
                held.push(p);
            }
        } else {
            held.push(last.split_off(last.len() - n));
            n = 0;
        }
    }
    held.reverse();
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(parts: &[Bytes]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn the_end_held_back_spans_parts_and_leaves_the_rest_in_order() {
        let whole = b"a1 APPEND INBOX () {5+}\r\nhello\r\n";
        // The end split across a large body's buffer and the command text after it.
        let mut parts = vec![
            Bytes::from_static(b"a1 APPEND INBOX () {5+}\r\n"),
            Bytes::from_static(b"hello"),
            Bytes::from_static(b"\r\n"),
        ];
        let held = hold_back(&mut parts, HELD_BACK);
        assert_eq!(joined(&held), b"o\r\n");
        assert_eq!(joined(&parts), &whole[..whole.len() - HELD_BACK]);
        // All in one buffer.
        let mut parts = vec![Bytes::from_static(whole)];
        let held = hold_back(&mut parts, HELD_BACK);
        assert_eq!(joined(&held), b"o\r\n");
        assert_eq!([joined(&parts), joined(&held)].concat(), whole);
        // Fewer bytes than asked for: all of them.
        let mut parts = vec![Bytes::from_static(b"\r\n")];
        assert_eq!(joined(&hold_back(&mut parts, HELD_BACK)), b"\r\n");
        assert!(parts.is_empty());
    }
}
