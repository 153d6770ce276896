//! Abuse the proxy is built to withstand, each case as a transcript: a backend that injects a
//! response after STARTTLS or greets with PREAUTH (a scripted fake, `support::fake`: a real
//! server will not do that on purpose), a SASL authorization identity that is not the
//! caller's, input at and one byte over every pre-auth limit, control characters aimed at the
//! log, LMTP with both backends down, and LMTP streamed while the user's route flips.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use support::client::Client;
use support::deadline::within;
use support::dovecot::dot_stuff;
use support::fake::{FakeBackend, Step};
use support::mailferry::{Mailferry, Options};
use support::{Backends, Dovecot};

/// A password that appears nowhere but in the credentials a test sends.
const SECRET: &str = "Sesame-4f1c-never-forward";

fn plain(authzid: &str, authcid: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{authzid}\0{authcid}\0{password}"))
}

/// What a backend must not have received if credentials were never sent to it.
fn assert_no_credentials(received: &[u8], user: &str) {
    let text = String::from_utf8_lossy(received).to_ascii_uppercase();
    for word in ["AUTHENTICATE", "LOGIN", &SECRET.to_ascii_uppercase()] {
        assert!(!text.contains(word), "{word} reached the backend: {text:?}");
    }
    let ir = plain("", user, SECRET);
    assert!(
        !received.windows(ir.len()).any(|w| w == ir.as_bytes()),
        "the SASL response reached the backend"
    );
}

/// Polls until `f` holds or `secs` have passed; returns whether it held.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------------------------------
// a scripted backend that misbehaves before any credentials are due

#[test]
fn starttls_answer_with_injected_bytes_gets_no_credentials() {
    within(90, || {
        let b = Backends::start();
        let greeting = "* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR] fake ready\r\n";
        // The classic: a second response in the same segment as the STARTTLS OK, meant to be
        // read after the handshake as if the TLS server had said it.
        let same_write = FakeBackend::start(vec![
            Step::send(greeting),
            Step::ReadLine,
            Step::send(
                "m0 OK Begin TLS negotiation now.\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n",
            ),
        ]);
        // The same in two writes: the proxy may already be in the handshake when the second
        // arrives, which then fails; either way no credentials go out.
        let two_writes = FakeBackend::start(vec![
            Step::send(greeting),
            Step::ReadLine,
            Step::send("m0 OK Begin TLS negotiation now.\r\n"),
            Step::send("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n"),
        ]);
        let proxy = Mailferry::start(
            &b,
            Options {
                backend_tls: "starttls",
                imap_at: vec![("legacy", same_write.addr), ("new", two_writes.addr)],
                ..Options::default()
            },
        );
        proxy.route("bob@example.org", "new");

        for (user, fake) in [
            ("alice@example.org", &same_write),
            ("bob@example.org", &two_writes),
        ] {
            let mut c = Client::plain(proxy.imap);
            let (_, no) = c.cmd(&format!("AUTHENTICATE PLAIN {}", plain("", user, SECRET)));
            assert_eq!(no, "NO [UNAVAILABLE] Backend temporarily unavailable.");
            // The client's session goes on, still unauthenticated.
            let (_, bad) = c.cmd("SELECT INBOX");
            assert_eq!(bad, "BAD SELECT is not allowed before login.");
            drop(c);
            let conns = fake.ended(1, Duration::from_secs(30));
            let login: Vec<_> = conns.iter().filter(|c| !c.received.is_empty()).collect();
            assert_eq!(login.len(), 1, "{user}: one login attempt: {conns:?}");
            let got = &login[0].received;
            assert!(
                got.starts_with(b"m0 STARTTLS\r\n"),
                "{user}: {:?}",
                String::from_utf8_lossy(got)
            );
            // After STARTTLS, nothing at all, or a TLS ClientHello (a handshake record).
            let rest = &got[b"m0 STARTTLS\r\n".len()..];
            assert!(
                rest.is_empty() || (fake.addr == two_writes.addr && rest[0] == 0x16),
                "{user}: after STARTTLS: {:?}",
                String::from_utf8_lossy(rest)
            );
            for c in &conns {
                assert_no_credentials(&c.received, user);
            }
        }
        let log = proxy.log();
        assert!(
            log.contains("data injected before the TLS handshake"),
            "the injection is named in the log:\n{log}"
        );
    });
}

