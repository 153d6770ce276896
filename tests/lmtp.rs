//! The LMTP front door against the real Dovecot LMTP of both backends: per-recipient routing
//! with one reply per RCPT in order, cutover deferral, backend failures, message smuggling,
//! limits, and MTAs the project did not write (swaks, Postfix).
//!
//! "Byte-identical" below means: the message as fetched back over IMAP, with the delivery
//! trace headers Dovecot's LMTP prepends (Return-Path, Received, Delivered-To) removed from
//! its top, equals the bytes the test sent.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mailferry::control::inflight::Deliveries;
use mailferry::lmtp::client::{BackendPool, ClientTimeouts};
use mailferry::lmtp::server::ServerLimits;
use mailferry::lmtp::{session, LmtpContext, LmtpTimeouts, StateCache};
use mailferry::route::embedded::EmbeddedDirectory;
use mailferry::route::{DirFuture, Directory, DirectoryError, Route, RouteCache};
use mailferry::shutdown::Shutdown;
use mailferry::store::SqlStore;
use support::dovecot::dot_stuff;
use support::mailferry::{Mailferry, Options};
use support::postfix::Postfix;
use support::{Backends, Dovecot};

// ---------------------------------------------------------------------------------------
// helpers

/// Runs `f` on its own thread and fails the test if it has not finished after `secs`.
fn within<F: FnOnce() + Send + 'static>(secs: u64, f: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => h.join().expect("test thread"),
        Err(RecvTimeoutError::Disconnected) => {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(RecvTimeoutError::Timeout) => panic!("test did not finish within {secs} s"),
    }
}

/// A blocking LMTP client with byte-level access.
struct Lmtp {
    r: BufReader<TcpStream>,
}

impl Lmtp {
    fn connect(addr: SocketAddr) -> Lmtp {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Lmtp {
            r: BufReader::new(s),
        };
        let greeting = c.reply();
        assert!(greeting.starts_with("220 "), "greeting: {greeting}");
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
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            all.push_str(line.trim_end());
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
            all.push('\n');
        }
    }

    /// Everything until the server closes.
    fn rest(&mut self) -> String {
        let mut s = String::new();
        let _ = self.r.read_to_string(&mut s);
        s
    }
}

/// What one pipelined transaction got.
#[derive(Debug)]
struct Outcome {
    rcpt: Vec<String>,
    data: Vec<String>,
}

/// LHLO, then MAIL + RCPTs + DATA in one write (PIPELINING), the message, and QUIT.
fn deliver(addr: SocketAddr, from: &str, rcpts: &[&str], message: &[u8]) -> Outcome {
    let mut c = Lmtp::connect(addr);
    c.send(b"LHLO mta.mailferry.test\r\n");
    let lhlo = c.reply();
    assert!(lhlo.contains("250-PIPELINING"), "{lhlo}");
    let mut batch = format!("MAIL FROM:<{from}> BODY=8BITMIME\r\n");
    for r in rcpts {
        batch.push_str(&format!("RCPT TO:<{r}>\r\n"));
    }
    batch.push_str("DATA\r\n");
    c.send(batch.as_bytes());
    let mail = c.reply();
    assert!(mail.starts_with("250 "), "MAIL: {mail}");
    let rcpt: Vec<String> = rcpts.iter().map(|_| c.reply()).collect();
    let data_go = c.reply();
    let accepted = rcpt.iter().filter(|r| r.starts_with('2')).count();
    let mut data = Vec::new();
    if accepted > 0 {
        assert!(data_go.starts_with("354 "), "DATA: {data_go}");
        c.send(&dot_stuff(message));
        c.send(b".\r\n");
        data = (0..accepted).map(|_| c.reply()).collect();
    } else {
        assert!(
            data_go.starts_with("503 5.5.1"),
            "DATA without recipients: {data_go}"
        );
    }
    c.send(b"QUIT\r\n");
    assert!(c.reply().starts_with("221 "));
    Outcome { rcpt, data }
}

