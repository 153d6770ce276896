//! Memory of the sync engine under load: 20 users copying large messages (1–10 MB) at once
//! through a real `mailferry serve`, at `[sync] memory_mb` 256 (the default) and 64. Prints,
//! for each budget, the server's peak RSS (sampled every 50 ms), what the budget allows
//! (budget + 64 MiB), and the copy speed. Not a test: nothing here asserts a figure.
//!
//! `cargo build --release --bin mailferry --examples && target/release/examples/bench_memory`
//! (`--messages N` per user, default 4).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::corpus::{self, Spec};
use support::dovecot::Backends;
use support::mailferry::{Mailferry, Options};

const USERS: usize = 20;

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Messages on new of every user, as doveadm counts them.
fn copied(b: &Backends, users: &[String]) -> usize {
    users.iter().map(|u| b.new.count(u, "INBOX")).sum()
}

/// One run at `memory_mb` into an empty new: prints peak RSS and speed.
fn run(b: &Backends, users: &[String], want: usize, bytes: u64, memory_mb: u64) {
    for u in users {
        // Fails harmlessly before the user's first login on new (no INBOX yet).
        let _ = b
            .new
            .doveadm(&["expunge", "-u", u, "mailbox", "INBOX", "all"]);
    }
    let m = Mailferry::start(
        b,
        Options {
            extra: format!(
                "[sync]\nmemory_mb = {memory_mb}\nconcurrency = {USERS}\nper_backend = {USERS}\n\
                 interval_secs = 3600\n"
            ),
            ..Options::default()
        },
    );
    let pid = m.pid();
    let start = Instant::now();
    for u in users {
        assert!(m.cli(&["user", "migrate", u]).status.success());
    }
    let mut peak = 0;
    let mut last_count = Instant::now();
    loop {
        peak = peak.max(rss_kib(pid, "VmRSS:"));
        if last_count.elapsed() > Duration::from_millis(500) {
            last_count = Instant::now();
            if copied(b, users) >= want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(900),
                "copy did not finish"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = start.elapsed().as_secs_f64();
    peak = peak.max(rss_kib(pid, "VmHWM:"));
    println!(
        "memory_mb {memory_mb:>4}: peak RSS {:.0} MiB (budget + 64 MiB = {} MiB), {:.0} MB in {secs:.1} s = {:.0} MB/s",
        peak as f64 / 1024.0,
        memory_mb + 64,
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let per_user = args
        .iter()
        .position(|a| a == "--messages")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(4);
    let b = Backends::start();
    let users: Vec<String> = (0..USERS).map(|i| format!("mem{i}@example.org")).collect();
    b.legacy.add_users(&users, "pw");
    b.new.add_users(&users, "pw");
    let mut bytes = 0;
    std::thread::scope(|s| {
        let loads: Vec<_> = users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let c = corpus::generate(&Spec {
                    seed: 900 + i as u64,
                    messages: 0,
                    large: per_user,
                    large_min: 1024 * 1024,
                    large_max: 10 * 1024 * 1024,
                    folders: false,
                    ..Spec::default()
                });
                bytes += c.bytes();
                let l = &b.legacy;
                s.spawn(move || corpus::load(l, u, &c))
            })
            .collect();
        for l in loads {
            l.join().expect("load");
        }
    });
    let want = USERS * per_user;
    println!(
        "{USERS} users, {per_user} messages of 1-10 MB each ({:.0} MB in all)",
        bytes as f64 / 1e6
    );
    for memory_mb in [256, 64] {
        run(&b, &users, want, bytes, memory_mb);
    }
}
