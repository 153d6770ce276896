//! The sync engine's throttling against real Dovecot when a backend misbehaves: it slows down
//! (rising latency), refuses with `NO [LIMIT]`, or goes silent (timeout). Each test drives the
//! real `mailferry sync EMAIL --once` (JSON log on stderr, report on stdout), with the new
//! backend behind a fault-injecting relay ([`support::relay`]) where needed, and checks what the
//! engine did from its log, then that the pass completed and `mailferry verify` is clean.
//! Nothing here asserts a wall-clock time: faults are switched on and off on observed progress.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::corpus::{self, Corpus, Spec};
use support::deadline::within;
use support::relay::Relay;
use support::{Backends, Dovecot, MASTER_PASSWORD, MASTER_USER};

const USER: &str = "alice@example.org";

/// Which backend the sync reaches through a fault-injecting relay.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relayed {
    Neither,
    New,
    Legacy,
}

/// Two backends, optionally a relay in front of one, and two mailferry configs: `config` (what
/// the sync uses, through the relay) and `direct` (both backends direct, for verify).
struct Env {
    backends: Backends,
    relay: Option<Relay>,
    config: PathBuf,
    direct: PathBuf,
    dir: tempfile::TempDir,
}

fn backend_toml(name: &str, imap: std::net::SocketAddr, d: &Dovecot, secret: &Path) -> String {
    format!(
        "[backends.{name}]\nimap = \"{imap}\"\nimap_tls = \"none\"\nca_file = \"{}\"\n\
         master_user = \"{MASTER_USER}\"\nmaster_password_file = \"{}\"\n\n",
        d.cert.cert_pem.display(),
        secret.display()
    )
}

impl Env {
    /// Starts the backends (`new_conf` is extra dovecot.conf for new), a relay in front of the
    /// `relayed` one, and writes the configs with `sync_toml` in `[sync]`.
    fn new(new_conf: &str, relayed: Relayed, sync_toml: &str) -> Env {
        let backends = Backends::start_with("", new_conf);
        let relay = match relayed {
            Relayed::Neither => None,
            Relayed::New => Some(Relay::start(backends.new.imap)),
            Relayed::Legacy => Some(Relay::start(backends.legacy.imap)),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("master.secret");
        std::fs::write(&secret, format!("{MASTER_PASSWORD}\n")).expect("secret");
        let state = dir.path().join("state.db");
        support::mailferry::create_store(&format!("sqlite://{}", state.display()));
        let write = |file: &str, legacy_addr, new_addr| {
            let mut text = format!(
                "[admin]\ntoken_file = \"{}\"\n\n[state]\nurl = \"sqlite://{}\"\n\n",
                secret.display(),
                state.display()
            );
            text.push_str(&backend_toml(
                "legacy",
                legacy_addr,
                &backends.legacy,
                &secret,
            ));
            text.push_str(&backend_toml("new", new_addr, &backends.new, &secret));
            text.push_str("[sync]\n");
            text.push_str(sync_toml);
            let path = dir.path().join(file);
            std::fs::write(&path, text).expect("config");
            path
        };
        let through = |side, direct| match &relay {
            Some(r) if relayed == side => r.addr,
            _ => direct,
        };
        let config = write(
            "sync.toml",
            through(Relayed::Legacy, backends.legacy.imap),
            through(Relayed::New, backends.new.imap),
        );
        let direct = write("direct.toml", backends.legacy.imap, backends.new.imap);
        Env {
            backends,
            relay,
            config,
            direct,
            dir,
        }
    }

    fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("env without relay")
    }

