//! Guards of the proxy against its own clients and operators' mistakes: the admin API's token,
//! connection slots that slow clients cannot starve, and a `COMPRESS` that cannot break a kick.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::client::{http, tcp, Client};
use support::deadline::within;
use support::mailferry::{command, run_cli, Mailferry, Options};
use support::Backends;

fn start(opts: Options) -> (Backends, Mailferry) {
    let backends = Backends::start();
    let proxy = Mailferry::start(&backends, opts);
    (backends, proxy)
}

/// The user as the admin API shows it to an authorized caller.
fn shown(proxy: &Mailferry, user: &str) -> serde_json::Value {
    let path = format!("/api/users/{user}");
    let (status, resp) = http(proxy.admin, "GET", &path, Some(&proxy.token), "");
    assert_eq!(status, 200, "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Every state-changing route of `admin::router` (`{user}` stands for the user), with a body
/// that would change something. The first three are replayed with the token, in this order.
const STATE_CHANGES: [(&str, &str, &str); 8] = [
    ("POST", "/api/users/{user}/migrate", ""),
    ("PUT", "/api/users/{user}/route", r#"{"route":"new"}"#),
    ("PUT", "/api/users/{user}/state", r#"{"state":"cutover"}"#),
    ("POST", "/api/users/{user}/cutover", ""),
    ("POST", "/api/users/{user}/rollback", ""),
    ("POST", "/api/import", r#"{"users":[["{user}","w1"]]}"#),
    ("POST", "/api/waves/w1/migrate", ""),
    ("POST", "/api/waves/w1/cutover", r#"{"all":true}"#),
];

#[test]
fn admin_api_changes_nothing_without_the_right_token() {
    within(120, || {
        let (_b, proxy) = start(Options::default());
        let user = "alice@example.org";
        let mut live = Client::plain(proxy.imap);
        assert!(live.login(user, "alicepw").starts_with("OK"));
        let t = proxy.token.as_str();
        // Wrong tokens of other lengths, one byte off at the end, and none at all.
        let wrong = [
            Some("wrong-token-of-some-length".to_owned()),
            Some(t[..t.len() - 1].to_owned()),
            Some(format!("{t}x")),
            Some(format!("{}X", &t[..t.len() - 1])),
            Some(String::new()),
            None,
        ];
        for (method, path, body) in STATE_CHANGES {
            let (path, body) = (path.replace("{user}", user), body.replace("{user}", user));
            for token in &wrong {
                let (status, resp) = http(proxy.admin, method, &path, token.as_deref(), &body);
                assert_eq!(status, 401, "{method} {path} with {token:?}: {resp}");
            }
        }
        let view = shown(&proxy, user);
        assert_eq!(view["route"], "legacy", "{view}");
        assert_eq!(view["state"], "legacy", "{view}");
        let (status, waves) = http(proxy.admin, "GET", "/api/waves", Some(t), "");
        assert_eq!(status, 200, "{waves}");
        assert!(
            waves.ends_with("\r\n\r\n[]"),
            "no wave was imported: {waves}"
        );
        assert_eq!(view["sessions"], 1, "{view}");
        let (_, ok) = live.cmd("NOOP");
        assert!(
            ok.starts_with("OK"),
            "the live session was not kicked: {ok}"
        );

        // The same requests with the token do change things: the 401s above were the token's.
        let bob = "bob@example.org";
        for (method, path, body) in &STATE_CHANGES[..3] {
            let path = path.replace("{user}", bob);
            let (status, resp) = http(proxy.admin, method, &path, Some(t), body);
            assert_eq!(status, 200, "{method} {path}: {resp}");
        }
        let view = shown(&proxy, bob);
        assert_eq!(view["route"], "new", "{view}");
        assert_eq!(view["state"], "cutover", "{view}");
    })
}

#[test]
fn short_or_empty_admin_tokens_stop_serve_and_fail_check_config() {
    within(120, || {
        let (_b, proxy) = start(Options::default());
        let text = std::fs::read_to_string(&proxy.config).unwrap();
        let good = proxy.config.with_file_name("admin.token");
        for (name, content, why) in [
            ("short.token", "fifteen-bytes-x\n", "15 bytes"),
            ("empty.token", "\n", "empty"),
        ] {
            let file = proxy.config.with_file_name(name);
            std::fs::write(&file, content).unwrap();
            let config = proxy.config.with_file_name(format!("{name}.toml"));
            let replaced = text.replace(&*good.to_string_lossy(), &file.to_string_lossy());
            assert_ne!(replaced, text, "token_file rewritten");
            std::fs::write(&config, replaced).unwrap();

            let out = run_cli(&config, &["check-config"], 30);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(1), "{stdout}");
            assert!(stdout.contains(name) && stdout.contains(why), "{stdout}");

            // `serve` refuses before binding: the running server holds the same ports.
            let out = command(&config, &["serve"])
                .env("MAILFERRY_LOG", "warn")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains(name) && stderr.contains(why), "{stderr}");
        }
        assert!(proxy.cli(&["check-config"]).status.success());
    })
}

/// A TCP connection from `source` (any 127.0.0.0/8 address is local on Linux).
fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    // std cannot bind before connect; tokio's TcpSocket can.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let s = tokio::time::timeout(Duration::from_secs(5), sock.connect(to))
            .await
            .expect("connect in time")
            .expect("connect");
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    })
}

/// The first line the server sends, or `None` if the connection was reset or closed first.
fn first_line(s: &mut TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&line).into_owned())
}

