//! The LDAP directory against a real OpenLDAP (`slapd`) and real Dovecot backends: routes
//! read from the attribute over StartTLS and LDAPS, a wrong CA refused, hostile login names
//! that find nobody, a directory that is down answered as unavailable (never as unknown) and
//! used again once back, and `user route` written back to the attribute.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mailferry::config::Config;
use mailferry::route::ldap::LdapDirectory;
use mailferry::route::{Directory, DirectoryError, Route};
use support::client::Client;
use support::deadline::within;
use support::dovecot::lmtp_deliver;
use support::ldap::{Slapd, READER_DN};
use support::mailferry::{run_cli, Mailferry, Options};
use support::{self_signed, Backends};

/// alice on new, bob on legacy, carol without the route attribute; dave is not in LDAP.
fn directory_with_users() -> Slapd {
    let slapd = Slapd::start();
    slapd.add_user(
        "alice",
        "alice@example.org",
        &["a.smith@example.org"],
        Some("new"),
    );
    slapd.add_user("bob", "bob@example.org", &[], Some("legacy"));
    slapd.add_user("carol", "carol@example.org", &[], None);
    slapd
}

fn proxy(backends: &Backends, directory: String) -> Mailferry {
    Mailferry::start(
        backends,
        Options {
            extra: directory,
            ..Options::default()
        },
    )
}

fn message(subject: &str) -> Vec<u8> {
    format!("From: a@example.net\r\nSubject: {subject}\r\n\r\nbody\r\n").into_bytes()
}

fn cli_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn routes_come_from_the_attribute_over_starttls_and_ldaps_and_a_wrong_ca_is_refused() {
    within(180, || {
        let slapd = directory_with_users();
        let backends = Backends::start();
        for url in [slapd.url(), slapd.url_ldaps()] {
            let p = proxy(&backends, slapd.directory_toml(&url, "cache_ttl_secs = 0"));
            let mut alice = Client::plain(p.imap);
            assert!(alice
                .login("alice@example.org", "alicepw")
                .starts_with("OK"));
            assert_eq!(alice.inbox_subjects(), vec!["new marker"], "{url}");
            let mut bob = Client::plain(p.imap);
            assert!(bob.login("bob@example.org", "bobpw").starts_with("OK"));
            assert_eq!(bob.inbox_subjects(), vec!["legacy marker"], "{url}");
            // An entry without the attribute: a known user on the default route.
            let mut carol = Client::plain(p.imap);
            assert!(carol
                .login("carol@example.org", "carolpw")
                .starts_with("OK"));
            assert_eq!(carol.inbox_subjects(), vec!["legacy marker"], "{url}");
            let shown = p.show("carol@example.org");
            assert_eq!(
                (shown["route"].as_str(), shown["known"].as_bool()),
                (Some("legacy"), Some(true))
            );
            let check = run_cli(&p.config, &["check-config"], 30);
            assert!(check.status.success(), "{url}: {}", cli_text(&check));
            // What the directory holds for one user, found by an alias.
            let check = run_cli(
                &p.config,
                &["check-config", "--user", "A.Smith@example.org"],
                30,
            );
            let text = cli_text(&check);
            assert!(check.status.success(), "{text}");
            assert!(
                text.contains("uid=alice,ou=people,dc=example,dc=org")
                    && text.contains("mailMigrationRoute [\"new\"]: route new"),
                "{text}"
            );
            let check = run_cli(
                &p.config,
                &["check-config", "--user", "dave@example.org"],
                30,
            );
            assert!(
                cli_text(&check).contains("dave@example.org: no entry under ou=people"),
                "{}",
                cli_text(&check)
            );
        }

        // Trusting another certificate: the TLS handshake fails, so nothing is looked up.
        let wrong = tempfile::tempdir().expect("tempdir");
        let wrong_ca = self_signed(wrong.path(), "wrong-ca");
        for url in [slapd.url(), slapd.url_ldaps()] {
            let section = slapd.directory_toml_as(
                &url,
                support::ldap::BIND_DN,
                &slapd.bind_secret(),
                &wrong_ca.cert_pem,
                "cache_ttl_secs = 0",
            );
            let p = proxy(&backends, section);
            let mut alice = Client::plain(p.imap);
            let no = alice.login("alice@example.org", "alicepw");
            assert!(no.starts_with("NO [UNAVAILABLE]"), "{url}: {no}");
            let out = lmtp_deliver(p.lmtp, "", &["alice@example.org"], &message("wrong ca"));
            assert!(
                out.rcpt_replies[0].starts_with("451 4.3.0"),
                "{url}: {out:?}"
            );
            let check = run_cli(&p.config, &["check-config"], 30);
            let text = cli_text(&check);
            assert_eq!(check.status.code(), Some(1), "{url}: {text}");
            assert!(
                text.contains("directory:") && text.contains("certificate"),
                "{url}: {text}"
            );
            assert!(p.log().contains("route lookup failed"), "{}", p.log());
        }
        assert_eq!(backends.legacy.count("alice@example.org", "INBOX"), 1);
        assert_eq!(backends.new.count("alice@example.org", "INBOX"), 1);
    });
}