/// A message with 8-bit text, lines that need dot-stuffing, and some bulk.
fn message(subject: &str) -> Vec<u8> {
    let mut m = format!(
        "From: Sender <sender@mailferry.test>\r\n\
         To: Test <test@example.org>\r\n\
         Subject: {subject}\r\n\
         Date: Sun, 22 Nov 2026 06:00:00 +0000\r\n\
         Message-ID: <{id}@mailferry.test>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\n\
         Grüße: 8-bit text passes through.\r\n\
         .\r\n\
         ..\r\n\
         .a line starting with a dot\r\n\
         trailing space \r\n\
         \ttab\r\n\
         \r\n",
        id = subject.replace(' ', "-"),
    );
    for i in 0..100 {
        m.push_str(&format!(
            "line {i:04} of the body, long enough to make this a few kilobytes\r\n"
        ));
    }
    m.into_bytes()
}

/// The message without the delivery trace header fields at its top.
fn strip_trace(m: &[u8]) -> Vec<u8> {
    let mut rest = m;
    loop {
        let lower = rest[..rest.len().min(20)].to_ascii_lowercase();
        let trace = [
            "return-path:",
            "received:",
            "delivered-to:",
            "x-original-to:",
        ]
        .iter()
        .any(|h| lower.starts_with(h.as_bytes()));
        if !trace {
            return rest.to_vec();
        }
        loop {
            let nl = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            rest = &rest[nl..];
            if !(rest.starts_with(b" ") || rest.starts_with(b"\t")) {
                break;
            }
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Messages in `user`'s INBOX on `d` whose text contains `needle`.
fn find(d: &Dovecot, user: &str, needle: &str) -> Vec<Vec<u8>> {
    d.messages(user, "INBOX")
        .into_iter()
        .filter(|m| contains(m, needle))
        .collect()
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
        thread::sleep(Duration::from_millis(50));
    }
}

fn http(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("admin connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp
}

/// `PUT /api/users/USER/state` on the admin API.
fn set_state(proxy: &Mailferry, user: &str, state: &str) {
    let body = format!("{{\"state\":\"{state}\"}}");
    let resp = http(
        proxy.admin,
        &format!(
            "PUT /api/users/{user}/state HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            proxy.token,
            body.len()
        ),
    );
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "set state {user} {state}: {resp}"
    );
}

fn metrics(proxy: &Mailferry) -> String {
    http(
        proxy.admin,
        "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
}

fn start(opts: Options) -> (Backends, Mailferry) {
    let b = Backends::start();
    let proxy = Mailferry::start(&b, opts);
    (b, proxy)
}

// ---------------------------------------------------------------------------------------
// the LMTP proxy built in-process from the library, for backends behind a fault relay and
// for a directory that is down

struct InProcess {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    routes: Arc<RouteCache>,
    deliveries: Arc<Deliveries>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    fn start(
        legacy: Option<SocketAddr>,
        new: Option<SocketAddr>,
        directory: Option<Arc<dyn Directory>>,
    ) -> InProcess {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let (store, routes, listener) = rt.block_on(async {
            let store = SqlStore::open(&url, mailferry::store::Open::CreateIfMissing)
                .await
                .expect("state store");
            let directory =
                directory.unwrap_or_else(|| Arc::new(EmbeddedDirectory::new(store.pool().clone())));
            let routes = Arc::new(RouteCache::new(
                directory,
                Route::Legacy,
                Duration::from_secs(30),
            ));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            (Arc::new(store), routes, listener)
        });
        let addr = listener.local_addr().unwrap();
        let deliveries = Arc::new(Deliveries::default());
        let shutdown = Shutdown::new();
        let pool = |route, a: Option<SocketAddr>| {
            a.map(|a| {
                Arc::new(BackendPool::new(
                    route,
                    a.to_string(),
                    "mailferry-test".into(),
                    4,
                    Duration::from_secs(30),
                ))
            })
        };
        let ctx = Arc::new(LmtpContext {
            server: ServerLimits {
                hostname: "mailferry-test".into(),
                ..ServerLimits::default()
            },
            timeouts: LmtpTimeouts {
                command_idle: Duration::from_secs(30),
                data_idle: Duration::from_secs(30),
                first_mail: Duration::from_secs(30),
                client: ClientTimeouts {
                    connect: Duration::from_secs(5),
                    reply: Duration::from_secs(10),
                    data: Duration::from_secs(20),
                },
            },
            routes: routes.clone(),
            store,
            states: StateCache::new(Duration::from_secs(1)),
            deliveries: deliveries.clone(),
            reject_unknown: false,
            legacy: pool(Route::Legacy, legacy),
            new: pool(Route::New, new),
            shutdown: shutdown.clone(),
        });
        rt.spawn(mailferry::net::listener::accept_loop(
            listener,
            shutdown,
            mailferry::net::listener::Admission::new(100, b"421 4.3.2 Too many connections\r\n"),
            move |tcp, _| session::handle(ctx.clone(), tcp),
        ));
        InProcess {
            rt,
            addr,
            routes,
            deliveries,
            _dir: dir,
        }
    }

    fn route(&self, user: &str, route: Route) {
        self.rt
            .block_on(self.routes.set_route(user, route))
            .expect("set route");
    }
}

/// A directory that cannot be reached.
struct DownDirectory;

impl Directory for DownDirectory {
    fn route<'a>(&'a self, _user: &'a str) -> DirFuture<'a, Option<Route>> {
        Box::pin(async { Err(DirectoryError::Unavailable("connection refused".into())) })
    }
    fn set_route<'a>(&'a self, _user: &'a str, _route: Route) -> DirFuture<'a, ()> {
        Box::pin(async { Err(DirectoryError::Unavailable("connection refused".into())) })
    }
    fn ping(&self) -> DirFuture<'_, ()> {
        Box::pin(async { Err(DirectoryError::Unavailable("connection refused".into())) })
    }
}

/// What a relay in front of a backend's LMTP does wrong.
#[derive(Clone)]
enum Fault {
    /// After the backend's 354, passes 1000 bytes of the message, then cuts both sides.
    CutMidData,
    /// After the backend's 354, passes its first per-recipient reply, then cuts both sides.
    CutAfterFirstReply,
    /// Holds the backend's per-recipient replies until the flag is set.
    HoldRepliesUntil(Arc<AtomicBool>),
}

/// A TCP relay to `target` that injects `fault` into every connection.
fn relay(target: SocketAddr, fault: Fault) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { break };
            let fault = fault.clone();
            thread::spawn(move || relay_one(client, target, fault));
        }
    });
    addr
}

