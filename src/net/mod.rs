//! Sockets: listeners and their connection permits, TLS configurations, and the stream type
//! shared by client and backend.

pub mod listener;
pub mod permits;
pub mod stream;
pub mod tls;

pub use stream::Stream;
