//! The state store on a real PostgreSQL (throwaway cluster from tests/support/postgres.rs):
//! migrations, user state, the sync tables' operations, and a full `sync --once` + `verify`
//! between the two real Dovecot instances with `[state] url = "postgres://..."`.

mod support;

use std::path::Path;
use std::process::Output;

use mailferry::store::sync::{FolderState, UidRow};
use mailferry::store::{self, Change, UserState};
use support::corpus::{self, Spec};
use support::deadline::within;
use support::postgres::Postgres;
use support::{Backends, Dovecot, MASTER_PASSWORD, MASTER_USER};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn folder(email: &str, name: &str) -> FolderState {
    FolderState {
        email: email.into(),
        source_name: name.into(),
        target_name: name.replace('.', "/"),
        // Above i32::MAX: UIDVALIDITY is a u32 and must survive the BIGINT round trip.
        source_uidvalidity: 4_000_000_000,
        target_uidvalidity: 9,
        last_uid: 0,
        highest_modseq: 1 << 40,
        source_uidnext: 1,
        source_messages: 0,
        source_bytes: 0,
        subscribed: true,
    }
}

fn pending(uids: std::ops::RangeInclusive<u32>) -> Vec<UidRow> {
    uids.map(|u| UidRow {
        source_uid: u,
        target_uid: None,
        hash: format!("h{u}"),
        size: 10,
        pending_at: None,
    })
    .collect()
}

/// Only `serve` creates a store: the CLI's open of a database without our schema is refused,
/// and every open of a schema newer than the binary, on PostgreSQL as on SQLite.
#[test]
fn an_empty_database_or_a_newer_schema_is_refused() {
    within(60, || {
        let pg = Postgres::start();
        let url = pg.create_database("refuse");
        rt().block_on(async {
            let err = store::open(&url, mailferry::store::Open::Existing)
                .await
                .err()
                .expect("an empty database is no store");
            assert!(err.to_string().contains("does not exist"), "{err}");
            store::open(&url, mailferry::store::Open::CreateIfMissing)
                .await
                .expect("serve creates it");
            store::open(&url, mailferry::store::Open::Existing)
                .await
                .expect("then the CLI opens it");
        });
        pg.psql("refuse", "INSERT INTO schema_version (version) VALUES (99)");
        rt().block_on(async {
            for mode in [
                mailferry::store::Open::Existing,
                mailferry::store::Open::CreateIfMissing,
            ] {
                let err = store::open(&url, mode).await.err().expect("too new");
                assert!(
                    err.to_string()
                        .contains("schema version 99 is newer than this mailferry knows"),
                    "{err}"
                );
            }
        });
    });
}

#[test]
fn migrations_and_user_state() {
    within(60, || {
        let pg = Postgres::start();
        rt().block_on(async {
            let store = store::open(&pg.url(), mailferry::store::Open::CreateIfMissing)
                .await
                .expect("open on postgres");
            // Opening again (another process, a restart) finds the schema current.
            let again = store::open(&pg.url(), mailferry::store::Open::CreateIfMissing)
                .await
                .expect("reopen");
            assert_eq!(
                again.user_state("nobody@example.org").await.unwrap(),
                UserState::Legacy
            );
            store
                .change_state("a@example.org", &Change::forced(UserState::Syncing, "test"))
                .await
                .unwrap();
            store
                .change_state(
                    "a@example.org",
                    &Change {
                        last_error: Some("boom"),
                        ..Change::forced(UserState::Failed, "test")
                    },
                )
                .await
                .unwrap();
            let u = store.user("a@example.org").await.unwrap().expect("user");
            assert_eq!(u.state, UserState::Failed);
            assert_eq!(u.last_error.as_deref(), Some("boom"));
            assert!(u.updated_at > 0);
            store
                .change_state("b@example.org", &Change::forced(UserState::Syncing, "test"))
                .await
                .unwrap();
            assert_eq!(
                store.syncing_users().await.unwrap(),
                vec!["b@example.org".to_string()]
            );
        });
        // One row per schema version, each applied once.
        let versions = pg.psql(
            "mailferry",
            "SELECT COUNT(*), MAX(version) FROM schema_version",
        );
        assert_eq!(versions.trim(), "5|5", "{versions}");
        // Several nodes starting at once on an empty database: each version applied once.
        let url = pg.create_database("race");
        rt().block_on(async {
            let (a, b, c, d) = tokio::join!(
                store::open(&url, mailferry::store::Open::CreateIfMissing),
                store::open(&url, mailferry::store::Open::CreateIfMissing),
                store::open(&url, mailferry::store::Open::CreateIfMissing),
                store::open(&url, mailferry::store::Open::CreateIfMissing)
            );
            for r in [a, b, c, d] {
                r.expect("concurrent open");
            }
        });
        let versions = pg.psql("race", "SELECT COUNT(*), MAX(version) FROM schema_version");
        assert_eq!(versions.trim(), "5|5", "{versions}");
        let events = pg.psql(
            "mailferry",
            "SELECT from_state || '>' || to_state FROM events WHERE email = 'a@example.org' ORDER BY at, to_state DESC",
        );
        assert!(events.contains("syncing>failed"), "{events}");
    });
}