fn relay_one(client: TcpStream, target: SocketAddr, fault: Fault) {
    let Ok(server) = TcpStream::connect(target) else {
        return;
    };
    let in_data = Arc::new(AtomicBool::new(false));
    let cut: Arc<dyn Fn() + Send + Sync> = {
        let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        Arc::new(move || {
            let _ = c.shutdown(NetShutdown::Both);
            let _ = s.shutdown(NetShutdown::Both);
        })
    };
    let down = {
        let (mut client, server) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let (in_data, fault, cut) = (in_data.clone(), fault.clone(), cut.clone());
        thread::spawn(move || {
            let mut r = BufReader::new(server);
            let mut after = 0;
            let mut line = Vec::new();
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                    break;
                }
                if in_data.load(Ordering::SeqCst) {
                    after += 1;
                    match &fault {
                        Fault::CutAfterFirstReply if after > 1 => {
                            cut();
                            break;
                        }
                        Fault::HoldRepliesUntil(flag) => {
                            while !flag.load(Ordering::SeqCst) {
                                thread::sleep(Duration::from_millis(10));
                            }
                        }
                        _ => {}
                    }
                }
                if line.starts_with(b"354") {
                    in_data.store(true, Ordering::SeqCst);
                }
                if client.write_all(&line).is_err() {
                    break;
                }
            }
            let _ = client.shutdown(NetShutdown::Write);
        })
    };
    let (mut client, mut server) = (client, server);
    let mut buf = [0u8; 8192];
    let mut passed = 0;
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if matches!(fault, Fault::CutMidData) && in_data.load(Ordering::SeqCst) {
            if passed + n > 1000 {
                let _ = server.write_all(&buf[..1000 - passed]);
                cut();
                break;
            }
            passed += n;
        }
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(NetShutdown::Write);
    let _ = down.join();
}

// ---------------------------------------------------------------------------------------
// tests

