//! The sync engine against real Dovecot on both sides (legacy maildir `.` → new sdbox `/`),
//! driven through the real `mailferry` binary: `sync EMAIL --once` and `verify EMAIL`.

mod support;

use support::deadline::within;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::corpus::{self, Session, Spec};
use support::{Backends, Dovecot, MASTER_PASSWORD, MASTER_USER};

/// Two backends and a mailferry config (no server) pointing at them.
struct Env {
    backends: Backends,
    config: PathBuf,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

fn backend_toml(name: &str, d: &Dovecot, tls: &str, secret: &std::path::Path) -> String {
    let imap = if tls == "implicit" { d.imaps } else { d.imap };
    format!(
        "[backends.{name}]\nimap = \"{imap}\"\nimap_tls = \"{tls}\"\ntls_server_name = \"localhost\"\nca_file = \"{}\"\n\
         master_user = \"{MASTER_USER}\"\nmaster_password_file = \"{}\"\n\n",
        d.cert.cert_pem.display(),
        secret.display()
    )
}

impl Env {
    fn new(tls: &str, sync_toml: &str) -> Env {
        Env::with_new_conf(tls, sync_toml, "")
    }

    /// As `new`, with `new_conf` added to new's dovecot.conf.
    fn with_new_conf(tls: &str, sync_toml: &str, new_conf: &str) -> Env {
        let backends = Backends::start_with("", new_conf);
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("master.secret");
        std::fs::write(&secret, format!("{MASTER_PASSWORD}\n")).unwrap();
        let state = dir.path().join("state.db");
        let mut text = format!(
            "[admin]\ntoken_file = \"{}\"\n\n[state]\nurl = \"sqlite://{}\"\n\n",
            secret.display(),
            state.display()
        );
        text.push_str(&backend_toml("legacy", &backends.legacy, tls, &secret));
        text.push_str(&backend_toml("new", &backends.new, tls, &secret));
        text.push_str("[sync]\n");
        text.push_str(sync_toml);
        let config = dir.path().join("mailferry.toml");
        std::fs::write(&config, text).unwrap();
        support::mailferry::create_store(&format!("sqlite://{}", state.display()));
        Env {
            backends,
            config,
            state,
            _dir: dir,
        }
    }

