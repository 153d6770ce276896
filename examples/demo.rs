//! The README's demo: the migration an operator runs, live. Two real Dovecot backends and
//! `mailferry serve` in front of them; alice's mailbox on legacy, her mail client in IDLE
//! through the proxy and an MTA delivering to her over LMTP all along, while the operator runs
//! `user migrate`, follows the background sync and cuts her over with `user cutover --wait`.
//! Every step is checked; the demo ends with `demo OK` only when all of them held.
//!
//! Run through `scripts/demo.sh` (installs Dovecot, builds, then runs this). With `--no-wait`
//! it exits after the walk-through; without, everything stays up for you to try.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::client::Client;
use support::corpus::{self, Corpus, Spec};
use support::dovecot::{lmtp_deliver, LmtpOutcome};
use support::mailferry::{self as mf, Mailferry, Options};
use support::Backends;

const USER: &str = "alice@example.org";
const PASSWORD: &str = "alicepw";
/// How often the MTA has a new message for alice.
const MTA_EVERY: Duration = Duration::from_millis(200);
/// How long the MTA delivers to legacy before the cutover, and to new after it.
const MTA_STRETCH: Duration = Duration::from_millis(1500);
/// Retries of one deferred message before the MTA gives up (and the demo fails).
const MTA_MAX_RETRIES: usize = 150;
/// The longest a step may take (the background sync, a reconnection).
const STEP_LIMIT: Duration = Duration::from_secs(60);

fn main() {
    let wait = !std::env::args().any(|a| a == "--no-wait");
    let (backends, proxy) = start();
    let corpus = mailbox_on_legacy(&backends);
    let idle = idle_on_legacy(&proxy);
    migrate(&proxy, &corpus);
    let clock = Clock(Instant::now());
    println!("4. an MTA delivers to alice through the proxy's LMTP listener, a message every");
    println!(
        "   {} ms, retrying deferred (4xx) ones; her IDLE client sees them arrive",
        MTA_EVERY.as_millis()
    );
    println!(
        "   (times in seconds from here; `idle` is her client, `mta` the MTA, `cli` the operator;"
    );
    println!(
        "   when the cutover begins the MTA tries at once, so that a delivery always meets it):"
    );
    let mta = Mta::start(proxy.lmtp, clock);
    let reader = idle_reader(idle, proxy.imap, clock);
    thread::sleep(MTA_STRETCH);
    let before = mta.accepted();
    clock.say(
        "mta",
        format!("{before} accepted so far, stored on legacy (her route)"),
    );
    let mut client = cutover(&proxy, reader, &mta, clock);
    verify(&proxy, &mta);
    after_cutover(&backends, &mut client, &mta, clock);
    let log = mta.stop();
    exactly_once(&backends, &log);
    report(&proxy);
    println!();
    println!("demo OK");
    if wait {
        try_it(&proxy);
    }
}

/// Both backends and `mailferry serve` in front of them, its gate in `full` mode.
fn start() -> (Backends, Mailferry) {
    println!("Starting two Dovecot backends (legacy: maildir, '.'; new: sdbox, '/') ...");
    let backends = Backends::start();
    let (l, n) = (&backends.legacy, &backends.new);
    println!("  legacy IMAP {}  LMTP {}", l.imap, l.lmtp);
    println!("  new    IMAP {}  LMTP {}", n.imap, n.lmtp);
    let proxy = Mailferry::start(
        &backends,
        Options {
            allow_plaintext: true,
            // The cutover's verification gate compares every message, not only counts.
            extra: "[cutover]\nverify = \"full\"\n".into(),
            ..Options::default()
        },
    );
    println!("mailferry is serving:");
    println!(
        "  IMAP (STARTTLS) {}   IMAPS {}   LMTP {}   admin {}",
        proxy.imap, proxy.imaps, proxy.lmtp, proxy.admin
    );
    println!("  config: {}", proxy.config.display());
    println!("  (`$ mailferry ...` below is the real CLI, run as `mailferry -c CONFIG ...`)");
    println!();
    (backends, proxy)
}

