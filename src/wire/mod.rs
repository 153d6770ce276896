//! Pure IMAP byte helpers shared by the proxy and the sync engine: literal announcements,
//! response framing, SASL PLAIN. No I/O: bytes in, values out.

pub mod framer;
pub mod sasl;
