//! The state store: users' migration state, the audit log of transitions, and the embedded
//! directory's table. One SQL dialect through sqlx's `Any` driver: SQLite by default,
//! PostgreSQL when several nodes share the work.

mod migrations;
pub mod sync;
pub mod users;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

pub use users::{UserRecord, UserState};

/// Failures of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or a query failed.
    #[error("state store: {0}")]
    Db(#[from] sqlx::Error),
    /// The URL in `[state] url` is not usable.
    #[error("state store url {0:?}: {1}")]
    Url(String, String),
    /// A stored value is not one this version understands.
    #[error("state store holds an unknown value {0:?}")]
    BadValue(String),
}

/// A migrated connection pool to the state database.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let url = prepare_url(url)?;
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 10 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // WAL lets the proxy read routes while the CLI or sync writes state.
                        sqlx::query("PRAGMA journal_mode=WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout=5000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        migrations::run(&pool, !sqlite).await?;
        Ok(Store { pool })
    }

    /// The pool, for modules that keep their own tables here (embedded directory, sync state).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// Makes a SQLite URL create its file (and parent directory) on first use.
fn prepare_url(url: &str) -> Result<String, StoreError> {
    let Some(rest) = url.strip_prefix("sqlite://") else {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(url.to_owned());
        }
        return Err(StoreError::Url(
            url.into(),
            "expected sqlite:// or postgres://".into(),
        ));
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(StoreError::Url(url.into(), "missing database path".into()));
    }
    if path != ":memory:" {
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Url(url.into(), format!("cannot create {}: {e}", dir.display()))
            })?;
        }
    }
    let mut out = format!("sqlite://{path}");
    if query.is_empty() {
        out.push_str("?mode=rwc");
    } else {
        out.push('?');
        out.push_str(query);
        if !query.contains("mode=") {
            out.push_str("&mode=rwc");
        }
    }
    Ok(out)
}

/// Seconds since the epoch, as stored in every timestamp column.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_create_their_file() {
        assert_eq!(
            prepare_url("sqlite://var/x.db").unwrap(),
            "sqlite://var/x.db?mode=rwc"
        );
        assert_eq!(
            prepare_url("sqlite://:memory:").unwrap(),
            "sqlite://:memory:?mode=rwc"
        );
        assert!(prepare_url("mysql://x").is_err());
    }
}
