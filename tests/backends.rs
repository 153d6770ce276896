//! Smoke tests of the Dovecot test harness itself (tests/support).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use support::dovecot::{
    instance_processes, lmtp_deliver, marker_message, port_open, quote, Backends, Dovecot, Flavor,
    ImapConn, MASTER_PASSWORD, MASTER_USER, SPECIAL_USE, USERS,
};
use support::tls;

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Raw `std::net::TcpStream` LOGIN, as the brief asks (no helper involved).
fn raw_login(addr: std::net::SocketAddr, user: &str, password: &str) -> String {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut greeting = String::new();
    r.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    w.write_all(format!("a LOGIN {user} {password}\r\n").as_bytes())
        .unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("a ") {
            break;
        }
    }
    w.write_all(b"b LOGOUT\r\n").unwrap();
    line.trim_end().to_string()
}

fn check_backend(d: &Dovecot, flavor: Flavor) {
    let sep = flavor.separator();
    assert_eq!(d.flavor, flavor);
    assert_eq!(d.separator, sep);

    // Plain LOGIN as the user, over a raw socket.
    let r = raw_login(d.imap, "alice@example.org", "alicepw");
    assert!(r.starts_with("a OK"), "[{}] alice LOGIN: {r}", d.name);
    let r = raw_login(d.imap, "alice@example.org", "wrongpw");
    assert!(r.starts_with("a NO"), "[{}] bad password: {r}", d.name);
    // Master user with LOGIN user*master.
    let r = raw_login(
        d.imap,
        &format!("alice@example.org*{MASTER_USER}"),
        MASTER_PASSWORD,
    );
    assert!(r.starts_with("a OK"), "[{}] master LOGIN: {r}", d.name);
    let r = raw_login(d.imap, &format!("alice@example.org*{MASTER_USER}"), "nope");
    assert!(
        r.starts_with("a NO"),
        "[{}] master bad password: {r}",
        d.name
    );

    // Master user with SASL PLAIN authzid = user.
    let mut c = d.imap_connect();
    assert!(c.greeting.contains("STARTTLS"), "{}", c.greeting);
    assert!(c.greeting.contains("AUTH=PLAIN"), "{}", c.greeting);
    let resp = b64(format!("bob@example.org\0{MASTER_USER}\0{MASTER_PASSWORD}").as_bytes());
    let r = c.command(&format!("AUTHENTICATE PLAIN {resp}"));
    assert!(
        r.is_ok(),
        "[{}] AUTHENTICATE PLAIN authzid: {}",
        d.name,
        r.tagged
    );
    for cap in [
        "CONDSTORE",
        "QRESYNC",
        "SPECIAL-USE",
        "LITERAL+",
        "ID",
        "IDLE",
    ] {
        assert!(
            r.tagged.contains(cap),
            "[{}] missing {cap}: {}",
            d.name,
            r.tagged
        );
    }
    // The session really is bob's.
    let r = c.command("NAMESPACE");
    assert!(r.is_ok());
    assert!(
        r.text().contains(&format!("((\"\" \"{sep}\"))")),
        "[{}] NAMESPACE: {}",
        d.name,
        r.text()
    );
    c.logout();

    // LIST: separator and special-use folders, subscribed.
    let mut c = d.imap_login("alice@example.org", "alicepw");
    let r = c.command("LIST \"\" \"*\" RETURN (SPECIAL-USE SUBSCRIBED)");
    assert!(r.is_ok(), "{}", r.tagged);
    let list = r.text();
    for line in list.lines() {
        assert!(
            line.contains(&format!(") \"{sep}\" ")),
            "[{}] separator not {sep:?}: {line}",
            d.name
        );
    }
    for (name, flag) in SPECIAL_USE {
        let line = list
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("[{}] no {name} in LIST:\n{list}", d.name));
        assert!(
            line.contains(flag),
            "[{}] {name} lacks {flag}: {line}",
            d.name
        );
        assert!(line.contains("\\Subscribed"), "[{}] {line}", d.name);
    }
    c.logout();

    // Seeded markers: one per user, exact bytes.
    for (user, _) in USERS {
        assert_eq!(d.count(user, "INBOX"), 1, "[{}] {user} INBOX", d.name);
        let msgs = d.messages(user, "INBOX");
        assert_eq!(
            msgs,
            vec![marker_message(flavor, user)],
            "[{}] {user}",
            d.name
        );
    }
    let mailboxes = d.mailboxes("alice@example.org");
    for (name, _) in SPECIAL_USE {
        assert!(mailboxes.iter().any(|m| m == name), "{mailboxes:?}");
    }

    // save() into a missing hierarchical mailbox creates it, with this flavor's separator.
    let folder = format!("Projects{sep}2024");
    let msg = b"Subject: nested\r\n\r\nline one\r\n.leading dot\r\n".to_vec();
    d.save("carol@example.org", &folder, &msg);
    d.save(
        "carol@example.org",
        &folder,
        b"Subject: second\r\n\r\n2\r\n",
    );
    assert_eq!(d.count("carol@example.org", &folder), 2);
    let got = d.messages("carol@example.org", &folder);
    assert_eq!(got[0], msg);
    assert!(d.mailboxes("carol@example.org").contains(&folder));

    // Many sessions of one user from 127.0.0.1 (mail_max_userip_connections).
    let conns: Vec<ImapConn> = (0..15)
        .map(|_| d.imap_login("dave@example.org", "davepw"))
        .collect();
    for c in conns {
        c.logout();
    }

    assert!(
        d.wait_for_log("Login: user=<alice@example.org>", Duration::from_secs(5)),
        "[{}] auth_verbose log lines missing:\n{}",
        d.name,
        d.log_tail(30)
    );
}