#[test]
fn mixed_routing_replies_in_rcpt_order_and_stores_each_copy_once_byte_identical() {
    within(90, || {
        let (b, proxy) = start(Options::default());
        // erin exists on legacy only and is unknown to the directory: the default route.
        b.legacy.add_user("erin@example.org", "erinpw");
        proxy.route("bob@example.org", "new");
        proxy.route("dave@example.org", "new");
        proxy.route("carol@example.org", "legacy");

        let rcpts = [
            "alice@example.org",
            "bob@example.org",
            "carol@example.org",
            "dave@example.org",
            "erin@example.org",
            "Alice@Example.org",
        ];
        let msg = message("mixed routing");
        let out = deliver(proxy.lmtp, "sender@mailferry.test", &rcpts, &msg);
        assert_eq!(out.rcpt.len(), 6);
        for (r, to) in out.rcpt.iter().zip(rcpts) {
            assert_eq!(r, &format!("250 2.1.5 <{to}> Recipient OK"));
        }
        assert_eq!(
            out.data.len(),
            6,
            "one reply per RCPT, duplicates included: {out:?}"
        );
        for (r, to) in out.data.iter().zip(rcpts) {
            assert!(r.starts_with("250 2.0.0"), "{to}: {r}\n{}", proxy.log());
            // Dovecot's own per-recipient reply, relayed; the repeat gets the first's.
            assert!(
                r.to_lowercase()
                    .contains(&format!("<{}>", to.to_lowercase())),
                "reply for {to} names it: {r}"
            );
        }

        for (user, home, other) in [
            ("alice@example.org", &b.legacy, Some(&b.new)),
            ("carol@example.org", &b.legacy, Some(&b.new)),
            ("erin@example.org", &b.legacy, None),
            ("bob@example.org", &b.new, Some(&b.legacy)),
            ("dave@example.org", &b.new, Some(&b.legacy)),
        ] {
            let got = find(home, user, "Subject: mixed routing");
            assert_eq!(got.len(), 1, "{user} on {}: exactly once", home.name);
            assert_eq!(
                String::from_utf8_lossy(&strip_trace(&got[0])),
                String::from_utf8_lossy(&msg),
                "{user}: the stored message is the one sent"
            );
            if let Some(other) = other {
                assert!(
                    find(other, user, "Subject: mixed routing").is_empty(),
                    "{user} not on {}",
                    other.name
                );
            }
        }
        let m = metrics(&proxy);
        assert!(
            m.contains(
                "mailferry_lmtp_deliveries_total{backend=\"legacy\",outcome=\"delivered\"} 3"
            ),
            "{m}"
        );
        assert!(
            m.contains("mailferry_lmtp_deliveries_total{backend=\"new\",outcome=\"delivered\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("mailferry_lmtp_bytes_total{backend=\"legacy\"}"),
            "{m}"
        );
    });
}

#[test]
fn cutover_defers_that_recipient_only_until_cleared() {
    within(90, || {
        let (b, proxy) = start(Options::default());
        set_state(&proxy, "bob@example.org", "cutover");
        let msg = message("during cutover");
        let out = deliver(
            proxy.lmtp,
            "sender@mailferry.test",
            &["alice@example.org", "bob@example.org", "carol@example.org"],
            &msg,
        );
        assert!(out.rcpt[0].starts_with("250 "), "{out:?}");
        assert_eq!(
            out.rcpt[1],
            "451 4.2.0 <bob@example.org> Mailbox is being migrated, try again later"
        );
        assert!(out.rcpt[2].starts_with("250 "), "{out:?}");
        assert_eq!(out.data.len(), 2);
        assert!(
            out.data.iter().all(|r| r.starts_with("250 2.0.0")),
            "{out:?}"
        );
        assert_eq!(
            find(&b.legacy, "alice@example.org", "Subject: during cutover").len(),
            1
        );
        assert_eq!(
            find(&b.legacy, "carol@example.org", "Subject: during cutover").len(),
            1
        );
        assert!(find(&b.legacy, "bob@example.org", "Subject: during cutover").is_empty());

        // A RCPT accepted before the cutover started is deferred when its DATA ends after it.
        let mut c = Lmtp::connect(proxy.lmtp);
        c.send(b"LHLO mta\r\nMAIL FROM:<sender@mailferry.test>\r\nRCPT TO:<dave@example.org>\r\n");
        assert!(c.reply().starts_with("250-"));
        assert!(c.reply().starts_with("250 "));
        assert!(c.reply().starts_with("250 2.1.5"));
        set_state(&proxy, "dave@example.org", "cutover");
        c.send(b"DATA\r\n");
        assert!(c.reply().starts_with("354 "));
        c.send(&dot_stuff(&message("raced cutover")));
        c.send(b".\r\n");
        assert_eq!(
            c.reply(),
            "451 4.2.0 <dave@example.org> Mailbox is being migrated, try again later"
        );
        assert!(find(&b.legacy, "dave@example.org", "Subject: raced cutover").is_empty());

        // Same when the cutover starts while the message is being uploaded (the backend
        // transaction was already opened at DATA): the backend gets no message.
        let mut c = Lmtp::connect(proxy.lmtp);
        c.send(b"LHLO mta\r\nMAIL FROM:<sender@mailferry.test>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n");
        for _ in 0..3 {
            assert!(c.reply().starts_with("250"));
        }
        assert!(c.reply().starts_with("354 "));
        set_state(&proxy, "carol@example.org", "cutover");
        c.send(&dot_stuff(&message("cutover during upload")));
        c.send(b".\r\n");
        assert_eq!(
            c.reply(),
            "451 4.2.0 <carol@example.org> Mailbox is being migrated, try again later"
        );
        assert!(find(
            &b.legacy,
            "carol@example.org",
            "Subject: cutover during upload"
        )
        .is_empty());

        // And a route that changes during the upload (a cutover completing) is followed.
        let mut c = Lmtp::connect(proxy.lmtp);
        c.send(b"LHLO mta\r\nMAIL FROM:<sender@mailferry.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n");
        for _ in 0..3 {
            assert!(c.reply().starts_with("250"));
        }
        assert!(c.reply().starts_with("354 "));
        proxy.route("alice@example.org", "new");
        c.send(&dot_stuff(&message("moved during upload")));
        c.send(b".\r\n");
        assert!(c.reply().starts_with("250 2.0.0 <alice@example.org>"));
        assert_eq!(
            find(&b.new, "alice@example.org", "Subject: moved during upload").len(),
            1
        );
        assert!(find(
            &b.legacy,
            "alice@example.org",
            "Subject: moved during upload"
        )
        .is_empty());

        // Cleared: the MTA's retry of the same message is accepted and lands once.
        set_state(&proxy, "bob@example.org", "syncing");
        let out = deliver(
            proxy.lmtp,
            "sender@mailferry.test",
            &["bob@example.org"],
            &msg,
        );
        assert!(
            out.rcpt[0].starts_with("250 ") && out.data[0].starts_with("250 2.0.0"),
            "{out:?}"
        );
        let got = find(&b.legacy, "bob@example.org", "Subject: during cutover");
        assert_eq!(got.len(), 1);
        assert_eq!(strip_trace(&got[0]), msg);
        let m = metrics(&proxy);
        assert!(
            m.contains("mailferry_lmtp_deferrals_total{reason=\"cutover\"} 3"),
            "{m}"
        );
    });
}

#[test]
fn unknown_users_follow_the_directory_policy() {
    within(60, || {
        let (b, proxy) = start(Options {
            extra: "[directory]\nreject_unknown = true\n".into(),
            ..Options::default()
        });
        proxy.route("alice@example.org", "legacy");
        let out = deliver(
            proxy.lmtp,
            "",
            &["nobody@example.org", "alice@example.org"],
            &message("known only"),
        );
        assert_eq!(out.rcpt[0], "550 5.1.1 <nobody@example.org> User unknown");
        assert!(out.rcpt[1].starts_with("250 "));
        assert_eq!(out.data.len(), 1);
        assert!(out.data[0].starts_with("250 2.0.0"), "{out:?}");
        assert_eq!(
            find(&b.legacy, "alice@example.org", "Subject: known only").len(),
            1
        );
    });
}

#[test]
fn directory_down_defers_with_4_3_0() {
    within(30, || {
        // No backend is contacted: addresses that nothing listens on.
        let nowhere = Some(SocketAddr::from(([127, 0, 0, 1], support::free_port())));
        let p = InProcess::start(nowhere, nowhere, Some(Arc::new(DownDirectory)));
        let out = deliver(p.addr, "s@mailferry.test", &["alice@example.org"], b"x\r\n");
        assert_eq!(
            out.rcpt[0],
            "451 4.3.0 <alice@example.org> Directory unavailable, try again later"
        );
        assert!(out.data.is_empty());
    });
}

#[test]
fn stopped_backend_defers_its_recipients_and_the_other_delivers() {
    within(60, || {
        let (mut b, proxy) = start(Options::default());
        proxy.route("bob@example.org", "new");
        b.legacy.stop();
        let out = deliver(
            proxy.lmtp,
            "sender@mailferry.test",
            &["alice@example.org", "bob@example.org"],
            &message("one side down"),
        );
        assert!(out.rcpt.iter().all(|r| r.starts_with("250 ")), "{out:?}");
        assert!(
            out.data[0].starts_with("451 4.4.1 <alice@example.org> Backend legacy failed"),
            "{out:?}"
        );
        assert!(
            out.data[1].starts_with("250 2.0.0 <bob@example.org>"),
            "{out:?}"
        );
        assert_eq!(
            find(&b.new, "bob@example.org", "Subject: one side down").len(),
            1
        );
        let m = metrics(&proxy);
        assert!(
            m.contains(
                "mailferry_lmtp_deliveries_total{backend=\"legacy\",outcome=\"deferred\"} 1"
            ),
            "{m}"
        );
        assert!(
            proxy.log().contains("backend LMTP transaction failed"),
            "{}",
            proxy.log()
        );
    });
}

#[test]
fn backend_cut_mid_data_stores_nothing_and_acknowledges_nothing() {
    within(60, || {
        let b = Backends::start();
        let legacy = relay(b.legacy.lmtp, Fault::CutMidData);
        let p = InProcess::start(Some(legacy), Some(b.new.lmtp), None);
        p.route("bob@example.org", Route::New);
        let out = deliver(
            p.addr,
            "sender@mailferry.test",
            &["alice@example.org", "bob@example.org", "carol@example.org"],
            &message("cut mid data"),
        );
        assert!(
            out.data[0].starts_with("451 4.4.2 <alice@example.org>"),
            "{out:?}"
        );
        assert!(
            out.data[1].starts_with("250 2.0.0 <bob@example.org>"),
            "{out:?}"
        );
        assert!(
            out.data[2].starts_with("451 4.4.2 <carol@example.org>"),
            "{out:?}"
        );
        assert!(find(&b.legacy, "alice@example.org", "Subject: cut mid data").is_empty());
        assert!(find(&b.legacy, "carol@example.org", "Subject: cut mid data").is_empty());
        assert_eq!(
            find(&b.new, "bob@example.org", "Subject: cut mid data").len(),
            1
        );
    });
}

#[test]
fn backend_closing_between_replies_fails_only_the_unanswered() {
    within(60, || {
        let b = Backends::start();
        let legacy = relay(b.legacy.lmtp, Fault::CutAfterFirstReply);
        let p = InProcess::start(Some(legacy), Some(b.new.lmtp), None);
        let out = deliver(
            p.addr,
            "sender@mailferry.test",
            &["alice@example.org", "carol@example.org"],
            &message("half answered"),
        );
        assert!(
            out.data[0].starts_with("250 2.0.0 <alice@example.org>"),
            "{out:?}"
        );
        assert!(
            out.data[1].starts_with("451 4.4.2 <carol@example.org>"),
            "{out:?}"
        );
        // What was acknowledged is stored. (carol's copy may or may not be: the backend
        // never said, so the MTA retries; a possible duplicate beats a loss.)
        assert_eq!(
            find(&b.legacy, "alice@example.org", "Subject: half answered").len(),
            1
        );
    });
}

#[test]
fn cutover_waits_for_in_flight_deliveries_and_defers_new_ones() {
    within(60, || {
        let b = Backends::start();
        let release = Arc::new(AtomicBool::new(false));
        let legacy = relay(b.legacy.lmtp, Fault::HoldRepliesUntil(release.clone()));
        let p = InProcess::start(Some(legacy), Some(b.new.lmtp), None);
        let addr = p.addr;
        let sender = thread::spawn(move || {
            deliver(
                addr,
                "s@mailferry.test",
                &["alice@example.org"],
                &message("in flight"),
            )
        });
        assert!(
            eventually(20, || p.deliveries.in_flight("alice@example.org") == 1),
            "the delivery is counted while the backend has not answered"
        );
        // DESIGN.md §2 steps 1 and 2: flag, then wait for the count to drop.
        p.deliveries.set_cutover("alice@example.org", true);
        let waiter = {
            let d = p.deliveries.clone();
            p.rt.spawn(async move { d.wait_idle("alice@example.org").await })
        };
        let deferred = deliver(addr, "s@mailferry.test", &["alice@example.org"], b"x\r\n");
        assert!(deferred.rcpt[0].starts_with("451 4.2.0"), "{deferred:?}");
        assert!(
            !waiter.is_finished(),
            "the wait lasts while the delivery is in flight"
        );
        release.store(true, Ordering::SeqCst);
        let out = sender.join().unwrap();
        assert!(out.data[0].starts_with("250 2.0.0"), "{out:?}");
        p.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), waiter).await })
            .expect("wait_idle returns once the delivery has been answered")
            .unwrap();
        assert_eq!(p.deliveries.in_flight("alice@example.org"), 0);
        assert_eq!(
            find(&b.legacy, "alice@example.org", "Subject: in flight").len(),
            1
        );
    });
}

