//! The cutover of one user against real Dovecot (DESIGN.md §2): held logins, deferred LMTP,
//! the final delta, the verification gate and its evidence, failures that leave the user on
//! legacy, a server killed in the middle, and the audit log of it all.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::client::Client;
use support::corpus::{self, Spec};
use support::deadline::within;
use support::dovecot::lmtp_deliver;
use support::mailferry::{Mailferry, Options};
use support::relay::Relay;
use support::Backends;

const USER: &str = "alice@example.org";
const PASSWORD: &str = "alicepw";

/// Backends with `USER`'s mail on legacy only (new's INBOX emptied), and a proxy whose
/// scheduler has copied it; `extra` is appended to the proxy's config.
fn migrated(b: &Backends, opts: Options) -> Mailferry {
    let out = b
        .new
        .doveadm(&["expunge", "-u", USER, "mailbox", "INBOX", "all"]);
    assert!(out.status.success());
    let c = corpus::generate(&Spec {
        seed: 16,
        messages: 20,
        large: 0,
        ..Spec::default()
    });
    corpus::load(&b.legacy, USER, &c);
    let m = Mailferry::start(b, opts);
    let out = m.cli(&["user", "migrate", USER]);
    assert!(out.status.success(), "{}", text(&out));
    m.wait_for(USER, "initial pass", |v| {
        v["sync"]["passes"].as_u64() >= Some(1)
            && v["sync"]["messages_copied"] == v["sync"]["messages_total"]
    });
    m
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn message(subject: &str) -> Vec<u8> {
    format!(
        "From: mta@example.net\r\nTo: {USER}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nbody of {subject}\r\n"
    )
    .into_bytes()
}

/// How many messages of `user`'s INBOX on `d` carry `subject`.
fn copies(d: &support::Dovecot, subject: &str) -> usize {
    let needle = format!("Subject: {subject}\r\n");
    d.messages(USER, "INBOX")
        .iter()
        .filter(|m| String::from_utf8_lossy(m).contains(&needle))
        .count()
}

fn events(m: &Mailferry) -> Vec<serde_json::Value> {
    let out = m.cli(&["user", "events", USER, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("events json")
}

#[test]
fn a_login_during_the_cutover_is_held_and_lands_on_new() {
    within(180, || {
        let b = Backends::start();
        // Legacy's LMTP through a relay, to keep one delivery in flight while the cutover waits.
        let relay = Relay::start(b.legacy.lmtp);
        let m = migrated(
            &b,
            Options {
                lmtp_at: vec![("legacy", relay.addr)],
                ..Options::default()
            },
        );
        relay.stall(true);
        let lmtp = m.lmtp;
        let delivery = thread::spawn(move || {
            lmtp_deliver(lmtp, "mta@example.net", &[USER], &message("in-flight"))
        });
        thread::sleep(Duration::from_millis(500));
        let out = m.cli(&["user", "cutover", USER]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(m.show(USER)["state"], "cutover");
        // A second operator (or a script run twice) cannot start another sequence, nor force
        // the route, while this one runs.
        for args in [
            &["user", "cutover", USER][..],
            &["user", "rollback", USER],
            &["user", "route", USER, "new"],
            &["user", "migrate", USER],
        ] {
            let out = m.cli(args);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
            let said = text(&out);
            assert!(
                said.contains("state cutover") || said.contains("routed to legacy"),
                "{args:?}: {said}"
            );
        }
        // Deferred, not lost, while the cutover runs.
        let deferred = lmtp_deliver(m.lmtp, "mta@example.net", &[USER], &message("deferred"));
        assert!(
            deferred.rcpt_replies[0].starts_with("451 4.2.0")
                || deferred
                    .data_replies
                    .iter()
                    .any(|r| r.starts_with("451 4.2.0")),
            "{deferred:?}"
        );
        let imap = m.imap;
        let login = thread::spawn(move || {
            let mut c = Client::plain(imap);
            let started = Instant::now();
            let ok = c.login(USER, PASSWORD);
            (c, ok, started.elapsed())
        });
        thread::sleep(Duration::from_millis(700));
        assert!(
            !login.is_finished(),
            "the login is held while the cutover waits"
        );
        relay.stall(false);
        let done = delivery.join().unwrap();
        assert!(
            done.all_delivered(),
            "the delivery in flight ends: {done:?}"
        );
        let (mut c, ok, waited) = login.join().unwrap();
        assert!(ok.starts_with("OK"), "{ok}\n{}", m.log());
        assert!(waited >= Duration::from_millis(500), "{waited:?}");
        let v = m.wait_for(USER, "cutover done", |v| v["state"] != "cutover");
        assert_eq!(v["state"], "new", "{v}");
        assert_eq!(v["route"], "new");
        // The held login went to new: it sees the delivery the final delta carried over.
        assert!(c.inbox_subjects().iter().any(|s| s == "in-flight"));
        assert_eq!(copies(&b.new, "in-flight"), 1);
        let retry = lmtp_deliver(m.lmtp, "mta@example.net", &[USER], &message("deferred"));
        assert!(retry.all_delivered(), "{retry:?}");
        assert_eq!(copies(&b.new, "deferred"), 1);
        assert_eq!(copies(&b.legacy, "deferred"), 0);
        let ev = &v["evidence"];
        assert_eq!(ev["mode"], "counts");
        assert!(ev["differences"].as_array().unwrap().is_empty(), "{ev}");
        let trail: Vec<(String, String)> = events(&m)
            .iter()
            .map(|e| {
                (
                    e["to"].as_str().unwrap().to_owned(),
                    e["actor"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let want = [("syncing", "cli"), ("cutover", "cli"), ("new", "cli")];
        assert_eq!(
            trail,
            want.map(|(a, b)| (a.to_owned(), b.to_owned())).to_vec()
        );
    });
}

#[test]
fn a_cutover_with_new_down_fails_on_legacy_and_a_retry_succeeds() {
    within(180, || {
        let mut b = Backends::start();
        let m = migrated(&b, Options::default());
        b.new.stop();
        let out = m.cli(&["user", "cutover", USER, "--wait"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let v = m.show(USER);
        assert_eq!(
            (&v["state"], &v["route"]),
            (&"failed".into(), &"legacy".into()),
            "{v}"
        );
        let error = v["last_error"].as_str().unwrap_or_default().to_owned();
        assert!(
            error.contains("final delta sync") && error.contains("new"),
            "{error}"
        );
        // Logins and mail go to legacy meanwhile.
        let mut c = Client::plain(m.imap);
        assert!(c.login(USER, PASSWORD).starts_with("OK"));
        let mail = lmtp_deliver(m.lmtp, "mta@example.net", &[USER], &message("while-failed"));
        assert!(mail.all_delivered(), "{mail:?}");

        b.new.restart();
        let out = m.cli(&["user", "cutover", USER, "--wait"]);
        assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out), m.log());
        assert_eq!(copies(&b.new, "while-failed"), 1);
        let v = m.show(USER);
        assert_eq!((&v["state"], &v["route"]), (&"new".into(), &"new".into()));
        assert!(v["last_error"].is_null(), "{v}");
        let outcomes: Vec<String> = events(&m)
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e["to"].as_str().unwrap(),
                    e["outcome"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            [
                "syncing:ok",
                "cutover:ok",
                "failed:failed",
                "cutover:ok",
                "new:ok"
            ]
        );
    });
}

#[test]
fn a_gate_that_finds_a_difference_fails_the_cutover_and_says_what() {
    within(180, || {
        let b = Backends::start();
        let m = migrated(
            &b,
            Options {
                extra: "[cutover]\nverify = \"full\"\n".into(),
                ..Options::default()
            },
        );
        // Copied messages are flagged on new behind the sync's back (the sync carries changes
        // made on legacy; one made on new stays a difference that only the full gate sees).
        let out = b.new.doveadm(&[
            "flags",
            "add",
            "-u",
            USER,
            "$GateTest",
            "mailbox",
            "INBOX",
            "all",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let out = m.cli(&["user", "cutover", USER, "--wait"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let v = m.show(USER);
        assert_eq!(
            (&v["state"], &v["route"]),
            (&"failed".into(), &"legacy".into()),
            "{v}"
        );
        let diffs = v["evidence"]["differences"].as_array().unwrap().clone();
        assert!(
            diffs
                .iter()
                .any(|d| d.as_str().unwrap().contains("vs ($gatetest")),
            "{diffs:?}"
        );
        assert_eq!(v["evidence"]["mode"], "full");
        assert!(
            v["last_error"]
                .as_str()
                .unwrap()
                .contains("verification gate"),
            "{v}"
        );
        let human = text(&m.cli(&["user", "events", USER]));
        assert!(human.contains("verification gate found"), "{human}");
    });
}

#[test]
fn a_server_killed_mid_cutover_leaves_the_user_whole_on_one_side() {
    within(240, || {
        let b = Backends::start();
        // New's IMAP through a slow relay: the final delta takes long enough to be killed in.
        let relay = Relay::start(b.new.imap);
        let mut m = migrated(
            &b,
            Options {
                imap_at: vec![("new", relay.addr)],
                // The killed server's lease is freed at restart: no wait for the lapse.
                extra: "[sync]\nlease_secs = 600\n".into(),
                ..Options::default()
            },
        );
        let more = corpus::generate(&Spec {
            seed: 61,
            messages: 30,
            large: 0,
            ..Spec::default()
        });
        corpus::load(&b.legacy, USER, &more);
        relay.set_delay(Duration::from_millis(40));
        let out = m.cli(&["user", "cutover", USER]);
        assert!(out.status.success(), "{}", text(&out));
        thread::sleep(Duration::from_millis(800));
        assert_eq!(
            m.show(USER)["state"],
            "cutover",
            "still copying when killed"
        );
        m.kill9();
        relay.set_delay(Duration::ZERO);
        m.respawn();
        let v = m.show(USER);
        assert_eq!(
            (&v["state"], &v["route"]),
            (&"failed".into(), &"legacy".into()),
            "{v}"
        );
        assert!(
            v["last_error"].as_str().unwrap().contains("interrupted"),
            "{v}"
        );
        let out = m.cli(&["user", "cutover", USER, "--wait"]);
        assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out), m.log());
        let out = m.cli(&["verify", USER]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "no duplicates, nothing missing: {}",
            text(&out)
        );
        let actors: Vec<String> = events(&m)
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e["to"].as_str().unwrap(),
                    e["actor"].as_str().unwrap()
                )
            })
            .collect();
        assert!(actors.contains(&"failed:server".to_owned()), "{actors:?}");
    });
}

#[test]
fn a_live_cutover_under_idle_and_a_stream_of_deliveries_loses_nothing() {
    within(240, || {
        let b = Backends::start();
        let m = migrated(
            &b,
            Options {
                extra: "[cutover]\nverify = \"full\"\n".into(),
                ..Options::default()
            },
        );
        let mut idle = Client::plain(m.imap);
        assert!(idle.login(USER, PASSWORD).starts_with("OK"));
        let (_, ok) = idle.cmd("SELECT INBOX");
        assert!(ok.contains("OK"), "{ok}");
        idle.send(b"i1 IDLE\r\n");
        assert!(idle.line().starts_with("+ "));

        // Two MTA connections delivering several messages a second; a deferred message is
        // retried, as an MTA does, until it is accepted.
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
        let deferrals = Arc::new(AtomicUsize::new(0));
        let mtas: Vec<_> = (0..2)
            .map(|t| {
                let (stop, accepted, deferrals, lmtp) =
                    (stop.clone(), accepted.clone(), deferrals.clone(), m.lmtp);
                thread::spawn(move || {
                    let mut queue: Vec<String> = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) || !queue.is_empty() {
                        if !stop.load(Ordering::SeqCst) {
                            queue.push(format!("stream-{t}-{n}"));
                            n += 1;
                        }
                        let mut later = Vec::new();
                        for s in queue.drain(..) {
                            let r = lmtp_deliver(lmtp, "mta@example.net", &[USER], &message(&s));
                            if r.all_delivered() {
                                accepted.lock().unwrap().push(s);
                            } else {
                                deferrals.fetch_add(1, Ordering::SeqCst);
                                later.push(s);
                            }
                        }
                        queue = later;
                        thread::sleep(Duration::from_millis(150));
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(1500));
        let out = m.cli(&["user", "cutover", USER, "--wait"]);
        assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out), m.log());
        // The IDLE client is told to reconnect, and does so to new without any change.
        let bye = loop {
            let line = idle.line();
            if !line.starts_with("* ") || line.starts_with("* BYE") {
                break line;
            }
        };
        assert!(bye.starts_with("* BYE [UNAVAILABLE]"), "{bye}");
        thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::SeqCst);
        for t in mtas {
            t.join().unwrap();
        }
        let mut again = Client::plain(m.imap);
        assert!(again.login(USER, PASSWORD).starts_with("OK"));
        b.legacy.save(USER, "INBOX", &message("only-on-legacy"));
        let subjects = again.inbox_subjects();
        assert!(
            !subjects.iter().any(|s| s == "only-on-legacy"),
            "on new now"
        );

        let accepted = accepted.lock().unwrap().clone();
        assert!(accepted.len() >= 10, "{}", accepted.len());
        assert!(
            deferrals.load(Ordering::SeqCst) > 0,
            "some deliveries met the cutover"
        );
        let on_new = b.new.messages(USER, "INBOX");
        for s in &accepted {
            let needle = format!("Subject: {s}\r\n");
            let n = on_new
                .iter()
                .filter(|m| String::from_utf8_lossy(m).contains(&needle))
                .count();
            assert_eq!(n, 1, "{s} accepted, so exactly once on new");
        }
        let v = m.show(USER);
        assert_eq!(v["evidence"]["mode"], "full");
        assert!(
            v["evidence"]["differences"].as_array().unwrap().is_empty(),
            "{v}"
        );
    });
}

#[test]
fn a_wave_of_fifty_imported_users_migrates_and_cuts_over() {
    within(300, || {
        let b = Backends::start();
        let users: Vec<String> = (0..50).map(|i| format!("wave{i:02}@example.org")).collect();
        b.legacy.add_users(&users, "wavepw");
        b.new.add_users(&users, "wavepw");
        for u in &users {
            b.legacy.save(u, "INBOX", &message(&format!("hello-{u}")));
        }
        let m = Mailferry::start(&b, Options::default());
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("users.csv");
        let mut text = String::from("# wave 1 of the pilot\n\n");
        for u in &users {
            text.push_str(&format!("{u}\n"));
        }
        text.push_str("not an address\n");
        std::fs::write(&csv, &text).unwrap();
        let csv = csv.to_str().unwrap();
        let out = m.cli(&["import", csv, "--wave", "w1"]);
        assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
        let said = text_of(&out);
        assert!(
            said.contains("50 added") && said.contains("rejected line 53"),
            "{said}"
        );
        let again = text_of(&m.cli(&["import", csv, "--wave", "w1"]));
        assert!(
            again.contains("0 added") && again.contains("50 unchanged"),
            "{again}"
        );
        let missing = m.cli(&["import", "/nonexistent/users.csv"]);
        assert_eq!(missing.status.code(), Some(2), "{}", text_of(&missing));
        assert!(text_of(&missing).contains("/nonexistent/users.csv"));
        let nosuch = m.cli(&["wave", "cutover", "nosuch", "--wait"]);
        assert_eq!(nosuch.status.code(), Some(1), "{}", text_of(&nosuch));
        assert!(
            text_of(&nosuch).contains("no wave named"),
            "{}",
            text_of(&nosuch)
        );
        let list = text_of(&m.cli(&["wave", "list"]));
        assert!(list.contains("w1") && list.contains("50 legacy"), "{list}");

        let out = m.cli(&["wave", "migrate", "w1"]);
        assert!(out.status.success(), "{}", text_of(&out));
        let deadline = Instant::now() + Duration::from_secs(120);
        let view = loop {
            let v = wave_view(&m);
            if v["caught_up"] == 50 {
                break v;
            }
            assert!(Instant::now() < deadline, "{v}\n{}", m.log());
            thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(view["states"]["syncing"], 50, "{view}");
        assert!(view["messages_copied"].as_u64() >= Some(50), "{view}");

        let out = m.cli(&["wave", "cutover", "w1", "--wait"]);
        assert_eq!(out.status.code(), Some(0), "{}\n{}", text_of(&out), m.log());
        let view = wave_view(&m);
        assert_eq!(view["states"]["new"], 50, "{view}");
        assert_eq!(view["cutover"]["done"], 50, "{view}");
        assert_eq!(view["cutover"]["failed"], 0, "{view}");
        for u in users.iter().step_by(7) {
            let needle = format!("Subject: hello-{u}\r\n");
            let n = b
                .new
                .messages(u, "INBOX")
                .iter()
                .filter(|m| String::from_utf8_lossy(m).contains(&needle))
                .count();
            assert_eq!(n, 1, "{u}");
            let out = m.cli(&["user", "events", u, "--json"]);
            let ev: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            let trail: Vec<String> = ev
                .iter()
                .map(|e| {
                    format!(
                        "{}:{}",
                        e["to"].as_str().unwrap(),
                        e["actor"].as_str().unwrap()
                    )
                })
                .collect();
            assert_eq!(
                trail,
                ["syncing:wave:w1", "cutover:wave:w1", "new:wave:w1"],
                "{u}"
            );
        }
        let human = text_of(&m.cli(&["wave", "show", "w1"]));
        assert!(human.contains("users:      50 (50 new)"), "{human}");
        let metrics = metrics(&m);
        assert!(
            metrics.contains(r#"mailferry_cutovers_total{kind="cutover",outcome="ok"} 50"#),
            "{metrics}"
        );
    });
}

fn wave_view(m: &Mailferry) -> serde_json::Value {
    let out = m.cli(&["wave", "show", "w1", "--json"]);
    assert!(out.status.success(), "{}", text_of(&out));
    serde_json::from_slice(&out.stdout).expect("wave json")
}

fn text_of(out: &std::process::Output) -> String {
    text(out)
}

/// The server's `/metrics` page.
fn metrics(m: &Mailferry) -> String {
    support::client::http(m.admin, "GET", "/metrics", None, "").1
}

#[test]
fn a_rollback_returns_the_user_to_legacy_with_what_happened_on_new() {
    within(240, || {
        let b = Backends::start();
        let m = migrated(&b, Options::default());
        let out = m.cli(&["user", "cutover", USER, "--wait"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        // On new: mail arrives by LMTP and by the client's APPEND; the client flags one copied
        // message and deletes another.
        for s in ["while-on-new-1", "while-on-new-2"] {
            let r = lmtp_deliver(m.lmtp, "mta@example.net", &[USER], &message(s));
            assert!(r.all_delivered(), "{r:?}");
        }
        let mut c = Client::plain(m.imap);
        assert!(c.login(USER, PASSWORD).starts_with("OK"));
        let note = message("appended-on-new");
        c.send(format!("a1 APPEND INBOX (\\Seen $Note) {{{}}}\r\n", note.len()).as_bytes());
        assert!(c.line().starts_with("+"));
        c.send(&note);
        c.send(b"\r\n");
        let ok = loop {
            let line = c.line();
            if line.starts_with("a1 ") {
                break line;
            }
        };
        assert!(ok.starts_with("a1 OK"), "{ok}");
        let (_, ok) = c.cmd("SELECT INBOX");
        assert!(ok.contains("OK"), "{ok}");
        let (_, ok) = c.cmd("STORE 1 +FLAGS (\\Flagged $RolledBack)");
        assert!(ok.contains("OK"), "{ok}");
        let (_, ok) = c.cmd("STORE 2 +FLAGS (\\Deleted)");
        assert!(ok.contains("OK"), "{ok}");
        // The corpus has messages flagged \Deleted already: the user's EXPUNGE removes those too.
        let (gone, ok) = c.cmd("EXPUNGE");
        assert!(ok.contains("OK"), "{ok}");
        let expunged = gone.iter().filter(|l| l.ends_with(" EXPUNGE")).count();
        assert!(expunged >= 1, "{gone:?}");
        let legacy_before = b.legacy.count(USER, "INBOX");

        let out = m.cli(&["user", "rollback", USER, "--wait"]);
        assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out), m.log());
        let v = m.show(USER);
        assert_eq!(
            (&v["state"], &v["route"]),
            (&"legacy".into(), &"legacy".into()),
            "{v}"
        );
        for s in ["while-on-new-1", "while-on-new-2", "appended-on-new"] {
            assert_eq!(copies(&b.legacy, s), 1, "{s} on legacy exactly once");
        }
        // Three arrived; what the user expunged on new is expunged on legacy.
        assert_eq!(b.legacy.count(USER, "INBOX"), legacy_before + 3 - expunged);
        let out = m.cli(&["verify", USER]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "legacy and new agree: {}",
            text(&out)
        );
        let mut again = Client::plain(m.imap);
        assert!(again.login(USER, PASSWORD).starts_with("OK"));
        let (lines, _) = again.cmd("SELECT INBOX");
        assert!(lines.iter().any(|l| l.contains("$RolledBack")), "{lines:?}");
        let trail: Vec<String> = events(&m)
            .iter()
            .map(|e| e["to"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(trail, ["syncing", "cutover", "new", "rollback", "legacy"]);
    });
}
