//! Cutover speed against real Dovecot through a real `mailferry serve`: 100 pre-synced users
//! cut over one at a time (`user cutover --wait`), then a wave of 100 more (`wave cutover
//! --wait`). Prints the per-user blackout (from the audit log: the `cutover` event to the
//! `new` event, i.e. while logins are held and mail deferred) as p50/p99/max, the CLI's wall
//! time per cutover beside a bare `user show` round trip in the same run, and the wave's users
//! per minute. Not a test: nothing here asserts a figure.
//!
//! `cargo build --release --bin mailferry --examples && target/release/examples/bench_cutover`
//! (`--users N` per phase, default 100; `--messages N` per user, default 3).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::dovecot::Backends;
use support::mailferry::{Mailferry, Options};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn json(m: &Mailferry, args: &[&str]) -> serde_json::Value {
    let out = m.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Milliseconds from the user's last `cutover` event to the `new` event after it.
fn blackout_ms(m: &Mailferry, user: &str) -> Option<f64> {
    let events = json(m, &["user", "events", user, "--json"]);
    let list = events.as_array()?;
    let start = list.iter().rev().find(|e| e["to"] == "cutover")?["at_ms"].as_i64()?;
    let end = list.iter().rev().find(|e| e["to"] == "new")?["at_ms"].as_i64()?;
    Some((end - start) as f64)
}

fn populate(b: &Backends, users: &[String], messages: usize) {
    b.legacy.add_users(users, "benchpw");
    b.new.add_users(users, "benchpw");
    for u in users {
        for n in 0..messages {
            let msg = format!(
                "From: a@example.net\r\nTo: {u}\r\nSubject: bench {n}\r\n\r\n{}\r\n",
                "line of text ".repeat(40)
            );
            b.legacy.save(u, "INBOX", msg.as_bytes());
        }
    }
}

fn import(m: &Mailferry, users: &[String], wave: &str) {
    let path = m.config.with_file_name(format!("{wave}.csv"));
    std::fs::write(&path, users.join("\n")).expect("csv");
    let out = m.cli(&["import", path.to_str().unwrap_or_default(), "--wave", wave]);
    assert!(out.status.success(), "import {wave}");
    let out = m.cli(&["wave", "migrate", wave]);
    assert!(out.status.success(), "migrate {wave}");
}

fn wait_caught_up(m: &Mailferry, wave: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while json(m, &["wave", "show", wave, "--json"])["caught_up"].as_u64() != Some(n as u64) {
        assert!(Instant::now() < deadline, "wave {wave} never caught up");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn main() {
    let (n, messages) = (arg("--users", 100), arg("--messages", 3));
    let single: Vec<String> = (0..n).map(|i| format!("one{i:03}@example.org")).collect();
    let bulk: Vec<String> = (0..n).map(|i| format!("bulk{i:03}@example.org")).collect();
    let b = Backends::start();
    populate(&b, &single, messages);
    populate(&b, &bulk, messages);
    let m = Mailferry::start(&b, Options::default());
    import(&m, &single, "single");
    import(&m, &bulk, "bulk");
    wait_caught_up(&m, "single", n);
    wait_caught_up(&m, "bulk", n);

    // One at a time, each cutover beside a bare CLI round trip (what the CLI itself costs).
    let (mut blackouts, mut walls, mut shows) = (Vec::new(), Vec::new(), Vec::new());
    for u in &single {
        let t = Instant::now();
        let _ = json(&m, &["user", "show", u, "--json"]);
        shows.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let out = m.cli(&["user", "cutover", u, "--wait"]);
        walls.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(out.status.success(), "cutover of {u} failed");
        blackouts.extend(blackout_ms(&m, u));
    }
    for v in [&mut blackouts, &mut walls, &mut shows] {
        v.sort_by(f64::total_cmp);
    }
    let t = Instant::now();
    let out = m.cli(&["wave", "cutover", "bulk", "--wait"]);
    let wave_secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "wave cutover failed");
    let view = json(&m, &["wave", "show", "bulk", "--json"]);
    let took = view["cutover"]["took_secs"].as_f64().unwrap_or(wave_secs);

    println!("{n} users, {messages} messages each, cut over one at a time:");
    for (name, v) in [
        ("blackout (cutover -> new)", &blackouts),
        ("user cutover --wait, wall", &walls),
        ("user show (CLI floor), wall", &shows),
    ] {
        println!(
            "  {name:<28} p50 {:7.1} ms  p99 {:7.1} ms  max {:7.1} ms",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(0.0)
        );
    }
    println!(
        "wave cutover of {n} users (wave_concurrency 10): {took:.1} s in the server, {wave_secs:.1} s \
         with the CLI's polling: {:.0} users/minute",
        n as f64 / took * 60.0
    );
}