/// A realistic mailbox for alice on legacy; new's INBOX emptied of the harness's marker, so
/// that all she has on new is what mailferry puts there.
fn mailbox_on_legacy(b: &Backends) -> Corpus {
    let out = b
        .new
        .doveadm(&["expunge", "-u", USER, "mailbox", "INBOX", "all"]);
    assert!(
        out.status.success(),
        "doveadm expunge on new: {}",
        text(&out)
    );
    let c = corpus::generate(&Spec {
        seed: 2026,
        messages: 300,
        large: 2,
        large_min: 256 * 1024,
        large_max: 1024 * 1024,
        ..Spec::default()
    });
    corpus::load(&b.legacy, USER, &c);
    let flagged = c.messages.iter().filter(|m| !m.flags.is_empty()).count();
    println!(
        "1. alice's mailbox on legacy: {} messages ({:.1} MB) in {} folders (nested, non-ASCII,",
        c.messages.len() + 1,
        c.bytes() as f64 / 1e6,
        c.folders.len()
    );
    println!("   special-use), {flagged} with flags or keywords, dates over 20 years; new's INBOX");
    println!("   emptied: all she will have on new is what mailferry copies or delivers there");
    c
}

/// Alice's mail client: logs in through the proxy (to legacy), selects INBOX, sits in IDLE.
fn idle_on_legacy(proxy: &Mailferry) -> Client {
    println!("2. alice's mail client logs in through the proxy (her route: legacy), selects INBOX");
    println!("   and sits in IDLE:");
    let mut c = Client::plain(proxy.imap);
    let ok = c.login(USER, PASSWORD);
    assert!(ok.starts_with("OK"), "alice's login: {ok}\n{}", proxy.log());
    println!("   LOGIN        {}", short(&ok));
    let (lines, ok) = c.cmd("SELECT INBOX");
    assert!(ok.starts_with("OK"), "SELECT INBOX: {ok}");
    let exists = lines.iter().find(|l| l.ends_with(" EXISTS"));
    println!("   SELECT INBOX {}", exists.map_or("?", String::as_str));
    c.send(b"i IDLE\r\n");
    let idling = c.line();
    assert!(idling.starts_with("+ "), "IDLE: {idling}");
    println!("   IDLE         {idling}");
    c
}

/// `OK [CAPABILITY ...] Logged in`: a tagged reply without its long capability list.
fn short(reply: &str) -> String {
    match (reply.starts_with("OK [CAPABILITY"), reply.find("] ")) {
        (true, Some(end)) => format!("OK [CAPABILITY ...]{}", &reply[end + 1..]),
        _ => reply.to_owned(),
    }
}