const BYE_ADDRESS: &str = "* BYE [UNAVAILABLE] Too many connections from your address\r\n";
const BYE_FULL: &str = "* BYE [UNAVAILABLE] Too many connections, try again later.\r\n";

/// Opens `n` connections from `source`, each sent a partial command line once greeted;
/// returns them (held open) with how many were greeted and how many refused per address.
fn slow_connections(source: &str, to: SocketAddr, n: usize) -> (Vec<TcpStream>, usize, usize) {
    let (mut held, mut greeted, mut refused) = (Vec::with_capacity(n), 0, 0);
    for _ in 0..n {
        let mut s = connect_from(source, to);
        match first_line(&mut s).as_deref() {
            Some(l) if l.starts_with("* OK") => {
                greeted += 1;
                s.write_all(b"a1 LOGIN alice@example.org ").unwrap();
            }
            Some(BYE_ADDRESS) => refused += 1,
            other => panic!("connection {} from {source}: {other:?}", held.len()),
        }
        held.push(s);
    }
    (held, greeted, refused)
}

#[test]
fn slow_connections_from_one_address_starve_neither_logins_nor_lmtp() {
    within(300, || {
        // 3,000 client sockets here, plus the proxy's and Dovecot's own.
        let nofile = support::fds::raise_nofile(16_384);
        assert!(
            nofile >= 8_000,
            "open-files limit {nofile} too low for this test"
        );
        // IMAP holds at most 150 connections. Without the per-address cap the 3,000 slow
        // connections would take all 150 (and, were LMTP counted with IMAP, the MTA's too),
        // so the assertions below fail unless both guards work. The deadline and idle limit
        // are long so that nothing frees the slow connections' slots while the test runs.
        let (b, proxy) = start(Options {
            extra: "[limits]\nmax_connections = 150\nmax_preauth_per_ip = 50\n\
                    preauth_deadline_secs = 600\npreauth_idle_secs = 600\n"
                .into(),
            ..Options::default()
        });
        let (slow, greeted, refused) = slow_connections("127.0.0.1", proxy.imap, 3000);
        assert!(greeted <= 50, "{greeted} greeted from one address");
        assert_eq!(greeted + refused, 3000);

        // A client from another address still logs in.
        let mut legit = Client::over(Box::new(connect_from("127.0.0.2", proxy.imap)));
        let ok = legit.login("alice@example.org", "alicepw");
        assert!(ok.starts_with("OK"), "{ok}\n{}", proxy.log());
        assert_eq!(legit.inbox_subjects(), vec!["legacy marker"]);

        // Fill the rest of IMAP's slots from three more addresses, until one is refused.
        let mut more = Vec::new();
        let mut full = false;
        for source in ["127.0.0.3", "127.0.0.4", "127.0.0.5"] {
            for _ in 0..50 {
                let mut s = connect_from(source, proxy.imap);
                match first_line(&mut s).as_deref() {
                    Some(l) if l.starts_with("* OK") => more.push(s),
                    Some(BYE_FULL) => full = true,
                    other => panic!("from {source}: {other:?}"),
                }
            }
        }
        assert!(full, "IMAP's 150 slots were all taken");
        // LMTP has slots of its own: the MTA still delivers.
        let outcome = support::dovecot::lmtp_deliver(
            proxy.lmtp,
            "mta@example.net",
            &["bob@example.org"],
            b"Subject: through a full IMAP side\r\n\r\nhello\r\n",
        );
        assert!(outcome.all_delivered(), "{outcome:?}\n{}", proxy.log());
        assert_eq!(b.legacy.count("bob@example.org", "INBOX"), 2);
        // The logged-in client kept its session throughout.
        let (_, ok) = legit.cmd("NOOP");
        assert!(ok.starts_with("OK"), "{ok}");
        drop((slow, more));
    })
}

