//! The IMAP front door against two real Dovecot backends: routing, TLS, master mode, kicks,
//! and hostile input.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::client::{literal, tcp, tls_wrap, Client};
use support::mailferry::{Mailferry, Options};
use support::{Backends, MASTER_PASSWORD, MASTER_USER};

fn start(opts: Options) -> (Backends, Mailferry) {
    let backends = Backends::start();
    let proxy = Mailferry::start(&backends, opts);
    (backends, proxy)
}

fn assert_ok(reply: &str, what: &str, proxy: &Mailferry) {
    assert!(
        reply.starts_with("OK"),
        "{what}: {reply}\nproxy log:\n{}",
        proxy.log()
    );
}

#[test]
fn each_user_lands_on_their_route_over_starttls_and_implicit_tls() {
    let (_b, proxy) = start(Options {
        allow_plaintext: false,
        backend_tls: "starttls",
        ..Options::default()
    });
    proxy.route("bob@example.org", "new");

    let mut alice = Client::starttls(proxy.imap, &proxy.cert.cert_pem);
    let ok = alice.login("alice@example.org", "alicepw");
    assert_ok(&ok, "alice login", &proxy);
    assert!(
        ok.contains("[CAPABILITY IMAP4rev1"),
        "backend capabilities relayed: {ok}"
    );
    assert!(!ok.contains("COMPRESS"), "COMPRESS stripped: {ok}");
    assert_eq!(alice.inbox_subjects(), vec!["legacy marker"]);

    let mut bob = Client::tls(proxy.imaps, &proxy.cert.cert_pem);
    assert_ok(&bob.login("bob@example.org", "bobpw"), "bob login", &proxy);
    assert_eq!(bob.inbox_subjects(), vec!["new marker"]);

    let out = proxy.cli(&["user", "show", "bob@example.org", "--json"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("\"route\":\"new\""), "{shown}");
    assert!(shown.contains("\"sessions\":1"), "{shown}");
}

#[test]
fn master_mode_routes_by_the_user_acted_for() {
    let (_b, proxy) = start(Options {
        legacy_auth: "passthrough",
        new_auth: "master",
        backend_tls: "implicit",
        ..Options::default()
    });
    proxy.route("bob@example.org", "new");
    proxy.route("carol@example.org", "new");

    // The user's own password, checked on legacy, then a master login on new.
    let mut bob = Client::tls(proxy.imaps, &proxy.cert.cert_pem);
    assert_ok(&bob.login("bob@example.org", "bobpw"), "bob login", &proxy);
    assert_eq!(bob.inbox_subjects(), vec!["new marker"]);
    let mut wrong = Client::tls(proxy.imaps, &proxy.cert.cert_pem);
    let no = wrong.login("bob@example.org", "not-bobs");
    assert!(no.starts_with("NO [AUTHENTICATIONFAILED]"), "{no}");

    // An operator logging in as master for carol is routed by carol, not by "admin".
    let mut op = Client::tls(proxy.imaps, &proxy.cert.cert_pem);
    let ok = op.login(&format!("carol@example.org*{MASTER_USER}"), MASTER_PASSWORD);
    assert_ok(&ok, "user*master login", &proxy);
    assert_eq!(op.inbox_subjects(), vec!["new marker"]);

    // Same through SASL PLAIN with an authorization identity, with continuation.
    let mut op = Client::tls(proxy.imaps, &proxy.cert.cert_pem);
    op.send(b"p1 AUTHENTICATE PLAIN\r\n");
    assert_eq!(op.line(), "+ ");
    let ir = base64_plain("carol@example.org", MASTER_USER, MASTER_PASSWORD);
    op.send(format!("{ir}\r\n").as_bytes());
    let ok = op.line();
    assert!(ok.starts_with("p1 OK [CAPABILITY"), "{ok}\n{}", proxy.log());
    assert_eq!(op.inbox_subjects(), vec!["new marker"]);
}

fn base64_plain(authz: &str, authc: &str, pass: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{authz}\0{authc}\0{pass}"))
}

#[test]
fn passthrough_with_sasl_ir_over_plain_when_allowed() {
    let (_b, proxy) = start(Options::default());
    let mut c = Client::plain(proxy.imap);
    assert!(c.greeting.contains("AUTH=PLAIN"), "{}", c.greeting);
    let ir = base64_plain("", "dave@example.org", "davepw");
    let (_, ok) = c.cmd(&format!("AUTHENTICATE PLAIN {ir}"));
    assert_ok(&ok, "AUTHENTICATE", &proxy);
    assert_eq!(c.inbox_subjects(), vec!["legacy marker"]);
    let (_, ok) = c.cmd("LOGOUT");
    assert!(ok.starts_with("OK"), "{ok}");
}

#[test]
fn plaintext_login_is_refused_before_tls() {
    let (_b, proxy) = start(Options {
        allow_plaintext: false,
        ..Options::default()
    });
    let mut c = Client::plain(proxy.imap);
    assert!(c.greeting.contains("LOGINDISABLED"), "{}", c.greeting);
    assert!(c.greeting.contains("STARTTLS"), "{}", c.greeting);
    let no = c.login("alice@example.org", "alicepw");
    assert!(no.starts_with("NO [PRIVACYREQUIRED]"), "{no}");
    let (_, bad) = c.cmd("SELECT INBOX");
    assert!(bad.starts_with("BAD"), "{bad}");
}

#[test]
fn wrong_password_is_authenticationfailed_and_repeated_failures_close() {
    let (_b, proxy) = start(Options {
        extra: "[limits]\nauth_failure_delay_ms = 10\n".into(),
        ..Options::default()
    });
    let mut c = Client::plain(proxy.imap);
    for _ in 0..2 {
        let no = c.login("alice@example.org", "wrong");
        assert!(no.starts_with("NO [AUTHENTICATIONFAILED]"), "{no}");
    }
    let no = c.login("alice@example.org", "wrong");
    assert!(no.starts_with("NO [AUTHENTICATIONFAILED]"), "{no}");
    assert!(c.line().starts_with("* BYE"));
    assert!(c.try_line().is_none(), "closed after too many failures");
    assert!(
        !proxy.log().contains("wrong"),
        "passwords never reach the log"
    );
}

#[test]
fn starttls_pipelining_is_not_executed() {
    let (_b, proxy) = start(Options::default());
    let mut s = tcp(proxy.imap);
    let mut greeting = [0u8; 512];
    let _ = s.read(&mut greeting).unwrap();
    s.write_all(b"a STARTTLS\r\nb NOOP\r\n").unwrap();
    let mut ok = Vec::new();
    let mut byte = [0u8; 1];
    while !ok.ends_with(b"\n") {
        s.read_exact(&mut byte).unwrap();
        ok.push(byte[0]);
    }
    assert_eq!(ok, b"a OK Begin TLS negotiation now.\r\n");
    let mut c = Client::over(Box::new(NoGreeting::wrap(
        tls_wrap(s, &proxy.cert.cert_pem, &[]).expect("handshake"),
    )));
    c.send(b"c NOOP\r\n");
    assert_eq!(
        c.line(),
        "c OK NOOP completed.",
        "the injected b NOOP got no reply"
    );
}

/// Feeds a fake greeting first so `Client::over` can be used after STARTTLS.
struct NoGreeting<T> {
    fake: std::io::Cursor<Vec<u8>>,
    inner: T,
}

impl<T> NoGreeting<T> {
    fn wrap(inner: T) -> Self {
        NoGreeting {
            fake: std::io::Cursor::new(b"* OK (after STARTTLS)\r\n".to_vec()),
            inner,
        }
    }
}

impl<T: Read> Read for NoGreeting<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.fake.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

impl<T: Write> Write for NoGreeting<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn oversized_lines_and_literals_get_bad_and_bounded_memory() {
    // Room for the 50 floods below and the clients after them, all from 127.0.0.1: this test
    // is about memory, not about the per-address cap.
    let (_b, proxy) = start(Options {
        extra: "[limits]\nmax_preauth_per_ip = 100\n".into(),
        ..Options::default()
    });
    let before = rss_kib(proxy.pid());

    let mut c = Client::plain(proxy.imap);
    c.send(&vec![b'x'; 100 * 1024]);
    let bad = c.line();
    assert!(bad.starts_with("* BAD [TOOBIG]"), "{bad}");
    assert!(c.try_line().is_none(), "closed after an overlong line");

    let mut c = Client::plain(proxy.imap);
    c.send(b"a LOGIN {4294967295}\r\n");
    assert_eq!(c.line(), "a BAD [TOOBIG] Literal too large");
    assert!(c.try_line().is_none(), "closed after a huge literal");

    // Many clients streaming garbage without a line end at once.
    let mut floods: Vec<TcpStream> = (0..50).map(|_| tcp(proxy.imap)).collect();
    for s in &mut floods {
        let _ = s.write_all(&vec![b'A'; 64 * 1024]);
    }
    drop(floods);
    let mut c = Client::plain(proxy.imap);
    c.send(b"\x00\xff\xfe garbage\r\nz NOOP\r\n");
    assert!(c.line().contains("BAD"));
    assert_eq!(c.line(), "z OK NOOP completed.");
    let after = rss_kib(proxy.pid());
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

#[test]
fn backend_down_is_unavailable_and_logged() {
    let (mut b, proxy) = start(Options::default());
    b.legacy.stop();
    let mut c = Client::plain(proxy.imap);
    let no = c.login("alice@example.org", "alicepw");
    assert!(no.starts_with("NO [UNAVAILABLE]"), "{no}");
    let log = proxy.log();
    assert!(
        log.contains("backend legacy") && log.contains("backend unavailable"),
        "log names the backend:\n{log}"
    );
    // The new backend still serves its users.
    proxy.route("bob@example.org", "new");
    let mut bob = Client::plain(proxy.imap);
    assert_ok(&bob.login("bob@example.org", "bobpw"), "bob", &proxy);
}

#[test]
fn route_change_kicks_an_idling_client_which_reconnects_to_new() {
    let (_b, proxy) = start(Options::default());
    let mut c = Client::plain(proxy.imap);
    assert_ok(&c.login("alice@example.org", "alicepw"), "login", &proxy);
    assert_eq!(c.inbox_subjects(), vec!["legacy marker"]);
    c.send(b"i1 IDLE\r\n");
    assert!(c.line().starts_with("+ "), "IDLE continuation");
    proxy.route("alice@example.org", "new");
    let bye = c.line();
    assert!(bye.starts_with("* BYE [UNAVAILABLE]"), "{bye}");
    assert!(c.try_line().is_none(), "closed after BYE");

    let mut again = Client::plain(proxy.imap);
    assert_ok(
        &again.login("alice@example.org", "alicepw"),
        "relogin",
        &proxy,
    );
    assert_eq!(again.inbox_subjects(), vec!["new marker"]);
    let metrics = http_get(proxy.admin, "/metrics");
    assert!(metrics.contains("mailferry_kicks_total 1"), "{metrics}");
    assert!(metrics.contains("mailferry_logins_total{"), "{metrics}");
}

#[test]
fn kick_during_a_large_fetch_waits_for_the_end_of_the_literal() {
    let (b, proxy) = start(Options::default());
    let size = 16 * 1024 * 1024;
    let mut msg = b"Subject: big\r\nFrom: a@example.net\r\n\r\n".to_vec();
    while msg.len() < size {
        msg.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ{123}\r\n",
        );
    }
    b.legacy.save("alice@example.org", "INBOX", &msg);

    let mut c = Client::plain(proxy.imap);
    assert_ok(&c.login("alice@example.org", "alicepw"), "login", &proxy);
    let (_, ok) = c.cmd("SELECT INBOX");
    assert_ok(&ok, "select", &proxy);
    c.send(b"f1 UID FETCH 1:* (BODY.PEEK[])\r\nf2 NOOP\r\n");
    // The marker message first, then the big one; stop reading inside the big literal.
    let mut seen = Vec::new();
    let big_len = loop {
        let line = c.line();
        let n = literal(&line).expect("FETCH literal");
        if n < 4096 {
            seen.push(c.bytes(n));
            assert_eq!(c.line(), ")");
            continue;
        }
        break n;
    };
    let head = c.bytes(64 * 1024);
    proxy.route("alice@example.org", "new");
    let rest = c.bytes(big_len - head.len());
    let mut body = head;
    body.extend_from_slice(&rest);
    assert_eq!(body.len(), msg.len());
    assert!(body == msg, "literal delivered whole and unchanged");
    assert_eq!(c.line(), ")", "the FETCH response completes before the BYE");
    let mut next = c.line();
    if next.starts_with("f1 OK")
        || next.starts_with("f2 OK")
        || next.starts_with("* ") && !next.starts_with("* BYE")
    {
        next = c.line();
    }
    assert!(
        next.starts_with("* BYE [UNAVAILABLE]") || next.starts_with("f"),
        "{next}"
    );
    while !next.starts_with("* BYE") {
        next = c.try_line().expect("BYE before close");
    }
    assert!(
        proxy.log().contains("kick deferred"),
        "the kick waited for a response boundary"
    );
}

#[test]
fn backend_sees_the_real_client_address() {
    let (b, proxy) = start(Options::default());
    // Connect from 127.0.0.2 so the proxy's own address (127.0.0.1) is distinguishable.
    let s = bind_connect("127.0.0.2", proxy.imap);
    let mut c = Client::over(Box::new(s));
    assert_ok(&c.login("alice@example.org", "alicepw"), "login", &proxy);
    let _ = c.cmd("LOGOUT");
    assert!(
        b.legacy
            .wait_for_log("rip=127.0.0.2", Duration::from_secs(5)),
        "Dovecot logs the client's address from ID:\n{}",
        b.legacy.log_tail(20)
    );
}

fn bind_connect(source: &str, to: SocketAddr) -> TcpStream {
    // std cannot bind before connect; tokio's TcpSocket can.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let s = sock.connect(to).await.unwrap();
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    })
}