#[test]
fn smuggling_sequences_never_yield_a_second_message() {
    within(60, || {
        let (b, proxy) = start(Options::default());
        let seqs: [(&str, &[u8]); 6] = [
            ("lf-dot-lf", b"\n.\n"),
            ("cr-dot-crlf", b"\r.\r\n"),
            ("lf-dot-crlf", b"\n.\r\n"),
            ("crlf-dot-lf", b"\r\n.\n"),
            ("crlf-dot-cr", b"\r\n.\r"),
            ("bare-cr", b"\r"),
        ];
        for (name, seq) in seqs {
            let mut data = format!("Subject: smuggle {name}\r\n\r\nfirst part").into_bytes();
            data.extend_from_slice(seq);
            data.extend_from_slice(
                b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n.\r\n",
            );
            let mut c = Lmtp::connect(proxy.lmtp);
            c.send(b"LHLO mta\r\nMAIL FROM:<s@mailferry.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n");
            for _ in 0..4 {
                c.reply();
            }
            // The whole payload and QUIT in one write: anything the proxy took for a second
            // transaction would produce more replies before the 221.
            data.extend_from_slice(b"QUIT\r\n");
            c.send(&data);
            let reply = c.reply();
            assert!(
                reply.starts_with("250 2.0.0 <alice@example.org>"),
                "{name}: {reply}"
            );
            let rest = c.rest();
            assert!(
                rest.starts_with("221 ") && rest.lines().count() == 1,
                "{name}: {rest:?}"
            );
            let got = find(
                &b.legacy,
                "alice@example.org",
                &format!("Subject: smuggle {name}"),
            );
            assert_eq!(got.len(), 1, "{name}");
            assert!(
                contains(&got[0], "RCPT TO:<carol@example.org>"),
                "{name}: the rest stays inside"
            );
        }
        assert_eq!(
            b.legacy.count("carol@example.org", "INBOX"),
            1,
            "only carol's marker"
        );
        assert!(find(&b.legacy, "alice@example.org", "Subject: smuggled").len() == 6);
        assert_eq!(
            b.legacy.count("alice@example.org", "INBOX"),
            7,
            "marker + one per attempt"
        );
    });
}

