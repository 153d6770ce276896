//! The rollback's reverse delta (`Engine::reverse_pass`) against real Dovecot on both sides
//! (legacy maildir `.` → new sdbox `/`), the engine driven in-process: after a forward sync,
//! what happened on new while the user was there comes back to legacy exactly once, and the
//! forward sync finds nothing more to do.

mod support;

use std::path::Path;
use std::sync::Arc;

use mailferry::config::Config;
use mailferry::store::{Open, StateStore};
use mailferry::sync::reverse::ReverseReport;
use mailferry::sync::verify::parse_internaldate;
use mailferry::sync::{content_hash, Engine, PassReport};
use support::corpus::{Message, Session};
use support::deadline::within;
use support::{Backends, Dovecot, MASTER_PASSWORD, MASTER_USER};

const USER: &str = "alice@example.org";

/// Two backends, a config and a state store pointing at them, and an engine run in-process.
struct Env {
    backends: Backends,
    rt: tokio::runtime::Runtime,
    engine: Engine,
    store: Arc<dyn StateStore>,
    _dir: tempfile::TempDir,
}

fn backend_toml(name: &str, d: &Dovecot, secret: &Path) -> String {
    format!(
        "[backends.{name}]\nimap = \"{}\"\nimap_tls = \"none\"\n\
         master_user = \"{MASTER_USER}\"\nmaster_password_file = \"{}\"\n\n",
        d.imap,
        secret.display()
    )
}

impl Env {
    /// Both backends, new's INBOX emptied of the harness's marker so both sides can agree.
    fn new() -> Env {
        Env::with_legacy_conf("")
    }