#[test]
fn preauth_greeting_is_refused_and_gets_no_credentials() {
    within(90, || {
        let b = Backends::start();
        // PREAUTH: "already authenticated", as whoever the backend chose. Whatever the client
        // then did would happen in that account.
        let fake = FakeBackend::start(vec![Step::send(
            "* PREAUTH [CAPABILITY IMAP4rev1] Logged in as admin\r\n",
        )]);
        let proxy = Mailferry::start(
            &b,
            Options {
                imap_at: vec![("legacy", fake.addr)],
                ..Options::default()
            },
        );
        let mut c = Client::plain(proxy.imap);
        let no = c.login("alice@example.org", SECRET);
        assert_eq!(no, "NO [UNAVAILABLE] Backend temporarily unavailable.");
        let (_, bad) = c.cmd("SELECT INBOX");
        assert_eq!(bad, "BAD SELECT is not allowed before login.");
        assert_eq!(proxy.show("alice@example.org")["sessions"], 0);
        drop(c);
        let conns = fake.ended(1, Duration::from_secs(30));
        for conn in &conns {
            assert_eq!(
                String::from_utf8_lossy(&conn.received),
                "",
                "nothing is sent to a PREAUTH backend, not even ID"
            );
        }
        let log = proxy.log();
        assert!(
            log.contains("backend legacy: protocol error: greeting is not * OK"),
            "{log}"
        );

        // The other backend is unaffected: a user routed there logs in.
        proxy.route("bob@example.org", "new");
        let mut bob = Client::plain(proxy.imap);
        assert!(bob.login("bob@example.org", "bobpw").starts_with("OK"));
        assert_eq!(bob.inbox_subjects(), vec!["new marker"]);
    });
}

// ---------------------------------------------------------------------------------------
// SASL PLAIN: an authorization identity that is not the caller's

