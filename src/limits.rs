//! Every size limit and timeout of the proxy, in one place, with where each default comes from.

use std::time::Duration;

use serde::Deserialize;

/// Size limits and per-phase timeouts. Durations are whole seconds in TOML (`[limits]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest pre-auth command line; 8 KiB as Dovecot's `imap_max_line_length` for login.
    pub preauth_line: usize,
    /// Largest literal accepted before login (a LOGIN password); larger gets BAD and close.
    pub preauth_literal: usize,
    /// RFC 2971: at most 30 field/value pairs in ID.
    pub id_max_pairs: usize,
    /// RFC 2971: field names at most 30 octets.
    pub id_max_field: usize,
    /// RFC 2971: values at most 1024 octets.
    pub id_max_value: usize,
    /// Open IMAP client connections (plain and implicit-TLS listeners together). The key keeps
    /// its name from before LMTP had its own limit. 20,000 sessions hold two sockets each,
    /// well within the file descriptors the systemd unit allows (`LimitNOFILE`).
    pub max_connections: usize,
    /// Open LMTP connections, counted apart from IMAP so that no number of IMAP clients can
    /// keep the MTA out. Postfix opens at most 20 per destination by default
    /// (`default_destination_concurrency_limit`); 500 leaves room for several MTAs.
    pub max_lmtp_connections: usize,
    /// IMAP connections from one source address (an IPv6 /64) that have not logged in yet.
    /// A connection frees its slot when it logs in or closes. Real clients hold one each for
    /// about a second, so 50 lets a NAT gateway full of them through, while one host opening
    /// thousands of slow connections is refused (`* BYE [UNAVAILABLE]`) after its 50th.
    pub max_preauth_per_ip: usize,
    /// The whole pre-auth phase (TLS handshake, commands, login), however busy the client
    /// keeps it: a client trickling a byte at a time never hits `preauth_idle_secs` but is
    /// closed here. 60 s is many times what a real login takes. Also bounds an LMTP
    /// session's time until its first `MAIL FROM`.
    pub preauth_deadline_secs: u64,
    /// Failed logins in one session before the proxy says BYE.
    pub max_auth_failures: u32,
    /// First delay after a failed login from an address, doubled per further failure.
    pub auth_failure_delay_ms: u64,
    /// Ceiling of that delay.
    pub auth_failure_delay_max_ms: u64,
    /// TLS handshake (implicit TLS and STARTTLS), as seconds.
    pub tls_handshake_secs: u64,
    /// Silence before login (per read; the phase as a whole is bounded by
    /// `preauth_deadline_secs`); RFC 9051 allows servers to close idle unauthenticated sessions.
    pub preauth_idle_secs: u64,
    /// Connecting to a backend.
    pub backend_connect_secs: u64,
    /// Backend greeting and each backend reply during login.
    pub backend_reply_secs: u64,
    /// Silence in both directions after login; RFC 9051 requires at least 30 minutes.
    pub postauth_idle_secs: u64,
    /// Time sessions get to finish on SIGTERM before the proxy says BYE.
    pub shutdown_grace_secs: u64,
    /// Read buffer per direction of an active spliced session.
    pub splice_buffer: usize,
    /// After a client half-closes its side, time the backend gets to finish its responses.
    pub half_close_secs: u64,
    /// Time a backend gets to answer the LOGOUT of a session the proxy or sync engine ends.
    pub logout_secs: u64,
    /// Connecting to the LDAP directory: TCP, StartTLS and the TLS handshake together. A
    /// directory on the same network answers in milliseconds; a login waits for this at most
    /// once before it is answered `NO [UNAVAILABLE]`.
    pub directory_connect_secs: u64,
    /// One LDAP operation (bind, search, modify). OpenLDAP answers an indexed equality search
    /// in well under a millisecond; 5 s is a directory in trouble, and the login gets
    /// `NO [UNAVAILABLE]` (LMTP `451 4.3.0`) rather than waiting for the client to give up.
    pub directory_reply_secs: u64,
    /// LDAP connections kept open and reused. Each carries many operations at once (LDAP
    /// multiplexes by message id), so a few serve thousands of logins a second.
    pub directory_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            preauth_line: 8 * 1024,
            preauth_literal: 8 * 1024,
            id_max_pairs: 30,
            id_max_field: 30,
            id_max_value: 1024,
            max_connections: 20_000,
            max_lmtp_connections: 500,
            max_preauth_per_ip: 50,
            preauth_deadline_secs: 60,
            max_auth_failures: 3,
            auth_failure_delay_ms: 500,
            auth_failure_delay_max_ms: 15_000,
            tls_handshake_secs: 15,
            preauth_idle_secs: 180,
            backend_connect_secs: 10,
            backend_reply_secs: 30,
            postauth_idle_secs: 31 * 60,
            shutdown_grace_secs: 10,
            splice_buffer: 64 * 1024,
            half_close_secs: 10,
            logout_secs: 2,
            directory_connect_secs: 5,
            directory_reply_secs: 5,
            directory_connections: 4,
        }
    }
}

impl Limits {
    /// TLS handshake timeout.
    pub fn tls_handshake(&self) -> Duration {
        Duration::from_secs(self.tls_handshake_secs)
    }
    /// Pre-auth idle timeout.
    pub fn preauth_idle(&self) -> Duration {
        Duration::from_secs(self.preauth_idle_secs)
    }
    /// Deadline of the whole pre-auth phase.
    pub fn preauth_deadline(&self) -> Duration {
        Duration::from_secs(self.preauth_deadline_secs)
    }
    /// Backend connect timeout.
    pub fn backend_connect(&self) -> Duration {
        Duration::from_secs(self.backend_connect_secs)
    }
    /// Backend reply timeout.
    pub fn backend_reply(&self) -> Duration {
        Duration::from_secs(self.backend_reply_secs)
    }
    /// Post-auth idle timeout.
    pub fn postauth_idle(&self) -> Duration {
        Duration::from_secs(self.postauth_idle_secs)
    }
    /// Shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// Half-close grace of a spliced session.
    pub fn half_close(&self) -> Duration {
        Duration::from_secs(self.half_close_secs)
    }
    /// LOGOUT reply timeout.
    pub fn logout(&self) -> Duration {
        Duration::from_secs(self.logout_secs)
    }

    /// Reasons these limits are unusable (empty when fine).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.preauth_line < 512 {
            p.push("limits.preauth_line must be at least 512".into());
        }
        if self.postauth_idle_secs < 30 * 60 {
            p.push("limits.postauth_idle_secs must be at least 1800 (RFC 9051)".into());
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("max_lmtp_connections", self.max_lmtp_connections),
            ("max_preauth_per_ip", self.max_preauth_per_ip),
            ("directory_connections", self.directory_connections),
            (
                "directory_connect_secs",
                self.directory_connect_secs as usize,
            ),
            ("directory_reply_secs", self.directory_reply_secs as usize),
        ] {
            if value == 0 {
                p.push(format!("limits.{key} must be at least 1"));
            }
        }
        if self.preauth_deadline_secs == 0 {
            p.push("limits.preauth_deadline_secs must be at least 1".into());
        }
        if self.splice_buffer < 4096 {
            p.push("limits.splice_buffer must be at least 4096".into());
        }
        p
    }
}
