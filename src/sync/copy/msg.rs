//! A message on its way from the fetcher to the appender, and how an APPEND is written: the
//! command's head and each message's flags, date and literal.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::store::sync::UidRow;
use crate::sync::bodies::BodyPool;
use crate::sync::proto;

/// A fetched message on its way to the target.
pub(super) struct Msg {
    pub uid: u32,
    pub flags: Vec<String>,
    pub date: Option<String>,
    /// Length of the body.
    pub size: u64,
    /// The body, or as much of it as has arrived: sent as one literal, in this order.
    pub parts: Vec<Bytes>,
    /// The rest of a body still arriving from legacy, up to its [`Part::End`].
    pub rest: Option<mpsc::UnboundedReceiver<Part>>,
    /// What is left of the buffer a body arriving in parts was read into, once all is here.
    pub tail: Option<BytesMut>,
    /// Content hash, taken only for a target without UIDPLUS (its pending rows are matched by
    /// hash right after the copy).
    pub hash: Option<String>,
    /// Where the body's buffer goes back once the message is done with.
    pub bodies: Arc<BodyPool>,
    /// Its share of the bytes fetched messages may hold.
    pub _permit: OwnedSemaphorePermit,
}

/// A piece of a body that is still arriving from legacy.
pub(super) enum Part {
    Data(Bytes),
    /// All of it is here: its content hash (when one is taken) and what is left of its buffer.
    End {
        hash: Option<String>,
        tail: BytesMut,
    },
}

impl Drop for Msg {
    fn drop(&mut self) {
        let parts = std::mem::take(&mut self.parts);
        match self.tail.take() {
            Some(tail) => {
                // The buffer comes back whole once no part of it is held.
                drop(parts);
                self.bodies.give_tail(tail, self.size as usize);
            }
            None => parts.into_iter().for_each(|p| self.bodies.give(p)),
        }
    }
}

impl Msg {
    /// Its pending row, with its hash if one was taken.
    pub fn row(&self) -> UidRow {
        UidRow {
            source_uid: self.uid,
            target_uid: None,
            hash: self.hash.clone().unwrap_or_default(),
            size: self.size,
            pending_at: None,
        }
    }

    /// Whether the body is still arriving: its APPEND is a command of its own, sent as it comes.
    pub fn arriving(&self) -> bool {
        self.rest.is_some()
    }

    /// ` (flags) "date" {n+}\r\n`, to follow the command head or the previous message of a
    /// MULTIAPPEND; the body goes after it (`literal_plus`), or after the continuation.
    pub fn encode(&self, out: &mut Vec<u8>, literal_plus: bool) {
        message_head(
            out,
            &self.flags,
            self.date.as_deref(),
            self.size,
            literal_plus,
        );
    }
}

/// ` (flags) "date" {size+}\r\n`: one message of an APPEND, after the command head or the
/// previous message of a MULTIAPPEND; its `size` bytes go after it (`literal_plus`), or after
/// the continuation.
pub(crate) fn message_head(
    out: &mut Vec<u8>,
    flags: &[String],
    date: Option<&str>,
    size: u64,
    literal_plus: bool,
) {
    out.extend_from_slice(b" (");
    out.extend_from_slice(flags.join(" ").as_bytes());
    out.extend_from_slice(b") ");
    if let Some(d) = date {
        out.extend_from_slice(proto::quote(d).as_bytes());
        out.push(b' ');
    }
    let plus = if literal_plus { "+" } else { "" };
    out.extend_from_slice(format!("{{{size}{plus}}}\r\n").as_bytes());
}

/// `tag APPEND "mailbox"`: what every APPEND starts with, before its messages.
pub(crate) fn append_command(out: &mut Vec<u8>, tag: &str, mbox: &str) {
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(b" APPEND ");
    out.extend_from_slice(mbox.as_bytes());
}

/// An APPEND batch on its way out: command text and small bodies gathered into one buffer,
/// large bodies sent from their own (shared) buffers without a copy.
#[derive(Default)]
pub(super) struct Out {
    parts: Vec<Bytes>,
    pub head: Vec<u8>,
}

impl Out {
    /// Below this a body is copied into the command text: fewer, larger writes.
    const COPY_BELOW: usize = 64 * 1024;

    /// Adds one message (after the command head or the previous message) with its body.
    pub fn message(&mut self, m: &Msg) {
        m.encode(&mut self.head, true);
        for body in &m.parts {
            if body.len() < Self::COPY_BELOW {
                self.head.extend_from_slice(body);
            } else {
                self.parts.push(Bytes::from(std::mem::take(&mut self.head)));
                self.parts.push(body.clone());
            }
        }
    }

    /// The buffers to write, in order.
    pub fn finish(mut self) -> Vec<Bytes> {
        if !self.head.is_empty() {
            self.parts.push(Bytes::from(self.head));
        }
        self.parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(flags: &[&str], date: Option<&str>, body: &'static [u8]) -> Msg {
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("a permit");
        Msg {
            uid: 1,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            date: date.map(str::to_owned),
            size: body.len() as u64,
            parts: vec![Bytes::from_static(body)],
            rest: None,
            tail: None,
            hash: None,
            bodies: Arc::new(BodyPool::new(0)),
            _permit: permit,
        }
    }

    #[test]
    fn an_append_is_its_head_then_each_message() {
        let mut out = Out::default();
        append_command(&mut out.head, "s7", &proto::quote("INBOX"));
        out.message(&msg(
            &["\\Seen", "$Work"],
            Some("01-Feb-2020 10:00:00 +0000"),
            b"hello",
        ));
        out.message(&msg(&[], None, b"hi"));
        out.head.extend_from_slice(b"\r\n");
        assert_eq!(
            out.finish().concat(),
            b"s7 APPEND \"INBOX\" (\\Seen $Work) \"01-Feb-2020 10:00:00 +0000\" {5+}\r\nhello \
              () {2+}\r\nhi\r\n"
        );
        let mut sync = Vec::new();
        msg(&[], None, b"hi").encode(&mut sync, false);
        assert_eq!(sync, b" () {2}\r\n");
    }
}