/// `user migrate`, then the background sync's progress from `user show --json` until the
/// initial pass has copied everything.
fn migrate(proxy: &Mailferry, corpus: &Corpus) {
    let total = corpus.messages.len() as u64 + 1; // and the harness's legacy marker
    println!("3. the operator starts the migration; the server's background sync copies her mail:");
    let out = run(proxy, &["user", "migrate", USER]);
    assert!(out.status.success(), "user migrate: {}", text(&out));
    let started = Instant::now();
    let mut printed: Option<(Instant, u64)> = None;
    loop {
        let v = show(proxy);
        let s = &v["sync"];
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        let copied = n("messages_copied");
        let done = n("passes") >= 1 && copied == total && n("messages_total") == total;
        let due = n("messages_total") > 0
            && printed.is_none_or(|(at, last)| last != copied && at.elapsed().as_millis() >= 600);
        if done || due {
            println!(
                "   {:>4.1}s  {copied}/{} messages, {:.2}/{:.2} MB copied, {} pass(es), state {}",
                started.elapsed().as_secs_f64(),
                n("messages_total"),
                n("bytes_copied") as f64 / 1e6,
                n("bytes_total") as f64 / 1e6,
                n("passes"),
                v["state"].as_str().unwrap_or("?")
            );
            printed = Some((Instant::now(), copied));
        }
        if done {
            assert_eq!(v["state"], "syncing", "{v}");
            assert!(s["last_error"].is_null(), "the sync failed: {v}");
            return;
        }
        assert!(
            started.elapsed() < STEP_LIMIT,
            "the sync did not finish: {v}\n{}",
            proxy.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// `user cutover --wait`, its output shown line by line as it comes, while the IDLE client
/// and the MTA go on; returns the client, reconnected.
fn cutover(proxy: &Mailferry, reader: JoinHandle<Reconnected>, mta: &Mta, clock: Clock) -> Client {
    println!("5. the operator cuts her over, with her client in IDLE and the MTA delivering:");
    clock.say("cli", format!("$ mailferry user cutover {USER} --wait"));
    mta.pause_at_next_deferral();
    let mut child = mf::command(&proxy.config, &["user", "cutover", USER, "--wait"])
        .env("MAILFERRY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mailferry user cutover");
    let stdout = child.stdout.take().expect("the CLI's stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read the CLI's output");
        clock.say("cli", &line);
        if line.ends_with(": cutover") {
            mta.try_now();
        }
    }
    let out = child
        .wait_with_output()
        .expect("wait for mailferry user cutover");
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        clock.say("cli", line);
    }
    clock.say(
        "cli",
        format!("exit status {}", out.status.code().unwrap_or(-1)),
    );
    assert!(out.status.success(), "user cutover failed\n{}", proxy.log());
    let r = match reader.join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    };
    assert!(r.bye.starts_with("* BYE [UNAVAILABLE]"), "{}", r.bye);
    let v = show(proxy);
    assert_eq!(
        (&v["state"], &v["route"]),
        (&"new".into(), &"new".into()),
        "{v}"
    );
    r.client
}

/// What the IDLE client's thread ends with.
struct Reconnected {
    /// The BYE it was kicked with.
    bye: String,
    /// The new session, INBOX selected.
    client: Client,
}

/// Alice's client on its own thread: prints what it receives until the BYE, then reconnects
/// by itself, as mail clients do, through the same proxy address.
fn idle_reader(mut c: Client, addr: SocketAddr, clock: Clock) -> JoinHandle<Reconnected> {
    thread::spawn(move || {
        let bye = loop {
            let Some(line) = c.try_line() else {
                panic!("alice's IDLE connection ended without a BYE");
            };
            if line.starts_with("* BYE") {
                break line;
            }
            // `* n RECENT` goes with every `* n EXISTS`: one line per delivery is enough.
            if !line.ends_with(" RECENT") {
                clock.say("idle", line);
            }
        };
        clock.say("idle", &bye);
        drop(c);
        clock.say("idle", "reconnects to the same address and logs in again");
        let (client, held) = reconnect(addr, clock);
        clock.say(
            "idle",
            format!(
                "LOGIN OK after {:.2}s (held until the cutover ended)",
                held.as_secs_f64()
            ),
        );
        Reconnected { bye, client }
    })
}

/// A new login, retried as a client would if the proxy refused it for now.
fn reconnect(addr: SocketAddr, clock: Clock) -> (Client, Duration) {
    let started = Instant::now();
    loop {
        let mut c = Client::plain(addr);
        let ok = c.login(USER, PASSWORD);
        if ok.starts_with("OK") {
            return (c, started.elapsed());
        }
        clock.say("idle", format!("LOGIN {ok}; again in 1 s"));
        assert!(
            started.elapsed() < STEP_LIMIT,
            "alice cannot log in again: {ok}"
        );
        thread::sleep(Duration::from_secs(1));
    }
}