#[test]
fn plain_authzid_of_another_user_is_refused_and_never_reaches_their_mailbox() {
    within(120, || {
        let b = Backends::start();
        // legacy passes the client's credentials through; new is reached as master user once
        // the client's password was checked on legacy (`password_backend`). The proxy routes
        // a PLAIN login by its authzid, so each attack below is routed as its victim: what
        // refuses it is the backend, which grants an authzid only to its master users.
        let proxy = Mailferry::start(
            &b,
            Options {
                legacy_auth: "passthrough",
                new_auth: "master",
                extra: "[limits]\nauth_failure_delay_ms = 10\n".into(),
                ..Options::default()
            },
        );
        proxy.route("alice@example.org", "legacy");
        proxy.route("carol@example.org", "legacy");
        proxy.route("bob@example.org", "new");

        let mut c = Client::plain(proxy.imap);
        // alice, with her own correct password, asking to act as carol (passthrough) ...
        let (_, no) = c.cmd(&format!(
            "AUTHENTICATE PLAIN {}",
            plain("carol@example.org", "alice@example.org", "alicepw")
        ));
        assert_eq!(no, "NO [AUTHENTICATIONFAILED] Authentication failed.");
        // ... and as bob, whose backend the proxy would log in to as master user.
        let (_, no) = c.cmd(&format!(
            "AUTHENTICATE PLAIN {}",
            plain("bob@example.org", "alice@example.org", "alicepw")
        ));
        assert_eq!(no, "NO [AUTHENTICATIONFAILED] Authentication failed.");
        // Still unauthenticated; nothing registered for the victims.
        let (_, bad) = c.cmd("SELECT INBOX");
        assert_eq!(bad, "BAD SELECT is not allowed before login.");
        for victim in ["carol@example.org", "bob@example.org"] {
            assert_eq!(proxy.show(victim)["sessions"], 0, "{victim}");
        }
        // The same credentials without the authzid are good: the refusals were about it.
        let (_, ok) = c.cmd(&format!(
            "AUTHENTICATE PLAIN {}",
            plain("", "alice@example.org", "alicepw")
        ));
        assert!(ok.starts_with("OK [CAPABILITY"), "{ok}\n{}", proxy.log());
        assert_eq!(c.inbox_subjects(), vec!["legacy marker"]);
        assert_eq!(proxy.show("alice@example.org")["sessions"], 1);

        // Neither backend ever started a session for a victim. Dovecot logs asynchronously:
        // alice's login, which came last, is in the log once everything before it is.
        assert!(
            b.legacy
                .wait_for_log("Login: user=<alice@example.org>", Duration::from_secs(20)),
            "{}",
            b.legacy.log_tail(40)
        );
        for d in [&b.legacy, &b.new] {
            let log = d.log();
            for victim in ["carol@example.org", "bob@example.org"] {
                assert!(
                    !log.contains(&format!("Login: user=<{victim}>"))
                        && !log.contains(&format!("imap({victim})")),
                    "[{}] a session for {victim}:\n{log}",
                    d.name
                );
            }
        }
        // Their mailboxes hold what they held, unread.
        for (d, victim) in [
            (&b.legacy, "carol@example.org"),
            (&b.new, "bob@example.org"),
        ] {
            let out = d.doveadm(&[
                "-f",
                "flow",
                "mailbox",
                "status",
                "-u",
                victim,
                "messages unseen",
                "INBOX",
            ]);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "INBOX messages=1 unseen=1",
                "[{}] {victim}",
                d.name
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// pre-auth limits at the edge

/// `ID (...)` with these pairs as quoted strings.
fn id_args(pairs: &[(String, String)]) -> String {
    let list: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("\"{k}\" \"{v}\""))
        .collect();
    format!("ID ({})", list.join(" "))
}

/// `TAG ID (...)`, CRLF included.
fn id_command(tag: &str, pairs: &[(String, String)]) -> Vec<u8> {
    format!("{tag} {}\r\n", id_args(pairs)).into_bytes()
}

/// An ID command of exactly `len` octets (CRLF included), every value within RFC 2971's
/// 1024 octets.
fn id_command_of_len(tag: &str, len: usize) -> Vec<u8> {
    let mut pairs: Vec<(String, String)> = (0..10)
        .map(|i| (format!("x-pad{i}"), String::new()))
        .collect();
    let mut missing = len - id_command(tag, &pairs).len();
    for (_, v) in pairs.iter_mut() {
        let n = missing.min(1000);
        *v = "v".repeat(n);
        missing -= n;
    }
    assert_eq!(missing, 0, "{len} octets need more pairs");
    let line = id_command(tag, &pairs);
    assert_eq!(line.len(), len);
    line
}

const ID_REPLY: &str = "* ID (\"name\" \"mailferry\")";

#[test]
fn preauth_line_of_exactly_the_limit_is_answered_and_one_more_octet_is_refused() {
    within(60, || {
        let b = Backends::start();
        let proxy = Mailferry::start(&b, Options::default());
        // `[limits] preauth_line`, 8 KiB by default: the longest line, CRLF included.
        let limit = 8 * 1024;

        let mut c = Client::plain(proxy.imap);
        c.send(&id_command_of_len("a", limit));
        assert_eq!(c.line(), ID_REPLY);
        assert_eq!(c.line(), "a OK ID completed.");
        let (_, ok) = c.cmd("NOOP");
        assert_eq!(ok, "OK NOOP completed.");

        let mut c = Client::plain(proxy.imap);
        c.send(&id_command_of_len("b", limit + 1));
        assert_eq!(c.line(), "* BAD [TOOBIG] Line too long");
        assert_eq!(c.try_line(), None, "closed after the refusal");

        // Without its line end yet: refused as soon as it cannot fit any more.
        let mut c = Client::plain(proxy.imap);
        c.send(&vec![b'a'; limit + 1]);
        assert_eq!(c.line(), "* BAD [TOOBIG] Line too long");
        assert_eq!(c.try_line(), None);
    });
}

#[test]
fn id_accepts_exactly_the_rfc_2971_limits_and_refuses_one_more() {
    within(60, || {
        let b = Backends::start();
        let proxy = Mailferry::start(&b, Options::default());
        let mut c = Client::plain(proxy.imap);
        let bad = "BAD ID parameters exceed RFC 2971 limits.";
        let mut id = |pairs: Vec<(String, String)>| c.cmd(&id_args(&pairs));
        let pairs = |n: usize| -> Vec<(String, String)> {
            (1..=n)
                .map(|i| (format!("x-f{i:02}"), format!("{i}")))
                .collect()
        };
        let one = |k: String, v: String| vec![(k, v)];

        // 30 pairs.
        assert_eq!(
            id(pairs(30)),
            (vec![ID_REPLY.to_owned()], "OK ID completed.".into())
        );
        assert_eq!(id(pairs(31)).1, bad);
        // Field names of 30 octets.
        let (at, over) = ("k".repeat(30), "k".repeat(31));
        assert_eq!(id(one(at, "v".into())).1, "OK ID completed.");
        assert_eq!(id(one(over, "v".into())).1, bad);
        // Values of 1024 octets.
        let (at, over) = ("v".repeat(1024), "v".repeat(1025));
        assert_eq!(id(one("name".into(), at)).1, "OK ID completed.");
        assert_eq!(id(one("name".into(), over)).1, bad);
        // A refusal does not end the session.
        let (_, ok) = c.cmd("ID NIL");
        assert_eq!(ok, "OK ID completed.");
        let (_, ok) = c.cmd("NOOP");
        assert_eq!(ok, "OK NOOP completed.");
    });
}

// ---------------------------------------------------------------------------------------
// control characters aimed at the log

/// A log line a client would like to see: its own timestamp, level and target.
const FORGED_DATE: &str = "2031-01-01";

/// A login name that, written raw, would end the log line, start a forged one, clear the
/// terminal and colour what follows.
fn evil_login() -> String {
    format!(
        "mallory\r\n{FORGED_DATE}T00:00:00.000000Z  INFO mailferry::control: route changed \
         user=root route=new\x1b[2J\x1b[1;31m@example.org"
    )
}

/// A backend that takes any login (a real one checks names and passwords) and then LOGOUT.
fn lax_backend() -> FakeBackend {
    FakeBackend::start(vec![
        Step::send("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] lax ready\r\n"),
        // The proxy's ID and AUTHENTICATE, in one write.
        Step::ReadLine,
        Step::ReadLine,
        Step::send("m1 OK ID completed.\r\nm2 OK [CAPABILITY IMAP4rev1] Logged in\r\n"),
        // The client's LOGOUT, through the splice.
        Step::ReadLine,
        Step::send("* BYE Logging out\r\na3 OK Logout completed.\r\n"),
        Step::Close,
    ])
}

/// Logs in through `proxy` with `evil_login()` after an ID whose field name and value carry
/// the same kind of payload, then logs out; returns once the session's end is logged.
fn evil_session(proxy: &Mailferry) {
    let mut c = Client::plain(proxy.imap);
    let (field, value) = (
        format!("x\r\n{FORGED_DATE}\x1b[2J"),
        format!("v\r\n{FORGED_DATE}T00:00:00Z  WARN forged\x1b]0;title\x07"),
    );
    let mut id = format!("a1 ID ({{{}+}}\r\n", field.len()).into_bytes();
    id.extend_from_slice(field.as_bytes());
    id.extend_from_slice(format!(" {{{}+}}\r\n", value.len()).as_bytes());
    id.extend_from_slice(value.as_bytes());
    id.extend_from_slice(b")\r\n");
    c.send(&id);
    assert_eq!(c.line(), ID_REPLY);
    assert_eq!(c.line(), "a1 OK ID completed.");
    let login = evil_login();
    let mut cmd = format!("a2 LOGIN {{{}+}}\r\n", login.len()).into_bytes();
    cmd.extend_from_slice(login.as_bytes());
    cmd.extend_from_slice(b" \"pw\"\r\n");
    c.send(&cmd);
    assert_eq!(c.line(), "a2 OK [CAPABILITY IMAP4rev1] Logged in");
    c.send(b"a3 LOGOUT\r\n");
    assert_eq!(c.line(), "* BYE Logging out");
    assert_eq!(c.line(), "a3 OK Logout completed.");
    assert!(
        eventually(20, || proxy.log().contains("session end")),
        "{}",
        proxy.log()
    );
}

/// Folder names are not here: Dovecot refuses control characters in them ("Mailbox name is not
/// valid mUTF-7"), and a sync pass against a fake would be a test of the fake. The sync engine
/// logs them as `folder = %name`, which `src/logging.rs`'s tests write in both formats.
#[test]
fn control_characters_in_login_names_and_id_fields_never_forge_a_log_line() {
    within(90, || {
        let b = Backends::start();
        let (lax_h, lax_j) = (lax_backend(), lax_backend());
        let human = Mailferry::start(
            &b,
            Options {
                imap_at: vec![("legacy", lax_h.addr)],
                ..Options::default()
            },
        );
        let json = Mailferry::start(
            &b,
            Options {
                imap_at: vec![("legacy", lax_j.addr)],
                log_format: "json",
                ..Options::default()
            },
        );
        // The proxy routes (and logs) the login name lower-cased.
        let user = evil_login().to_lowercase();

        evil_session(&human);
        let log = human.log();
        assert!(!log.contains('\r'), "raw CR in the log:\n{log:?}");
        assert!(!log.contains('\x1b'), "raw ESC in the log:\n{log:?}");
        assert!(!log.contains('\x07'), "raw BEL in the log:\n{log:?}");
        for line in log.lines() {
            // Every line is one of ours: it starts with the time it was written.
            let stamp = line.get(..11).unwrap_or(line);
            assert!(
                stamp.len() == 11
                    && stamp.as_bytes()[4] == b'-'
                    && stamp.ends_with('T')
                    && !stamp.starts_with(FORGED_DATE),
                "a line that is not a log event: {line:?}\n{log}"
            );
        }
        let end: Vec<&str> = log.lines().filter(|l| l.contains("session end")).collect();
        assert_eq!(end.len(), 1, "{log}");
        assert!(
            end[0].contains("mallory\\r\\n2031-01-01t00:00:00.000000z"),
            "the name is there, escaped: {}",
            end[0]
        );

        evil_session(&json);
        let log = json.log();
        let mut ended = 0;
        for line in log.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}\n{log}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string(),
                "{line}"
            );
            if v["fields"]["message"] == "session end" {
                ended += 1;
                assert_eq!(v["fields"]["user"], user.as_str(), "exactly the name");
                assert_eq!(v["span"]["user"], user.as_str(), "{line}");
            }
        }
        assert_eq!(ended, 1, "{log}");
    });
}

