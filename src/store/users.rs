//! Per-user migration state and the audit log of its transitions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{now, SqlStore, StoreError};

/// A user's place in the migration (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserState {
    /// Not started; everything goes to legacy.
    Legacy,
    /// Background copy running; everything still goes to legacy.
    Syncing,
    /// Final delta sync; logins held, LMTP deferred.
    Cutover,
    /// Done; everything goes to new.
    New,
    /// A transition failed; the last safe route stays.
    Failed,
}

impl UserState {
    /// Lower-case name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            UserState::Legacy => "legacy",
            UserState::Syncing => "syncing",
            UserState::Cutover => "cutover",
            UserState::New => "new",
            UserState::Failed => "failed",
        }
    }
}

impl fmt::Display for UserState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UserState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "legacy" => UserState::Legacy,
            "syncing" => UserState::Syncing,
            "cutover" => UserState::Cutover,
            "new" => UserState::New,
            "failed" => UserState::Failed,
            other => return Err(StoreError::BadValue(other.into())),
        })
    }
}

/// What `check-config` says of a store: its schema and how many users are in each state.
#[derive(Debug, Clone, Serialize)]
pub struct StoreSummary {
    /// The schema version.
    pub schema_version: i64,
    /// Users per state, in the order of `UserState`; states without users are left out.
    pub users: Vec<(UserState, i64)>,
}

/// What the store knows of one user.
#[derive(Debug, Clone, Serialize)]
pub struct UserRecord {
    /// Normalized login.
    pub email: String,
    /// Migration state.
    pub state: UserState,
    /// Wave the user was imported into.
    pub wave: Option<String>,
    /// Why the last transition failed.
    pub last_error: Option<String>,
    /// Seconds since the epoch of the last change.
    pub updated_at: i64,
}

/// A `users` row as selected by `SqlStore::user`.
type UserRow = (String, String, Option<String>, Option<String>, i64);

impl SqlStore {
    /// The record of `email`, if the store has one.
    pub async fn user(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT email, state, wave, last_error, updated_at FROM users WHERE email = $1",
        )
        .bind(email)
        .fetch_optional(self.pool())
        .await?;
        row.map(|(email, state, wave, last_error, updated_at)| {
            Ok(UserRecord {
                email,
                state: state.parse()?,
                wave,
                last_error,
                updated_at,
            })
        })
        .transpose()
    }

    /// The state of `email`; users the store does not know are `legacy`.
    pub async fn user_state(&self, email: &str) -> Result<UserState, StoreError> {
        Ok(self
            .user(email)
            .await?
            .map_or(UserState::Legacy, |u| u.state))
    }

    /// Records a transition (and its audit event); `error` becomes `last_error`.
    pub async fn set_user_state(
        &self,
        email: &str,
        state: UserState,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let before = self.user(email).await?.map(|u| u.state);
        let at = now();
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        sqlx::query(
            "INSERT INTO users (email, state, last_error, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (email) DO UPDATE SET state = excluded.state, \
             last_error = excluded.last_error, updated_at = excluded.updated_at",
        )
        .bind(email)
        .bind(state.as_str())
        .bind(error)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO events (at, email, from_state, to_state, detail) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(at)
        .bind(email)
        .bind(before.map(|s| s.as_str()))
        .bind(state.as_str())
        .bind(error)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The schema version and the number of users per state.
    pub async fn summary(&self) -> Result<StoreSummary, StoreError> {
        let mut conn = self.pool().acquire().await?;
        let schema_version = super::migrations::version(&mut conn, self.is_postgres()).await?;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM users GROUP BY state")
                .fetch_all(&mut *conn)
                .await?;
        let mut users = Vec::with_capacity(rows.len());
        for (state, n) in rows {
            users.push((state.parse()?, n));
        }
        users.sort_by_key(|(s, _)| *s as u8);
        Ok(StoreSummary {
            schema_version,
            users,
        })
    }
}