#[test]
fn hostile_login_names_find_nobody() {
    within(120, || {
        let slapd = directory_with_users();
        let backends = Backends::start();
        // `*` is the default master-user separator (`alice*admin`): another one lets the
        // whole hostile name reach the directory.
        let mut section =
            slapd.directory_toml(&slapd.url(), "cache_ttl_secs = 0\nreject_unknown = true");
        section.push_str("[proxy]\nmaster_user_separator = \"%\"\n");
        let p = proxy(&backends, section);
        // Quoted strings: `\\` is one backslash.
        let hostile = [
            "*",
            "*)(uid=*",
            "alice@example.org)(uid=*",
            ")(",
            "\\\\",
            "*@example.org",
            "alice*",
        ];
        for name in hostile {
            let mut c = Client::plain(p.imap);
            let no = c.login(name, "alicepw");
            assert!(no.starts_with("NO [AUTHENTICATIONFAILED]"), "{name}: {no}");
        }
        // Reached slapd escaped: one equality assertion per attribute, no wildcard.
        let log = slapd.log();
        for filter in [
            "(uid=\\2A\\29\\28uid=\\2A)",
            "(mail=alice@example.org\\29\\28uid=\\2A)",
            "(uid=alice\\2A)",
            "(mail=\\5C)",
        ] {
            assert!(log.contains(filter), "{filter} not in\n{log}");
        }
        let out = lmtp_deliver(
            p.lmtp,
            "",
            &["*@example.org", "alice*@example.org", "alice@example.org"],
            &message("hostile"),
        );
        assert!(out.rcpt_replies[0].starts_with("550 5.1.1"), "{out:?}");
        assert!(out.rcpt_replies[1].starts_with("550 5.1.1"), "{out:?}");
        assert!(out.rcpt_replies[2].starts_with("250"), "{out:?}");
        assert!(
            out.data_replies.len() == 1 && out.data_replies[0].starts_with("250"),
            "{out:?}"
        );
        // The real user still logs in, and got only the mail addressed to her.
        let mut alice = Client::plain(p.imap);
        assert!(alice
            .login("alice@example.org", "alicepw")
            .starts_with("OK"));
        assert_eq!(alice.inbox_subjects(), vec!["new marker", "hostile"]);
        // dave has a mailbox but no entry: unknown, refused.
        let mut dave = Client::plain(p.imap);
        assert!(dave
            .login("dave@example.org", "davepw")
            .starts_with("NO [AUTHENTICATIONFAILED]"));
    });
}

