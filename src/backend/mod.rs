//! A connection to a backend, used by the proxy and the sync engine alike: where it is
//! (`target`), the socket with its buffer (`conn`), connect + TLS + greeting + ID + login
//! (`login`), the backend's replies parsed (`reply`, pure), and what can go wrong (`error`). Knows nothing of clients or sync state.

pub mod conn;
pub mod error;
pub mod login;
pub mod reply;
pub mod target;