// ---------------------------------------------------------------------------------------
// LMTP

/// A blocking LMTP client with byte-level access.
struct Lmtp {
    r: BufReader<TcpStream>,
}

impl Lmtp {
    fn connect(addr: SocketAddr) -> Lmtp {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Lmtp {
            r: BufReader::new(s),
        };
        let greeting = c.reply();
        assert!(greeting.starts_with("220 "), "greeting: {greeting}");
        c.send(b"LHLO mta.mailferry.test\r\n");
        let lhlo = c.reply();
        assert!(lhlo.contains("250-PIPELINING"), "{lhlo}");
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).expect("LMTP write");
    }

    /// One complete (possibly multi-line) reply, lines joined by `\n`.
    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).expect("LMTP read");
            assert!(n > 0, "connection closed; got so far: {all:?}");
            all.push_str(line.trim_end());
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
            all.push('\n');
        }
    }

    /// RSET, MAIL, the RCPTs and DATA in one write; then, if DATA was accepted, the message.
    /// Returns the RCPT replies and, per accepted RCPT, the final reply.
    fn transaction(&mut self, rcpts: &[&str], message: &[u8]) -> (Vec<String>, Vec<String>) {
        let mut batch = String::from("RSET\r\nMAIL FROM:<sender@mailferry.test>\r\n");
        for r in rcpts {
            batch.push_str(&format!("RCPT TO:<{r}>\r\n"));
        }
        batch.push_str("DATA\r\n");
        self.send(batch.as_bytes());
        assert_eq!(self.reply(), "250 2.0.0 OK");
        assert_eq!(self.reply(), "250 2.1.0 Sender OK");
        let rcpt: Vec<String> = rcpts.iter().map(|_| self.reply()).collect();
        let go = self.reply();
        let accepted = rcpt.iter().filter(|r| r.starts_with('2')).count();
        if accepted == 0 {
            assert!(go.starts_with("503 "), "DATA without recipients: {go}");
            return (rcpt, Vec::new());
        }
        assert!(go.starts_with("354 "), "DATA: {go}");
        let mut data = dot_stuff(message);
        data.extend_from_slice(b".\r\n");
        self.send(&data);
        let replies = (0..accepted).map(|_| self.reply()).collect();
        (rcpt, replies)
    }
}

