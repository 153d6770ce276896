//! One sync pass per user at a time, across processes and nodes: a lease row per user with
//! its holder and an expiry. The holder renews it while its pass runs (a heartbeat); a dead
//! holder's lease lapses, and the next pass takes it over.

use super::{now, SqlStore, StoreError};

/// What an attempt to take a user's lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseTaken {
    /// The lease is ours until it is renewed or released.
    Taken,
    /// Another holder has it until `expires_at` (seconds since the epoch).
    HeldBy {
        /// Who holds it (host, process and pass).
        holder: String,
        /// When it lapses unless renewed.
        expires_at: i64,
    },
}

impl SqlStore {
    /// Takes `email`'s lease for `holder` for `secs`, unless a live lease of another holder
    /// exists.
    pub async fn take_lease(
        &self,
        email: &str,
        holder: &str,
        secs: i64,
    ) -> Result<LeaseTaken, StoreError> {
        let at = now();
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        let done = sqlx::query(
            "INSERT INTO sync_leases (email, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (email) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE sync_leases.expires_at < $4 OR sync_leases.holder = excluded.holder",
        )
        .bind(email)
        .bind(holder)
        .bind(at + secs)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let taken = if done.rows_affected() == 1 {
            LeaseTaken::Taken
        } else {
            let (holder, expires_at): (String, i64) =
                sqlx::query_as("SELECT holder, expires_at FROM sync_leases WHERE email = $1")
                    .bind(email)
                    .fetch_one(&mut *tx)
                    .await?;
            LeaseTaken::HeldBy { holder, expires_at }
        };
        tx.commit().await?;
        Ok(taken)
    }

    /// Extends `holder`'s lease of `email` by `secs` from now; false if it is no longer theirs.
    pub async fn renew_lease(
        &self,
        email: &str,
        holder: &str,
        secs: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        let done =
            sqlx::query("UPDATE sync_leases SET expires_at = $3 WHERE email = $1 AND holder = $2")
                .bind(email)
                .bind(holder)
                .bind(now() + secs)
                .execute(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives `holder`'s lease of `email` up.
    pub async fn release_lease(&self, email: &str, holder: &str) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        sqlx::query("DELETE FROM sync_leases WHERE email = $1 AND holder = $2")
            .bind(email)
            .bind(holder)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The leases whose holder starts with `prefix` (`host:`), as (user, holder).
    pub async fn leases_held_by(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT email, holder FROM sync_leases ORDER BY email")
                .fetch_all(self.pool())
                .await?;
        Ok(rows
            .into_iter()
            .filter(|(_, h)| h.starts_with(prefix))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Open;

    #[tokio::test]
    async fn a_live_lease_keeps_others_out_and_a_lapsed_one_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/s.db", dir.path().display());
        let store = SqlStore::open(&url, Open::CreateIfMissing).await.unwrap();
        assert_eq!(
            store.take_lease("a@x", "p1", 60).await.unwrap(),
            LeaseTaken::Taken
        );
        // The holder may take it again (a retry in the same pass).
        assert_eq!(
            store.take_lease("a@x", "p1", 60).await.unwrap(),
            LeaseTaken::Taken
        );
        let LeaseTaken::HeldBy { holder, .. } = store.take_lease("a@x", "p2", 60).await.unwrap()
        else {
            panic!("p2 took a live lease");
        };
        assert_eq!(holder, "p1");
        assert!(store.renew_lease("a@x", "p1", 60).await.unwrap());
        assert!(!store.renew_lease("a@x", "p2", 60).await.unwrap());
        // Lapsed: anyone may take it, and the old holder's renewal then fails.
        assert!(store.renew_lease("a@x", "p1", -10).await.unwrap());
        assert_eq!(
            store.take_lease("a@x", "p2", 60).await.unwrap(),
            LeaseTaken::Taken
        );
        assert!(!store.renew_lease("a@x", "p1", 60).await.unwrap());
        store.release_lease("a@x", "p1").await.unwrap();
        assert!(matches!(
            store.take_lease("a@x", "p3", 60).await.unwrap(),
            LeaseTaken::HeldBy { .. }
        ));
        store.release_lease("a@x", "p2").await.unwrap();
        assert_eq!(
            store.take_lease("a@x", "p3", 60).await.unwrap(),
            LeaseTaken::Taken
        );
    }
}