    /// Turns the store back into schema version 2 (before `sync_uids.pending_at`), as an older
    /// mailferry left it.
    fn downgrade_store_to_version_2(&self) {
        let url = format!("sqlite://{}", self.state.display());
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            sqlx::any::install_default_drivers();
            let pool = sqlx::AnyPool::connect(&url).await.unwrap();
            for sql in [
                // Version 5.
                "ALTER TABLE events DROP COLUMN at_ms",
                "ALTER TABLE events DROP COLUMN actor",
                "ALTER TABLE events DROP COLUMN outcome",
                "DROP TABLE cutover_evidence",
                "DROP TABLE reverse_pending",
                "DROP INDEX users_wave",
                "DROP TABLE waves",
                // Versions 4 and 3.
                "ALTER TABLE sync_uids DROP COLUMN pending_at",
                "DROP TABLE sync_leases",
                "DROP TABLE sync_warnings",
                "DELETE FROM schema_version WHERE version >= 3",
            ] {
                sqlx::query(sql).execute(&pool).await.unwrap();
            }
            pool.close().await;
        });
    }

    /// Empties `user`'s new INBOX (the harness seeds a marker there) so that both sides can agree.
    fn fresh_target(&self, user: &str) {
        let out = self
            .backends
            .new
            .doveadm(&["expunge", "-u", user, "mailbox", "INBOX", "all"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn cli(&self, args: &[&str]) -> Output {
        support::mailferry::run_cli(&self.config, args, 120)
    }

    /// `sync EMAIL --once --json`, asserting exit 0; returns the report.
    fn sync(&self, user: &str) -> serde_json::Value {
        support::mailferry::sync_report(&self.cli(&["sync", user, "--once", "--json"]))
    }

    /// `sync EMAIL --once --force --json`, asserting exit 0; returns the report.
    fn sync_forced(&self, user: &str) -> serde_json::Value {
        support::mailferry::sync_report(&self.cli(&["sync", user, "--once", "--force", "--json"]))
    }

    /// A pass copies `c` (loaded on legacy) with nothing left to differ, and a second pass
    /// appends nothing; returns the second pass's report.
    fn copies_once(&self, user: &str, c: &corpus::Corpus) -> serde_json::Value {
        let first = self.sync(user);
        // The corpus plus the harness's legacy marker message.
        assert_eq!(
            n(&first, "appended"),
            c.messages.len() as u64 + 1,
            "{first}"
        );
        self.assert_same(user);
        let second = self.sync(user);
        assert_eq!(n(&second, "appended"), 0, "{second}");
        self.assert_same(user);
        second
    }

    /// `verify EMAIL`: asserts exit 0 ("same").
    fn assert_same(&self, user: &str) {
        let out = self.cli(&["verify", user]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "verify reports differences:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("no {k} in {v}"))
}

const USER: &str = "alice@example.org";

#[test]
fn one_pass_copies_the_corpus_and_a_second_pass_appends_nothing() {
    within(150, || {
        let env = Env::new("none", "");
        env.fresh_target(USER);
        let c = corpus::generate(&Spec::default());
        corpus::load(&env.backends.legacy, USER, &c);

        // Before any sync, verify reports a difference and exits 1.
        let out = env.cli(&["verify", USER]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("missing on new"));

        let second = env.copies_once(USER, &c);
        assert_eq!(n(&second, "folders_changed"), 0, "{second}");
        // Folder names arrived translated: "." → "/", modified UTF-7 kept, INBOX children.
        let folders = env.backends.new.mailboxes(USER);
        for want in [
            "Projekte/2024/Größe Ä",
            "INBOX/Rechnungen",
            "日本語",
            "Tom & Jerry",
        ] {
            assert!(
                folders.iter().any(|f| f == want),
                "{want} missing in {folders:?}"
            );
        }
    });
}

/// What new advertises after login when it offers none of LITERAL+ (nor LITERAL-),
/// MULTIAPPEND and UIDPLUS: Dovecot's own list otherwise.
const PLAIN_APPEND_CAPS: &str = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT \
     SEARCHRES WITHIN ESEARCH LIST-STATUS BINARY MOVE NAMESPACE UNSELECT CHILDREN \
     LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESORT THREAD=REFERENCES SPECIAL-USE";

/// A target without LITERAL+, MULTIAPPEND and UIDPLUS gets the same copy: one APPEND per
/// message, each literal sent after the server's continuation, each message found again by
/// its content hash; the second pass appends nothing.
#[test]
fn a_target_without_literal_plus_multiappend_or_uidplus_gets_the_same_copy() {
    within(150, || {
        let env = Env::with_new_conf(
            "none",
            "",
            &format!("imap_capability = {PLAIN_APPEND_CAPS}\n"),
        );
        env.fresh_target(USER);
        let caps = Session::open(&env.backends.new, USER)
            .ok("CAPABILITY")
            .lines;
        let caps: Vec<&str> = caps.iter().flat_map(|l| l.split_whitespace()).collect();
        assert!(caps.contains(&"IMAP4rev1"), "{caps:?}");
        for absent in ["LITERAL+", "LITERAL-", "MULTIAPPEND", "UIDPLUS"] {
            assert!(!caps.contains(&absent), "{absent} in {caps:?}");
        }
        let c = corpus::generate(&Spec {
            seed: 43,
            messages: 40,
            large: 2,
            ..Spec::default()
        });
        corpus::load(&env.backends.legacy, USER, &c);
        env.copies_once(USER, &c);
    });
}

#[test]
fn changes_on_legacy_are_reflected_by_the_next_pass() {
    within(150, || {
        let env = Env::new("none", "");
        env.fresh_target(USER);
        let c = corpus::generate(&Spec {
            seed: 7,
            messages: 40,
            large: 0,
            ..Spec::default()
        });
        corpus::load(&env.backends.legacy, USER, &c);
        env.sync(USER);
        env.assert_same(USER);

        let legacy = &env.backends.legacy;
        let mut s = Session::open(legacy, USER);
        s.ok("SELECT INBOX");
        // Flag and keyword changes, an expunge.
        s.ok("UID STORE 1:3 +FLAGS (\\Flagged projekt_y)");
        s.ok("UID STORE 4 -FLAGS (\\Seen \\Answered \\Flagged \\Draft)");
        s.ok("UID STORE 5 +FLAGS.SILENT (\\Deleted)");
        s.ok("UID EXPUNGE 5");
        // A folder renamed, with its child.
        s.ok("RENAME \"Projekte\" \"Projects\"");
        s.close();
        // New messages.
        let more = corpus::generate(&Spec {
            seed: 8,
            messages: 5,
            large: 0,
            folders: false,
            ..Spec::default()
        });
        corpus::load(legacy, USER, &more);
        // A UIDVALIDITY change (as after a maildir rebuild on the legacy server).
        let out = legacy.doveadm(&[
            "mailbox",
            "update",
            "-u",
            USER,
            "--uid-validity",
            "12345",
            "Archive",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let r = env.sync(USER);
        assert!(n(&r, "flag_updates") >= 4, "{r}");
        assert_eq!(n(&r, "expunged"), 1, "{r}");
        assert_eq!(n(&r, "appended"), 5, "{r}");
        assert_eq!(n(&r, "renamed"), 1, "{r}");
        env.assert_same(USER);
        let folders = env.backends.new.mailboxes(USER);
        assert!(folders.iter().any(|f| f == "Projects/2024"), "{folders:?}");
        assert!(
            !folders.iter().any(|f| f.starts_with("Projekte")),
            "{folders:?}"
        );
        assert_eq!(n(&env.sync(USER), "appended"), 0);
    });
}

/// Eight `sync --once` processes at once on one SQLite store, the way operators run imapsync
/// and dsync (`xargs -P`): every one succeeds (none fails on a lock) and every user verifies.
/// The store is one schema version behind, so all eight also start by upgrading it at once
/// (the race that failed them when they created a store together).
#[test]
fn eight_sync_processes_at_once_share_one_sqlite_store() {
    within(240, || {
        let env = Env::new("none", "");
        env.downgrade_store_to_version_2();
        let users: Vec<String> = (0..8).map(|i| format!("par{i}@example.org")).collect();
        env.backends.legacy.add_users(&users, "pw");
        env.backends.new.add_users(&users, "pw");
        for (i, u) in users.iter().enumerate() {
            let c = corpus::generate(&Spec {
                seed: 500 + i as u64,
                messages: 40,
                large: 0,
                ..Spec::default()
            });
            corpus::load(&env.backends.legacy, u, &c);
        }
        let children: Vec<_> = users
            .iter()
            .map(|u| {
                support::mailferry::command(&env.config, &["sync", u, "--once", "--quiet"])
                    .env("MAILFERRY_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        for (u, child) in users.iter().zip(children) {
            let out = child.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "{u}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for u in &users {
            env.assert_same(u);
        }
    });
}

#[test]
fn killed_passes_resume_without_duplicates() {
    within(170, || {
        // Short leases: a killed pass keeps its user's lease until it lapses.
        let env = Env::new("none", "lease_secs = 3\n");
        env.fresh_target(USER);
        let c = corpus::generate(&Spec {
            seed: 99,
            messages: 400,
            large: 3,
            large_min: 1024 * 1024,
            large_max: 3 * 1024 * 1024,
            folders: true,
            small_size: 4000,
        });
        corpus::load(&env.backends.legacy, USER, &c);
        // Kill at increasing progress: as soon as the UID map holds N rows (pending or done).
        let watcher = MapWatcher::new(&env.state);
        for threshold in [1, 60, 200, 350] {
            let mut child =
                support::mailferry::command(&env.config, &["sync", USER, "--once", "--quiet"])
                    .env("MAILFERRY_LOG", "info")
                    .stdout(Stdio::null())
                    .stderr(
                        std::fs::File::create(
                            env.state.with_extension(format!("kill{threshold}.log")),
                        )
                        .unwrap(),
                    )
                    .spawn()
                    .expect("spawn");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if watcher.rows() >= threshold || Instant::now() > deadline {
                    break;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
            if threshold == 1 {
                // The dead pass still holds the lease: no second pass may start yet.
                let out = env.cli(&["sync", USER, "--once", "--quiet"]);
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.code() == Some(1) && err.contains("pass in progress"),
                    "{err}"
                );
            }
            wait_for_lapsed_lease(&env);
        }
        eprintln!("before final: {}", watcher.dump());
        let r = env.sync(USER);
        eprintln!("after final: {}", watcher.dump());
        for t in [1, 60, 200, 350] {
            let log = std::fs::read_to_string(env.state.with_extension(format!("kill{t}.log")))
                .unwrap_or_default();
            eprintln!("--- pass killed at {t} rows ---\n{log}");
        }
        eprintln!("final pass: {r}");
        assert!(n(&r, "appended") > 0 || n(&r, "recovered") > 0, "{r}");
        env.assert_same(USER);
        assert_eq!(n(&env.sync(USER), "appended"), 0);
    });
}

/// Nothing reaches new whole before the state store records it as pending. With the store's
/// write lock held by another connection, the pass goes on fetching from legacy and sends its
/// APPEND commands (small bodies in one batch, large ones as they arrive) but the end of each,
/// so new stores nothing; once the lock is released it completes, and verify is clean.
#[test]
fn nothing_is_appended_before_its_intent_is_committed() {
    within(120, || {
        let env = Env::new("none", "");
        env.fresh_target(USER);
        let c = corpus::generate(&Spec {
            seed: 41,
            messages: 30,
            large: 2,
            folders: false,
            ..Spec::default()
        });
        corpus::load(&env.backends.legacy, USER, &c);
        let watcher = MapWatcher::new(&env.state);
        let mut lock = watcher
            .rt
            .block_on(watcher.store.pool().acquire())
            .expect("connection");
        let mut child =
            support::mailferry::command(&env.config, &["sync", USER, "--once", "--json"])
                .env("MAILFERRY_LOG", "warn,mailferry::sync::client=trace")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
        // The pass writes its lease first; the write lock is taken right after that (reads go
        // on meanwhile in WAL), while the pass logs in and lists folders, long before its
        // first intent.
        watcher.rt.block_on(async {
            loop {
                let (leases,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sync_leases")
                    .fetch_one(&mut *lock)
                    .await
                    .expect("leases");
                if leases > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        watcher
            .rt
            .block_on(sqlx::query("BEGIN IMMEDIATE").execute(&mut *lock))
            .expect("write lock");
        // The command timeline: wait for the FETCH of bodies (the second UID FETCH on legacy,
        // after the one listing sizes), i.e. the copy is under way while its intents wait.
        let stderr = child.stderr.take().expect("stderr");
        let (seen_tx, seen) = std::sync::mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = std::thread::spawn({
            let lines = lines.clone();
            move || {
                use std::io::BufRead;
                let mut fetches = 0;
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    if line.contains("UID FETCH") && line.contains("Legacy") {
                        fetches += 1;
                        if fetches == 2 {
                            let _ = seen_tx.send(());
                        }
                    }
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            }
        });
        seen.recv_timeout(Duration::from_secs(30))
            .expect("the pass never asked legacy for bodies");
        // Ample time for the bodies to be fetched and, were it allowed, appended.
        std::thread::sleep(Duration::from_millis(1500));
        let status = env
            .backends
            .new
            .doveadm(&["mailbox", "status", "-u", USER, "messages", "INBOX"]);
        let on_new = String::from_utf8_lossy(&status.stdout).trim().to_string();
        let appends_while_locked = lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| l.contains("APPEND") && l.contains("New"))
            .count();
        watcher
            .rt
            .block_on(sqlx::query("COMMIT").execute(&mut *lock))
            .expect("release");
        {
            // The connection goes back to its pool on the runtime.
            let _rt = watcher.rt.enter();
            drop(lock);
        }
        let out = child.wait_with_output().expect("sync");
        let _ = log.join();
        let log = lines.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
        assert!(
            on_new.split_whitespace().any(|w| w == "messages=0"),
            "appended before its intent was committed ({on_new})\n{log}"
        );
        // The commit overlaps the transfer: the commands went out while it waited.
        assert!(
            appends_while_locked > 0,
            "no APPEND went out before the intents were committed\n{log}"
        );
        assert!(out.status.success(), "sync failed: {log}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
        // The corpus plus the harness's legacy marker message.
        assert_eq!(n(&r, "appended"), c.messages.len() as u64 + 1, "{r}");
        env.assert_same(USER);
    });
}

#[test]
fn pending_rows_of_an_older_version_are_recovered_not_copied_again() {
    // A version that recorded SHA-256, killed after sending its last APPEND.
    pending_row_is_recovered_not_copied_again(mailferry::sync::sha256_hex);
}

#[test]
fn an_intent_whose_append_landed_is_recovered_not_copied_again() {
    // Killed after sending an APPEND whose pending row is a bare intent (no hash yet): the
    // hash comes from legacy.
    pending_row_is_recovered_not_copied_again(|_| String::new());
}

/// Leaves the state a killed pass leaves: the newest message is on new, its row pending with
/// the hash `recorded` gives; then checks that the next pass matches it instead of copying it.
fn pending_row_is_recovered_not_copied_again(recorded: fn(&[u8]) -> String) {
    within(120, move || {
        let (env, c, watcher, map) = synced_inbox(5, 12);
        let last = map
            .iter()
            .max_by_key(|r| r.source_uid)
            .expect("rows")
            .clone();
        let body = &c.messages.last().expect("messages").body;
        assert_eq!(
            last.size,
            body.len() as u64,
            "the newest row is the corpus's last message"
        );
        let old = mailferry::store::sync::UidRow {
            target_uid: None,
            hash: recorded(body),
            ..last
        };
        let source_uid = old.source_uid;
        watcher.add_pending("INBOX", old);
        // Unacknowledged, so the folder's copy had not got past it.
        watcher.set_last_uid("INBOX", source_uid - 1);
        // And one new message on legacy, so the folder has changed.
        load_one_more(&env, 6);

        let r = env.sync(USER);
        assert_eq!(n(&r, "recovered"), 1, "{r}");
        assert_eq!(n(&r, "appended"), 1, "{r}");
        // A duplicate would show as an extra message on new.
        env.assert_same(USER);
    });
}

#[test]
fn an_intent_for_a_message_gone_from_legacy_is_forgotten() {
    within(120, || {
        let (env, _, watcher, _) = synced_inbox(7, 5);
        // An intent for a UID legacy no longer holds (expunged before the rerun).
        let gone = mailferry::store::sync::UidRow::intent(4000, 100);
        watcher.add_pending("INBOX", gone);
        load_one_more(&env, 8);

        let r = env.sync(USER);
        assert_eq!(n(&r, "recovered"), 0, "{r}");
        assert_eq!(n(&r, "appended"), 1, "{r}");
        let map = watcher
            .rt
            .block_on(watcher.store.uid_map(USER, "INBOX"))
            .expect("uid map");
        assert!(map.iter().all(|r| r.source_uid != 4000), "intent kept");
        assert!(
            map.iter().all(|r| r.target_uid.is_some()),
            "rows left pending"
        );
        env.assert_same(USER);
    });
}

#[test]
fn a_forgotten_row_below_the_last_copied_uid_is_copied_again() {
    within(120, || {
        let (env, _, watcher, map) = synced_inbox(9, 8);
        // What a crash leaves when a later batch was confirmed before an earlier one (retried
        // one by one after a refused MULTIAPPEND) had landed: its row pending, its message
        // not on new, `last_uid` already past it.
        let row = map
            .iter()
            .find(|r| r.source_uid == 3)
            .expect("row 3")
            .clone();
        let target_uid = row.target_uid.expect("copied");
        let mut s = Session::open(&env.backends.new, USER);
        s.ok("SELECT INBOX");
        s.ok(&format!("UID STORE {target_uid} +FLAGS.SILENT (\\Deleted)"));
        s.ok(&format!("UID EXPUNGE {target_uid}"));
        drop(s);
        let pending = mailferry::store::sync::UidRow::intent(row.source_uid, row.size);
        watcher.add_pending("INBOX", pending);
        load_one_more(&env, 10);

        let r = env.sync(USER);
        assert_eq!(n(&r, "recovered"), 0, "{r}");
        assert_eq!(
            n(&r, "appended"),
            2,
            "the forgotten one and the new one: {r}"
        );
        env.assert_same(USER);
    });
}

/// A fresh user with `messages` generated messages in INBOX, synced once; with a watcher on
/// the state store and INBOX's UID map.
fn synced_inbox(
    seed: u64,
    messages: usize,
) -> (
    Env,
    corpus::Corpus,
    MapWatcher,
    Vec<mailferry::store::sync::UidRow>,
) {
    let env = Env::new("none", "");
    env.fresh_target(USER);
    let c = corpus::generate(&Spec {
        seed,
        messages,
        large: 0,
        folders: false,
        ..Spec::default()
    });
    corpus::load(&env.backends.legacy, USER, &c);
    env.sync(USER);
    let watcher = MapWatcher::new(&env.state);
    let map = watcher
        .rt
        .block_on(watcher.store.uid_map(USER, "INBOX"))
        .expect("uid map");
    (env, c, watcher, map)
}

/// Delivers one more generated message to legacy's INBOX, so the folder has changed.
fn load_one_more(env: &Env, seed: u64) {
    let more = corpus::generate(&Spec {
        seed,
        messages: 1,
        large: 0,
        folders: false,
        ..Spec::default()
    });
    corpus::load(&env.backends.legacy, USER, &more);
}

/// Counts rows of the UID map while a pass runs in another process (SQLite WAL allows it).
struct MapWatcher {
    rt: tokio::runtime::Runtime,
    store: mailferry::store::SqlStore,
}

impl MapWatcher {
    fn new(db: &std::path::Path) -> MapWatcher {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = rt
            .block_on(mailferry::store::SqlStore::open(
                &format!("sqlite://{}", db.display()),
                mailferry::store::Open::CreateIfMissing,
            ))
            .expect("open state");
        MapWatcher { rt, store }
    }

    fn dump(&self) -> String {
        let q = sqlx::query_as::<_, (String, i64, i64, i64, i64, i64)>(
            "SELECT f.source_name, f.last_uid, f.source_uidnext, f.source_messages, \
             (SELECT COUNT(*) FROM sync_uids u WHERE u.source_name = f.source_name), \
             (SELECT COUNT(*) FROM sync_uids u WHERE u.source_name = f.source_name AND u.target_uid IS NULL) \
             FROM sync_folders f",
        );
        format!("{:?}", self.rt.block_on(q.fetch_all(self.store.pool())))
    }

    fn rows(&self) -> u64 {
        let q = sqlx::query_as::<_, (i64,)>("SELECT COUNT(*) FROM sync_uids");
        self.rt
            .block_on(q.fetch_one(self.store.pool()))
            .map_or(0, |r| r.0 as u64)
    }

    /// Records `row` as pending in `folder`, as a killed pass leaves it.
    fn add_pending(&self, folder: &str, row: mailferry::store::sync::UidRow) {
        self.rt
            .block_on(self.store.add_pending(USER, folder, &[row]))
            .expect("add pending");
    }

    /// Moves the folder's last copied UID back, as a pass killed before confirming leaves it.
    fn set_last_uid(&self, folder: &str, uid: u32) {
        let mut st = self
            .rt
            .block_on(self.store.sync_folders(USER))
            .expect("folders")
            .into_iter()
            .find(|f| f.source_name == folder)
            .expect("folder state");
        st.last_uid = uid;
        self.rt
            .block_on(self.store.put_sync_folder(&st))
            .expect("put folder");
    }
}

#[test]
fn tls_modes_and_throttling() {
    within(150, || {
        // 400 KB/s with one connection per backend: the copy cannot be faster than the budget.
        let budget = 400 * 1024;
        let env = Env::new(
            "starttls",
            &format!("concurrency = 1\nper_backend = 1\nbytes_per_second = {budget}\n"),
        );
        env.fresh_target(USER);
        let c = corpus::generate(&Spec {
            seed: 3,
            messages: 30,
            large: 1,
            large_min: 600 * 1024,
            large_max: 700 * 1024,
            folders: false,
            small_size: 8000,
        });
        corpus::load(&env.backends.legacy, USER, &c);
        let start = Instant::now();
        let r = env.sync(USER);
        let took = start.elapsed().as_secs_f64();
        let bytes = n(&r, "appended_bytes") as f64;
        assert!(bytes > 1_000_000.0, "{r}");
        // The bucket allows a burst of a tenth of a second's budget.
        let rate = bytes / took;
        assert!(
            rate <= budget as f64 * 1.15,
            "measured {rate:.0} B/s over a budget of {budget} B/s"
        );
        env.assert_same(USER);
    });
}

#[test]
fn implicit_tls_and_folder_rules() {
    within(120, || {
        let env = Env::new(
            "implicit",
            "exclude = [\"^Tom & Jerry$\", \"^Listen(/|$)\"]\n[[sync.rename]]\nfrom = \"^Archive/(.*)$\"\nto = \"Archive/Old/$1\"\n",
        );
        env.fresh_target(USER);
        let c = corpus::generate(&Spec {
            seed: 5,
            messages: 30,
            large: 0,
            ..Spec::default()
        });
        corpus::load(&env.backends.legacy, USER, &c);
        env.sync(USER);
        env.assert_same(USER);
        let folders = env.backends.new.mailboxes(USER);
        assert!(
            folders.iter().any(|f| f == "Archive/Old/2019"),
            "{folders:?}"
        );
        assert!(
            !folders.iter().any(|f| f.starts_with("Listen")),
            "{folders:?}"
        );
    });
}

// --- The sync never destroys what it did not put there (DESIGN.md §5) ---

/// A message with a unique subject, to find it again on either side.
fn marked(subject: &str) -> corpus::Message {
    corpus::Message {
        folder: vec!["INBOX".into()],
        body: format!(
            "From: someone@example.org\r\nTo: {USER}\r\nSubject: {subject}\r\n\
             Message-ID: <{subject}@example.org>\r\n\r\nBody of {subject}.\r\n"
        )
        .into_bytes(),
        flags: vec![],
        date: "01-Feb-2024 10:00:00 +0000".into(),
    }
}

/// Appends `subjects` (as `marked` messages) to `folder` of `d`, creating it if asked.
fn put(d: &Dovecot, folder: &str, subjects: &[&str], create: bool) {
    let mut s = Session::open(d, USER);
    if create {
        s.ok(&format!("CREATE \"{folder}\""));
    }
    let msgs: Vec<corpus::Message> = subjects.iter().map(|s| marked(s)).collect();
    let items: Vec<(&str, &corpus::Message)> = msgs.iter().map(|m| (folder, m)).collect();
    s.append_all(&items);
    s.close();
}

/// Whether `d` holds a message with `subject` in `folder` of `USER`, and how many.
fn copies(d: &Dovecot, folder: &str, subject: &str) -> usize {
    let needle = format!("Subject: {subject}\r\n");
    d.messages(USER, folder)
        .iter()
        .filter(|m| m.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .count()
}

/// The UID map's view of a user: the warnings `user show` prints.
fn warnings(env: &Env) -> Vec<String> {
    let url = format!("sqlite://{}", env.state.display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = mailferry::store::open(&url, mailferry::store::Open::Existing)
            .await
            .unwrap();
        store.sync_progress(USER).await.unwrap().warnings
    })
}

/// Waits until no live lease on `USER` is left (a killed pass's lapses after `lease_secs`).
fn wait_for_lapsed_lease(env: &Env) {
    let url = format!("sqlite://{}", env.state.display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        loop {
            let live: Option<(i64,)> =
                sqlx::query_as("SELECT expires_at FROM sync_leases WHERE email = $1")
                    .bind(USER)
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            match live {
                Some((at,)) if at >= mailferry::store::now() => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                _ => break,
            }
        }
        pool.close().await;
    });
}

/// Runs SQL on the state store (to play another process holding a lease).
fn sql(env: &Env, stmt: &str) {
    let url = format!("sqlite://{}", env.state.display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(stmt.to_owned()))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
}

#[test]
fn a_folder_deleted_on_legacy_is_kept_on_new_while_it_holds_mail_the_sync_did_not_copy() {
    within(120, || {
        let env = Env::new("none", "");
        env.fresh_target(USER);
        let legacy = &env.backends.legacy;
        put(legacy, "Keep", &["keep-1", "keep-2"], true);
        put(legacy, "Drop", &["drop-1", "drop-2"], true);
        env.sync(USER);
        env.assert_same(USER);
        // Mail put on new directly (a client through the proxy, after a rollback, by hand).
        put(&env.backends.new, "Keep", &["direct-on-new"], false);
        let mut s = Session::open(legacy, USER);
        s.ok("DELETE \"Keep\"");
        s.ok("DELETE \"Drop\"");
        s.close();
        let report = env.sync(USER);
        assert_eq!(n(&report, "deleted"), 1, "{report}");
        assert_eq!(report["kept"], serde_json::json!(["Keep"]), "{report}");
        let new = &env.backends.new;
        let folders = new.mailboxes(USER);
        assert!(!folders.iter().any(|f| f == "Drop"), "{folders:?}");
        assert_eq!(new.count(USER, "Keep"), 3);
        assert_eq!(copies(new, "Keep", "direct-on-new"), 1);
        let w = warnings(&env);
        assert!(
            w.len() == 1 && w[0].starts_with("Keep: gone from legacy, kept on new: 1 message"),
            "{w:?}"
        );
        // The next pass leaves it alone and appends nothing.
        let again = env.sync(USER);
        assert_eq!(n(&again, "appended"), 0, "{again}");
        assert_eq!(new.count(USER, "Keep"), 3);
    });
}

#[test]
fn a_uidvalidity_change_on_legacy_expunges_only_the_syncs_own_copies() {
    within(120, || {
        let env = Env::new("none", "");
        env.fresh_target(USER);
        let legacy = &env.backends.legacy;
        put(legacy, "INBOX", &["a", "b", "c"], false);
        env.sync(USER);
        put(&env.backends.new, "INBOX", &["direct-on-new"], false);
        // Legacy expunges one message and its INBOX gets a new UIDVALIDITY (a rebuild).
        expunge_subject(legacy, "b");
        let out = legacy.doveadm(&[
            "mailbox",
            "update",
            "-u",
            USER,
            "--uid-validity",
            "777",
            "INBOX",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = env.sync(USER);
        assert_eq!(n(&report, "appended"), 0, "no duplicates: {report}");
        let new = &env.backends.new;
        assert_eq!(
            copies(new, "INBOX", "b"),
            0,
            "the sync's own copy of b goes"
        );
        for kept in ["a", "c", "direct-on-new"] {
            assert_eq!(copies(new, "INBOX", kept), 1, "{kept}");
        }
    });
}

#[test]
fn a_uidvalidity_change_on_new_gives_no_duplicates_and_deletes_nothing() {
    within(120, || {
        let env = Env::new("none", "");
        env.fresh_target(USER);
        put(&env.backends.legacy, "INBOX", &["a", "b", "c"], false);
        env.sync(USER);
        let new = &env.backends.new;
        put(new, "INBOX", &["direct-on-new"], false);
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
        let report = env.sync(USER);
        assert_eq!(n(&report, "appended"), 0, "{report}");
        assert_eq!(n(&report, "expunged"), 0, "{report}");
        assert!(
            n(&report, "rematched") >= 4,
            "the map is rebuilt by content: {report}"
        );
        for subject in ["a", "b", "c", "direct-on-new"] {
            assert_eq!(copies(new, "INBOX", subject), 1, "{subject}");
        }
        // The rebuilt map holds: a change on legacy is carried over without duplicates.
        put(&env.backends.legacy, "INBOX", &["d"], false);
        let report = env.sync(USER);
        assert_eq!(n(&report, "appended"), 1, "{report}");
        assert_eq!(copies(new, "INBOX", "d"), 1);
    });
}

/// Expunges `subject` from `USER`'s legacy INBOX.
fn expunge_subject(d: &Dovecot, subject: &str) {
    let out = d.doveadm(&[
        "expunge", "-u", USER, "mailbox", "INBOX", "header", "Subject", subject,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_user_routed_to_new_is_synced_only_when_forced() {
    within(120, || {
        let env = Env::new("none", "");
        env.fresh_target(USER);
        put(&env.backends.legacy, "INBOX", &["a", "b"], false);
        env.sync(USER);
        put(&env.backends.new, "INBOX", &["direct-on-new"], false);
        put(&env.backends.legacy, "INBOX", &["late"], false);
        sql(
            &env,
            &format!(
                "INSERT INTO directory_routes (email, route, updated_at) VALUES ('{USER}', 'new', 1)"
            ),
        );
        let out = env.cli(&["sync", USER, "--once", "--json"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("routed to new"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let new = &env.backends.new;
        assert_eq!(copies(new, "INBOX", "late"), 0, "nothing copied");
        let report = env.sync_forced(USER);
        assert_eq!(n(&report, "appended"), 1, "{report}");
        for subject in ["a", "b", "late", "direct-on-new"] {
            assert_eq!(copies(new, "INBOX", subject), 1, "{subject}");
        }
    });
}

#[test]
fn one_pass_per_user_at_a_time_and_a_lapsed_lease_is_taken_over() {
    within(150, || {
        let env = Env::new("none", "lease_secs = 3\n");
        env.fresh_target(USER);
        put(&env.backends.legacy, "INBOX", &["a", "b"], false);
        put(&env.backends.new, "INBOX", &["direct-on-new"], false);
        // Another process holds the user's lease.
        let far = mailferry::store::now() + 3600;
        sql(
            &env,
            &format!("INSERT INTO sync_leases (email, holder, expires_at) VALUES ('{USER}', 'other:1:1', {far})"),
        );
        let out = env.cli(&["sync", USER, "--once"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("pass in progress") && err.contains("other:1:1"),
            "{err}"
        );
        assert_eq!(copies(&env.backends.new, "INBOX", "a"), 0);
        // Its holder died: once the lease has lapsed, the next pass takes it over.
        sql(&env, "UPDATE sync_leases SET expires_at = 0");
        env.sync(USER);
        // Two passes started at once: one runs, the other says so (or, if the first was
        // already done, runs too and finds nothing to do); nothing is copied twice.
        put(&env.backends.legacy, "INBOX", &["c"], false);
        let children: Vec<_> = (0..2)
            .map(|_| {
                support::mailferry::command(&env.config, &["sync", USER, "--once", "--json"])
                    .env("MAILFERRY_LOG", "warn")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        let outs: Vec<Output> = children
            .into_iter()
            .map(|c| c.wait_with_output().expect("wait"))
            .collect();
        let mut appended = 0;
        for out in &outs {
            match out.status.code() {
                Some(0) => appended += n(&support::mailferry::sync_report(out), "appended"),
                Some(1) => assert!(
                    String::from_utf8_lossy(&out.stderr).contains("pass in progress"),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                other => panic!("{other:?}: {}", String::from_utf8_lossy(&out.stderr)),
            }
        }
        assert_eq!(appended, 1, "c copied once");
        let new = &env.backends.new;
        for subject in ["a", "b", "c", "direct-on-new"] {
            assert_eq!(copies(new, "INBOX", subject), 1, "{subject}");
        }
    });
}
