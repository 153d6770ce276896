//! Per-user migration state and the audit log of its transitions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{now_ms, SqlStore, StoreError};

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
    /// Reverse delta new → legacy; logins held, LMTP deferred.
    Rollback,
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
            UserState::Rollback => "rollback",
        }
    }

    /// Every state, in the order reports list them.
    pub const ALL: [UserState; 6] = [
        UserState::Legacy,
        UserState::Syncing,
        UserState::Cutover,
        UserState::New,
        UserState::Failed,
        UserState::Rollback,
    ];

    /// Whether the user is being moved between backends right now: LMTP deliveries are
    /// deferred and logins held (DESIGN.md §2).
    pub fn is_moving(self) -> bool {
        matches!(self, UserState::Cutover | UserState::Rollback)
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
            "rollback" => UserState::Rollback,
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

/// One audited change: where the user goes, who asked, why, and what came of it.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// The states the user may be in for the change to apply (`None`: any).
    pub from: Option<&'a [UserState]>,
    /// The state after the change (for an event without a change: the state it stays in).
    pub to: UserState,
    /// Becomes the user's `last_error` (cleared when `None`).
    pub last_error: Option<&'a str>,
    /// Who asked: `cli`, `api`, `wave:NAME`, `scheduler`, `recovery`.
    pub actor: &'a str,
    /// Why, for a human.
    pub reason: &'a str,
    /// What came of it: `ok`, `failed`, `refused`.
    pub outcome: &'a str,
}

impl<'a> Change<'a> {
    /// A change to `to` from any state, with nothing to say beyond who made it.
    pub fn forced(to: UserState, actor: &'a str) -> Self {
        Change {
            from: None,
            to,
            last_error: None,
            actor,
            reason: "state set",
            outcome: "ok",
        }
    }
}

/// One entry of a user's audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the epoch.
    pub at_ms: i64,
    /// The state before (`None`: the user was not in the store yet).
    pub from: Option<UserState>,
    /// The state after.
    pub to: UserState,
    /// Who asked.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// What came of it.
    pub outcome: String,
}

/// An `events` row as selected by `SqlStore::events`.
type EventRow = (
    i64,
    Option<i64>,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    at_ms: i64,
    email: &str,
    before: Option<UserState>,
    change: &Change<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO events (at, at_ms, email, from_state, to_state, actor, detail, outcome) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(at_ms / 1000)
    .bind(at_ms)
    .bind(email)
    .bind(before.map(|s| s.as_str()))
    .bind(change.to.as_str())
    .bind(change.actor)
    .bind(change.reason)
    .bind(change.outcome)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A `users` row: email, state, wave, last_error, updated_at.
pub(super) type UserRow = (String, String, Option<String>, Option<String>, i64);

impl UserRecord {
    /// The record of a `users` row selected as `email, state, wave, last_error, updated_at`.
    pub(super) fn from_row(row: UserRow) -> Result<UserRecord, StoreError> {
        let (email, state, wave, last_error, updated_at) = row;
        Ok(UserRecord {
            email,
            state: state.parse()?,
            wave,
            last_error,
            updated_at,
        })
    }
}

impl SqlStore {
    /// The record of `email`, if the store has one.
    pub async fn user(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT email, state, wave, last_error, updated_at FROM users WHERE email = $1",
        )
        .bind(email)
        .fetch_optional(self.pool())
        .await?;
        row.map(UserRecord::from_row).transpose()
    }

    /// The state of `email`; users the store does not know are `legacy`.
    pub async fn user_state(&self, email: &str) -> Result<UserState, StoreError> {
        Ok(self
            .user(email)
            .await?
            .map_or(UserState::Legacy, |u| u.state))
    }

    /// Records a transition and its audit event in one transaction. With `change.from` set,
    /// the state must still be that one (a user the store does not know is `legacy`), else
    /// nothing is written and `Conflict` says what it is: two operators, processes or nodes
    /// cannot both start a cutover of one user.
    pub async fn change_state(&self, email: &str, change: &Change<'_>) -> Result<(), StoreError> {
        let at_ms = now_ms();
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        let row: Option<(String,)> = sqlx::query_as("SELECT state FROM users WHERE email = $1")
            .bind(email)
            .fetch_optional(&mut *tx)
            .await?;
        let before = row.map(|(s,)| s.parse::<UserState>()).transpose()?;
        let current = before.unwrap_or(UserState::Legacy);
        if let Some(expected) = change.from {
            if !expected.contains(&current) {
                return Err(StoreError::Conflict { found: current });
            }
        }
        sqlx::query(
            "INSERT INTO users (email, state, last_error, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (email) DO UPDATE SET state = excluded.state, \
             last_error = excluded.last_error, updated_at = excluded.updated_at",
        )
        .bind(email)
        .bind(change.to.as_str())
        .bind(change.last_error)
        .bind(at_ms / 1000)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut tx, at_ms, email, before, change).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records an event that changes no state (a refused request, a step's outcome).
    pub async fn add_event(&self, email: &str, change: &Change<'_>) -> Result<(), StoreError> {
        let state = self.user_state(email).await?;
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        insert_event(&mut tx, now_ms(), email, Some(state), change).await?;
        tx.commit().await?;
        Ok(())
    }

    /// `email`'s audit log, oldest first.
    pub async fn events(&self, email: &str) -> Result<Vec<Event>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT at, at_ms, from_state, to_state, actor, detail, outcome FROM events \
             WHERE email = $1 ORDER BY COALESCE(at_ms, at * 1000)",
        )
        .bind(email)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(at, at_ms, from, to, actor, reason, outcome)| {
                Ok(Event {
                    at_ms: at_ms.unwrap_or(at * 1000),
                    from: from.map(|s| s.parse()).transpose()?,
                    to: to.parse()?,
                    actor: actor.unwrap_or_else(|| "unknown".into()),
                    reason: reason.unwrap_or_default(),
                    outcome: outcome.unwrap_or_else(|| "ok".into()),
                })
            })
            .collect()
    }

    /// Users in `state`, by address.
    pub async fn users_in(&self, state: UserState) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT email FROM users WHERE state = $1 ORDER BY email")
                .bind(state.as_str())
                .fetch_all(self.pool())
                .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Keeps the evidence (JSON) of `email`'s last verification gate.
    pub async fn put_evidence(
        &self,
        email: &str,
        clean: bool,
        evidence: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        sqlx::query(
            "INSERT INTO cutover_evidence (email, at, clean, evidence) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (email) DO UPDATE SET at = excluded.at, clean = excluded.clean, \
             evidence = excluded.evidence",
        )
        .bind(email)
        .bind(now_ms() / 1000)
        .bind(i64::from(clean))
        .bind(evidence)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The evidence (JSON) of `email`'s last verification gate, if any.
    pub async fn evidence(&self, email: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT evidence FROM cutover_evidence WHERE email = $1")
                .bind(email)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.map(|r| r.0))
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