#[test]
fn backends_start_seeded_and_independent() {
    let t0 = Instant::now();
    let b = Backends::start();
    eprintln!(
        "Backends::start (2 instances + seeding): {:?}",
        t0.elapsed()
    );
    assert_ne!(b.legacy.imap, b.new.imap);
    assert_ne!(b.legacy.pid(), b.new.pid());
    assert_ne!(b.legacy.dir, b.new.dir);

    std::thread::scope(|s| {
        s.spawn(|| check_backend(&b.legacy, Flavor::Legacy));
        s.spawn(|| check_backend(&b.new, Flavor::New));
    });

    // LMTP to alice on legacy lands there only (raw TCP dialogue).
    let body = b"From: x@example.net\r\nSubject: via lmtp legacy\r\n\r\nhello legacy\r\n.dot\r\n";
    let out = lmtp_raw(b.legacy.lmtp, "alice@example.org", body);
    assert!(out.starts_with("250"), "LMTP DATA reply: {out}");
    assert_eq!(b.legacy.count("alice@example.org", "INBOX"), 2);
    assert_eq!(b.new.count("alice@example.org", "INBOX"), 1);
    let last = b
        .legacy
        .messages("alice@example.org", "INBOX")
        .pop()
        .unwrap();
    let last = String::from_utf8(last).unwrap();
    assert!(last.contains("Subject: via lmtp legacy"), "{last}");
    assert!(last.ends_with("hello legacy\r\n.dot\r\n"), "{last:?}");

    // ... and the helper client, to bob on new only, with an unknown recipient.
    let out = b.new.lmtp_deliver(
        "x@example.net",
        &["bob@example.org", "nobody@example.org"],
        b"Subject: via lmtp new\r\n\r\nhi\r\n",
    );
    assert!(out.rcpt_replies[0].starts_with("250"), "{out:?}");
    assert!(out.rcpt_replies[1].starts_with("550"), "{out:?}");
    assert_eq!(out.data_replies.len(), 1, "{out:?}");
    assert!(out.data_replies[0].starts_with("250"), "{out:?}");
    assert_eq!(b.new.count("bob@example.org", "INBOX"), 2);
    assert_eq!(b.legacy.count("bob@example.org", "INBOX"), 1);
    let delivered = b.new.messages("bob@example.org", "INBOX");
    assert_eq!(delivered[0], marker_message(Flavor::New, "bob@example.org"));

    // Users added to one instance exist only there.
    b.new.add_user("erin@example.org", "erinpw");
    let r = raw_login(b.new.imap, "erin@example.org", "erinpw");
    assert!(r.starts_with("a OK"), "{r}");
    let r = raw_login(b.legacy.imap, "erin@example.org", "erinpw");
    assert!(r.starts_with("a NO"), "{r}");
}