fn lmtp_message(id: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@mailferry.test>\r\n\
         To: Test <test@example.org>\r\n\
         Subject: {id}\r\n\
         Date: Sun, 22 Nov 2026 06:00:00 +0000\r\n\
         Message-ID: <{id}@mailferry.test>\r\n\
         \r\n\
         Body of {id}.\r\n"
    )
    .into_bytes()
}

/// Message-IDs of `user`'s INBOX on `d` that start with `prefix`, with how often each is there.
fn stored(d: &Dovecot, user: &str, prefix: &str) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    for m in d.messages(user, "INBOX") {
        let text = String::from_utf8_lossy(&m);
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: <"))
            .and_then(|l| l.strip_suffix("@mailferry.test>"));
        if let Some(id) = id.filter(|id| id.starts_with(prefix)) {
            *ids.entry(id.to_owned()).or_default() += 1;
        }
    }
    ids
}

#[test]
fn lmtp_with_both_backends_down_defers_each_recipient_and_the_session_goes_on() {
    within(120, || {
        let mut b = Backends::start();
        let proxy = Mailferry::start(&b, Options::default());
        proxy.route("bob@example.org", "new");
        b.stop();

        let mut c = Lmtp::connect(proxy.lmtp);
        let rcpts = ["alice@example.org", "bob@example.org", "carol@example.org"];
        let (rcpt, data) = c.transaction(&rcpts, &lmtp_message("down-1"));
        assert!(rcpt.iter().all(|r| r.starts_with("250 2.1.5")), "{rcpt:?}");
        assert_eq!(data.len(), 3, "one reply per recipient: {data:?}");
        for (reply, (to, backend)) in data.iter().zip([
            ("alice@example.org", "legacy"),
            ("bob@example.org", "new"),
            ("carol@example.org", "legacy"),
        ]) {
            assert!(
                reply.starts_with(&format!("451 4.4.1 <{to}> Backend {backend} failed")),
                "{to}: {reply}"
            );
        }
        // The session is usable: commands are answered, and another message is deferred
        // the same way rather than breaking the session.
        c.send(b"NOOP\r\n");
        assert_eq!(c.reply(), "250 2.0.0 OK");
        let (_, data) = c.transaction(&["alice@example.org"], &lmtp_message("down-2"));
        assert_eq!(data.len(), 1);
        assert!(
            data[0].starts_with("451 4.4.1 <alice@example.org>"),
            "{data:?}"
        );

        // The backends come back: the same session delivers.
        b.legacy.restart();
        b.new.restart();
        c.send(b"RSET\r\nNOOP\r\n");
        assert_eq!(c.reply(), "250 2.0.0 OK");
        assert_eq!(c.reply(), "250 2.0.0 OK");
        let (_, data) = c.transaction(&rcpts, &lmtp_message("back-1"));
        assert_eq!(data.len(), 3);
        assert!(
            data.iter().all(|r| r.starts_with("250 2.0.0")),
            "{data:?}\n{}",
            proxy.log()
        );
        c.send(b"QUIT\r\n");
        assert!(c.reply().starts_with("221 2.0.0"));

        // What was deferred was stored nowhere (the MTA keeps it and retries); what was
        // accepted, once, on its route.
        for (d, user, expect) in [
            (&b.legacy, "alice@example.org", 1),
            (&b.new, "bob@example.org", 1),
            (&b.legacy, "carol@example.org", 1),
            (&b.new, "alice@example.org", 0),
            (&b.legacy, "bob@example.org", 0),
            (&b.new, "carol@example.org", 0),
        ] {
            let got = stored(d, user, "");
            assert!(
                !got.contains_key("down-1") && !got.contains_key("down-2"),
                "[{}] {user}: {got:?}",
                d.name
            );
            assert_eq!(
                got.get("back-1").copied().unwrap_or(0),
                expect,
                "[{}] {user}",
                d.name
            );
        }
    });
}

