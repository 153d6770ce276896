//! IMAP proxy benchmark: the same Dovecot measured directly and through mailferry in one run,
//! printing ratios. Not a test: nothing here asserts a time.
//!
//! `cargo run --release --example bench_imap [-- --quick]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::dovecot::{Backends, Dovecot, Flavor};
use support::mailferry::{Mailferry, Options};

/// One imap process hosts many clients so thousands of idle sessions fit in memory and
/// logins measure the proxy rather than Dovecot's process spawning.
const DOVECOT_BENCH: &str =
    "service imap {\n  service_count = 0\n  client_limit = 1000\n  process_limit = 64\n}\n";

struct Conn {
    r: BufReader<TcpStream>,
    tag: u64,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        let mut c = Conn {
            r: BufReader::with_capacity(256 * 1024, s),
            tag: 0,
        };
        let mut g = String::new();
        c.r.read_line(&mut g).unwrap();
        c
    }

    /// Sends a command and reads to its tagged reply; returns bytes of literal data seen.
    fn cmd(&mut self, cmd: &str) -> usize {
        self.tag += 1;
        let tag = format!("b{}", self.tag);
        self.r
            .get_mut()
            .write_all(format!("{tag} {cmd}\r\n").as_bytes())
            .unwrap();
        let mut lit = 0;
        let mut line = Vec::new();
        loop {
            line.clear();
            self.r.read_until(b'\n', &mut line).unwrap();
            assert!(!line.is_empty(), "closed");
            if let Some(n) = literal(&line) {
                let mut left = n;
                while left > 0 {
                    let buf = self.r.fill_buf().unwrap();
                    let take = buf.len().min(left);
                    self.r.consume(take);
                    left -= take;
                }
                lit += n;
                continue;
            }
            if line.starts_with(tag.as_bytes()) {
                assert!(
                    line[tag.len()..].starts_with(b" OK"),
                    "{}",
                    String::from_utf8_lossy(&line)
                );
                return lit;
            }
        }
    }
}

fn literal(line: &[u8]) -> Option<usize> {
    let l = line.strip_suffix(b"\r\n")?;
    let inner = l.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    std::str::from_utf8(&inner[open + 1..]).ok()?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn noop_latency(addr: SocketAddr, n: usize) -> (f64, f64) {
    let mut c = Conn::open(addr);
    c.cmd("LOGIN \"alice@example.org\" \"alicepw\"");
    c.cmd("SELECT INBOX");
    for _ in 0..200 {
        c.cmd("NOOP");
    }
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            c.cmd("NOOP");
            t.elapsed()
        })
        .collect();
    v.sort();
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

fn logins_per_sec(addr: SocketAddr, total: usize, threads: usize) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..threads {
            s.spawn(move || {
                let (user, pass) = support::USERS[i % support::USERS.len()];
                for _ in 0..total / threads {
                    let mut c = Conn::open(addr);
                    c.cmd(&format!("LOGIN \"{user}\" \"{pass}\""));
                    c.cmd("SELECT INBOX");
                    c.cmd("LOGOUT");
                }
            });
        }
    });
    total as f64 / t.elapsed().as_secs_f64()
}

/// Median MB/s of `rounds` FETCHes of the 10 MB message, direct and proxied rounds
/// interleaved so both see the same machine load.
fn fetch_mb_per_sec(direct: SocketAddr, via: SocketAddr, rounds: usize) -> (f64, f64) {
    let open = |addr| {
        let mut c = Conn::open(addr);
        c.cmd("LOGIN \"bob@example.org\" \"bobpw\"");
        c.cmd("SELECT INBOX");
        c.cmd("UID FETCH 1:* (BODY.PEEK[])");
        c
    };
    let (mut d, mut p) = (open(direct), open(via));
    let rate = |c: &mut Conn| {
        let t = Instant::now();
        let bytes = c.cmd("UID FETCH 1:* (BODY.PEEK[])");
        bytes as f64 / t.elapsed().as_secs_f64() / 1e6
    };
    let (mut ds, mut ps) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ds.push(rate(&mut d));
        ps.push(rate(&mut p));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut ds), median(&mut ps))
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_field(pid, "status", "VmRSS:")
}

/// CPU time (user + system, all threads) of a process in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the state field.
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    ticks as f64 * 1000.0 / 100.0
}