#[test]
fn protocol_errors_and_size_limit() {
    within(60, || {
        let (b, proxy) = start(Options {
            extra: "[lmtp]\nmax_message_size = 2000\nhostname = \"lmtp.mailferry.test\"\n".into(),
            ..Options::default()
        });
        let mut c = Lmtp::connect(proxy.lmtp);
        c.send(b"MAIL FROM:<a@x>\r\nEHLO mta\r\nLHLO mta\r\n");
        assert_eq!(c.reply(), "503 5.5.1 Send LHLO first");
        assert_eq!(c.reply(), "500 5.5.1 This is LMTP: use LHLO");
        assert_eq!(
            c.reply(),
            "250-lmtp.mailferry.test\n250-PIPELINING\n250-ENHANCEDSTATUSCODES\n250-8BITMIME\n250 SIZE 2000"
        );
        c.send(b"DATA\r\nMAIL FROM:<a@x> SIZE=2001\r\nMAIL FROM:<a@x> SIZE=100\r\nDATA\r\nRCPT TO:<a b@x>\r\n");
        assert_eq!(c.reply(), "503 5.5.1 Need MAIL command first");
        assert_eq!(c.reply(), "552 5.3.4 Message size exceeds fixed limit");
        assert_eq!(c.reply(), "250 2.1.0 Sender OK");
        assert_eq!(c.reply(), "503 5.5.1 No valid recipients");
        assert_eq!(c.reply(), "501 5.1.3 Bad recipient address syntax");
        let mut long = vec![b'N'; 10_000];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        c.send(&long);
        assert_eq!(c.reply(), "500 5.5.2 Line too long");
        assert_eq!(c.reply(), "250 2.0.0 OK");
        // Larger than announced: refused per recipient, nothing stored.
        c.send(b"RCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n");
        assert!(c.reply().starts_with("250 2.1.5"));
        assert!(c.reply().starts_with("250 2.1.5"));
        assert!(c.reply().starts_with("354 "));
        let mut big = b"Subject: too big\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b"0123456789\r\n".as_slice(), 200).flatten());
        c.send(&dot_stuff(&big));
        c.send(b".\r\nRSET\r\nQUIT\r\n");
        assert_eq!(c.reply(), "552 5.3.4 Message too big");
        assert_eq!(c.reply(), "552 5.3.4 Message too big");
        assert_eq!(c.reply(), "250 2.0.0 OK");
        assert_eq!(
            c.reply(),
            "221 2.0.0 lmtp.mailferry.test closing connection"
        );
        assert!(find(&b.legacy, "alice@example.org", "Subject: too big").is_empty());
    });
}