#[test]
fn strict_alpn_refuses_other_protocols() {
    let (_b, proxy) = start(Options::default());
    assert!(tls_wrap(tcp(proxy.imaps), &proxy.cert.cert_pem, &[b"h2"]).is_err());
    let ok = tls_wrap(tcp(proxy.imaps), &proxy.cert.cert_pem, &[b"h2", b"imap"]);
    assert!(ok.is_ok());
}

#[test]
fn sigterm_says_bye_to_live_sessions_and_exits() {
    let (_b, mut proxy) = start(Options {
        extra: "[limits]\nshutdown_grace_secs = 1\n".into(),
        ..Options::default()
    });
    let mut c = Client::plain(proxy.imap);
    assert_ok(&c.login("alice@example.org", "alicepw"), "login", &proxy);
    let (_, ok) = c.cmd("SELECT INBOX");
    assert_ok(&ok, "select", &proxy);
    c.send(b"i IDLE\r\n");
    assert!(c.line().starts_with("+ "));
    assert!(
        proxy.terminate(Duration::from_secs(20)),
        "exited after draining"
    );
    let bye = c.try_line().unwrap_or_default();
    assert!(
        bye.starts_with("* BYE [UNAVAILABLE]"),
        "{bye:?}\n{}",
        proxy.log()
    );
    assert!(proxy.log().contains("session end"), "session end logged");
}