#[test]
fn sync_tables() {
    within(60, || {
        let pg = Postgres::start();
        rt().block_on(async {
            let store = store::open(&pg.url(), mailferry::store::Open::CreateIfMissing)
                .await
                .expect("open on postgres");
            let email = "a@example.org";
            let mut f = folder(email, "INBOX");
            store.put_sync_folder(&f).await.unwrap();
            // Upsert of the same key.
            f.source_messages = 3;
            f.source_bytes = 30;
            store.put_sync_folder(&f).await.unwrap();
            // A folder new to the sync: its state and first intents in one transaction.
            let other = folder(email, "Archive.2019");
            store.start_folder(&other, &pending(1..=2)).await.unwrap();
            assert_eq!(store.uid_map(email, "Archive.2019").await.unwrap().len(), 2);
            let mut states = store.sync_folders(email).await.unwrap();
            states.sort_by(|a, b| a.source_name.cmp(&b.source_name));
            assert_eq!(states, vec![other.clone(), f.clone()]);

            // Pending rows (more than one INSERT chunk), then acknowledged ones.
            store
                .add_pending(email, "INBOX", &pending(1..=150))
                .await
                .unwrap();
            let map = store.uid_map(email, "INBOX").await.unwrap();
            assert_eq!(map.len(), 150);
            assert!(map.iter().all(|r| r.target_uid.is_none()));
            assert!(map.iter().all(|r| r.pending_at.is_some_and(|t| t > 0)));
            store
                .confirm_uids(email, "INBOX", &[(1, 11), (2, 12), (3, 0)])
                .await
                .unwrap();
            let map = store.uid_map(email, "INBOX").await.unwrap();
            assert_eq!(map[0].target_uid, Some(11));
            assert_eq!(map[2].target_uid, Some(0));
            assert_eq!(map[3].target_uid, None);
            // Re-sending a pending row (a retried batch) keeps one row per UID.
            store
                .add_pending(email, "INBOX", &pending(150..=151))
                .await
                .unwrap();
            assert_eq!(store.uid_map(email, "INBOX").await.unwrap().len(), 151);
            let st = store.sync_folders(email).await.unwrap();
            let inbox = st.iter().find(|s| s.source_name == "INBOX").unwrap();
            assert_eq!(inbox.last_uid, 3);
            // last_uid never goes back.
            store
                .confirm_uids(email, "INBOX", &[(2, 12)])
                .await
                .unwrap();
            let st = store.sync_folders(email).await.unwrap();
            let inbox = st.iter().find(|s| s.source_name == "INBOX").unwrap();
            assert_eq!(inbox.last_uid, 3);

            store
                .delete_uids(email, "INBOX", &[150, 151])
                .await
                .unwrap();
            assert_eq!(store.uid_map(email, "INBOX").await.unwrap().len(), 149);

            // Progress: 2 copied (UID 3 is "not copyable"), totals from the folder rows.
            let p = store.sync_progress(email).await.unwrap();
            assert_eq!((p.folders, p.messages_copied, p.bytes_copied), (2, 2, 20));
            assert_eq!((p.messages_total, p.bytes_total), (3, 30));
            assert_eq!(p.passes, 0);
            store.record_pass(email, 5, 2, None).await.unwrap();
            store.record_pass(email, 7, 0, Some("boom")).await.unwrap();
            let p = store.sync_progress(email).await.unwrap();
            assert_eq!(p.passes, 2);
            assert_eq!(p.last_pass_ms, Some(7));
            assert_eq!(p.last_appended, Some(0));
            assert_eq!(p.last_error.as_deref(), Some("boom"));
            store.record_pass(email, 9, 4, None).await.unwrap();
            assert_eq!(store.sync_progress(email).await.unwrap().last_error, None);

            // UIDVALIDITY change: the whole map replaced at once, pending rows kept as such.
            let mut rows = pending(1..=2);
            rows[0].target_uid = Some(21);
            rows[1].pending_at = Some(1234);
            store.replace_uid_map(&f, &rows).await.unwrap();
            let map = store.uid_map(email, "INBOX").await.unwrap();
            assert_eq!(map, {
                let mut want = rows.clone();
                want[0].pending_at = None;
                want
            });

            // Renamed on legacy: state and map move along.
            store
                .rename_sync_folder(email, "INBOX", "Renamed")
                .await
                .unwrap();
            assert_eq!(store.uid_map(email, "Renamed").await.unwrap().len(), 2);
            assert!(store.uid_map(email, "INBOX").await.unwrap().is_empty());
            store.delete_sync_folder(email, "Renamed").await.unwrap();
            assert!(store.uid_map(email, "Renamed").await.unwrap().is_empty());
            let names: Vec<String> = store
                .sync_folders(email)
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.source_name)
                .collect();
            assert_eq!(names, vec!["Archive.2019".to_string()]);
            // Another user's progress is empty, not an error.
            assert_eq!(
                store.sync_progress("z@example.org").await.unwrap(),
                Default::default()
            );
        });
    });
}