/// `mailferry verify`, right after the cutover, with the MTA paused on its deferred mail.
fn verify(proxy: &Mailferry, mta: &Mta) {
    assert!(
        mta.deferrals() > 0 && mta.paused(),
        "no delivery met the cutover: the MTA was never deferred"
    );
    println!(
        "6. verify compares legacy and new message by message (folders, content hashes, flags,"
    );
    println!(
        "   keywords, dates, subscriptions). It runs now: the MTA holds its deferred message,"
    );
    println!(
        "   so new has exactly what was copied from legacy. From here on mail lands on new only,"
    );
    println!("   which legacy never sees, and verify would list it as differences.");
    let out = run(proxy, &["verify", USER]);
    assert!(
        out.status.success(),
        "verify found differences: {}",
        text(&out)
    );
}

/// The MTA goes on on new; a message saved on legacy behind mailferry's back stays unseen.
fn after_cutover(b: &Backends, client: &mut Client, mta: &Mta, clock: Clock) {
    println!("7. the MTA goes on, retrying what was deferred: alice's mail lands on new now");
    mta.resume();
    thread::sleep(MTA_STRETCH);
    b.legacy.save(USER, "INBOX", &message("only-on-legacy"));
    clock.say(
        "demo",
        "saved 'only-on-legacy' directly on legacy, behind mailferry's back",
    );
    let delivered: Vec<String> = mta.log().into_iter().map(|a| a.subject).collect();
    let subjects = client.inbox_subjects();
    assert!(
        !subjects.iter().any(|s| s == "only-on-legacy"),
        "alice's reconnected client is on legacy"
    );
    let missing: Vec<&String> = delivered.iter().filter(|s| !subjects.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "accepted but not in her INBOX: {missing:?}"
    );
    clock.say(
        "idle",
        format!(
            "INBOX: {} messages, all {} the MTA delivered, not 'only-on-legacy': she is on new",
            subjects.len(),
            delivered.len()
        ),
    );
}

/// Every accepted message is on new exactly once; those accepted after the cutover began never
/// went to legacy.
fn exactly_once(b: &Backends, log: &[Accepted]) {
    let on_new = b.new.messages(USER, "INBOX");
    let on_legacy = b.legacy.messages(USER, "INBOX");
    let copies = |msgs: &[Vec<u8>], subject: &str| {
        let needle = format!("Subject: {subject}\r\n");
        msgs.iter()
            .filter(|m| String::from_utf8_lossy(m).contains(&needle))
            .count()
    };
    for a in log {
        let n = copies(&on_new, &a.subject);
        assert_eq!(
            n, 1,
            "{} was accepted, so it must be on new exactly once",
            a.subject
        );
        if a.after_cutover {
            assert_eq!(
                copies(&on_legacy, &a.subject),
                0,
                "{} went to legacy",
                a.subject
            );
        }
    }
    let late = log.iter().filter(|a| a.after_cutover).count();
    let retried: Vec<&Accepted> = log.iter().filter(|a| a.deferrals > 0).collect();
    let deferrals: usize = retried.iter().map(|a| a.deferrals).sum();
    assert!(
        !retried.is_empty(),
        "no message was deferred, then accepted"
    );
    println!(
        "8. the MTA stopped: {} messages accepted, {} before the cutover (stored on legacy,",
        log.len(),
        log.len() - late
    );
    println!(
        "   copied by the sync) and {late} after it began (stored on new only); {} deferred by",
        retried.len()
    );
    println!("   the cutover ({deferrals} time(s) in all), then accepted on retry. Each accepted");
    println!("   message is on new exactly once.");
}

/// `user show` and `user events`, printed, and the state, route and gate evidence checked.
fn report(proxy: &Mailferry) {
    println!("9. what the operator sees afterwards:");
    let out = run(proxy, &["user", "show", USER]);
    assert!(out.status.success(), "user show: {}", text(&out));
    let v = show(proxy);
    assert_eq!(
        (&v["state"], &v["route"]),
        (&"new".into(), &"new".into()),
        "{v}"
    );
    let ev = &v["evidence"];
    assert_eq!(ev["mode"], "full", "{v}");
    assert_eq!(ev["differences"].as_array().map(Vec::len), Some(0), "{v}");
    let out = run(proxy, &["user", "events", USER]);
    assert!(out.status.success(), "user events: {}", text(&out));
    let out = proxy.cli(&["user", "events", USER, "--json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).expect("events json");
    let field = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or("?").to_owned();
    let trail: Vec<String> = events
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| [field(e, "to"), field(e, "actor"), field(e, "outcome")].join(" "))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        trail,
        ["syncing cli ok", "cutover cli ok", "new cli ok"],
        "the audit log"
    );
}

