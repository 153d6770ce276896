//! Background sync in `serve`: `user migrate` puts a user in `syncing`, the scheduler copies the
//! mailbox, `user show` reports progress, and a login through the proxy bumps the next pass.

mod support;

use support::deadline::within;

use std::time::{Duration, Instant};

use support::client::Client;
use support::corpus::{self, Spec};
use support::mailferry::{Mailferry, Options};
use support::Backends;

const USER: &str = "bob@example.org";
const PASSWORD: &str = "bobpw";

fn show(m: &Mailferry) -> serde_json::Value {
    let out = m.cli(&["user", "show", USER, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn copied(v: &serde_json::Value) -> u64 {
    v["sync"]["messages_copied"].as_u64().unwrap_or(0)
}

/// Polls `user show` until `pred` holds (the scheduler works in the background).
fn wait_for(
    m: &Mailferry,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = show(m);
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last view {v}\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
        assert_eq!(show(&m)["state"], "legacy");

        let out = m.cli(&["user", "migrate", USER]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("syncing"));
        let total = c.messages.len() as u64 + 1; // plus the harness's legacy marker
        let v = wait_for(&m, "initial pass", |v| {
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
        wait_for(&m, "bumped pass", |v| copied(v) == want);
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
