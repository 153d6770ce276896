//! Sync engine benchmark (not a test: nothing here asserts a time). In one run, on the same two
//! Dovecot instances (legacy maildir → new sdbox), for a small-message corpus and a
//! large-message corpus:
//! - the new backend's pipelined APPEND ceiling with 4 connections (measured here, each run),
//! - mailferry's sync of 4 users in parallel (messages/s, MB/s, CPU per 10,000 messages),
//! - `doveadm backup -R` with imapc between the same backends (4 users in parallel),
//!
//! and a no-change pass over 20 users. Prints the ratios against the targets of issue 4.
//!
//! `cargo run --release --example bench_sync [-- --quick] [--only small|large]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailferry::config::Config;
use mailferry::store;
use mailferry::sync::Engine;
use support::corpus::{self, Corpus, Spec};
use support::dovecot::{Backends, Dovecot, Flavor, MASTER_PASSWORD, MASTER_USER};

const PW: &str = "benchpw";

/// Adds users to a running instance in one write (Dovecot re-reads the passwd-file once its
/// mtime changes; wait for the next second so the change is seen).
fn add_users(d: &Dovecot, users: &[String]) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(d.dir.join("users"))
        .expect("users file");
    for u in users {
        let home = d.dir.join("home").join(u);
        writeln!(f, "{u}:{{PLAIN}}{PW}::::{}::", home.display()).expect("append user");
    }
    drop(f);
    std::thread::sleep(Duration::from_millis(1100));
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Machine-wide (busy, total) CPU ticks from /proc/stat, to tell whether a phase saturated
/// the cores (both Dovecots and mailferry share them here).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().sum();
    // idle + iowait
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Runs `f` and returns its result with the machine's CPU utilisation meanwhile (0..=1).
fn busy<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let (b0, t0) = machine_ticks();
    let r = f();
    let (b1, t1) = machine_ticks();
    (r, (b1 - b0) as f64 / (t1 - t0).max(1) as f64)
}

struct Rate {
    msgs: f64,
    mb: f64,
    secs: f64,
}

impl Rate {
    fn new(msgs: usize, bytes: u64, secs: f64) -> Rate {
        Rate {
            msgs: msgs as f64 / secs,
            mb: bytes as f64 / 1e6 / secs,
            secs,
        }
    }
}

/// APPEND ceiling: 4 connections, each fully pipelined (LITERAL+): a writer thread sends every
/// APPEND without waiting, a reader thread consumes the replies; TCP flow control is the window.
fn ceiling(new: &Dovecot, users: &[String], corpora: &[Corpus]) -> Rate {
    let start = Instant::now();
    std::thread::scope(|s| {
        for (u, c) in users.iter().zip(corpora) {
            s.spawn(move || {
                let stream = TcpStream::connect(new.imap).expect("connect");
                stream.set_nodelay(true).ok();
                let mut r = BufReader::with_capacity(64 * 1024, stream.try_clone().expect("clone"));
                let mut line = String::new();
                r.read_line(&mut line).expect("greeting");
                let mut w = stream;
                w.write_all(
                    format!("l LOGIN \"{u}*{MASTER_USER}\" \"{MASTER_PASSWORD}\"\r\n").as_bytes(),
                )
                .expect("login");
                loop {
                    line.clear();
                    r.read_line(&mut line).expect("login reply");
                    if line.starts_with("l ") {
                        assert!(line.starts_with("l OK"), "ceiling login: {line}");
                        break;
                    }
                }
                let total = c.messages.len();
                let reader = std::thread::spawn(move || {
                    let mut done = 0;
                    let mut line = String::new();
                    while done < total {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            break;
                        }
                        if line.starts_with('a') {
                            assert!(line.contains(" OK"), "ceiling APPEND: {line}");
                            done += 1;
                        }
                    }
                });
                let mut out = std::io::BufWriter::with_capacity(256 * 1024, &mut w);
                for (i, m) in c.messages.iter().enumerate() {
                    write!(
                        out,
                        "a{i} APPEND INBOX ({}) \"{}\" {{{}+}}\r\n",
                        m.flags.join(" "),
                        m.date,
                        m.body.len()
                    )
                    .expect("write");
                    out.write_all(&m.body).expect("write");
                    out.write_all(b"\r\n").expect("write");
                }
                out.flush().expect("flush");
                drop(out);
                reader.join().expect("reader");
                let _ = w.write_all(b"z LOGOUT\r\n");
            });
        }
    });
    let n: usize = corpora.iter().map(|c| c.messages.len()).sum();
    let b: u64 = corpora.iter().map(Corpus::bytes).sum();
    Rate::new(n, b, start.elapsed().as_secs_f64())
}

