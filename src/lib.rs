//! mailferry: a transparent IMAP/LMTP proxy and sync engine for live mailbox migrations.
//!
//! Modules follow the flows of DESIGN.md §1; a module never reaches back up its flow.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod backend;
pub mod check;
pub mod config;
pub mod control;
pub mod imap;
pub mod limits;
pub mod lmtp;
pub mod logging;
pub mod net;
pub mod route;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod sync;
pub mod wire;