/// LMTP over a raw socket: LHLO / MAIL FROM / RCPT TO / DATA; returns the DATA reply.
fn lmtp_raw(addr: std::net::SocketAddr, rcpt: &str, body: &[u8]) -> String {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut reply = || {
        let mut all = String::new();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            all.push_str(&l);
            if l.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    };
    assert!(reply().starts_with("220"));
    w.write_all(b"LHLO test.example\r\n").unwrap();
    assert!(reply().starts_with("250"));
    w.write_all(b"MAIL FROM:<x@example.net>\r\n").unwrap();
    assert!(reply().starts_with("250"));
    w.write_all(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
        .unwrap();
    let rr = reply();
    assert!(rr.starts_with("250"), "RCPT: {rr}");
    w.write_all(b"DATA\r\n").unwrap();
    assert!(reply().starts_with("354"));
    w.write_all(&support::dovecot::dot_stuff(body)).unwrap();
    w.write_all(b".\r\n").unwrap();
    let out = reply();
    w.write_all(b"QUIT\r\n").unwrap();
    out
}

#[test]
fn tls_listeners_verify_with_the_test_cert() {
    let t0 = Instant::now();
    let d = Dovecot::start("tls", Flavor::New);
    eprintln!("Dovecot::start (one instance): {:?}", t0.elapsed());

    // Implicit TLS, by name and by IP SAN.
    for name in ["localhost", "127.0.0.1"] {
        let mut s = tls::connect(d.imaps, name, &d.cert.cert_pem);
        let mut greeting = [0u8; 4];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"* OK");
        s.write_all(b"a LOGIN alice@example.org alicepw\r\n")
            .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap(); // rest of greeting
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("a OK"), "{line}");
    }

    // STARTTLS on the plain port.
    let mut c = d.imap_connect();
    let r = c.command("STARTTLS");
    assert!(r.is_ok(), "{}", r.tagged);
    let s = tls::wrap(c.into_stream(), "localhost", &d.cert.cert_pem);
    let mut r = BufReader::new(s);
    r.get_mut().write_all(b"a CAPABILITY\r\n").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("* CAPABILITY"), "{line}");
    assert!(!line.contains("STARTTLS"), "{line}");

    // A different cert is not trusted.
    let other = tls::self_signed(&d.dir, "other");
    let tcp = std::net::TcpStream::connect(d.imaps).unwrap();
    let conn = rustls::ClientConnection::new(
        tls::client_config(&other.cert_pem),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut buf = [0u8; 1];
    assert!(s.read(&mut buf).is_err(), "untrusted cert must fail");

    // The test cert also works as a rustls server identity (for the proxy's listeners).
    let _ = d.cert.server_config();
    assert!(d.log().contains("starting up for imap, lmtp"));
}

