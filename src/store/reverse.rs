//! A rollback's intents (`reverse_pending`): messages of new a reverse pass is appending to
//! legacy. Each is written before its APPEND goes out and replaced by its UID map row, in one
//! transaction, once legacy acknowledged it, so that a pass killed in between is resolved by
//! content hash instead of appending the message twice.

use super::sync::{insert_rows, UidRow};
use super::{now, SqlStore, StoreError};

/// A message of new whose APPEND to legacy may have been sent but was not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReversePending {
    /// Its UID on new.
    pub target_uid: u32,
    /// Its content hash (`sync::content_hash`).
    pub hash: String,
    /// When the intent was written (seconds since the epoch).
    pub at: i64,
}

impl SqlStore {
    /// The rollback intents of one folder (keyed by its legacy name), in new UID order.
    pub async fn reverse_pending(
        &self,
        email: &str,
        source_name: &str,
    ) -> Result<Vec<ReversePending>, StoreError> {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT target_uid, hash, at FROM reverse_pending \
             WHERE email = $1 AND source_name = $2 ORDER BY target_uid",
        )
        .bind(email)
        .bind(source_name)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(t, hash, at)| ReversePending {
                target_uid: t as u32,
                hash,
                at,
            })
            .collect())
    }

    /// Records messages of new (new UID, content hash) about to be appended to legacy. Fsynced:
    /// a crash must never leave legacy a message whose intent is not durable.
    pub async fn add_reverse_pending(
        &self,
        email: &str,
        source_name: &str,
        rows: &[(u32, String)],
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let at = now();
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        for (target_uid, hash) in rows {
            sqlx::query(
                "INSERT INTO reverse_pending (email, source_name, target_uid, hash, at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (email, source_name, target_uid) \
                 DO UPDATE SET hash = excluded.hash, at = excluded.at",
            )
            .bind(email)
            .bind(source_name)
            .bind(i64::from(*target_uid))
            .bind(hash)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records the UID map rows of messages now on legacy (appended, or found there by content)
    /// and drops their intents, in one transaction. Not fsynced on SQLite (`relaxed`): a lost
    /// commit leaves the intents, which the next reverse pass matches by content.
    pub async fn confirm_reverse(
        &self,
        email: &str,
        source_name: &str,
        rows: &[UidRow],
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.relaxed()).await?;
        insert_rows(&mut tx, email, source_name, rows).await?;
        for r in rows {
            let Some(t) = r.target_uid else { continue };
            delete_pending(&mut tx, email, source_name, t).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Drops rollback intents whose message did not reach legacy (it is appended again, or is
    /// gone from new).
    pub async fn forget_reverse_pending(
        &self,
        email: &str,
        source_name: &str,
        target_uids: &[u32],
    ) -> Result<(), StoreError> {
        if target_uids.is_empty() {
            return Ok(());
        }
        let _turn = self.write_turn().await;
        let mut tx = self.begin_write(self.pool()).await?;
        for &t in target_uids {
            delete_pending(&mut tx, email, source_name, t).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Deletes one rollback intent within `tx`.
async fn delete_pending(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    email: &str,
    source_name: &str,
    target_uid: u32,
) -> Result<(), StoreError> {
    sqlx::query(
        "DELETE FROM reverse_pending WHERE email = $1 AND source_name = $2 AND target_uid = $3",
    )
    .bind(email)
    .bind(source_name)
    .bind(i64::from(target_uid))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_intent_becomes_a_uid_map_row_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqlStore::open(
            &format!("sqlite://{}/s.db", dir.path().display()),
            crate::store::Open::CreateIfMissing,
        )
        .await
        .unwrap();
        let pending = [(7, "b3:aa".to_owned()), (9, "b3:bb".to_owned())];
        store
            .add_reverse_pending("a@x", "INBOX", &pending)
            .await
            .unwrap();
        let got = store.reverse_pending("a@x", "INBOX").await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].target_uid, got[0].hash.as_str()), (7, "b3:aa"));
        assert!(store
            .reverse_pending("a@x", "Sent")
            .await
            .unwrap()
            .is_empty());

        let row = UidRow {
            source_uid: 41,
            target_uid: Some(7),
            hash: "b3:aa".into(),
            size: 10,
            pending_at: None,
        };
        store
            .confirm_reverse("a@x", "INBOX", std::slice::from_ref(&row))
            .await
            .unwrap();
        let map = store.uid_map("a@x", "INBOX").await.unwrap();
        assert_eq!((map[0].source_uid, map[0].target_uid), (41, Some(7)));
        let left = store.reverse_pending("a@x", "INBOX").await.unwrap();
        assert_eq!(left.iter().map(|p| p.target_uid).collect::<Vec<_>>(), [9]);

        store
            .forget_reverse_pending("a@x", "INBOX", &[9])
            .await
            .unwrap();
        assert!(store
            .reverse_pending("a@x", "INBOX")
            .await
            .unwrap()
            .is_empty());
    }
}