#[test]
fn admin_api_requires_the_token() {
    let (_b, proxy) = start(Options::default());
    let resp = http_get(proxy.admin, "/api/users/alice@example.org");
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    assert!(http_get(proxy.admin, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(proxy.admin, "/readyz").starts_with("HTTP/1.1 200"));
    let out = proxy.cli(&["user", "show", "nobody@example.org"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("legacy (default: not in directory)"),
        "{text}"
    );
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    support::client::http(addr, "GET", path, None, "").1
}

/// Connects until the greeting is no longer the over-the-limit refusal (peeking at each new
/// connection's first bytes), within 10 s.
fn greeted_when_a_slot_is_free(addr: std::net::SocketAddr) -> Client {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = tcp(addr);
        let mut first = [0u8; 4];
        let n = s.peek(&mut first).unwrap_or(0);
        if &first[..n] == b"* OK" {
            return Client::over(Box::new(s));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no free slot: {:?}",
            String::from_utf8_lossy(&first[..n])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn connections_over_the_limit_are_told_to_come_back() {
    let (_b, proxy) = start(Options {
        extra: "[limits]\nmax_connections = 2\n".into(),
        ..Options::default()
    });
    // Slots free once the proxy has seen a connection end (its own readiness probe, the
    // sessions dropped below), which under load takes a moment.
    let a = greeted_when_a_slot_is_free(proxy.imap);
    let b = greeted_when_a_slot_is_free(proxy.imap);
    let mut third = tcp(proxy.imap);
    let mut reply = String::new();
    let _ = third.read_to_string(&mut reply);
    assert_eq!(
        reply,
        "* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
    );
    drop((a, b));
    let mut c = greeted_when_a_slot_is_free(proxy.imap);
    assert_ok(
        &c.login("alice@example.org", "alicepw"),
        "login after others left",
        &proxy,
    );
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_sessions() {
    let (_b, proxy) = start(Options::default());
    let mut live = Client::tls(proxy.imaps, &proxy.cert.cert_pem);
    assert_ok(&live.login("alice@example.org", "alicepw"), "login", &proxy);

    let dir = tempfile::tempdir().unwrap();
    let renewed = support::self_signed(dir.path(), "renewed");
    std::fs::copy(&renewed.cert_pem, &proxy.cert.cert_pem).unwrap();
    std::fs::copy(&renewed.key_pem, &proxy.cert.key_pem).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !proxy.log().contains("reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload:\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // New handshakes present the renewed certificate (verified against it as the only CA).
    let mut fresh = Client::tls(proxy.imaps, &renewed.cert_pem);
    assert_ok(
        &fresh.login("bob@example.org", "bobpw"),
        "login on renewed cert",
        &proxy,
    );
    // The session established before the reload is still alive.
    let (_, ok) = live.cmd("NOOP");
    assert_ok(&ok, "old session after reload", &proxy);
}

#[test]
fn check_config_reports_unreachable_backends() {
    let (mut b, proxy) = start(Options::default());
    let out = proxy.cli(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    b.new.stop();
    let out = proxy.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("backends.new.imap") && text.contains("unreachable"),
        "{text}"
    );
}
