//! One IMAP connection, to a client or a backend: the socket and the bytes read from it but
//! not yet used.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::Stream;

/// A socket with its read buffer; `into_parts` hands both to the splice.
pub struct Conn {
    stream: Stream,
    buf: BytesMut,
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(stream: Stream) -> Self {
        Conn {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// The stream (for addresses and TLS state).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Bytes read and not yet consumed.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Reads once into the buffer, at most `max` bytes; 0 means end of stream.
    pub async fn read_some(&mut self, max: usize) -> io::Result<usize> {
        // Login-phase exchanges are small; a large reservation per connection fragments the heap.
        self.buf.reserve(max.min(4 * 1024));
        let mut limited = (&mut self.stream).take(max as u64);
        limited.read_buf(&mut self.buf).await
    }

    /// Reads once straight into `dst` (past the buffer), at most `max` bytes: a large literal
    /// goes into its own buffer without passing through this one.
    pub async fn read_into(&mut self, dst: &mut BytesMut, max: usize) -> io::Result<usize> {
        let mut limited = (&mut self.stream).take(max as u64);
        limited.read_buf(dst).await
    }

    /// Writes all of `bytes` and flushes.
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The stream and the unconsumed bytes.
    pub fn into_parts(self) -> (Stream, BytesMut) {
        (self.stream, self.buf)
    }
}
