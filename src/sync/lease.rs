//! A pass holds its user's lease in the state store (`store::leases`) for as long as it runs,
//! so that no other process or node runs a pass of the same user meanwhile: taken before the
//! logins, renewed every third of its duration, given up at the end. A pass whose renewal
//! fails (its lease lapsed and another holder took it) stops at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::SyncError;
use crate::store::leases::LeaseTaken;
use crate::store::StateStore;

/// Who takes leases for one engine: `host:pid:n` names each pass uniquely in the cluster.
pub(crate) struct Leases {
    prefix: String,
    next: AtomicU64,
    secs: i64,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Gives up the leases held by processes of this host that are gone (a `serve` or `sync
/// --once` killed with SIGKILL), so that a restarted server need not wait for them to lapse.
/// A holder whose process id is alive again (reused) keeps its lease until it lapses.
pub async fn free_dead_local(store: &dyn StateStore) -> Result<usize, SyncError> {
    let host = format!("{}:", hostname());
    let mut freed = 0;
    for (user, holder) in store.leases_held_by(&host).await? {
        let pid = holder[host.len()..].split(':').next().unwrap_or_default();
        let alive = pid.parse::<u32>().is_ok_and(|p| {
            p == std::process::id() || std::path::Path::new(&format!("/proc/{p}")).exists()
        });
        if !alive {
            store.release_lease(&user, &holder).await?;
            tracing::info!(user = %user, holder = %holder, "freed the sync lease of a dead process");
            freed += 1;
        }
    }
    Ok(freed)
}

impl Leases {
    pub(crate) fn new(secs: u64) -> Leases {
        let host = hostname();
        Leases {
            prefix: format!("{host}:{}", std::process::id()),
            next: AtomicU64::new(1),
            secs: i64::try_from(secs.max(3)).unwrap_or(60),
        }
    }

    /// Takes `user`'s lease for a new pass, or says who holds it.
    pub(crate) async fn take(
        &self,
        store: &dyn StateStore,
        user: &str,
    ) -> Result<Lease, SyncError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let holder = format!("{}:{n}", self.prefix);
        match store.take_lease(user, &holder, self.secs).await? {
            LeaseTaken::Taken => Ok(Lease {
                holder,
                secs: self.secs,
            }),
            LeaseTaken::HeldBy { holder, expires_at } => {
                Err(SyncError::PassInProgress { holder, expires_at })
            }
        }
    }
}

/// A lease held by one pass.
pub(crate) struct Lease {
    holder: String,
    secs: i64,
}

impl Lease {
    /// Renews the lease every third of its duration; returns only when it cannot: the lease
    /// was lost, or the store failed (the pass then stops, resumable as after a crash).
    pub(crate) async fn keep(&self, store: &dyn StateStore, user: &str) -> SyncError {
        let every = Duration::from_secs((self.secs / 3).max(1) as u64);
        loop {
            tokio::time::sleep(every).await;
            match store.renew_lease(user, &self.holder, self.secs).await {
                Ok(true) => {}
                Ok(false) => return SyncError::LeaseLost,
                Err(e) => return e.into(),
            }
        }
    }

    /// Gives the lease up (a failure only leaves it to lapse).
    pub(crate) async fn release(self, store: &dyn StateStore, user: &str) {
        if let Err(e) = store.release_lease(user, &self.holder).await {
            tracing::warn!(user = %user, error = %e, "sync lease not released; it will lapse");
        }
    }
}
