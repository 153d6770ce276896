//! Waves: named groups of users, loaded by `mailferry import` (`users.wave`), and when each
//! wave was imported, migrated and cut over.

use serde::{Deserialize, Serialize};

use super::users::{UserRecord, UserRow};
use super::{now_ms, SqlStore, StoreError};

/// What an import changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Imported {
    /// Users new to the store (state `legacy`).
    pub added: u64,
    /// Users already known, moved into the wave given.
    pub moved: u64,
    /// Users already known and already in that wave (or given without a wave).
    pub unchanged: u64,
}

/// A wave's timestamps (seconds since the epoch).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WaveTimes {
    /// First import into the wave.
    pub created_at: i64,
    /// Last `wave migrate`.
    pub migrate_at: Option<i64>,
    /// Last `wave cutover`.
    pub cutover_at: Option<i64>,
}

/// Which of a wave's timestamps to set.
#[derive(Debug, Clone, Copy)]
pub enum WaveMark {
    /// `wave migrate` ran.
    Migrate,
    /// `wave cutover` ran.
    Cutover,
}

impl SqlStore {
    /// Adds `users` (normalized address, wave) in one transaction; a user already known keeps
    /// its state and moves to the wave given (if any). Importing a user twice changes nothing.
    pub async fn import_users(
        &self,
        users: &[(String, Option<String>)],
    ) -> Result<Imported, StoreError> {
        let at = now_ms() / 1000;
        let mut counts = Imported::default();
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        for (email, wave) in users {
            let row: Option<(Option<String>,)> =
                sqlx::query_as("SELECT wave FROM users WHERE email = $1")
                    .bind(email)
                    .fetch_optional(&mut *tx)
                    .await?;
            match (row, wave) {
                (None, _) => {
                    sqlx::query(
                        "INSERT INTO users (email, state, wave, updated_at) VALUES ($1, 'legacy', $2, $3)",
                    )
                    .bind(email)
                    .bind(wave.as_deref())
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                    counts.added += 1;
                }
                (Some((old,)), Some(w)) if old.as_deref() != Some(w) => {
                    sqlx::query("UPDATE users SET wave = $1 WHERE email = $2")
                        .bind(w)
                        .bind(email)
                        .execute(&mut *tx)
                        .await?;
                    counts.moved += 1;
                }
                _ => counts.unchanged += 1,
            }
            if let Some(w) = wave {
                sqlx::query(
                    "INSERT INTO waves (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                )
                .bind(w)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(counts)
    }

    /// The users of `wave`, by address.
    pub async fn wave_members(&self, wave: &str) -> Result<Vec<UserRecord>, StoreError> {
        let rows: Vec<UserRow> = sqlx::query_as(
            "SELECT email, state, wave, last_error, updated_at FROM users WHERE wave = $1 ORDER BY email",
        )
        .bind(wave)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(UserRecord::from_row).collect()
    }

    /// Every wave with its number of users, by name.
    pub async fn waves(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT name, (SELECT COUNT(*) FROM users WHERE users.wave = waves.name) FROM waves ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// A wave's timestamps, if the wave exists.
    pub async fn wave_times(&self, wave: &str) -> Result<Option<WaveTimes>, StoreError> {
        let row: Option<(i64, Option<i64>, Option<i64>)> =
            sqlx::query_as("SELECT created_at, migrate_at, cutover_at FROM waves WHERE name = $1")
                .bind(wave)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.map(|(created_at, migrate_at, cutover_at)| WaveTimes {
            created_at,
            migrate_at,
            cutover_at,
        }))
    }

    /// Records that `wave migrate` or `wave cutover` ran now.
    pub async fn mark_wave(&self, wave: &str, mark: WaveMark) -> Result<(), StoreError> {
        let sql = match mark {
            WaveMark::Migrate => "UPDATE waves SET migrate_at = $1 WHERE name = $2",
            WaveMark::Cutover => "UPDATE waves SET cutover_at = $1 WHERE name = $2",
        };
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        sqlx::query(sql)
            .bind(now_ms() / 1000)
            .bind(wave)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