    /// Loads `c` into the user's legacy account and empties the new INBOX (the harness seeds
    /// a marker there), so that both sides can agree after a sync.
    fn load(&self, c: &Corpus) {
        let out = self
            .backends
            .new
            .doveadm(&["expunge", "-u", USER, "mailbox", "INBOX", "all"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        corpus::load(&self.backends.legacy, USER, c);
    }

    /// Starts `mailferry sync USER --once --json` with an info-level JSON log.
    fn spawn_sync(&self, name: &str) -> Run {
        let out = self.dir.path().join(format!("{name}.out"));
        let log = self.dir.path().join(format!("{name}.log"));
        let child = support::mailferry::command(
            &self.config,
            &["--log-format", "json", "sync", USER, "--once", "--json"],
        )
        .env("MAILFERRY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn mailferry sync");
        Run {
            child: Some(child),
            out,
            log,
        }
    }

    /// Asserts that `verify` (straight to both backends) finds both sides the same, and that
    /// every folder holds as many messages on new as on legacy (no duplicate APPENDs).
    fn assert_same(&self, c: &Corpus) {
        let out = support::mailferry::run_cli(&self.direct, &["verify", USER], 120);
        assert_eq!(
            out.status.code(),
            Some(0),
            "verify reports differences:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let total = |d: &Dovecot| -> usize {
            // All mailboxes at once (parents that hold no messages of their own are left out).
            let out = d.doveadm(&[
                "-f", "flow", "mailbox", "status", "-u", USER, "messages", "*",
            ]);
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|t| t.strip_prefix("messages=")?.parse::<usize>().ok())
                .sum()
        };
        // The corpus and the legacy marker, once each.
        let want = c.messages.len() + 1;
        assert_eq!(total(&self.backends.legacy), want);
        assert_eq!(total(&self.backends.new), want);
    }

    /// Another pass appends nothing.
    fn assert_nothing_left(&self) {
        let out =
            support::mailferry::run_cli(&self.config, &["sync", USER, "--once", "--json"], 120);
        let r = support::mailferry::sync_report(&out);
        assert_eq!(n(&r, "appended"), 0, "{r}");
    }
}

/// A running `mailferry sync --once`.
struct Run {
    child: Option<Child>,
    out: PathBuf,
    log: PathBuf,
}

impl Run {
    /// Whether the process has exited.
    fn done(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// The JSON log lines so far (other lines, e.g. the CLI's own error line, skipped).
    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .split_inclusive('\n')
            // Complete lines only: one being written is read next time.
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for the exit (at most `secs`), asserts success; returns the report and the log.
    fn finish(mut self, secs: u64) -> (Value, Vec<Value>) {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sync did not finish in {secs} s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = std::fs::read_to_string(&self.out).unwrap_or_default();
        assert!(
            status.success(),
            "sync failed ({status}): {stdout}\n{}",
            self.log_text()
        );
        let report = serde_json::from_str(&stdout).expect("json report");
        (report, self.events())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn field<'a>(e: &'a Value, k: &str) -> &'a str {
    e.get("fields")
        .and_then(|f| f.get(k))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Events with this message.
fn named<'a>(events: &'a [Value], message: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| field(e, "message") == message)
        .collect()
}

/// "sync backing off" events of `backend` for `reason`.
fn backoffs<'a>(events: &'a [Value], backend: &str, reason: &str) -> Vec<&'a Value> {
    named(events, "sync backing off")
        .into_iter()
        .filter(|e| field(e, "backend") == backend && field(e, "reason") == reason)
        .collect()
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// Polls `cond` every few milliseconds for at most `secs`; returns whether it became true.
fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// Small messages in all folders (many APPEND batches, hence many latency samples) and a few
/// of 300–400 KB.
fn corpus(seed: u64, messages: usize, large: usize) -> Corpus {
    corpus::generate(&Spec {
        seed,
        messages,
        large,
        large_min: 300 * 1024,
        large_max: 400 * 1024,
        folders: true,
        small_size: 3000,
    })
}

