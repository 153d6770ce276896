//! Background sync in `serve`: `user migrate` puts a user in `syncing`, the scheduler copies the
//! mailbox, `user show` reports progress, and a login through the proxy bumps the next pass.

mod support;

use support::deadline::within;

use support::client::Client;
use support::corpus::{self, Spec};
use support::mailferry::{run_cli, with_master_users, Mailferry, Options};
use support::Backends;

const USER: &str = "bob@example.org";
const PASSWORD: &str = "bobpw";

fn copied(v: &serde_json::Value) -> u64 {
    v["sync"]["messages_copied"].as_u64().unwrap_or(0)
}

#[test]
fn migrate_syncs_in_the_background_and_a_login_bumps_the_next_pass() {
    within(150, || {
        let b = Backends::start();
        let out = b
            .new
            .doveadm(&["expunge", "-u", USER, "mailbox", "INBOX", "all"]);
        assert!(out.status.success());
        let c = corpus::generate(&Spec {
            seed: 11,
            messages: 25,
            large: 0,
            ..Spec::default()
        });
        corpus::load(&b.legacy, USER, &c);
        // Passes an hour apart: only the initial pass and a bump can copy anything in this test.
        let m = Mailferry::start(
            &b,
            Options {
                extra: "[sync]\ninterval_secs = 3600\n".into(),
                ..Options::default()
            },
        );
        assert_eq!(m.show(USER)["state"], "legacy");

        let out = m.cli(&["user", "migrate", USER]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("syncing"));
        let total = c.messages.len() as u64 + 1; // plus the harness's legacy marker
        let v = m.wait_for(USER, "initial pass", |v| {
            copied(v) == total && v["sync"]["passes"].as_u64() >= Some(1)
        });
        assert_eq!(v["state"], "syncing");
        assert_eq!(v["sync"]["messages_total"].as_u64(), Some(total));
        assert!(v["sync"]["last_error"].is_null(), "{v}");

        let out = m.cli(&["verify", USER]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let human = m.cli(&["user", "show", USER]);
        let text = String::from_utf8_lossy(&human.stdout);
        assert!(
            text.contains(&format!("sync:       {total}/{total} messages")),
            "{text}"
        );

        // New mail on legacy, then the user logs in through the proxy: the bump copies it now,
        // although the next scheduled pass is an hour away.
        let more = corpus::generate(&Spec {
            seed: 12,
            messages: 3,
            large: 0,
            folders: false,
            ..Spec::default()
        });
        corpus::load(&b.legacy, USER, &more);
        let mut client = Client::plain(m.imap);
        let login = client.login(USER, PASSWORD);
        assert!(login.contains("OK"), "{login}");
        let want = total + more.messages.len() as u64;
        m.wait_for(USER, "bumped pass", |v| copied(v) == want);
        let out = m.cli(&["verify", USER]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );

        // A second migrate is harmless; an unknown state transition is refused.
        assert!(m.cli(&["user", "migrate", USER]).status.success());
    });
}

/// Without master users, `[sync] capture_credentials` lets the scheduler sync a user with the
/// password of their last login through the proxy: before that login a pass says why it cannot
/// run; after it the mailbox is copied; the password never reaches the log or the state store.
#[test]
fn captured_credentials_sync_a_user_without_master_users() {
    within(150, || {
        const CAROL: &str = "carol@example.org";
        const CAROL_PW: &str = "carolpw";
        let b = Backends::start();
        let out = b
            .new
            .doveadm(&["expunge", "-u", CAROL, "mailbox", "INBOX", "all"]);
        assert!(out.status.success());
        let c = corpus::generate(&Spec {
            seed: 21,
            messages: 15,
            large: 0,
            ..Spec::default()
        });
        corpus::load(&b.legacy, CAROL, &c);
        let m = Mailferry::start(
            &b,
            Options {
                no_master: true,
                extra: "[sync]\ninterval_secs = 3600\ncapture_credentials = true\n".into(),
                ..Options::default()
            },
        );
        assert!(m.cli(&["user", "migrate", CAROL]).status.success());
        let v = m.wait_for(CAROL, "a pass without credentials", |v| {
            v["sync"]["last_error"].is_string()
        });
        let err = v["sync"]["last_error"].as_str().unwrap_or_default();
        assert!(err.contains("no credentials"), "{v}");
        assert_eq!(copied(&v), 0);

        let mut client = Client::plain(m.imap);
        let login = client.login(CAROL, CAROL_PW);
        assert!(login.contains("OK"), "{login}");
        let total = c.messages.len() as u64 + 1; // plus the harness's legacy marker
        let v = m.wait_for(CAROL, "pass with the captured password", |v| {
            copied(v) == total && v["sync"]["last_error"].is_null()
        });
        assert_eq!(v["state"], "syncing");

        let verify = run_cli(&with_master_users(&m), &["verify", CAROL], 60);
        assert_eq!(
            verify.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
        assert!(!m.log().contains(CAROL_PW), "password in the log");
        for file in ["state.db", "state.db-wal"] {
            let db = std::fs::read(m.config.with_file_name(file)).unwrap_or_default();
            assert!(
                !db.windows(CAROL_PW.len()).any(|w| w == CAROL_PW.as_bytes()),
                "password in {file}"
            );
        }
    });
}

/// One pass per user across processes: while `serve`'s scheduler copies a user (slowed by a
/// bytes/s budget), `sync --once` for the same user exits 1 with "pass in progress". Once the
/// user is routed to new, the scheduler's passes copy nothing more from legacy.
#[test]
fn a_cli_pass_beside_servers_pass_is_refused_and_a_user_routed_to_new_is_not_synced() {
    within(150, || {
        let b = Backends::start();
        let c = corpus::generate(&Spec {
            seed: 21,
            messages: 10,
            large: 2,
            large_min: 1024 * 1024,
            large_max: 1024 * 1024 + 10,
            folders: false,
            ..Spec::default()
        });
        corpus::load(&b.legacy, USER, &c);
        let m = Mailferry::start(
            &b,
            Options {
                // About 2 MB at 300 kB/s: the first pass runs for several seconds.
                extra: "[sync]\ninterval_secs = 1\nbytes_per_second = 300000\n".into(),
                ..Options::default()
            },
        );
        let config = with_master_users(&m);
        assert!(m.cli(&["user", "migrate", USER]).status.success());
        m.wait_for(USER, "the pass has started", |v| copied(v) > 0);
        let out = run_cli(&config, &["sync", USER, "--once", "--quiet"], 60);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("pass in progress"), "{err}");

        let total = c.messages.len() as u64 + 1;
        m.wait_for(USER, "initial pass", |v| copied(v) == total);
        m.route(USER, "new");
        let more = corpus::generate(&Spec {
            seed: 22,
            messages: 2,
            large: 0,
            folders: false,
            ..Spec::default()
        });
        corpus::load(&b.legacy, USER, &more);
        // Forced to new, the user is `new`: the scheduler, whose passes are due every second,
        // no longer syncs them.
        let passes = m.show(USER)["sync"]["passes"].clone();
        assert_eq!(m.show(USER)["state"], "new");
        std::thread::sleep(std::time::Duration::from_secs(3));
        let v = m.show(USER);
        assert_eq!(v["sync"]["passes"], passes, "{v}");
        assert!(v["sync"]["last_error"].is_null(), "{v}");
        // Set back to `syncing` while routed to new (as a flip made outside mailferry would
        // leave it): the passes run, and refuse.
        let (status, body) = m.api(
            "PUT",
            &format!("/api/users/{USER}/state"),
            r#"{"state":"syncing"}"#,
        );
        assert_eq!(status, 200, "{body}");
        let v = m.wait_for(USER, "a refused pass", |v| {
            v["sync"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("routed to new"))
        });
        assert_eq!(copied(&v), total, "nothing more copied: {v}");
    });
}