fn assert_gone(what: &str, instance: &str, conf: &std::path::Path, ports: &[std::net::SocketAddr]) {
    // The master is reaped by stop(); give the kernel a moment for sockets.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let procs = instance_processes(instance, conf);
        let open: Vec<_> = ports.iter().filter(|a| port_open(**a)).collect();
        if procs.is_empty() && open.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: processes left {procs:?}, ports still open {open:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn drop_stops_every_process_and_closes_ports() {
    let d = Dovecot::start("dropme", Flavor::Legacy);
    let (instance, conf, dir) = (
        d.instance_name().to_string(),
        d.conf_path().to_path_buf(),
        d.dir.clone(),
    );
    let ports = [d.imap, d.imaps, d.lmtp];
    // keep a logged-in session (an imap process) and an LMTP session open across the drop
    let mut busy = d.imap_login("alice@example.org", "alicepw");
    assert!(busy.command("SELECT INBOX").is_ok());
    let lmtp = std::net::TcpStream::connect(d.lmtp).unwrap();
    let procs = d.processes();
    assert!(
        procs.contains(&d.pid()),
        "{procs:?} lacks master {}",
        d.pid()
    );
    assert!(procs.len() >= 5, "expected master + children: {procs:?}");

    let t0 = Instant::now();
    drop(d);
    eprintln!("drop: {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_gone("after drop", &instance, &conf, &ports);
    let keep = std::env::var_os("MAILFERRY_KEEP_DOVECOT").is_some();
    assert!(
        keep || !dir.exists(),
        "instance dir left behind: {}",
        dir.display()
    );
    drop(lmtp);
}

#[test]
fn stop_is_idempotent_and_runs_on_panic() {
    let info = std::sync::Mutex::new(None);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut d = Dovecot::start("panicky", Flavor::New);
        *info.lock().unwrap() = Some((
            d.instance_name().to_string(),
            d.conf_path().to_path_buf(),
            [d.imap, d.imaps, d.lmtp],
        ));
        d.stop();
        d.stop();
        assert!(!port_open(d.imap));
        let d2 = Dovecot::start("panicky2", Flavor::New);
        d2.save("alice@example.org", "INBOX", b"Subject: x\r\n\r\nx\r\n");
        *info.lock().unwrap() = Some((
            d2.instance_name().to_string(),
            d2.conf_path().to_path_buf(),
            [d2.imap, d2.imaps, d2.lmtp],
        ));
        panic!("deliberate panic with a running instance");
    }));
    assert!(res.is_err());
    let (instance, conf, ports) = info.lock().unwrap().take().unwrap();
    assert_gone("after panic", &instance, &conf, &ports);
}

/// Helper run in a child process by `watchdog_stops_instance_when_test_process_dies`.
#[test]
fn watchdog_child_helper() {
    if std::env::var_os("MF_WATCHDOG_CHILD").is_none() {
        return;
    }
    let d = Dovecot::start("orphan", Flavor::Legacy);
    println!(
        "INSTANCE {} {} {} {} {}",
        d.instance_name(),
        d.conf_path().display(),
        d.imap,
        d.lmtp,
        d.dir.display()
    );
    std::io::stdout().flush().unwrap();
    // Leave without running destructors.
    std::process::exit(0);
}

#[test]
fn watchdog_stops_instance_when_test_process_dies() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "watchdog_child_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MF_WATCHDOG_CHILD", "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("INSTANCE ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("child printed no INSTANCE line: {stdout}"));
    let f: Vec<&str> = line.split(' ').collect();
    let conf = PathBuf::from(f[1]);
    let ports = [f[2].parse().unwrap(), f[3].parse().unwrap()];
    assert_gone("after the test process died", f[0], &conf, &ports);
    if std::env::var_os("MAILFERRY_KEEP_DOVECOT").is_some() {
        return;
    }
    let dir = PathBuf::from(f[4]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dir.exists(), "watchdog left {}", dir.display());
}

#[test]
fn quote_and_parallel_free_ports() {
    assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    let ports: std::collections::HashSet<u16> = (0..50).map(|_| support::free_port()).collect();
    assert_eq!(ports.len(), 50);
    let _ = lmtp_deliver; // re-exported helper used by other tests
}