/// The new backend starts answering slowly in the middle of a pass: the engine notices from its
/// own round-trip samples (above the default latency floor and its recent best), backs off, and
/// the pass still completes once the backend is fast again.
#[test]
fn rising_latency_backs_off_and_the_pass_completes() {
    within(170, || {
        let env = Env::new("", Relayed::New, "");
        let c = corpus(21, 400, 6);
        env.load(&c);
        let relay = env.relay();
        let mut run = env.spawn_sync("latency");
        // A quarter of the corpus went up: the pace has samples of the backend at its normal speed.
        let quarter = c.bytes() / 4;
        assert!(wait_until(90, || relay.bytes_up() >= quarter || run.done()));
        assert!(
            !run.done(),
            "the pass ended before the slowdown:\n{}",
            run.log_text()
        );
        let before = run.events().len();
        let early = backoffs(&run.events(), "new", "latency").len();
        // Each reply of new now takes 600 ms more: well above the 250 ms floor per 256 KiB.
        relay.set_delay(Duration::from_millis(600));
        let noticed = wait_until(90, || {
            run.done() || !backoffs(&run.events()[before..], "new", "latency").is_empty()
        });
        relay.set_delay(Duration::ZERO);
        assert!(noticed);
        let (report, events) = run.finish(120);
        let cut = backoffs(&events[before..], "new", "latency");
        assert!(
            !cut.is_empty(),
            "no latency backoff of new after the slowdown: {:#?}",
            named(&events, "sync backing off")
        );
        eprintln!("backoffs before the slowdown: {early}; after: {cut:?}");
        // The cut halves the connection limit of new and comes with a pause.
        let limit = |k: &str| cut[0]["fields"][k].as_u64().unwrap_or(0);
        assert!(
            limit("to") < limit("from") && limit("pause_ms") > 0,
            "{}",
            cut[0]
        );
        // Nothing failed, nothing was retried: the same pass copied everything.
        assert!(named(&events, "sync pass failed").is_empty(), "{events:#?}");
        assert_eq!(
            n(&report, "appended"),
            c.messages.len() as u64 + 1,
            "{report}"
        );
        env.assert_same(&c);
        env.assert_nothing_left();
    });
}

/// Dovecot refuses the login with `NO [LIMIT]` while the user's allowed connections are taken
/// (`mail_max_userip_connections = 1` and another session open): the engine takes it as an
/// overload of new, backs off, retries, and the pass completes once the other session is gone.
#[test]
fn limit_at_login_backs_off_and_retries_until_the_slot_is_free() {
    within(150, || {
        let env = Env::new("mail_max_userip_connections = 1\n", Relayed::Neither, "");
        let c = corpus(22, 40, 1);
        env.load(&c);
        // The user's one connection from 127.0.0.1, taken by someone else.
        let holder = env.backends.new.imap_master_login(USER);
        let mut run = env.spawn_sync("limit");
        let retried = wait_until(60, || {
            run.done() || !named(&run.events(), "sync pass will be retried").is_empty()
        });
        holder.logout();
        assert!(retried);
        let (report, events) = run.finish(60);
        assert!(
            env.backends
                .new
                .log()
                .contains("Maximum number of connections from user+IP exceeded"),
            "{}",
            env.backends.new.log_tail(20)
        );
        let retries = named(&events, "sync pass will be retried");
        assert!(
            retries
                .iter()
                .any(|e| field(e, "error").contains("LOGIN refused: NO [LIMIT]")),
            "{retries:#?}"
        );
        eprintln!("retries: {retries:?}");
        assert!(
            !backoffs(&events, "new", "LIMIT").is_empty(),
            "{:#?}",
            named(&events, "sync backing off")
        );
        assert_eq!(
            n(&report, "appended"),
            c.messages.len() as u64 + 1,
            "{report}"
        );
        env.assert_same(&c);
        env.assert_nothing_left();
    });
}