#[test]
fn swaks_delivers_through_the_proxy() {
    within(60, || {
        let (b, proxy) = start(Options::default());
        proxy.route("bob@example.org", "new");
        for (to, pipeline) in [
            ("alice@example.org,bob@example.org", false),
            ("carol@example.org,dave@example.org", true),
        ] {
            let mut cmd = Command::new("swaks");
            cmd.args(["--protocol", "LMTP", "--server"])
                .arg(proxy.lmtp.ip().to_string())
                .arg("--port")
                .arg(proxy.lmtp.port().to_string())
                .args(["--from", "swaks@mailferry.test", "--to", to])
                .args([
                    "--header",
                    "Subject: via swaks",
                    "--body",
                    "Hello through mailferry.",
                ])
                .args(["--timeout", "20"]);
            if pipeline {
                cmd.arg("--pipeline");
            }
            let out = cmd.output().expect("run swaks (apt-get install swaks)");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "swaks to {to} failed:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                text.contains("<-  250 2.0.0 <") || text.contains("<** 250"),
                "{text}"
            );
        }
        assert_eq!(
            find(&b.legacy, "alice@example.org", "Subject: via swaks").len(),
            1
        );
        assert_eq!(
            find(&b.new, "bob@example.org", "Subject: via swaks").len(),
            1
        );
        assert_eq!(
            find(&b.legacy, "carol@example.org", "Subject: via swaks").len(),
            1
        );
        assert_eq!(
            find(&b.legacy, "dave@example.org", "Subject: via swaks").len(),
            1
        );
        assert!(find(&b.legacy, "bob@example.org", "Subject: via swaks").is_empty());
    });
}

