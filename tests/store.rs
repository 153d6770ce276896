//! The state store is never silently recreated: a relative SQLite path is relative to the
//! config file, only `serve` creates a missing store, a schema newer than the binary is
//! refused, and `check-config` reports what the store holds. Driven through the real binary.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use support::deadline::within;

/// A config in `dir/etc/` whose store is `sqlite://var/state.db` (relative), with backends
/// that nothing listens on: these commands must decide about the store before connecting.
fn config(dir: &Path) -> PathBuf {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let secret = etc.join("master.secret");
    std::fs::write(&secret, "secret-long-enough-for-a-token\n").unwrap();
    let port = support::free_port();
    let text = format!(
        "[admin]\ntoken_file = \"{s}\"\n\n[state]\nurl = \"sqlite://var/state.db\"\n\n\
         [backends.legacy]\nimap = \"127.0.0.1:{port}\"\nmaster_user = \"m\"\nmaster_password_file = \"{s}\"\n\n\
         [backends.new]\nimap = \"127.0.0.1:{port}\"\nmaster_user = \"m\"\nmaster_password_file = \"{s}\"\n",
        s = secret.display()
    );
    let path = etc.join("mailferry.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the CLI from `cwd` (not the config's directory).
fn cli_in(cwd: &Path, config: &Path, args: &[&str]) -> Output {
    support::mailferry::command(config, args)
        .current_dir(cwd)
        .env("MAILFERRY_LOG", "warn")
        .output()
        .expect("run mailferry")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn commands_other_than_serve_never_create_a_store() {
    within(60, || {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let store = dir.path().join("etc/var/state.db");
        for args in [
            &["sync", "alice@example.org", "--once"][..],
            &["check-config"],
        ] {
            let out = cli_in(dir.path(), &config, args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
            assert!(
                text(&out).contains(&store.display().to_string())
                    && text(&out).contains("does not exist"),
                "{args:?} names the missing store: {}",
                text(&out)
            );
            assert!(!store.exists(), "{args:?} created the store");
            assert!(
                !dir.path().join("etc/var").exists(),
                "{args:?} created its directory"
            );
        }
    });
}

#[test]
fn a_relative_store_path_is_relative_to_the_config_file() {
    within(60, || {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let store = dir.path().join("etc/var/state.db");
        support::mailferry::create_store(&format!("sqlite://{}", store.display()));
        // From two different working directories, check-config finds the same store.
        for cwd in [dir.path().to_owned(), std::env::temp_dir()] {
            let out = cli_in(&cwd, &config, &["check-config"]);
            let t = text(&out);
            assert!(
                t.contains(&format!("state store sqlite://{}", store.display()))
                    && t.contains("schema version"),
                "from {}: {t}",
                cwd.display()
            );
        }
        assert!(
            !dir.path().join("var").exists(),
            "nothing relative to the cwd"
        );
    });
}

#[test]
fn check_config_reports_the_schema_and_users_per_state() {
    within(60, || {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let url = format!("sqlite://{}", dir.path().join("etc/var/state.db").display());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            use mailferry::store::{Change, Open, UserState};
            let store = mailferry::store::open(&url, Open::CreateIfMissing)
                .await
                .unwrap();
            for (user, state) in [
                ("a@x", UserState::Syncing),
                ("b@x", UserState::Syncing),
                ("c@x", UserState::New),
            ] {
                store
                    .change_state(user, &Change::forced(state, "test"))
                    .await
                    .unwrap();
            }
        });
        let out = cli_in(dir.path(), &config, &["check-config"]);
        let t = text(&out);
        // The backends are unreachable: a problem (exit 1), but the store is reported.
        assert_eq!(out.status.code(), Some(1), "{t}");
        assert!(t.contains("schema version 5, 2 syncing, 1 new"), "{t}");
    });
}

#[test]
fn a_store_newer_than_the_binary_is_refused() {
    within(60, || {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let path = dir.path().join("etc/var/state.db");
        let url = format!("sqlite://{}", path.display());
        support::mailferry::create_store(&url);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            sqlx::any::install_default_drivers();
            let pool = sqlx::AnyPool::connect(&url).await.unwrap();
            sqlx::query("INSERT INTO schema_version (version) VALUES (99)")
                .execute(&pool)
                .await
                .unwrap();
        });
        for args in [
            &["sync", "alice@example.org", "--once"][..],
            &["check-config"],
        ] {
            let out = cli_in(dir.path(), &config, args);
            let t = text(&out);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {t}");
            assert!(
                t.contains("schema version 99 is newer than this mailferry knows"),
                "{args:?}: {t}"
            );
        }
        let err = rt
            .block_on(mailferry::store::open(
                &url,
                mailferry::store::Open::CreateIfMissing,
            ))
            .err()
            .expect("serve's open refuses it too");
        assert!(err.to_string().contains("newer"), "{err}");
    });
}