fn backend_toml(name: &str, d: &Dovecot, secret: &Path) -> String {
    format!(
        "[backends.{name}]\nimap = \"{}\"\nimap_tls = \"none\"\nca_file = \"{}\"\n\
         master_user = \"{MASTER_USER}\"\nmaster_password_file = \"{}\"\n\n",
        d.imap,
        d.cert.cert_pem.display(),
        secret.display()
    )
}

fn cli(config: &Path, args: &[&str]) -> Output {
    support::mailferry::run_cli(config, args, 50)
}

fn report(out: &Output) -> serde_json::Value {
    support::mailferry::sync_report(out)
}

#[test]
fn sync_and_verify_with_state_on_postgres() {
    within(60, || {
        const USER: &str = "alice@example.org";
        let pg = Postgres::start();
        let backends = Backends::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("master.secret");
        std::fs::write(&secret, format!("{MASTER_PASSWORD}\n")).unwrap();
        let mut text = format!(
            "[admin]\ntoken_file = \"{}\"\n\n[state]\nurl = \"{}\"\n\n",
            secret.display(),
            pg.url()
        );
        text.push_str(&backend_toml("legacy", &backends.legacy, &secret));
        text.push_str(&backend_toml("new", &backends.new, &secret));
        let config = dir.path().join("mailferry.toml");
        std::fs::write(&config, text).unwrap();
        support::mailferry::create_store(&pg.url());

        // The harness seeds a marker into the new INBOX: empty it so both sides can agree.
        let out = backends
            .new
            .doveadm(&["expunge", "-u", USER, "mailbox", "INBOX", "all"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let c = corpus::generate(&Spec {
            seed: 11,
            messages: 60,
            large: 1,
            large_min: 300 * 1024,
            large_max: 400 * 1024,
            ..Spec::default()
        });
        corpus::load(&backends.legacy, USER, &c);

        let first = report(&cli(&config, &["sync", USER, "--once", "--json"]));
        // The corpus plus the harness's legacy marker message.
        assert_eq!(
            first.get("appended").and_then(|v| v.as_u64()),
            Some(c.messages.len() as u64 + 1),
            "{first}"
        );
        let out = cli(&config, &["verify", USER]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "verify reports differences:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let second = report(&cli(&config, &["sync", USER, "--once", "--json"]));
        assert_eq!(
            second.get("appended").and_then(|v| v.as_u64()),
            Some(0),
            "{second}"
        );
        // The state really is in PostgreSQL.
        let mapped = pg.psql(
            "mailferry",
            &format!("SELECT COUNT(*) FROM sync_uids WHERE email = '{USER}' AND target_uid > 0"),
        );
        assert_eq!(mapped.trim(), (c.messages.len() + 1).to_string());
        let passes = pg.psql(
            "mailferry",
            &format!("SELECT passes FROM sync_passes WHERE email = '{USER}'"),
        );
        assert_eq!(passes.trim(), "2");
    });
}