#[test]
fn a_directory_that_is_down_is_unavailable_and_used_again_when_back() {
    within(180, || {
        let mut slapd = directory_with_users();
        let backends = Backends::start();
        // Default route legacy: a lookup taken for "unknown" would land alice there.
        let p = proxy(
            &backends,
            slapd.directory_toml(&slapd.url(), "cache_ttl_secs = 0"),
        );
        let mut alice = Client::plain(p.imap);
        assert!(alice
            .login("alice@example.org", "alicepw")
            .starts_with("OK"));
        assert_eq!(alice.inbox_subjects(), vec!["new marker"]);

        slapd.stop();
        let mut c = Client::plain(p.imap);
        let no = c.login("alice@example.org", "alicepw");
        assert!(no.starts_with("NO [UNAVAILABLE]"), "{no}\n{}", p.log());
        let out = lmtp_deliver(
            p.lmtp,
            "",
            &["alice@example.org", "bob@example.org"],
            &message("while down"),
        );
        for r in &out.rcpt_replies {
            assert!(r.starts_with("451 4.3.0"), "{out:?}");
        }
        assert!(out.data_replies.is_empty(), "{out:?}");

        slapd.restart();
        // The pool reconnects by itself (within its reconnect backoff).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let ok = loop {
            let mut c = Client::plain(p.imap);
            let r = c.login("alice@example.org", "alicepw");
            if r.starts_with("OK") || std::time::Instant::now() > deadline {
                break (r, c);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(ok.0.starts_with("OK"), "{}\n{}", ok.0, p.log());
        let mut c = ok.1;
        assert_eq!(c.inbox_subjects(), vec!["new marker"]);
        let out = lmtp_deliver(
            p.lmtp,
            "",
            &["alice@example.org", "bob@example.org"],
            &message("back"),
        );
        assert!(out.all_delivered(), "{out:?}");
        // Nothing of either went to the default route while the directory was down.
        assert_eq!(backends.legacy.count("alice@example.org", "INBOX"), 1);
        assert_eq!(backends.new.count("alice@example.org", "INBOX"), 2);
        assert_eq!(backends.legacy.count("bob@example.org", "INBOX"), 2);
    });
}

#[test]
fn user_route_writes_the_attribute_and_a_refused_write_changes_nothing() {
    within(180, || {
        let mut slapd = directory_with_users();
        let backends = Backends::start();
        let p = proxy(&backends, slapd.directory_toml(&slapd.url(), ""));
        // bob: legacy in LDAP; carol: no attribute yet. Both written by `user route`.
        for (uid, email, pw) in [
            ("bob", "bob@example.org", "bobpw"),
            ("carol", "carol@example.org", "carolpw"),
        ] {
            p.route(email, "new");
            assert_eq!(slapd.route_of(uid).as_deref(), Some("new"));
            let mut c = Client::plain(p.imap);
            assert!(c.login(email, pw).starts_with("OK"));
            assert_eq!(c.inbox_subjects(), vec!["new marker"], "{email}");
            assert_eq!(p.show(email)["state"], "new");
        }
        // dave is not in LDAP: nothing to write, the command fails.
        let out = p.cli(&["user", "route", "dave@example.org", "new"]);
        assert!(!out.status.success(), "{}", cli_text(&out));
        assert!(
            cli_text(&out).contains("not in the directory"),
            "{}",
            cli_text(&out)
        );

        // A bind account the ACL lets read but not write.
        let reader = proxy(
            &backends,
            slapd.directory_toml_as(
                &slapd.url(),
                READER_DN,
                &slapd.reader_secret(),
                &slapd.cert.cert_pem,
                "",
            ),
        );
        let out = reader.cli(&["user", "route", "alice@example.org", "legacy"]);
        let text = cli_text(&out);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("insufficientAccessRights"), "{text}");
        assert_eq!(slapd.route_of("alice").as_deref(), Some("new"));
        let shown = reader.show("alice@example.org");
        assert_eq!(
            (shown["route"].as_str(), shown["state"].as_str()),
            (Some("new"), Some("legacy"))
        );
        let mut c = Client::plain(reader.imap);
        assert!(c.login("alice@example.org", "alicepw").starts_with("OK"));
        assert_eq!(c.inbox_subjects(), vec!["new marker"]);

        // The directory down: the write fails, the state stays.
        slapd.stop();
        let out = p.cli(&["user", "route", "bob@example.org", "legacy"]);
        assert!(!out.status.success(), "{}", cli_text(&out));
        slapd.restart();
        assert_eq!(slapd.route_of("bob").as_deref(), Some("new"));
        assert_eq!(p.show("bob@example.org")["state"], "new");
        let events = p.cli(&["user", "events", "bob@example.org", "--json"]);
        let events = String::from_utf8_lossy(&events.stdout);
        assert!(!events.contains("route forced to legacy"), "{events}");
    });
}

