//! The IMAP proxy: pre-auth conversation, backend login, then a framing-aware splice.

pub mod authdelay;
pub mod command;
pub mod filter;
pub mod framer;
pub mod preauth;
pub mod session;
pub mod splice;
