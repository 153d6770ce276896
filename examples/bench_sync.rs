//! Sync engine benchmark (not a test: nothing here asserts a time). In one run, on the same two
//! Dovecot instances (legacy maildir → new sdbox), for a small-message corpus and a
//! large-message corpus:
//! - the new backend's pipelined APPEND ceiling with 4 connections (measured here, each run),
//! - mailferry's sync of 4 users in parallel (messages/s, MB/s, CPU per 10,000 messages),
//! - `doveadm backup -R` with imapc between the same backends (4 users in parallel),
//!
//! and a no-change pass over 20 users. Prints the ratios against the targets of issue 4.
//!
//! `cargo run --release --example bench_sync [-- --quick] [--only small|large] [--rounds N] [--pin]`
//!
//! `--pin` puts legacy and the copier on CPU 0 and new on CPU 1, as if new were its own host;
//! by default all three share every core.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use mailferry::config::Config;
use mailferry::sync::Engine;
use support::corpus::{self, Corpus, Spec};
use support::dovecot::{Backends, Dovecot, Flavor, MASTER_PASSWORD, MASTER_USER};

const PW: &str = "benchpw";

/// CPU seconds of process `pid` from /proc: user + system, with `children` also those of its
/// reaped children (a Dovecot master's dead imap processes, our finished doveadm runs).
fn proc_cpu(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime, stime, cutime, cstime are
    // the 14th to 17th of the line, 12th to 15th after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let own = ticks(11) + ticks(12);
    let reaped = if children { ticks(13) + ticks(14) } else { 0.0 };
    (own + reaped) / 100.0
}

fn cpu_seconds() -> f64 {
    proc_cpu("self", false)
}

/// Minor page faults of this process so far: fresh buffers cost one per 4 KiB touched.
fn page_faults() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // minflt is the 10th field of the line, the 8th after the command name.
    rest.split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn backend_cpu(d: &Dovecot) -> f64 {
    d.processes()
        .iter()
        .map(|p| proc_cpu(&p.to_string(), true))
        .sum()
}

/// Machine-wide (busy, total) CPU ticks from /proc/stat.
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

/// Where a phase's CPU went: both Dovecots, this process (the loader, the reader, or
/// mailferry's engine), doveadm (reaped children), and the machine as a whole.
#[derive(Clone, Copy, Default)]
struct Usage {
    legacy: f64,
    new: f64,
    own: f64,
    children: f64,
    /// Minor page faults of this process.
    faults: f64,
    /// Machine CPU busy, 0..=1 of all cores.
    busy: f64,
}

fn usage_now(b: &Backends) -> (Usage, (u64, u64)) {
    (
        Usage {
            legacy: backend_cpu(&b.legacy),
            new: backend_cpu(&b.new),
            own: cpu_seconds(),
            children: proc_cpu("self", true) - cpu_seconds(),
            faults: page_faults(),
            busy: 0.0,
        },
        machine_ticks(),
    )
}

/// Fills and frees `bytes` of memory, just before a phase is measured. This VM hands memory
/// that stayed free for a while back to its host (virtio-balloon free page reporting), and
/// touching such a page again is slow: the first phases of a round wrote into what the round's
/// cleanup had just freed, the later ones into pages handed back meanwhile, and new's system
/// time in them was up to twice the ceiling's. Freed right before each phase, the pages are on
/// the kernel's free lists for whichever phase writes next, alike for all.
fn warm_memory(bytes: usize) {
    let pages = vec![1u8; bytes];
    std::hint::black_box(&pages);
}

/// Runs `f` and returns its result with the CPU each party used meanwhile. Dirty pages of
/// earlier phases are written out first, so one phase's writeback does not load the next, and
/// `warm` bytes of memory are made warm for it ([`warm_memory`]).
fn measured<T>(b: &Backends, warm: usize, f: impl FnOnce() -> T) -> (T, Usage) {
    let _ = Command::new("sync").status();
    warm_memory(warm);
    let (u0, (b0, t0)) = usage_now(b);
    let r = f();
    let (u1, (b1, t1)) = usage_now(b);
    let u = Usage {
        legacy: u1.legacy - u0.legacy,
        new: u1.new - u0.new,
        own: u1.own - u0.own,
        children: u1.children - u0.children,
        faults: u1.faults - u0.faults,
        busy: (b1 - b0) as f64 / (t1 - t0).max(1) as f64,
    };
    (r, u)
}