fn idle_sessions(addr: SocketAddr, n: usize, keep: &mut Vec<TcpStream>) {
    let per = 32;
    let opened: Vec<Vec<TcpStream>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..per)
            .map(|i| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    for j in 0..n / per + usize::from(i < n % per) {
                        let (user, pass) = support::USERS[(i + j) % support::USERS.len()];
                        let mut c = Conn::open(addr);
                        c.cmd(&format!("LOGIN \"{user}\" \"{pass}\""));
                        out.push(c.r.into_inner());
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    keep.extend(opened.into_iter().flatten());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only noop|login|fetch|idle` runs one section (for profiling); default: all.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let extra = std::env::var("MAILFERRY_BENCH_CONFIG").unwrap_or_default();
    let _ = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            "--nofile=65536:65536",
        ])
        .status();
    println!("starting Dovecot (legacy) and mailferry ...");
    let backends = Backends {
        legacy: Dovecot::start_with("legacy", Flavor::Legacy, DOVECOT_BENCH),
        new: Dovecot::start_with("new", Flavor::New, DOVECOT_BENCH),
    };
    let mut big = b"Subject: big\r\nFrom: a@example.net\r\n\r\n".to_vec();
    while big.len() < 10 * 1024 * 1024 {
        big.extend_from_slice(&[b'x'; 78]);
        big.extend_from_slice(b"\r\n");
    }
    backends.legacy.save("bob@example.org", "INBOX", &big);
    backends.legacy.save(
        "alice@example.org",
        "INBOX",
        b"Subject: hi\r\n\r\nhello\r\n",
    );
    let proxy = Mailferry::start(
        &backends,
        Options {
            extra: extra.replace("\\n", "\n"),
            ..Options::default()
        },
    );
    let pid = proxy.pid();
    let direct = backends.legacy.imap;
    let via = proxy.imap;
    println!("direct: Dovecot {direct}   proxied: mailferry {via} → Dovecot\n");

    let n = if quick { 2000 } else { 10000 };
    if run("noop") {
        let (dp50, dp99) = noop_latency(direct, n);
        let (pp50, pp99) = noop_latency(via, n);
        println!("NOOP round trip ({n} sequential)    direct p50 {dp50:.0} µs p99 {dp99:.0} µs | proxied p50 {pp50:.0} µs p99 {pp99:.0} µs | added p50 {:+.0} µs, p99 {:+.0} µs",
        pp50 - dp50, pp99 - dp99);
    }

    let logins = if quick { 400 } else { 2000 };
    if run("login") {
        let d = logins_per_sec(direct, logins, 4);
        let cpu0 = cpu_ms(pid);
        let p = logins_per_sec(via, logins, 4);
        let cpu = cpu_ms(pid) - cpu0;
        println!("LOGIN+SELECT+LOGOUT ({logins}, 4 threads) direct {d:.0}/s | proxied {p:.0}/s | ratio {:.2}x | proxy CPU {:.3} ms per login",
        p / d, cpu / logins as f64);
    }

    let rounds = if quick { 11 } else { 41 };
    if run("fetch") {
        let (d, p) = fetch_mb_per_sec(direct, via, rounds);
        println!("FETCH 10 MB message (median of {rounds})   direct {d:.0} MB/s | proxied {p:.0} MB/s | ratio {:.3}x", p / d);
    }

    if run("idle") {
        let base = rss_kib(pid);
        let mut keep = Vec::new();
        for target in [1000usize, 5000] {
            let have = keep.len();
            idle_sessions(via, target - have, &mut keep);
            std::thread::sleep(Duration::from_secs(2));
            let rss = rss_kib(pid);
            println!("idle proxied sessions {target:>5}          proxy RSS {rss} KiB (base {base} KiB) → {:.1} KiB per session",
            (rss.saturating_sub(base)) as f64 / target as f64);
        }
        let peak = rss_kib(pid);
        drop(keep);
        // What the allocator gives back, second by second, once the sessions are gone.
        let mut after = peak;
        let mut trace = Vec::new();
        for _ in 0..10 {
            std::thread::sleep(Duration::from_secs(1));
            after = rss_kib(pid);
            trace.push(after / 1024);
        }
        let added = peak.saturating_sub(base).max(1);
        println!(
            "10 s after closing all sessions          proxy RSS {after} KiB (base {base} KiB): {:.0}% of what they added returned [MiB per second: {}]",
            peak.saturating_sub(after) as f64 * 100.0 / added as f64,
            trace.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
        );
        // glibc keeps freed pages for reuse: a second wave of the same size must not grow RSS.
        let mut keep = Vec::new();
        idle_sessions(via, 5000, &mut keep);
        std::thread::sleep(Duration::from_secs(2));
        println!(
            "5000 sessions again (reuse, no leak)     proxy RSS {} KiB",
            rss_kib(pid)
        );
        drop(keep);
    }
    let mut s = TcpStream::connect(proxy.admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut m = String::new();
    let _ = s.read_to_string(&mut m);
    let ok = m
        .lines()
        .filter(|l| l.starts_with("mailferry_logins_total"))
        .collect::<Vec<_>>();
    println!("\n{}", ok.join("\n"));
}