/// Messages streamed in the route-flip test, and flips made meanwhile.
const STREAMED: usize = 200;
const FLIPS: usize = 10;
/// Flip k (1..=FLIPS) starts once message `STRIDE * k` has started ...
const STRIDE: usize = STREAMED / (FLIPS + 1);
/// ... and messages from `STRIDE * k + SLACK` on start only after it has finished.
const SLACK: usize = STRIDE / 2;

/// Route after `flips` flips: legacy, new, legacy, ...
fn route_after(flips: usize) -> &'static str {
    if flips % 2 == 0 {
        "legacy"
    } else {
        "new"
    }
}

/// One streamed message, as its sender saw it.
#[derive(Debug, Clone)]
struct Sent {
    /// The route epoch just before its MAIL FROM was sent, and just after its final reply
    /// arrived: 2j while the route is that after j flips, odd while a flip is under way.
    epochs: (usize, usize),
    /// Its RCPT reply, and final reply if the RCPT was accepted.
    rcpt: String,
    data: Option<String>,
}

impl Sent {
    fn accepted(&self) -> bool {
        self.data.as_deref().is_some_and(|d| d.starts_with('2'))
    }

    /// The route in effect over the whole of its transaction, if no flip overlapped it.
    fn certain_route(&self) -> Option<&'static str> {
        let (e0, e1) = self.epochs;
        (e0 == e1 && e0 % 2 == 0).then(|| route_after(e0 / 2))
    }
}