#[test]
fn trickling_clients_are_closed_at_the_preauth_deadline() {
    within(120, || {
        let (_b, proxy) = start(Options {
            extra: "[limits]\npreauth_deadline_secs = 2\npreauth_idle_secs = 60\n".into(),
            ..Options::default()
        });
        // IMAP: one byte every 500 ms keeps clear of the 60 s idle limit, not of the deadline.
        let mut imap = tcp(proxy.imap);
        assert!(first_line(&mut imap).is_some_and(|g| g.starts_with("* OK")));
        let got = trickle(&mut imap, b"a1 LOGIN alice@example.org alicepw\r\n");
        assert!(got.starts_with("* BYE"), "{got:?}");
        // LMTP: the same before MAIL FROM.
        let mut lmtp = tcp(proxy.lmtp);
        assert!(first_line(&mut lmtp).is_some_and(|g| g.starts_with("220")));
        let got = trickle(&mut lmtp, b"LHLO trickle.example.net\r\n");
        assert!(got.starts_with("421 4.4.2"), "{got:?}");
    })
}

/// Sends `line` one byte per 500 ms, reading between bytes, until the server closes;
/// returns what the server said. Fails if all of `line` went out without a close.
fn trickle(s: &mut TcpStream, line: &[u8]) -> String {
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut said = Vec::new();
    let mut buf = [0u8; 256];
    for byte in line {
        if s.write_all(std::slice::from_ref(byte)).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => return String::from_utf8_lossy(&said).into_owned(),
            Ok(n) => said.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    // The close comes at the deadline; whatever was said before it is in `said` or here.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut said);
    assert!(!said.is_empty(), "closed without a word");
    String::from_utf8_lossy(&said).into_owned()
}

/// Dovecot offers COMPRESS=DEFLATE with these plugins.
const ZLIB: &str = "mail_plugins = $mail_plugins zlib\n\
                    protocol imap {\n  mail_plugins = $mail_plugins zlib imap_zlib\n}\n";

#[test]
fn compress_never_reaches_the_backend_and_a_kick_stays_readable() {
    within(120, || {
        let b = Backends::start_with(ZLIB, ZLIB);
        // The backend itself offers COMPRESS: what follows is the proxy's doing.
        let mut direct = Client::plain(b.legacy.imap);
        let ok = direct.login("alice@example.org", "alicepw");
        assert!(ok.contains("COMPRESS=DEFLATE"), "backend offers it: {ok}");
        let proxy = Mailferry::start(&b, Options::default());

        let mut c = Client::plain(proxy.imap);
        let ok = c.login("alice@example.org", "alicepw");
        assert!(ok.starts_with("OK [CAPABILITY IMAP4rev1"), "{ok}");
        assert!(!ok.contains("COMPRESS="), "{ok}");
        let (untagged, ok) = c.cmd("CAPABILITY");
        assert!(ok.starts_with("OK"), "{ok}");
        assert!(
            untagged
                .iter()
                .any(|l| l.starts_with("* CAPABILITY IMAP4rev1")),
            "{untagged:?}"
        );
        assert!(
            !untagged.iter().any(|l| l.contains("COMPRESS=")),
            "{untagged:?}"
        );

        let (_, no) = c.cmd("COMPRESS DEFLATE");
        assert_eq!(
            no,
            "NO [CANNOT] COMPRESS is not supported through this proxy"
        );
        // Pipelined between other commands, answered in plain text too.
        c.send(b"p1 NOOP\r\np2 compress deflate\r\np3 NOOP\r\n");
        let mut replies: Vec<String> = (0..3).map(|_| c.line()).collect();
        replies.sort();
        assert!(replies[0].starts_with("p1 OK"), "{replies:?}");
        assert_eq!(
            replies[1],
            "p2 NO [CANNOT] COMPRESS is not supported through this proxy"
        );
        assert!(replies[2].starts_with("p3 OK"), "{replies:?}");

        // A synchronizing literal holding the same line is message data, stored untouched.
        let msg = b"Subject: carried\r\n\r\nz COMPRESS DEFLATE\r\n";
        c.send(format!("a1 APPEND INBOX {{{}}}\r\n", msg.len()).as_bytes());
        assert!(c.line().starts_with("+ "), "go-ahead for the literal");
        c.send(msg);
        c.send(b"\r\n");
        let ok = c.line();
        assert!(ok.starts_with("a1 OK"), "{ok}");
        assert!(b
            .legacy
            .messages("alice@example.org", "INBOX")
            .iter()
            .any(|m| m == msg));

        // IDLE and DONE pass; the kick's BYE arrives as a plain line.
        let (_, ok) = c.cmd("SELECT INBOX");
        assert!(ok.starts_with("OK"), "{ok}");
        c.send(b"i1 IDLE\r\n");
        assert!(c.line().starts_with("+ "), "IDLE continuation");
        proxy.route("alice@example.org", "new");
        let bye = c.line();
        assert!(bye.starts_with("* BYE [UNAVAILABLE] "), "{bye:?}");
        assert!(c.try_line().is_none(), "closed after BYE");
    })
}
