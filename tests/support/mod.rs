//! Shared integration-test support: real Dovecot backends, OpenLDAP, PostgreSQL, Postfix and
//! TLS helpers.
//! Use with `mod support;` from a test crate.
#![allow(dead_code)]

pub mod client;
pub mod corpus;
pub mod deadline;
pub mod dovecot;
pub mod fake;
pub mod fds;
pub mod ldap;
pub mod mailferry;
pub mod postfix;
pub mod postgres;
pub mod relay;
pub mod tls;

#[allow(unused_imports)]
pub use dovecot::{
    free_port, marker_message, Backends, Dovecot, Flavor, ImapConn, ImapResponse, LmtpOutcome,
    MASTER_PASSWORD, MASTER_USER, SPECIAL_USE, USERS,
};
#[allow(unused_imports)]
pub use tls::{self_signed, TestCert};
