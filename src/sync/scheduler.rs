//! The background scheduler of `serve`: runs initial and incremental passes for every user in
//! state `syncing`, at most `concurrency` at once, each user again `interval` after its last
//! pass; transient failures back off exponentially. A login of a syncing user (through the
//! proxy) bumps that user's next pass to the front of the queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Engine, PassReport, SyncError};
use crate::shutdown::Shutdown;

/// Bumps kept until the scheduler next looks. Every proxy login bumps, syncing or not, and the
/// scheduler may not be running at all (no master credentials): past this, bumps are dropped
/// and those users are reached by their normal schedule.
const MAX_URGENT: usize = 10_000;

/// Logins waiting to be looked at, in arrival order, each once.
#[derive(Default)]
struct Urgent {
    order: VecDeque<String>,
    members: HashSet<String>,
}

/// The handle others use to talk to the scheduler: bumps from logins, wake-ups from `migrate`.
#[derive(Default)]
pub struct SyncQueue {
    urgent: Mutex<Urgent>,
    notify: Notify,
    /// Set by `wake`: the set of syncing users changed, read the store again now.
    refresh: AtomicBool,
}

/// How often the scheduler re-reads the set of `syncing` users without being asked to. Logins
/// only bump: they must not cost a store query each.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

impl SyncQueue {
    /// Moves `email`'s next pass to the front (ignored unless the user is `syncing`).
    pub fn bump(&self, email: &str) {
        if let Ok(mut q) = self.urgent.lock() {
            if q.order.len() < MAX_URGENT && q.members.insert(email.to_owned()) {
                q.order.push_back(email.to_owned());
            }
        }
        self.notify.notify_one();
    }

    /// Makes the scheduler look at the store now (a user entered `syncing`).
    pub fn wake(&self) {
        self.refresh.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    fn take_urgent(&self) -> Vec<String> {
        self.urgent
            .lock()
            .map(|mut q| {
                q.members.clear();
                q.order.drain(..).collect()
            })
            .unwrap_or_default()
    }
}

/// Scheduling limits.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Passes at once.
    pub concurrency: usize,
    /// Pause between two passes of one user.
    pub interval: Duration,
}

/// Runs until `shutdown` says stop. Passes still running then are dropped with the runtime;
/// the store makes them resumable.
pub async fn run(
    engine: Arc<Engine>,
    queue: Arc<SyncQueue>,
    schedule: Schedule,
    shutdown: Shutdown,
) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut failures: HashMap<String, u32> = HashMap::new();
    let mut running: HashSet<String> = HashSet::new();
    let mut rerun: HashSet<String> = HashSet::new();
    let mut front: VecDeque<String> = VecDeque::new();
    let mut tasks: JoinSet<(String, Result<PassReport, SyncError>)> = JoinSet::new();
    let mut users: HashSet<String> = HashSet::new();
    let mut read_at: Option<Instant> = None;
    loop {
        let stale = read_at.is_none_or(|at| at.elapsed() >= REFRESH_EVERY);
        if queue.refresh.swap(false, Ordering::Relaxed) || stale {
            match engine.store.syncing_users().await {
                Ok(u) => users = u.into_iter().collect(),
                Err(e) => warn!(error = %e, "sync scheduler cannot read the store"),
            }
            read_at = Some(Instant::now());
        }
        let now = Instant::now();
        due.retain(|u, _| users.contains(u));
        for u in &users {
            due.entry(u.clone()).or_insert(now);
        }
        for u in queue.take_urgent() {
            if !users.contains(&u) {
                continue;
            }
            if running.contains(&u) {
                rerun.insert(u);
            } else if !front.contains(&u) {
                debug!(user = %u, "sync bumped by a login");
                front.push_back(u);
            }
        }
        front.retain(|u| users.contains(u));
        while running.len() < schedule.concurrency.max(1) {
            let next = front.pop_front().or_else(|| {
                due.iter()
                    .filter(|(u, at)| **at <= now && !running.contains(*u))
                    .min_by_key(|(_, at)| **at)
                    .map(|(u, _)| u.clone())
            });
            let Some(user) = next else { break };
            if running.contains(&user) {
                continue;
            }
            running.insert(user.clone());
            let e = engine.clone();
            tasks.spawn(async move {
                let r = e.pass(&user, None).await;
                (user, r)
            });
        }
        let wait = due
            .iter()
            .filter(|(u, _)| !running.contains(*u))
            .map(|(_, at)| at.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(5))
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
        tokio::select! {
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((user, result)) = done else { continue };
                running.remove(&user);
                let next = match result {
                    Ok(_) => {
                        failures.remove(&user);
                        schedule.interval
                    }
                    Err(e) if e.retryable() => {
                        let n = failures.entry(user.clone()).or_insert(0);
                        *n += 1;
                        Duration::from_secs(5u64 << (*n - 1).min(6)).min(Duration::from_secs(300))
                    }
                    Err(_) => schedule.interval,
                };
                let next = if rerun.remove(&user) { Duration::ZERO } else { next };
                due.insert(user, Instant::now() + next);
            }
            _ = queue.notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.stopping() => return,
        }
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    #[test]
    fn bumps_are_deduplicated_and_bounded() {
        let q = SyncQueue::default();
        q.bump("a@example.org");
        q.bump("b@example.org");
        q.bump("a@example.org");
        assert_eq!(q.take_urgent(), vec!["a@example.org", "b@example.org"]);
        for i in 0..MAX_URGENT + 50 {
            q.bump(&format!("u{i}@example.org"));
        }
        assert_eq!(q.take_urgent().len(), MAX_URGENT);
        q.bump("a@example.org");
        assert_eq!(q.take_urgent(), vec!["a@example.org"]);
    }
}