#[test]
fn lmtp_streamed_while_the_route_flips_stores_each_accepted_message_once_on_its_route() {
    within(300, || {
        const USER: &str = "alice@example.org";
        let b = Backends::start();
        let proxy = Mailferry::start(&b, Options::default());
        proxy.route(USER, "legacy");

        // "The route when a message was accepted": the flipper makes the epoch odd before it
        // asks for a flip and even again once the CLI has returned (the route is then in the
        // directory and gone from the cache). A message whose transaction (from MAIL FROM to
        // its final reply) saw the same even epoch at both ends ran entirely while the route
        // was route_after(epoch / 2): it must be stored there. One that overlapped a flip may
        // be stored on either side, but still exactly once if it got a 2xx, and nowhere if it
        // did not.
        let epoch = Arc::new(AtomicUsize::new(0));
        let flips_done = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let sent: Arc<Mutex<BTreeMap<usize, Sent>>> = Arc::default();

        let senders: Vec<_> = (0..4)
            .map(|_| {
                let (epoch, flips_done, next, sent) = (
                    epoch.clone(),
                    flips_done.clone(),
                    next.clone(),
                    sent.clone(),
                );
                let addr = proxy.lmtp;
                thread::spawn(move || {
                    let mut c = Lmtp::connect(addr);
                    loop {
                        let n = next.fetch_add(1, SeqCst);
                        if n >= STREAMED {
                            break;
                        }
                        // Keeps the flips among the messages: at most SLACK messages start
                        // after a flip was due before it is done.
                        let due = (1..=FLIPS).filter(|k| STRIDE * k + SLACK <= n).count();
                        while flips_done.load(SeqCst) < due {
                            thread::sleep(Duration::from_millis(2));
                        }
                        let e0 = epoch.load(SeqCst);
                        let (rcpt, data) =
                            c.transaction(&[USER], &lmtp_message(&format!("flip-{n:03}")));
                        let e1 = epoch.load(SeqCst);
                        let s = Sent {
                            epochs: (e0, e1),
                            rcpt: rcpt[0].clone(),
                            data: data.first().cloned(),
                        };
                        sent.lock().unwrap().insert(n, s);
                    }
                    c.send(b"QUIT\r\n");
                    assert!(c.reply().starts_with("221 "));
                })
            })
            .collect();

        for k in 1..=FLIPS {
            // Due once message STRIDE * k has started, and once a message has run entirely in
            // the current epoch (so that every route phase has messages whose route is certain).
            let settled = |e: usize| sent.lock().unwrap().values().any(|s| s.epochs == (e, e));
            let current = epoch.load(SeqCst);
            while next.load(SeqCst) < STRIDE * k || !settled(current) {
                thread::sleep(Duration::from_millis(2));
            }
            epoch.fetch_add(1, SeqCst);
            proxy.route(USER, route_after(k));
            epoch.fetch_add(1, SeqCst);
            flips_done.store(k, SeqCst);
        }
        for s in senders {
            s.join().expect("sender");
        }

        let sent = sent.lock().unwrap().clone();
        assert_eq!(sent.len(), STREAMED);
        let legacy = stored(&b.legacy, USER, "flip-");
        let new = stored(&b.new, USER, "flip-");
        let mut certain_per_phase = BTreeMap::<usize, usize>::new();
        for (n, s) in &sent {
            let id = format!("flip-{n:03}");
            let (on_legacy, on_new) = (
                legacy.get(&id).copied().unwrap_or(0),
                new.get(&id).copied().unwrap_or(0),
            );
            if !s.accepted() {
                assert!(
                    s.rcpt.starts_with('4')
                        || s.data.as_deref().is_some_and(|d| d.starts_with('4')),
                    "{id}: neither accepted nor deferred: {s:?}"
                );
                assert_eq!(
                    (on_legacy, on_new),
                    (0, 0),
                    "{id} was deferred but stored: {s:?}"
                );
                continue;
            }
            assert_eq!(
                on_legacy + on_new,
                1,
                "{id} accepted, stored {on_legacy} + {on_new}: {s:?}"
            );
            if let Some(route) = s.certain_route() {
                *certain_per_phase.entry(s.epochs.0 / 2).or_default() += 1;
                let on = if on_legacy == 1 { "legacy" } else { "new" };
                assert_eq!(
                    on, route,
                    "{id} accepted while the route was {route}: {s:?}"
                );
            }
        }
        // Nothing stored that was not sent.
        let sent_ids: BTreeSet<String> = sent.keys().map(|n| format!("flip-{n:03}")).collect();
        for id in legacy.keys().chain(new.keys()) {
            assert!(sent_ids.contains(id), "stored but never sent: {id}");
        }
        // Every phase, legacy and new alternately, had messages it must have routed.
        assert_eq!(
            certain_per_phase.keys().copied().collect::<Vec<_>>(),
            (0..=FLIPS).collect::<Vec<_>>(),
            "{certain_per_phase:?}"
        );
    });
}