/// Runs the CLI, printing the command and its output.
fn run(proxy: &Mailferry, args: &[&str]) -> Output {
    println!("   $ mailferry {}", args.join(" "));
    let out = proxy.cli(args);
    for line in text(&out).lines() {
        println!("     {line}");
    }
    out
}

fn show(proxy: &Mailferry) -> serde_json::Value {
    let out = proxy.cli(&["user", "show", USER, "--json"]);
    assert!(out.status.success(), "user show: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("user show --json")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn message(subject: &str) -> Vec<u8> {
    format!(
        "From: mta@example.net\r\nTo: {USER}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@demo>\r\n\r\nbody of {subject}\r\n"
    )
    .into_bytes()
}

/// Seconds since the MTA started, for the lines of the live part.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn say(&self, who: &str, what: impl std::fmt::Display) {
        println!(
            "   {:>6.2}s {who:<4}  {what}",
            self.0.elapsed().as_secs_f64()
        );
    }
}

/// A message the MTA got accepted.
#[derive(Clone, Debug)]
struct Accepted {
    subject: String,
    /// Times it was deferred first.
    deferrals: usize,
    /// Accepted after a delivery met the cutover (so stored on new, never on legacy).
    after_cutover: bool,
}

/// What the MTA thread and the demo share.
#[derive(Default)]
struct MtaState {
    stop: AtomicBool,
    paused: AtomicBool,
    pause_at_deferral: AtomicBool,
    /// Try now rather than at the next tick.
    wake: AtomicBool,
    deferrals: AtomicUsize,
    accepted: Mutex<Vec<Accepted>>,
}

/// An MTA delivering to alice over LMTP on a thread of its own.
struct Mta {
    state: Arc<MtaState>,
    thread: JoinHandle<()>,
}

impl Mta {
    fn start(lmtp: SocketAddr, clock: Clock) -> Mta {
        let state = Arc::new(MtaState::default());
        let s = state.clone();
        let thread = thread::spawn(move || mta_loop(lmtp, &s, clock));
        Mta { state, thread }
    }

    fn log(&self) -> Vec<Accepted> {
        self.state
            .accepted
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    fn accepted(&self) -> usize {
        self.log().len()
    }

    fn deferrals(&self) -> usize {
        self.state.deferrals.load(Ordering::SeqCst)
    }

    fn paused(&self) -> bool {
        self.state.paused.load(Ordering::SeqCst)
    }

    /// The MTA pauses when it is next deferred, until `resume`.
    fn pause_at_next_deferral(&self) {
        self.state.pause_at_deferral.store(true, Ordering::SeqCst);
    }

    /// The MTA tries at once rather than at its next tick.
    fn try_now(&self) {
        self.state.wake.store(true, Ordering::SeqCst);
    }

    fn resume(&self) {
        self.state.paused.store(false, Ordering::SeqCst);
    }

    /// Stops taking new messages, delivers what is queued, and returns what was accepted.
    fn stop(self) -> Vec<Accepted> {
        self.state.stop.store(true, Ordering::SeqCst);
        self.resume();
        let Mta { state, thread } = self;
        if let Err(p) = thread.join() {
            std::panic::resume_unwind(p);
        }
        let log = state.accepted.lock().map(|l| l.clone());
        log.unwrap_or_default()
    }
}

/// A message in the MTA's queue.
struct Queued {
    subject: String,
    deferrals: usize,
}

fn mta_loop(lmtp: SocketAddr, s: &MtaState, clock: Clock) {
    let mut queue: Vec<Queued> = Vec::new();
    let mut n = 0;
    loop {
        let stopping = s.stop.load(Ordering::SeqCst);
        if stopping && queue.is_empty() {
            return;
        }
        if s.paused.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        if !stopping {
            n += 1;
            let subject = format!("mta-{n:04}");
            queue.push(Queued {
                subject,
                deferrals: 0,
            });
        }
        queue = deliver(lmtp, s, clock, queue);
        nap(s);
    }
}

/// Until the next tick, or until woken.
fn nap(s: &MtaState) {
    let until = Instant::now() + MTA_EVERY;
    while Instant::now() < until && !s.wake.swap(false, Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(5));
    }
}