/// FETCH ceiling of legacy: 4 connections reading every message (`BODY.PEEK[]`) of the users.
fn fetch_ceiling(legacy: &Dovecot, users: &[String], corpora: &[Corpus]) -> Rate {
    let start = Instant::now();
    std::thread::scope(|s| {
        for u in users {
            s.spawn(move || {
                let mut sess = corpus::Session::open(legacy, u);
                sess.ok("EXAMINE INBOX");
                sess.ok("UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])");
                sess.close();
            });
        }
    });
    let n: usize = corpora.iter().map(|c| c.messages.len()).sum();
    let b: u64 = corpora.iter().map(Corpus::bytes).sum();
    Rate::new(n, b, start.elapsed().as_secs_f64())
}

/// `doveadm backup -R` from legacy (imapc, master user) into fresh users of new, in parallel.
fn doveadm_backup(b: &Backends, pairs: &[(String, String)], corpora: &[Corpus]) -> Option<Rate> {
    let start = Instant::now();
    let ok = std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(src, dst)| {
                s.spawn(move || {
                    let out = Command::new("doveadm")
                        .arg("-c")
                        .arg(b.new.conf_path())
                        .args(["-o", "imapc_host=127.0.0.1"])
                        .args(["-o", &format!("imapc_port={}", b.legacy.imap.port())])
                        .args(["-o", &format!("imapc_user={src}")])
                        .args(["-o", &format!("imapc_master_user={MASTER_USER}")])
                        .args(["-o", &format!("imapc_password={MASTER_PASSWORD}")])
                        .args(["-o", "imapc_features=rfc822.size fetch-headers modseq"])
                        .args(["backup", "-R", "-u", dst, "imapc:"])
                        .output();
                    match out {
                        Ok(o) if o.status.success() => true,
                        Ok(o) => {
                            eprintln!(
                                "doveadm backup {src}: {}",
                                String::from_utf8_lossy(&o.stderr)
                            );
                            false
                        }
                        Err(e) => {
                            eprintln!("doveadm: {e}");
                            false
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().all(|h| h.join().unwrap_or(false))
    });
    let secs = start.elapsed().as_secs_f64();
    let n: usize = corpora.iter().map(|c| c.messages.len()).sum();
    let bytes: u64 = corpora.iter().map(Corpus::bytes).sum();
    ok.then(|| Rate::new(n, bytes, secs))
}

fn config(b: &Backends, dir: &Path) -> Config {
    let secret = dir.join("master.secret");
    std::fs::write(&secret, MASTER_PASSWORD).unwrap();
    let mut text = format!(
        "[state]\nurl = \"sqlite://{}\"\n[sync]\nconcurrency = 20\nper_backend = 20\n",
        dir.join("state.db").display()
    );
    for (name, d) in [("legacy", &b.legacy), ("new", &b.new)] {
        text.push_str(&format!(
            "[backends.{name}]\nimap = \"{}\"\nmaster_user = \"{MASTER_USER}\"\nmaster_password_file = \"{}\"\n",
            d.imap,
            secret.display()
        ));
    }
    Config::parse(&text, Path::new("bench.toml"), dir).expect("config")
}

/// Passes for `users` in parallel; returns (wall seconds, CPU seconds, messages appended).
fn sync_all(
    rt: &tokio::runtime::Runtime,
    engine: &Arc<Engine>,
    users: &[String],
) -> (f64, f64, u64) {
    let cpu = cpu_seconds();
    let start = Instant::now();
    let appended = rt.block_on(async {
        let tasks: Vec<_> = users
            .iter()
            .map(|u| {
                let e = engine.clone();
                let u = u.clone();
                tokio::spawn(async move { e.pass(&u, None).await })
            })
            .collect();
        let mut n = 0;
        for t in tasks {
            match t.await {
                Ok(Ok(r)) => n += r.appended,
                Ok(Err(e)) => eprintln!("sync failed: {e}"),
                Err(e) => eprintln!("sync task: {e}"),
            }
        }
        n
    });
    (start.elapsed().as_secs_f64(), cpu_seconds() - cpu, appended)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only small` or `--only large` runs one corpus (for profiling).
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let (small_n, large_n) = if quick { (400, 2) } else { (2500, 12) };
    mailferry::net::tls::install_provider();
    // RUST_LOG=mailferry=debug shows what the engine waits for.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let conf = "service imap {\n  service_count = 0\n  process_limit = 200\n}\n";
    let (legacy, new) = std::thread::scope(|s| {
        let a = s.spawn(|| Dovecot::start_with("legacy", Flavor::Legacy, conf));
        let b = s.spawn(|| Dovecot::start_with("new", Flavor::New, conf));
        (a.join().unwrap(), b.join().unwrap())
    });
    let b = Backends { legacy, new };
    let names = |p: &str, n: usize| {
        (1..=n)
            .map(|i| format!("{p}{i}@bench.test"))
            .collect::<Vec<_>>()
    };
    let (small, large, idle) = (names("s", 4), names("l", 4), names("n", 16));
    let (cs, cl, ds, dl) = (
        names("cs", 4),
        names("cl", 4),
        names("ds", 4),
        names("dl", 4),
    );
    let legacy_users: Vec<String> = [&small, &large, &idle]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let new_users: Vec<String> = [&small, &large, &idle, &cs, &cl, &ds, &dl]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| add_users(&b.legacy, &legacy_users));
        add_users(&b.new, &new_users);
    });

    let small_c: Vec<Corpus> = (0..4)
        .map(|i| {
            corpus::generate(&Spec {
                seed: 100 + i,
                messages: small_n,
                large: 0,
                folders: false,
                small_size: 4500,
                ..Spec::default()
            })
        })
        .collect();
    let large_c: Vec<Corpus> = (0..4)
        .map(|i| {
            corpus::generate(&Spec {
                seed: 200 + i,
                messages: 0,
                large: large_n,
                large_min: 1024 * 1024,
                large_max: 8 * 1024 * 1024,
                folders: false,
                ..Spec::default()
            })
        })
        .collect();
    let idle_c = corpus::generate(&Spec {
        seed: 300,
        messages: 100,
        large: 0,
        ..Spec::default()
    });
    eprintln!("loading corpora into legacy...");
    std::thread::scope(|s| {
        for (u, c) in small.iter().zip(&small_c).chain(large.iter().zip(&large_c)) {
            let l = &b.legacy;
            s.spawn(move || corpus::load(l, u, c));
        }
    });
    for u in &idle {
        corpus::load(&b.legacy, u, &idle_c);
    }

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt
        .block_on(store::open(&format!(
            "sqlite://{}",
            dir.path().join("state.db").display()
        )))
        .unwrap();
    let engine = Arc::new(Engine::from_config(&config(&b, dir.path()), store).unwrap());

    let mut results = Vec::new();
    for (label, users, ceil_users, dsync_users, corpora) in [
        ("small (~5 KB)", &small, &cs, &ds, &small_c),
        ("large (1-8 MB)", &large, &cl, &dl, &large_c),
    ] {
        if only.as_deref().is_some_and(|o| !label.starts_with(o)) {
            continue;
        }
        let n: usize = corpora.iter().map(|c| c.messages.len()).sum();
        let bytes: u64 = corpora.iter().map(Corpus::bytes).sum();
        eprintln!(
            "{label}: {n} messages, {:.1} MB, 4 users",
            bytes as f64 / 1e6
        );
        let (ceil, ceil_busy) = busy(|| ceiling(&b.new, ceil_users, corpora));
        let (fetch, fetch_busy) = busy(|| fetch_ceiling(&b.legacy, users, corpora));
        let ((secs, cpu, appended), mf_busy) = busy(|| sync_all(&rt, &engine, users));
        // Every legacy INBOX also holds no harness marker here: appended must equal the corpus.
        if appended as usize != n {
            eprintln!("warning: mailferry appended {appended} of {n}");
        }
        let mf = Rate::new(n, bytes, secs);
        let pairs: Vec<(String, String)> = users
            .iter()
            .cloned()
            .zip(dsync_users.iter().cloned())
            .collect();
        let (dsync, dsync_busy) = busy(|| doveadm_backup(&b, &pairs, corpora));
        eprintln!(
            "{label}: machine CPU busy: APPEND ceiling {:.0}%, FETCH ceiling {:.0}%, mailferry {:.0}%, doveadm {:.0}%",
            ceil_busy * 100.0,
            fetch_busy * 100.0,
            mf_busy * 100.0,
            dsync_busy * 100.0
        );
        results.push((label, n, ceil, fetch, mf, cpu, dsync));
    }

    // The no-change pass needs the small corpus synced first.
    let nochange = (only.is_none() || only.as_deref() == Some("small")).then(|| {
        eprintln!("initial pass for the 16 other users...");
        sync_all(&rt, &engine, &idle);
        let all20: Vec<String> = small.iter().chain(&idle).cloned().collect();
        sync_all(&rt, &engine, &all20)
    });

    println!();
    println!("mailferry sync benchmark (legacy Dovecot maildir -> new Dovecot sdbox, 4 users in parallel)");
    println!(
        "{:<16} {:>8} {:>18} {:>18} {:>18} {:>9} {:>9} {:>12}",
        "corpus",
        "msgs",
        "APPEND ceiling",
        "mailferry",
        "doveadm backup",
        "mf/ceil",
        "mf/dsync",
        "CPU/10k msgs"
    );
    for (label, n, ceil, fetch, mf, cpu, dsync) in &results {
        let d = dsync.as_ref();
        println!(
            "{:<16} {:>8} {:>8.0} m/s {:>5.1} MB/s {:>8.0} m/s {:>5.1} MB/s {:>8} {:>9.2} {:>9} {:>10.2} s",
            label,
            n,
            ceil.msgs,
            ceil.mb,
            mf.msgs,
            mf.mb,
            d.map_or("n/a".to_string(), |d| format!("{:.0} m/s {:.1} MB/s", d.msgs, d.mb)),
            mf.msgs / ceil.msgs,
            d.map_or("n/a".to_string(), |d| format!("{:.2}", mf.msgs / d.msgs)),
            cpu / *n as f64 * 10_000.0
        );
        println!(
            "{:<16} wall: APPEND ceiling {:.2} s, legacy FETCH ceiling {:.2} s, mailferry {:.2} s, doveadm {}",
            "",
            ceil.secs,
            fetch.secs,
            mf.secs,
            d.map_or("n/a".to_string(), |d| format!("{:.2} s", d.secs))
        );
        // Both Dovecots share this machine's cores: reading legacy and writing new cannot
        // fully overlap, so FETCH + APPEND time is the bound a copy can reach here.
        let bound = *n as f64 / (ceil.secs + fetch.secs);
        println!(
            "{:<16} FETCH ceiling {:.0} m/s {:.1} MB/s; serial FETCH+APPEND bound {:.0} m/s; mailferry/bound {:.2}",
            "",
            fetch.msgs,
            fetch.mb,
            bound,
            mf.msgs / bound
        );
    }
    if let Some((wall, cpu, appended)) = nochange {
        println!(
            "no-change pass over 20 users: {wall:.3} s wall, {cpu:.3} s CPU, {appended} APPENDs"
        );
    }
    println!("targets: mf/ceil >= 0.9, mf/dsync >= 0.75, CPU <= 2 s per 10k messages, no-change pass <= 0.5 s");
}