#[test]
fn postfix_delivers_through_the_proxy_into_the_right_backend() {
    within(90, || {
        let (b, proxy) = start(Options::default());
        proxy.route("bob@example.org", "new");
        let pf = Postfix::start(proxy.lmtp, &["alice@example.org", "bob@example.org"]);
        // Mail submitted to Postfix over SMTP; Postfix delivers it with its lmtp(8) client.
        let out = Command::new("swaks")
            .args(["--server", &pf.smtp.to_string()])
            .args([
                "--from",
                "someone@mailferry.test",
                "--to",
                "alice@example.org,bob@example.org",
            ])
            .args([
                "--header",
                "Subject: via postfix",
                "--body",
                "Hello through Postfix and mailferry.",
            ])
            .args(["--timeout", "20"])
            .output()
            .expect("run swaks");
        assert!(
            out.status.success(),
            "SMTP to postfix:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let delivered = eventually(30, || {
            b.legacy.count("alice@example.org", "INBOX") == 2
                && b.new.count("bob@example.org", "INBOX") == 2
        });
        assert!(
            delivered,
            "postfix log:\n{}\nproxy log:\n{}",
            pf.log(),
            proxy.log()
        );
        assert_eq!(
            find(&b.legacy, "alice@example.org", "Subject: via postfix").len(),
            1
        );
        assert_eq!(
            find(&b.new, "bob@example.org", "Subject: via postfix").len(),
            1
        );
        assert!(find(&b.new, "alice@example.org", "Subject: via postfix").is_empty());
        assert!(find(&b.legacy, "bob@example.org", "Subject: via postfix").is_empty());
        let relay = format!(
            "relay={}[{}]:{}",
            proxy.lmtp.ip(),
            proxy.lmtp.ip(),
            proxy.lmtp.port()
        );
        assert!(
            pf.wait_for_log(&relay, Duration::from_secs(10)) && pf.log().contains("status=sent"),
            "postfix delivered over LMTP to mailferry:\n{}",
            pf.log()
        );
    });
}