/// One round's figures for one corpus: each phase's rate and where its CPU went.
struct Round {
    ceil: (Rate, Usage),
    multi: (Rate, Usage),
    fetch: (Rate, Usage),
    relay: (Rate, Usage),
    mf: (Rate, Usage),
    /// mailferry's own CPU seconds during its pass.
    mf_cpu: f64,
    dsync: Option<(Rate, Usage)>,
}

/// New's users that receive the other copies of one corpus.
struct Targets {
    append: Vec<String>,
    multi: Vec<String>,
    relay: Vec<String>,
    dsync: Vec<String>,
}

impl Targets {
    fn all(&self) -> impl Iterator<Item = &String> {
        self.append
            .iter()
            .chain(&self.multi)
            .chain(&self.relay)
            .chain(&self.dsync)
    }
}

struct CorpusResults {
    label: &'static str,
    n: usize,
    bytes: u64,
    rounds: Vec<Round>,
}

impl CorpusResults {
    /// Median over the rounds of `f`, rounds where it is `None` left out.
    fn median_of(&self, f: impl Fn(&Round) -> Option<f64>) -> Option<f64> {
        let mut v: Vec<f64> = self.rounds.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => None,
            n if n % 2 == 1 => Some(v[n / 2]),
            n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    /// Median over the rounds of `f` (NaN if no round has it).
    fn median(&self, f: impl Fn(&Round) -> Option<f64>) -> f64 {
        self.median_of(f).unwrap_or(f64::NAN)
    }
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

/// Logs in to `d` as `user` (master user) on a plain connection; returns the buffered reader
/// and the writing half.
fn login_raw(d: &Dovecot, user: &str) -> (BufReader<TcpStream>, TcpStream) {
    let stream = TcpStream::connect(d.imap).expect("connect");
    stream.set_nodelay(true).ok();
    let mut r = BufReader::with_capacity(256 * 1024, stream.try_clone().expect("clone"));
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    let mut w = stream;
    w.write_all(format!("l LOGIN \"{user}*{MASTER_USER}\" \"{MASTER_PASSWORD}\"\r\n").as_bytes())
        .expect("login");
    loop {
        line.clear();
        r.read_line(&mut line).expect("login reply");
        if line.starts_with("l ") {
            assert!(line.starts_with("l OK"), "login {user}: {line}");
            return (r, w);
        }
    }
}

/// Reads replies until `total` tagged APPEND replies (tags `a…`) have come, asserting each is OK.
fn await_appends(mut r: BufReader<TcpStream>, total: usize, what: &str) {
    let mut done = 0;
    let mut line = String::new();
    while done < total {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if line.starts_with('a') {
            assert!(line.contains(" OK"), "{what} APPEND: {line}");
            done += 1;
        }
    }
}

/// APPEND ceiling: 4 connections, each fully pipelined (LITERAL+): a writer thread sends every
/// command without waiting, a reader thread consumes the replies; TCP flow control is the
/// window. `batch` messages (at most 8 MB) per command: 1 is plain APPEND, more is MULTIAPPEND
/// (RFC 3502), which Dovecot commits once per command.
fn ceiling(new: &Dovecot, users: &[String], corpora: &[Corpus], batch: usize) -> Rate {
    let start = Instant::now();
    std::thread::scope(|s| {
        for (u, c) in users.iter().zip(corpora) {
            s.spawn(move || {
                let (r, mut w) = login_raw(new, u);
                let mut commands: Vec<&[corpus::Message]> = Vec::new();
                let mut rest = &c.messages[..];
                while !rest.is_empty() {
                    let mut take = 1;
                    let mut bytes = rest[0].body.len();
                    while take < batch.min(rest.len())
                        && bytes + rest[take].body.len() <= 8 * 1024 * 1024
                    {
                        bytes += rest[take].body.len();
                        take += 1;
                    }
                    let (now, later) = rest.split_at(take);
                    commands.push(now);
                    rest = later;
                }
                let total = commands.len();
                let reader = std::thread::spawn(move || await_appends(r, total, "ceiling"));
                let mut out = std::io::BufWriter::with_capacity(256 * 1024, &mut w);
                for (i, msgs) in commands.iter().enumerate() {
                    write!(out, "a{i} APPEND INBOX").expect("write");
                    for m in *msgs {
                        write!(
                            out,
                            " ({}) \"{}\" {{{}+}}\r\n",
                            m.flags.join(" "),
                            m.date,
                            m.body.len()
                        )
                        .expect("write");
                        out.write_all(&m.body).expect("write");
                    }
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

/// The text of `item (...)` or `item "..."` in a FETCH line (Dovecot's layout; bench only).
fn fetch_item<'a>(line: &'a str, item: &str, open: char, close: char) -> &'a str {
    line.find(&format!("{item} {open}"))
        .map(|i| &line[i + item.len() + 2..])
        .and_then(|rest| rest.find(close).map(|j| &rest[..j]))
        .unwrap_or("")
}

/// A bare copier, the fastest IMAP-to-IMAP copy we can write: per user, one legacy connection
/// streams `UID FETCH 1:*` and every literal goes straight on as a pipelined APPEND (LITERAL+)
/// on one new connection, through a 256 KiB buffer, with no hashing, no state, no batching
/// and no parsing beyond the FETCH line. What any IMAP copier pays on these cores.
fn bare_relay(b: &Backends, pairs: &[(String, String)], corpora: &[Corpus]) -> Rate {
    let start = Instant::now();
    std::thread::scope(|s| {
        for ((src, dst), c) in pairs.iter().zip(corpora) {
            s.spawn(move || {
                let (mut lr, mut lw) = login_raw(&b.legacy, src);
                let (nr, mut nw) = login_raw(&b.new, dst);
                let total = c.messages.len();
                let reader = std::thread::spawn(move || await_appends(nr, total, "relay"));
                let mut out = std::io::BufWriter::with_capacity(256 * 1024, &mut nw);
                let mut i = 0;
                each_literal(&mut lr, &mut lw, "UID FLAGS INTERNALDATE", |line, n, lr| {
                    let text = String::from_utf8_lossy(line);
                    let flags: Vec<&str> = fetch_item(&text, "FLAGS", '(', ')')
                        .split(' ')
                        .filter(|f| !f.is_empty() && !f.eq_ignore_ascii_case("\\Recent"))
                        .collect();
                    let date = fetch_item(&text, "INTERNALDATE", '"', '"');
                    write!(
                        out,
                        "a{i} APPEND INBOX ({}) \"{date}\" {{{n}+}}\r\n",
                        flags.join(" ")
                    )
                    .expect("write");
                    i += 1;
                    std::io::copy(&mut lr.take(n), &mut out).expect("relay literal");
                    out.write_all(b"\r\n").expect("write");
                });
                out.flush().expect("flush");
                drop(out);
                reader.join().expect("reader");
                let _ = lw.write_all(b"z LOGOUT\r\n");
                let _ = nw.write_all(b"z LOGOUT\r\n");
            });
        }
    });
    let n: usize = corpora.iter().map(|c| c.messages.len()).sum();
    let bytes: u64 = corpora.iter().map(Corpus::bytes).sum();
    Rate::new(n, bytes, start.elapsed().as_secs_f64())
}

/// Examines INBOX and streams `UID FETCH 1:* (<items> BODY.PEEK[])`: for each literal, hands
/// `literal` the FETCH line announcing it and its length; `literal` reads exactly those bytes.
fn each_literal(
    r: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    items: &str,
    mut literal: impl FnMut(&[u8], u64, &mut BufReader<TcpStream>),
) {
    let cmd = format!("e EXAMINE INBOX\r\nf UID FETCH 1:* ({items} BODY.PEEK[])\r\n");
    w.write_all(cmd.as_bytes()).expect("fetch");
    let mut line = Vec::new();
    loop {
        line.clear();
        r.read_until(b'\n', &mut line).expect("read");
        assert!(!line.is_empty(), "legacy closed during FETCH");
        if line.starts_with(b"f ") {
            assert!(line.starts_with(b"f OK"), "FETCH: {line:?}");
            return;
        }
        let announced = line.strip_suffix(b"\n").unwrap_or(&line);
        if let Some((n, _)) = mailferry::wire::framer::literal_at_end(announced) {
            literal(&line, n, r);
        }
    }
}
/// FETCH ceiling of legacy: 4 connections, each one `UID FETCH 1:*` of every message
/// (`BODY.PEEK[]`), literals drained without copying them anywhere, so the figure is the
/// backend's and not the reader's.
fn fetch_ceiling(legacy: &Dovecot, users: &[String], corpora: &[Corpus]) -> Rate {
    let start = Instant::now();
    std::thread::scope(|s| {
        for u in users {
            s.spawn(move || {
                let (mut r, mut w) = login_raw(legacy, u);
                each_literal(
                    &mut r,
                    &mut w,
                    "UID FLAGS INTERNALDATE RFC822.SIZE",
                    |_, n, r| {
                        std::io::copy(&mut r.take(n), &mut std::io::sink()).expect("literal");
                    },
                );
                let _ = w.write_all(b"z LOGOUT\r\n");
            });
        }
    });
    let n: usize = corpora.iter().map(|c| c.messages.len()).sum();
    let b: u64 = corpora.iter().map(Corpus::bytes).sum();
    Rate::new(n, b, start.elapsed().as_secs_f64())
}

/// `doveadm backup -R` from legacy (imapc, master user) into fresh users of new, in parallel.
/// With `pin`, doveadm runs on new's CPU: it writes new's storage itself, as on new's host.
fn doveadm_backup(
    b: &Backends,
    pairs: &[(String, String)],
    corpora: &[Corpus],
    pin: Option<&Pin>,
) -> Option<Rate> {
    let start = Instant::now();
    let ok = std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(src, dst)| {
                s.spawn(move || {
                    let mut cmd = match pin {
                        Some(p) => {
                            let mut c = Command::new("taskset");
                            c.args(["-c", &p.new.to_string(), "doveadm"]);
                            c
                        }
                        None => Command::new("doveadm"),
                    };
                    let out = cmd
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

/// `--pin`: one CPU for legacy and the copier (this process: loaders, relay, mailferry), one
/// for new, as if new were a host of its own. Unpinned, all three share every core.
struct Pin {
    legacy: usize,
    new: usize,
}

fn taskset(pid: u32, cpu: usize) {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("warning: taskset of {pid} to CPU {cpu} failed");
    }
}

impl Pin {
    fn apply(&self, b: &Backends) {
        for p in b.legacy.processes() {
            taskset(p, self.legacy);
        }
        // Children forked later (imap processes) inherit their master's CPU.
        for p in b.new.processes() {
            taskset(p, self.new);
        }
        taskset(std::process::id(), self.legacy);
    }
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

/// With `BENCH_PERF_CTL=<fifo>` (perf record -D -1 --control fifo:<fifo>), profiles only the
/// mailferry phase (of every round but the first, when there are several).
fn perf_control(cmd: &str) {
    if let Ok(fifo) = std::env::var("BENCH_PERF_CTL") {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open(fifo)
            .and_then(|mut f| f.write_all(format!("{cmd}\n").as_bytes()));
    }
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
                tokio::spawn(async move { e.pass(&u, None, false).await })
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
    let rounds_arg: Option<usize> = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());
    // A large round takes seconds and swings most on this kind of VM: more of them.
    let rounds_of = |large: bool| match (rounds_arg, quick, large) {
        (Some(n), _, _) => n,
        (None, true, _) => 1,
        (None, false, false) => 3,
        (None, false, true) => 7,
    };
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
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin =
        (args.iter().any(|a| a == "--pin") && cores >= 2).then_some(Pin { legacy: 0, new: 1 });
    if let Some(p) = &pin {
        p.apply(&b);
    }
    let names = |p: &str, n: usize| {
        (1..=n)
            .map(|i| format!("{p}{i}@bench.test"))
            .collect::<Vec<_>>()
    };
    let (small, large, idle) = (names("s", 4), names("l", 4), names("n", 16));
    // Fresh targets on new for the other copies of each corpus: APPEND and MULTIAPPEND
    // ceilings, the bare relay, doveadm.
    let targets = |c: char| Targets {
        append: names(&format!("c{c}"), 4),
        multi: names(&format!("m{c}"), 4),
        relay: names(&format!("r{c}"), 4),
        dsync: names(&format!("d{c}"), 4),
    };
    let (ts, tl) = (targets('s'), targets('l'));
    let legacy_users: Vec<String> = [&small, &large, &idle]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let new_users: Vec<String> = [&small, &large, &idle]
        .into_iter()
        .flatten()
        .chain(ts.all())
        .chain(tl.all())
        .cloned()
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| b.legacy.add_users(&legacy_users, PW));
        b.new.add_users(&new_users, PW);
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
    // Each round copies into empty targets with a fresh state store, so rounds are alike.
    let engine_on = |db: &str| {
        let mut cfg = config(&b, dir.path());
        cfg.state.url = format!("sqlite://{}", dir.path().join(db).display());
        let (store, routes) = rt
            .block_on(mailferry::server::open_directory(
                &cfg,
                mailferry::store::Open::CreateIfMissing,
            ))
            .unwrap();
        Arc::new(Engine::from_config(&cfg, store, routes).unwrap())
    };

    let mut results: Vec<CorpusResults> = Vec::new();
    // The state of the small corpus's last round, which the no-change pass starts from.
    let mut small_state = None;
    for (key, label, users, t, corpora) in [
        ("small", "small (~5 KB)", &small, &ts, &small_c),
        ("large", "large (1-8 MB)", &large, &tl, &large_c),
    ] {
        if only.as_deref().is_some_and(|o| !key.starts_with(o)) {
            continue;
        }
        let n: usize = corpora.iter().map(|c| c.messages.len()).sum();
        let bytes: u64 = corpora.iter().map(Corpus::bytes).sum();
        let pairs = |to: &[String]| -> Vec<(String, String)> {
            users.iter().cloned().zip(to.iter().cloned()).collect()
        };
        let rounds_n = rounds_of(key == "large");
        // What a phase writes into new's page cache, and then some for the buffers.
        let warm = 3 * bytes as usize + (256 << 20);
        let mut rounds = Vec::new();
        for round in 0..rounds_n {
            eprintln!(
                "{label}: {n} messages, {:.1} MB, 4 users, round {} of {rounds_n}",
                bytes as f64 / 1e6,
                round + 1
            );
            if round > 0 {
                for u in users.iter().chain(t.all()) {
                    let _ = std::fs::remove_dir_all(b.new.home(u));
                }
            }
            let db = format!("state-{key}-{round}.db");
            let e = engine_on(&db);
            let ceil = measured(&b, warm, || ceiling(&b.new, &t.append, corpora, 1));
            let multi = measured(&b, warm, || ceiling(&b.new, &t.multi, corpora, 64));
            let fetch = measured(&b, warm, || fetch_ceiling(&b.legacy, users, corpora));
            let relay = measured(&b, warm, || bare_relay(&b, &pairs(&t.relay), corpora));
            // Round 1 warms this VM's memory (first touch is slow here); profile the others.
            let profile = round > 0 || rounds_n == 1;
            if profile {
                perf_control("enable");
            }
            let ((secs, cpu, appended), mf_u) = measured(&b, warm, || sync_all(&rt, &e, users));
            if profile {
                perf_control("disable");
            }
            if appended as usize != n {
                eprintln!("warning: mailferry appended {appended} of {n}");
            }
            let (dsync, dsync_u) = measured(&b, warm, || {
                doveadm_backup(&b, &pairs(&t.dsync), corpora, pin.as_ref())
            });
            let mf_rate = Rate::new(n, bytes, secs);
            eprintln!(
                "  round {}: MB/s ceiling {:.0}, relay {:.0}, mailferry {:.0} (engine CPU {:.2} s, \
                 faults {:.0}; new CPU {:.2} s vs {:.2} s in the ceiling)",
                round + 1,
                ceil.0.mb,
                relay.0.mb,
                mf_rate.mb,
                cpu,
                mf_u.faults,
                mf_u.new,
                ceil.1.new
            );
            rounds.push(Round {
                ceil,
                multi,
                fetch,
                relay,
                mf: (mf_rate, mf_u),
                mf_cpu: cpu,
                dsync: dsync.map(|d| (d, dsync_u)),
            });
            if key == "small" {
                small_state = Some(db);
            }
        }
        results.push(CorpusResults {
            label,
            n,
            bytes,
            rounds,
        });
    }

    // The no-change pass needs the small corpus synced first (by its last round's engine).
    let nochange = small_state.map(|db| {
        let engine = engine_on(&db);
        eprintln!("initial pass for the 16 other users...");
        sync_all(&rt, &engine, &idle);
        let all20: Vec<String> = small.iter().chain(&idle).cloned().collect();
        sync_all(&rt, &engine, &all20)
    });

    println!();
    println!(
        "mailferry sync benchmark: legacy Dovecot maildir -> new Dovecot sdbox, 4 users in \
         parallel, medians of each corpus's rounds; {}",
        match &pin {
            Some(p) => format!(
                "pinned: legacy and the copier on CPU {}, new on CPU {} (new as its own host)",
                p.legacy, p.new
            ),
            None => format!("{cores} cores shared by both Dovecots and the copier"),
        }
    );
    println!(
        "(CPU seconds by party; client = this process: the loader, reader or relay, or \
         mailferry's engine; doveadm's own for doveadm)"
    );
    println!(
        "{:<16} {:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>8}",
        "corpus", "phase", "wall s", "legacy", "new", "client", "faults", "busy", "MB/s", "msg/s"
    );
    type Phase = fn(&Round) -> Option<&(Rate, Usage)>;
    let phases: [(&str, Phase); 6] = [
        ("APPEND ceiling", |x| Some(&x.ceil)),
        ("MULTIAPPEND ceiling", |x| Some(&x.multi)),
        ("FETCH ceiling", |x| Some(&x.fetch)),
        ("bare relay", |x| Some(&x.relay)),
        ("mailferry", |x| Some(&x.mf)),
        ("doveadm backup", |x| x.dsync.as_ref()),
    ];
    for r in &results {
        for (name, phase) in phases {
            if r.rounds.iter().all(|x| phase(x).is_none()) {
                continue;
            }
            let m = |f: fn(&(Rate, Usage)) -> f64| r.median(|x| phase(x).map(f));
            println!(
                "{:<16} {:<20} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.0} {:>5.0}% {:>9.1} {:>8.0}",
                r.label,
                name,
                m(|p| p.0.secs),
                m(|p| p.1.legacy),
                m(|p| p.1.new),
                m(|p| p.1.own + p.1.children),
                m(|p| p.1.faults),
                m(|p| p.1.busy) * 100.0,
                m(|p| p.0.mb),
                m(|p| p.0.msgs),
            );
        }
    }
    println!();
    println!("ratios of mailferry's rate (median of per-round ratios; each round in brackets):");
    for r in &results {
        let ratio = |other: Phase| {
            let med = r.median_of(|x| other(x).map(|o| x.mf.0.msgs / o.0.msgs));
            let each: Vec<String> = r
                .rounds
                .iter()
                .filter_map(|x| other(x).map(|o| format!("{:.2}", x.mf.0.msgs / o.0.msgs)))
                .collect();
            med.map_or("n/a".to_string(), |m| {
                format!("{m:.2} [{}]", each.join(" "))
            })
        };
        println!(
            "{:<16} vs APPEND ceiling {} (target >= 0.9); vs MULTIAPPEND ceiling {}; vs bare \
             relay {}; vs doveadm backup {} (target >= 0.75)",
            r.label,
            ratio(|x| Some(&x.ceil)),
            ratio(|x| Some(&x.multi)),
            ratio(|x| Some(&x.relay)),
            ratio(|x| x.dsync.as_ref()),
        );
        let own = r.median(|x| Some(x.mf.1.own));
        println!(
            "{:<16} mailferry CPU {:.2} s per 10,000 messages, {:.2} s per GB (target <= 2 s \
             per 10,000 small messages)",
            "",
            r.median(|x| Some(x.mf_cpu)) / r.n as f64 * 10_000.0,
            own / (r.bytes as f64 / 1e9)
        );
        // Legacy's work to serve the corpus and new's to store it bound any copier, however
        // cheap: on shared cores their sum, pinned the larger of the two.
        let mb = r.bytes as f64 / 1e6;
        let serve = r.median(|x| Some(x.fetch.1.legacy));
        let store = r.median(|x| Some(x.ceil.1.new.min(x.multi.1.new)));
        let wall = r.median(|x| Some(x.fetch.0.secs.max(x.ceil.0.secs.min(x.multi.0.secs))));
        let busy_secs = match pin {
            Some(_) => serve.max(store),
            None => (serve + store) / cores as f64,
        };
        let bound = mb / busy_secs.max(wall);
        println!(
            "{:<16} legacy needs {serve:.2} s CPU to serve it and new {store:.2} s to store it: \
             a copier costing nothing could reach {bound:.1} MB/s here",
            "",
        );
    }
    if let Some((wall, cpu, appended)) = nochange {
        println!(
            "no-change pass over 20 users: {wall:.3} s wall, {cpu:.3} s CPU, {appended} APPENDs"
        );
    }
    println!(
        "targets: mf/ceil >= 0.9, mf/dsync >= 0.75, CPU <= 2 s per 10k messages, no-change pass <= 0.5 s"
    );
}