/// New stops answering in the middle of the copy: the engine times out (a short
/// `[sync] reply_timeout_secs`), backs off and retries; the retry finds the messages new stored
/// but never acknowledged instead of appending them again.
fn silent_backend(name: &str, replies_only: bool) {
    let env = Env::new("", Relayed::New, "reply_timeout_secs = 3\n");
    let c = corpus(23, 300, 4);
    env.load(&c);
    let relay = env.relay();
    // A third into the upload, inside an APPEND.
    if replies_only {
        relay.stall_replies_after(c.bytes() / 3);
    } else {
        relay.stall_after(c.bytes() / 3);
    }
    let mut run = env.spawn_sync(name);
    assert!(wait_until(90, || relay.stalled() || run.done()));
    assert!(
        !run.done(),
        "the pass ended before the stall:\n{}",
        run.log_text()
    );
    let conns = relay.accepted();
    // The engine gives up on the silent connection; its retry connects again.
    let reconnected = wait_until(60, || relay.accepted() > conns || run.done());
    relay.stall(false);
    assert!(reconnected);
    let (report, events) = run.finish(120);
    let failed = named(&events, "sync pass failed");
    assert!(
        failed
            .iter()
            .any(|e| field(e, "error") == "backend new: timeout waiting for reply"),
        "{failed:#?}"
    );
    assert!(
        !backoffs(&events, "new", "TIMEOUT").is_empty(),
        "{:#?}",
        named(&events, "sync backing off")
    );
    assert!(!named(&events, "sync pass will be retried").is_empty());
    // The APPENDs in flight at the stall were stored by new (at once, or on resume for the
    // rest of the command) but never acknowledged: found, not appended again.
    let recovered = named(&events, "recovered unacknowledged appends");
    eprintln!("{name}: {recovered:?}\nretry report: {report}");
    assert!(n(&report, "recovered") > 0, "{report}");
    env.assert_same(&c);
    env.assert_nothing_left();
}

/// New receives and executes commands, its answers never arrive (a lost reply path).
#[test]
fn replies_that_never_arrive_time_out_and_nothing_is_appended_twice() {
    within(150, || silent_backend("replies", true));
}

/// New hangs in both directions in the middle of an APPEND literal, and gets the rest of it
/// only after the engine gave up on that connection (a hung backend).
#[test]
fn a_hung_backend_times_out_and_nothing_is_appended_twice() {
    within(150, || silent_backend("hung", false));
}

/// Large messages are nearly all of this corpus's bytes: a cut at half of them falls inside one.
fn large_corpus(seed: u64) -> Corpus {
    corpus::generate(&Spec {
        seed,
        messages: 20,
        large: 4,
        large_min: 1024 * 1024,
        large_max: 2 * 1024 * 1024,
        folders: false,
        small_size: 3000,
    })
}

/// The relayed backend's connection is cut (by `cut`, given the corpus) in the middle of a
/// large message that the engine passes on as it arrives: the pass fails with that backend's
/// error (`backend`), nothing half copied stays on new, and the retry copies everything once.
fn cut_mid_message(relayed: Relayed, backend: &str, cut: impl Fn(&Relay, u64)) {
    let env = Env::new("", relayed, "");
    let c = large_corpus(24);
    env.load(&c);
    let relay = env.relay();
    let at = c.bytes() / 2;
    cut(relay, at);
    let run = env.spawn_sync("cut");
    // Once the cut has happened, the retry gets through.
    assert!(wait_until(90, || relay.bytes_down().max(relay.bytes_up()) >= at));
    cut(relay, 0);
    let (report, events) = run.finish(120);
    let failed = named(&events, "sync pass failed");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    let error = field(failed[0], "error");
    assert!(error.starts_with(&format!("backend {backend}:")), "{error}");
    assert!(!named(&events, "sync pass will be retried").is_empty());
    eprintln!(
        "cut at {at} of {} bytes: {error}; retry: {report}",
        c.bytes()
    );
    env.assert_same(&c);
    env.assert_nothing_left();
}

/// Legacy's connection dies while it sends a large message.
#[test]
fn legacy_lost_in_the_middle_of_a_message_leaves_nothing_half_copied() {
    within(150, || {
        cut_mid_message(Relayed::Legacy, "legacy", Relay::cut_replies_after);
    });
}

/// New's connection dies while it receives a large message.
#[test]
fn new_lost_in_the_middle_of_a_message_leaves_nothing_half_copied() {
    within(150, || {
        cut_mid_message(Relayed::New, "new", Relay::cut_after)
    });
}