/// A `Config` whose `[directory]` is `section` (backends are never contacted here).
fn config_with(section: &str) -> Config {
    let text = format!(
        "[backends.legacy]\nimap = \"127.0.0.1:1\"\n[backends.new]\nimap = \"127.0.0.1:2\"\n{section}"
    );
    Config::parse(&text, Path::new("test.toml"), Path::new("/")).expect("config")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn lookups_escape_every_name_and_say_what_the_entry_holds() {
    within(60, || {
        let slapd = directory_with_users();
        slapd.add_user("erin", "erin@example.org", &[], Some("elsewhere"));
        // Two entries claiming one address: no route can be chosen.
        slapd.add_user(
            "frank",
            "frank@example.org",
            &["shared@example.org"],
            Some("new"),
        );
        slapd.add_user(
            "gina",
            "gina@example.org",
            &["shared@example.org"],
            Some("legacy"),
        );
        let cfg = config_with(&slapd.directory_toml(&slapd.url_ldaps(), ""));
        let dir = LdapDirectory::from_config(&cfg).expect("settings");
        runtime().block_on(async {
            dir.ping().await.expect("ping");
            assert_eq!(dir.route("alice@example.org").await.unwrap(), Some(Route::New));
            assert_eq!(dir.route("a.smith@example.org").await.unwrap(), Some(Route::New));
            assert_eq!(dir.route("bob").await.unwrap(), Some(Route::Legacy));
            assert_eq!(dir.route("carol@example.org").await.unwrap(), Some(Route::Legacy));
            assert_eq!(dir.route("dave@example.org").await.unwrap(), None);
            for hostile in ["*", "*)(uid=*", ")(", "\\", "a\0b", "alice@example.org\0", "*)(|(mail=*", "al*"] {
                assert_eq!(dir.route(hostile).await.unwrap(), None, "{hostile:?}");
            }
            assert!(matches!(dir.route("erin@example.org").await, Err(DirectoryError::BadValue(v)) if v == "elsewhere"));
            assert!(matches!(dir.route("shared@example.org").await, Err(DirectoryError::Ambiguous(_))));
            assert!(matches!(dir.set_route("*", Route::New).await, Err(DirectoryError::NoSuchUser(_))));
        });
    });
}

#[test]
fn the_pool_reconnects_after_a_restart_and_reports_bind_and_base_problems() {
    within(60, || {
        let mut slapd = directory_with_users();
        let cfg = config_with(&slapd.directory_toml(&slapd.url(), ""));
        let dir = Arc::new(LdapDirectory::from_config(&cfg).expect("settings"));
        let rt = runtime();
        rt.block_on(async {
            for _ in 0..8 {
                assert_eq!(
                    dir.route("alice@example.org").await.unwrap(),
                    Some(Route::New)
                );
            }
        });
        slapd.stop();
        rt.block_on(async {
            assert!(matches!(
                dir.route("alice@example.org").await,
                Err(DirectoryError::Unavailable(_))
            ));
            assert!(dir.ping().await.is_err());
        });
        slapd.restart();
        std::thread::sleep(mailferry::route::ldap::RECONNECT_BACKOFF);
        rt.block_on(async {
            // Every pooled connection died with the server; each is replaced on use.
            for _ in 0..8 {
                assert_eq!(
                    dir.route("alice@example.org").await.unwrap(),
                    Some(Route::New)
                );
            }
        });

        // A wrong password and a base that does not exist are unavailability, not unknown users.
        let secret = tempfile::NamedTempFile::new().expect("secret");
        std::fs::write(secret.path(), "not-the-password\n").expect("write");
        let section = slapd.directory_toml_as(
            &slapd.url(),
            support::ldap::BIND_DN,
            secret.path(),
            &slapd.cert.cert_pem,
            "",
        );
        let bad_bind = LdapDirectory::from_config(&config_with(&section)).expect("settings");
        let bad_base = config_with(
            &slapd
                .directory_toml(&slapd.url(), "")
                .replace("ou=people,dc=example,dc=org", "ou=nobody,dc=example,dc=org"),
        );
        let bad_base = LdapDirectory::from_config(&bad_base).expect("settings");
        rt.block_on(async {
            let e = bad_bind.route("alice@example.org").await.unwrap_err();
            assert!(e.to_string().contains("invalidCredentials"), "{e}");
            let e = bad_base.route("alice@example.org").await.unwrap_err();
            assert!(e.to_string().contains("noSuchObject"), "{e}");
            assert!(bad_base.ping().await.is_err());
        });
    });
}

/// `user migrate` and the initial pass of `email` (new's INBOX emptied first, as a fresh
/// account would be).
fn migrate(backends: &Backends, p: &Mailferry, email: &str) {
    let out = backends
        .new
        .doveadm(&["expunge", "-u", email, "mailbox", "INBOX", "all"]);
    assert!(out.status.success());
    let out = p.cli(&["user", "migrate", email]);
    assert!(out.status.success(), "{}", cli_text(&out));
    p.wait_for(email, "initial pass", |v| {
        v["sync"]["passes"].as_u64() >= Some(1)
            && v["sync"]["messages_copied"] == v["sync"]["messages_total"]
    });
}

#[test]
fn a_cutover_writes_the_attribute_and_one_whose_write_is_refused_stays_on_legacy() {
    within(180, || {
        let slapd = directory_with_users();
        let backends = Backends::start();
        // The read-only account: every step runs, the route write is refused.
        let reader = proxy(
            &backends,
            slapd.directory_toml_as(
                &slapd.url(),
                READER_DN,
                &slapd.reader_secret(),
                &slapd.cert.cert_pem,
                "",
            ),
        );
        migrate(&backends, &reader, "bob@example.org");
        let out = reader.cli(&["user", "cutover", "bob@example.org", "--wait"]);
        assert_eq!(out.status.code(), Some(1), "{}", cli_text(&out));
        assert_eq!(slapd.route_of("bob").as_deref(), Some("legacy"));
        let v = reader.show("bob@example.org");
        assert_eq!(
            (v["state"].as_str(), v["route"].as_str()),
            (Some("failed"), Some("legacy")),
            "{v}"
        );
        let error = v["last_error"].as_str().unwrap_or_default();
        assert!(error.contains("insufficientAccessRights"), "{error}");
        let mut c = Client::plain(reader.imap);
        assert!(c.login("bob@example.org", "bobpw").starts_with("OK"));
        assert_eq!(c.inbox_subjects(), vec!["legacy marker"]);

        // The service account: carol (no attribute yet) ends on new, in LDAP too.
        let writer = proxy(&backends, slapd.directory_toml(&slapd.url(), ""));
        migrate(&backends, &writer, "carol@example.org");
        let out = writer.cli(&["user", "cutover", "carol@example.org", "--wait"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            cli_text(&out),
            writer.log()
        );
        assert_eq!(slapd.route_of("carol").as_deref(), Some("new"));
        let mut c = Client::plain(writer.imap);
        assert!(c.login("carol@example.org", "carolpw").starts_with("OK"));
        assert_eq!(c.inbox_subjects(), vec!["legacy marker"]);
        assert_eq!(writer.show("carol@example.org")["state"], "new");
    });
}

/// bob idles on legacy; an unrelated change to his entry kicks nothing; slapd restarts (the
/// watch reconnects by itself); `ldapmodify` of his route attribute kicks the session within
/// 5 s, and the next login and mail land on new, though the route cache keeps answers for 30 s.
/// Returns the proxy's log.
fn a_flip_in_ldap_kicks_and_reroutes(slapd: &mut Slapd, extra: &str) -> String {
    let backends = Backends::start();
    let p = proxy(&backends, slapd.directory_toml(&slapd.url(), extra));
    let mut c = Client::plain(p.imap);
    assert!(c.login("bob@example.org", "bobpw").starts_with("OK"));
    assert_eq!(c.inbox_subjects(), vec!["legacy marker"]);
    c.send(b"i1 IDLE\r\n");
    assert!(c.line().starts_with("+ "), "IDLE continuation");

    slapd.replace("bob", "cn", Some("Bob Unrelated"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(p.show("bob@example.org")["sessions"], 1, "{}", p.log());
    slapd.restart();

    let flipped = std::time::Instant::now();
    slapd.set_route("bob", Some("new"));
    let bye = c.line();
    assert!(bye.starts_with("* BYE [UNAVAILABLE]"), "{bye}");
    assert!(
        flipped.elapsed() < Duration::from_secs(5),
        "kicked after {:?}",
        flipped.elapsed()
    );

    let mut again = Client::plain(p.imap);
    assert!(again.login("bob@example.org", "bobpw").starts_with("OK"));
    assert_eq!(again.inbox_subjects(), vec!["new marker"]);
    let out = lmtp_deliver(p.lmtp, "", &["bob@example.org"], &message("after the flip"));
    assert!(out.all_delivered(), "{out:?}");
    assert_eq!(backends.new.count("bob@example.org", "INBOX"), 2);
    assert_eq!(backends.legacy.count("bob@example.org", "INBOX"), 1);
    p.log()
}

#[test]
fn a_flip_made_with_ldapmodify_is_followed_through_syncrepl() {
    within(120, || {
        let mut slapd = directory_with_users();
        let log =
            a_flip_in_ldap_kicks_and_reroutes(&mut slapd, "change_notification = \"syncrepl\"");
        assert!(log.contains("persistent search started"), "{log}");
        assert!(!log.contains("polling"), "{log}");
    });
}

#[test]
fn a_flip_made_with_ldapmodify_is_followed_by_polling_where_there_is_no_syncrepl() {
    within(120, || {
        let mut slapd = Slapd::start_without_syncprov();
        slapd.add_user("bob", "bob@example.org", &[], Some("legacy"));
        // auto: syncrepl refused by the server, polling every second.
        let log = a_flip_in_ldap_kicks_and_reroutes(
            &mut slapd,
            "change_notification = \"auto\"\npoll_secs = 1",
        );
        assert!(log.contains("offers no syncrepl here: polling"), "{log}");
    });
}