/// One attempt for each queued message, in order; returns those still to deliver.
fn deliver(lmtp: SocketAddr, s: &MtaState, clock: Clock, queue: Vec<Queued>) -> Vec<Queued> {
    let mut left = Vec::new();
    for mut q in queue {
        if s.paused.load(Ordering::SeqCst) {
            left.push(q);
            continue;
        }
        let r = lmtp_deliver(lmtp, "mta@example.net", &[USER], &message(&q.subject));
        if r.all_delivered() {
            if q.deferrals > 0 {
                clock.say("mta", format!("{} accepted on retry", q.subject));
            }
            let after_cutover = s.deferrals.load(Ordering::SeqCst) > 0;
            let a = Accepted {
                subject: q.subject,
                deferrals: q.deferrals,
                after_cutover,
            };
            if let Ok(mut log) = s.accepted.lock() {
                log.push(a);
            }
            continue;
        }
        let Some(reply) = deferral(&r) else {
            panic!("{} refused for good: {r:?}", q.subject);
        };
        if q.deferrals == 0 {
            clock.say("mta", format!("{} deferred: {reply}", q.subject));
        }
        assert!(
            q.deferrals < MTA_MAX_RETRIES,
            "{} still deferred: {reply}",
            q.subject
        );
        q.deferrals += 1;
        if s.pause_at_deferral.swap(false, Ordering::SeqCst) {
            s.paused.store(true, Ordering::SeqCst);
            clock.say(
                "mta",
                "pauses, so that verify can run before more mail lands on new",
            );
        }
        s.deferrals.fetch_add(1, Ordering::SeqCst);
        left.push(q);
    }
    left
}

/// The first 4xx reply of a delivery, if it was deferred.
fn deferral(r: &LmtpOutcome) -> Option<&str> {
    r.rcpt_replies
        .iter()
        .chain(&r.data_replies)
        .find(|l| l.starts_with('4'))
        .map(String::as_str)
}

/// Everything stays up; how to look around.
fn try_it(proxy: &Mailferry) -> ! {
    let cli = format!("{} -c {}", mf::binary().display(), proxy.config.display());
    println!();
    println!(
        "Try it yourself (users alice/bob/carol/dave@example.org, passwords alicepw/bobpw/...):"
    );
    println!(
        "  openssl s_client -quiet -starttls imap -connect {}",
        proxy.imap
    );
    println!("  openssl s_client -quiet -connect {}", proxy.imaps);
    println!("    then: a LOGIN bob@example.org bobpw / b SELECT INBOX / c FETCH 1:* ENVELOPE");
    println!("  {cli} user migrate bob@example.org");
    println!("  {cli} user show bob@example.org");
    println!("  {cli} user cutover bob@example.org --wait");
    println!("    (bob has a message on new that did not come from legacy, the harness's 'new");
    println!("    marker': this demo's full gate counts it as a difference, the cutover fails and");
    println!("    leaves him on legacy; `user show` and `user events` say why)");
    println!("  {cli} user events alice@example.org");
    println!("  curl -s http://{}/metrics | grep mailferry_", proxy.admin);
    println!("Press Ctrl-C to stop everything.");
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}
