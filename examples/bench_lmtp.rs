//! LMTP proxy benchmark: messages/s delivered straight to Dovecot's LMTP and through
//! mailferry to the same Dovecot, with 1 and with 10 recipients per message, printing ratios.
//! Not a test: nothing here asserts a time.
//!
//! `cargo build --release && cargo run --release --example bench_lmtp [-- --quick]`
//!
//! Each run: `CONNS` client connections in parallel, each a persistent LMTP session sending
//! pipelined transactions (MAIL + RCPTs + DATA in one write, then the message) and checking
//! that every recipient got a 2xx. Direct and proxied runs alternate, five rounds each; the
//! medians of the rates and of the per-round ratios are reported. Recipients rotate over ten
//! users so no single mailbox grows much.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::dovecot::{dot_stuff, Backends};
use support::mailferry::{Mailferry, Options};

/// Parallel client connections per run (an MTA delivers over several at once).
const CONNS: usize = 4;
/// Rounds per configuration. Each round measures direct then proxied back to back, so a
/// ratio compares runs under the same machine load; the medians are reported.
const ROUNDS: usize = 5;

struct Client {
    r: BufReader<TcpStream>,
}

impl Client {
    fn open(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut c = Client {
            r: BufReader::new(s),
        };
        assert!(c.reply().starts_with("220"));
        c.r.get_mut()
            .write_all(b"LHLO bench.mailferry.test\r\n")
            .unwrap();
        assert!(c.reply().starts_with("250"));
        c
    }

    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).expect("read");
            assert!(n > 0, "connection closed after {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    /// One pipelined transaction; panics unless every recipient got 2xx after DATA.
    fn send(&mut self, rcpts: &[String], wire: &[u8]) {
        let mut batch = String::from("MAIL FROM:<bench@mailferry.test>\r\n");
        for r in rcpts {
            batch.push_str(&format!("RCPT TO:<{r}>\r\n"));
        }
        batch.push_str("DATA\r\n");
        self.r.get_mut().write_all(batch.as_bytes()).unwrap();
        for _ in 0..rcpts.len() + 1 {
            let r = self.reply();
            assert!(r.starts_with("250"), "{r}");
        }
        let go = self.reply();
        assert!(go.starts_with("354"), "{go}");
        self.r.get_mut().write_all(wire).unwrap();
        for _ in rcpts {
            let r = self.reply();
            assert!(r.starts_with("250"), "{r}");
        }
    }
}

fn message() -> Vec<u8> {
    let mut m = String::from(
        "From: Bench <bench@mailferry.test>\r\nTo: Someone <someone@example.org>\r\n\
         Subject: benchmark\r\nMessage-ID: <bench@mailferry.test>\r\n\
         Date: Sun, 22 Nov 2026 06:00:00 +0000\r\n\r\n",
    );
    while m.len() < 4096 {
        m.push_str("A line of benchmark body text, about seventy bytes long, repeated.\r\n");
    }
    let mut wire = dot_stuff(m.as_bytes());
    wire.extend_from_slice(b".\r\n");
    wire
}

/// Delivers `total` messages of `per` recipients over `CONNS` connections; returns msgs/s.
fn run(addr: SocketAddr, users: &[String], per: usize, total: usize, wire: &[u8]) -> f64 {
    let started = Instant::now();
    std::thread::scope(|s| {
        for w in 0..CONNS {
            s.spawn(move || {
                let mut c = Client::open(addr);
                for i in (w..total).step_by(CONNS) {
                    let rcpts: Vec<String> = (0..per)
                        .map(|k| users[(i + k) % users.len()].clone())
                        .collect();
                    c.send(&rcpts, wire);
                }
                let _ = c.r.get_mut().write_all(b"QUIT\r\n");
            });
        }
    });
    total as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    println!("Starting two Dovecot backends and mailferry ...");
    let backends = Backends::start();
    let mut users: Vec<String> = support::USERS.iter().map(|(u, _)| u.to_string()).collect();
    for i in 0..6 {
        let u = format!("bench{i}@example.org");
        backends.legacy.add_user(&u, "benchpw");
        users.push(u);
    }
    let proxy = Mailferry::start(&backends, Options::default());
    let direct = backends.legacy.lmtp;
    let wire = message();

    // Warm-up: Dovecot's lmtp processes, mailferry's route cache and backend pool.
    run(direct, &users, 10, 40, &wire);
    run(proxy.lmtp, &users, 10, 40, &wire);

    println!(
        "\n{CONNS} client connections, {} B message, {ROUNDS} rounds, all recipients on legacy (Dovecot maildir)\n",
        wire.len()
    );
    println!(
        "{:>6} {:>9} {:>14} {:>14} {:>13}  per-round ratios",
        "rcpts", "msgs/run", "direct msg/s", "proxied msg/s", "median ratio"
    );
    for (per, total) in [(1usize, 1000usize), (10, 200)] {
        let total = if quick { total / 5 } else { total };
        let (mut d, mut p, mut r) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let direct_rate = run(direct, &users, per, total, &wire);
            let proxied_rate = run(proxy.lmtp, &users, per, total, &wire);
            d.push(direct_rate);
            p.push(proxied_rate);
            r.push(proxied_rate / direct_rate);
        }
        let rounds: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
        println!(
            "{per:>6} {total:>9} {:>14.0} {:>14.0} {:>12.2}x  {}",
            median(d),
            median(p),
            median(r),
            rounds.join(" ")
        );
    }
    println!("\n(target: proxied >= 0.9x direct)");
}