    /// As `new`, with `legacy_conf` added to legacy's dovecot.conf.
    fn with_legacy_conf(legacy_conf: &str) -> Env {
        let backends = Backends::start_with(legacy_conf, "");
        let out = backends
            .new
            .doveadm(&["expunge", "-u", USER, "mailbox", "INBOX", "all"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("master.secret");
        std::fs::write(&secret, format!("{MASTER_PASSWORD}\n")).unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let mut text = format!(
            "[admin]\ntoken_file = \"{}\"\n\n[state]\nurl = \"{url}\"\n\n",
            secret.display()
        );
        text.push_str(&backend_toml("legacy", &backends.legacy, &secret));
        text.push_str(&backend_toml("new", &backends.new, &secret));
        let config = dir.path().join("mailferry.toml");
        std::fs::write(&config, text).unwrap();
        support::mailferry::create_store(&url);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let cfg = Config::load(&config).expect("config");
        let (store, routes) = rt
            .block_on(mailferry::server::open_directory(&cfg, Open::Existing))
            .expect("store");
        let engine = Engine::from_config(&cfg, store.clone(), routes).expect("engine");
        Env {
            backends,
            rt,
            engine,
            store,
            _dir: dir,
        }
    }

    fn legacy(&self) -> &Dovecot {
        &self.backends.legacy
    }

    fn new_side(&self) -> &Dovecot {
        &self.backends.new
    }

    /// A forward pass legacy → new.
    fn forward(&self) -> PassReport {
        self.rt
            .block_on(self.engine.pass(USER, None, false))
            .expect("forward pass")
    }

    /// The rollback's reverse delta new → legacy.
    fn reverse(&self) -> ReverseReport {
        self.rt
            .block_on(self.engine.reverse_pass(USER))
            .expect("reverse pass")
    }
}

/// A message with a unique subject, to find it again on either side.
fn msg(subject: &str, flags: &[&str], date: &str) -> Message {
    Message {
        folder: vec!["INBOX".into()],
        body: format!(
            "From: someone@example.org\r\nTo: {USER}\r\nSubject: {subject}\r\n\
             Message-ID: <{subject}@example.org>\r\n\r\nBody of {subject}.\r\n"
        )
        .into_bytes(),
        flags: flags.iter().map(|f| f.to_string()).collect(),
        date: date.into(),
    }
}

const DATE: &str = "01-Feb-2024 10:00:00 +0000";

/// Appends `msgs` to `folder` of `d` as the user would.
fn put(d: &Dovecot, folder: &str, msgs: &[Message]) {
    let mut s = Session::open(d, USER);
    let items: Vec<(&str, &Message)> = msgs.iter().map(|m| (folder, m)).collect();
    s.append_all(&items);
    s.close();
}

/// One message as a backend shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    uid: u32,
    subject: String,
    /// Sorted, without `\Recent`.
    flags: Vec<String>,
    /// INTERNALDATE in seconds since the epoch.
    date: i64,
}

/// What `d` holds in `folder`, in UID order.
fn seen(d: &Dovecot, folder: &str) -> Vec<Seen> {
    let mut s = Session::open(d, USER);
    s.ok(&format!("EXAMINE \"{folder}\""));
    let r = s.ok("UID FETCH 1:* (UID FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])");
    s.close();
    let between = |l: &str, from: &str, to: char| -> String {
        let start = l.find(from).map(|i| i + from.len()).expect(from);
        l[start..].split(to).next().unwrap_or_default().to_owned()
    };
    let mut out: Vec<Seen> = r
        .lines
        .iter()
        .filter(|l| l.contains(" FETCH ("))
        .map(|l| {
            let mut flags: Vec<String> = between(l, "FLAGS (", ')')
                .split_whitespace()
                .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
                .map(str::to_owned)
                .collect();
            flags.sort();
            Seen {
                uid: between(l, "UID ", ' ').parse().expect("uid"),
                subject: between(l, "Subject: ", '\r'),
                flags,
                date: parse_internaldate(&between(l, "INTERNALDATE \"", '"')).expect("date"),
            }
        })
        .collect();
    out.sort_by_key(|m| m.uid);
    out
}

/// The messages of `folder` on `d` with `subject`.
fn with_subject(d: &Dovecot, folder: &str, subject: &str) -> Vec<Seen> {
    seen(d, folder)
        .into_iter()
        .filter(|m| m.subject == subject)
        .collect()
}

/// The subjects of `folder` on `d`, sorted.
fn subjects(d: &Dovecot, folder: &str) -> Vec<String> {
    let mut v: Vec<String> = seen(d, folder).into_iter().map(|m| m.subject).collect();
    v.sort();
    v
}

/// The UID of the one message with `subject` in the user's INBOX on `d`.
fn uid_of(d: &Dovecot, subject: &str) -> u32 {
    let found = with_subject(d, "INBOX", subject);
    assert_eq!(found.len(), 1, "{subject}: {found:?}");
    found[0].uid
}

/// Runs commands in the user's INBOX on `d` (SELECTed, read-write).
fn in_inbox(d: &Dovecot, cmds: &[String]) {
    let mut s = Session::open(d, USER);
    s.ok("SELECT INBOX");
    for c in cmds {
        s.ok(c);
    }
    s.close();
}

fn sorted(flags: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    v.sort();
    v
}

fn nothing_done(r: &ReverseReport) -> bool {
    (
        r.appended,
        r.matched,
        r.flag_updates,
        r.expunged,
        r.folders_created,
    ) == (0, 0, 0, 0, 0)
}

#[test]
fn a_rollback_brings_back_what_happened_on_new_exactly_once() {
    within(180, || {
        let env = Env::new();
        let (legacy, new) = (env.legacy(), env.new_side());
        put(
            legacy,
            "INBOX",
            &[
                msg("keep", &["\\Seen"], DATE),
                msg("flag-me", &["\\Seen"], DATE),
                msg("expunge-me", &[], DATE),
                // Flagged \Deleted on legacy, never expunged: copied so, and left so on new.
                msg("deleted-kept", &["\\Deleted"], DATE),
            ],
        );
        assert_eq!(env.forward().appended, 5, "four and the legacy marker");

        // While the user is on new: mail arrives, a flag changes, a message is expunged.
        let arrivals = [
            msg(
                "arrival-1",
                &["\\Seen", "$Work"],
                "03-Mar-2023 08:15:00 +0100",
            ),
            msg(
                "arrival-2",
                &["\\Flagged", "\\Answered"],
                "15-Jul-2024 23:59:59 -0700",
            ),
            msg("arrival-3", &[], "01-Jan-2025 00:00:01 +0000"),
        ];
        put(new, "INBOX", &arrivals);
        let (flag_me, expunge_me) = (uid_of(new, "flag-me"), uid_of(new, "expunge-me"));
        in_inbox(
            new,
            &[
                format!("UID STORE {flag_me} FLAGS (\\Flagged $Billed)"),
                format!("UID STORE {expunge_me} +FLAGS.SILENT (\\Deleted)"),
                format!("UID EXPUNGE {expunge_me}"),
            ],
        );

        let r = env.reverse();
        assert_eq!(
            (r.appended, r.flag_updates, r.expunged, r.matched),
            (3, 1, 1, 0),
            "{r}"
        );
        assert!(r.warnings.is_empty(), "{r}");
        for a in &arrivals {
            let subject = a.subject();
            let on_legacy = with_subject(legacy, "INBOX", &subject);
            assert_eq!(
                on_legacy.len(),
                1,
                "{subject} once on legacy: {on_legacy:?}"
            );
            let flags: Vec<&str> = a.flags.iter().map(String::as_str).collect();
            assert_eq!(on_legacy[0].flags, sorted(&flags), "{subject}");
            assert_eq!(
                Some(on_legacy[0].date),
                parse_internaldate(&a.date),
                "{subject}"
            );
        }
        assert_eq!(
            with_subject(legacy, "INBOX", "flag-me")[0].flags,
            sorted(&["$Billed", "\\Flagged"])
        );
        let kept = with_subject(legacy, "INBOX", "deleted-kept");
        assert_eq!(
            kept.len(),
            1,
            "a \\Deleted message not expunged on new stays"
        );
        assert!(kept[0].flags.contains(&"\\Deleted".to_owned()));
        let expected = [
            "arrival-1",
            "arrival-2",
            "arrival-3",
            "deleted-kept",
            "flag-me",
            "keep",
            "legacy marker",
        ];
        assert_eq!(subjects(legacy, "INBOX"), expected, "only expunge-me went");

        // Once more: nothing left to do, nothing twice.
        let before = seen(legacy, "INBOX");
        let again = env.reverse();
        assert!(nothing_done(&again), "{again}");
        assert_eq!(seen(legacy, "INBOX"), before);

        // The forward sync knows every message on legacy: nothing to copy, nothing to expunge.
        let new_before = subjects(new, "INBOX");
        let fwd = env.forward();
        assert_eq!((fwd.appended, fwd.expunged), (0, 0), "{fwd:?}");
        assert_eq!(subjects(new, "INBOX"), new_before);
    });
}

#[test]
fn an_append_a_killed_pass_left_unrecorded_is_found_not_repeated() {
    within(180, || {
        let env = Env::new();
        let (legacy, new) = (env.legacy(), env.new_side());
        put(
            legacy,
            "INBOX",
            &[msg("a", &[], DATE), msg("b", &["\\Seen"], DATE)],
        );
        env.forward();
        let landed = msg("landed", &["\\Seen", "$Work"], "05-May-2024 05:05:05 +0000");
        let lost = msg("lost", &["\\Answered"], "06-May-2024 06:06:06 +0000");
        put(new, "INBOX", &[landed.clone(), lost.clone()]);
        // What a reverse pass killed mid-batch leaves: both intents recorded; legacy got the
        // first APPEND whole (its reply never read), the second never reached it.
        let intents = [
            (uid_of(new, "landed"), content_hash(&landed.body)),
            (uid_of(new, "lost"), content_hash(&lost.body)),
        ];
        env.rt
            .block_on(env.store.add_reverse_pending(USER, "INBOX", &intents))
            .expect("intents");
        put(legacy, "INBOX", std::slice::from_ref(&landed));
        // Legacy-only, flagged \Deleted, unknown to the map: never touched.
        put(legacy, "INBOX", &[msg("legacy-only", &["\\Deleted"], DATE)]);

        let r = env.reverse();
        assert_eq!((r.matched, r.appended, r.expunged), (1, 1, 0), "{r}");
        for subject in ["landed", "lost", "legacy-only", "a", "b"] {
            assert_eq!(with_subject(legacy, "INBOX", subject).len(), 1, "{subject}");
        }
        assert_eq!(
            with_subject(legacy, "INBOX", "lost")[0].flags,
            sorted(&["\\Answered"])
        );
        let left = env.rt.block_on(env.store.reverse_pending(USER, "INBOX"));
        assert_eq!(left.expect("intents").len(), 0, "every intent resolved");
        let map = env
            .rt
            .block_on(env.store.uid_map(USER, "INBOX"))
            .expect("map");
        for (t, _) in &intents {
            assert!(map.iter().any(|r| r.target_uid == Some(*t)), "{t} mapped");
        }

        let again = env.reverse();
        assert!(nothing_done(&again), "{again}");
        assert_eq!(with_subject(legacy, "INBOX", "landed").len(), 1);
    });
}

#[test]
fn folders_created_on_new_come_back_and_deleted_ones_stay_on_legacy() {
    within(180, || {
        let env = Env::new();
        let (legacy, new) = (env.legacy(), env.new_side());
        legacy.create_mailbox(USER, "Old");
        put(legacy, "Old", &[msg("old-1", &[], DATE)]);
        env.forward();
        let mut s = Session::open(new, USER);
        s.ok("DELETE \"Old\"");
        s.ok("CREATE \"Reports/2025\"");
        s.ok("SUBSCRIBE \"Reports/2025\"");
        s.close();
        put(
            new,
            "Reports/2025",
            &[
                msg("q1", &["\\Seen"], "31-Mar-2025 12:00:00 +0200"),
                msg("q2", &[], DATE),
            ],
        );

        let r = env.reverse();
        assert_eq!(r.folders_created, 1, "{r}");
        assert_eq!(r.appended, 2, "{r}");
        assert!(
            r.warnings
                .iter()
                .any(|w| w.starts_with("Old: deleted on new")),
            "{r}"
        );
        assert_eq!(subjects(legacy, "Reports.2025"), ["q1", "q2"]);
        assert_eq!(
            with_subject(legacy, "Reports.2025", "q1")[0].flags,
            ["\\Seen"]
        );
        assert_eq!(
            subjects(legacy, "Old"),
            ["old-1"],
            "nothing deleted on legacy"
        );
        let mut s = Session::open(legacy, USER);
        let lsub = s.ok("LSUB \"\" \"Reports*\"");
        s.close();
        assert!(
            lsub.lines.iter().any(|l| l.ends_with(" Reports.2025")),
            "subscribed as on new: {:?}",
            lsub.lines
        );

        let again = env.reverse();
        assert!(nothing_done(&again), "{again}");
        assert_eq!(subjects(legacy, "Reports.2025"), ["q1", "q2"]);
        // The forward sync knows the folder: no duplicates on new.
        env.forward();
        assert_eq!(subjects(new, "Reports/2025"), ["q1", "q2"]);
    });
}

#[test]
fn after_a_uidvalidity_change_on_new_arrivals_come_back_and_nothing_is_expunged() {
    within(180, || {
        let env = Env::new();
        let (legacy, new) = (env.legacy(), env.new_side());
        put(legacy, "INBOX", &[msg("a", &[], DATE), msg("b", &[], DATE)]);
        env.forward();
        put(new, "INBOX", &[msg("arrived", &["\\Flagged"], DATE)]);
        let b = uid_of(new, "b");
        in_inbox(
            new,
            &[
                format!("UID STORE {b} +FLAGS.SILENT (\\Deleted)"),
                format!("UID EXPUNGE {b}"),
            ],
        );
        let out = new.doveadm(&[
            "mailbox",
            "update",
            "-u",
            USER,
            "--uid-validity",
            "4242",
            "INBOX",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let r = env.reverse();
        assert_eq!((r.appended, r.expunged), (1, 0), "{r}");
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("UIDVALIDITY changed on new")),
            "{r}"
        );
        for subject in ["a", "b", "arrived"] {
            assert_eq!(with_subject(legacy, "INBOX", subject).len(), 1, "{subject}");
        }
        let again = env.reverse();
        assert_eq!((again.appended, again.expunged), (0, 0), "{again}");
        assert_eq!(with_subject(legacy, "INBOX", "arrived").len(), 1);
    });
}

/// What legacy advertises after login when it offers none of LITERAL+ (nor LITERAL-),
/// MULTIAPPEND and UIDPLUS: Dovecot's own list otherwise.
const PLAIN_APPEND_CAPS: &str = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT \
     SEARCHRES WITHIN ESEARCH LIST-STATUS BINARY MOVE NAMESPACE UNSELECT CHILDREN \
     LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESORT THREAD=REFERENCES SPECIAL-USE";

#[test]
fn a_legacy_without_literal_plus_or_uidplus_gets_each_arrival_once() {
    within(180, || {
        let env = Env::with_legacy_conf(&format!("imap_capability = {PLAIN_APPEND_CAPS}\n"));
        let (legacy, new) = (env.legacy(), env.new_side());
        put(legacy, "INBOX", &[msg("a", &[], DATE), msg("b", &[], DATE)]);
        env.forward();
        let arrivals = [
            msg("arrival-1", &["\\Seen"], "03-Mar-2023 08:15:00 +0100"),
            msg("arrival-2", &["$Work"], "04-Mar-2023 08:15:00 +0100"),
        ];
        put(new, "INBOX", &arrivals);
        let b = uid_of(new, "b");
        in_inbox(
            new,
            &[
                format!("UID STORE {b} +FLAGS.SILENT (\\Deleted)"),
                format!("UID EXPUNGE {b}"),
            ],
        );

        // One synchronizing APPEND at a time; no APPENDUID: recorded by content.
        let r = env.reverse();
        assert_eq!((r.appended, r.matched, r.expunged), (2, 0, 0), "{r}");
        assert!(
            r.warnings.iter().any(|w| w.contains("UIDPLUS")),
            "b is kept on legacy, and said so: {r}"
        );
        for subject in ["a", "b", "arrival-1", "arrival-2"] {
            assert_eq!(with_subject(legacy, "INBOX", subject).len(), 1, "{subject}");
        }
        let left = env.rt.block_on(env.store.reverse_pending(USER, "INBOX"));
        assert_eq!(left.expect("intents").len(), 0, "every APPEND recorded");

        let again = env.reverse();
        assert_eq!((again.appended, again.matched), (0, 0), "{again}");
        assert_eq!(env.forward().appended, 0);
    });
}

/// The subject a test message was made with.
trait Subject {
    fn subject(&self) -> String;
}

impl Subject for Message {
    fn subject(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let start = text.find("Subject: ").map_or(0, |i| i + 9);
        text[start..]
            .split('\r')
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}
