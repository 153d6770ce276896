//! One identity per user (DESIGN.md §2), against real Dovecot: with `[directory]
//! default_domain` and `recipient_delimiter`, a bare or differently cased login and a
//! sub-addressed recipient route, kick and count as the same user; the backends get what the
//! client or the MTA sent.

mod support;

use support::client::Client;
use support::deadline::within;
use support::dovecot::lmtp_deliver;
use support::mailferry::{Mailferry, Options};
use support::Backends;

/// Backends that complete a bare login with the same domain, as providers' Dovecots do.
fn backends() -> Backends {
    let conf = "auth_default_realm = example.org\n";
    Backends::start_with(conf, conf)
}

fn proxy(b: &Backends) -> Mailferry {
    Mailferry::start(
        b,
        Options {
            extra: "[directory]\ndefault_domain = \"example.org\"\nrecipient_delimiter = \"+\"\n"
                .into(),
            ..Options::default()
        },
    )
}

#[test]
fn a_bare_login_and_a_sub_address_follow_the_users_route_and_kicks() {
    within(120, || {
        let b = backends();
        let m = proxy(&b);
        m.route("alice@example.org", "new");
        // `ALICE` is alice@example.org: routed to new, and the backend accepts it as sent.
        let mut c = Client::plain(m.imap);
        let ok = c.login("ALICE", "alicepw");
        assert!(ok.starts_with("OK"), "{ok}\n{}", m.log());
        assert_eq!(c.inbox_subjects(), vec!["new marker"]);
        assert_eq!(m.show("Alice@Example.org")["sessions"], 1);
        // Mail to a sub-address lands with the user on new.
        let msg = b"From: a@example.net\r\nSubject: tagged\r\n\r\nhi\r\n";
        let r = lmtp_deliver(m.lmtp, "a@example.net", &["alice+news@example.org"], msg);
        assert!(r.all_delivered(), "{r:?}");
        assert_eq!(b.new.count("alice@example.org", "INBOX"), 2);
        assert_eq!(b.legacy.count("alice@example.org", "INBOX"), 1);
        // A flip of alice@example.org kicks the session opened as `ALICE`.
        c.send(b"i IDLE\r\n");
        assert!(c.line().starts_with("+ "));
        m.route("alice", "legacy");
        let bye = loop {
            let line = c.line();
            if !line.starts_with("* ") || line.starts_with("* BYE") {
                break line;
            }
        };
        assert!(bye.starts_with("* BYE [UNAVAILABLE]"), "{bye}");
        let v = m.show("alice@example.org");
        assert_eq!(v["route"], "legacy", "{v}");
    });
}

#[test]
fn a_bad_delimiter_or_domain_is_refused_by_check_config() {
    within(60, || {
        let b = backends();
        let m = proxy(&b);
        let text = std::fs::read_to_string(&m.config).unwrap().replace(
            "recipient_delimiter = \"+\"",
            "recipient_delimiter = \"+-\"\ndefault_domain = \"not a domain\"",
        );
        // The second default_domain key is refused by TOML itself; use a fresh table instead.
        let text = text.replace("default_domain = \"example.org\"\n", "");
        let config = m.config.with_file_name("bad.toml");
        std::fs::write(&config, text).unwrap();
        let out = support::mailferry::run_cli(&config, &["check-config"], 30);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_ne!(out.status.code(), Some(0), "{said}");
        assert!(said.contains("recipient_delimiter"), "{said}");
        assert!(said.contains("default_domain"), "{said}");
    });
}
