//! Sockets: listeners, TLS configurations, and the stream type shared by client and backend.

pub mod listener;
pub mod stream;
pub mod tls;

pub use stream::Stream;
