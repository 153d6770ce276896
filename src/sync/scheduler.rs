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
use crate::store::UserState;

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

/// Longest wait between two looks at the schedule, and the first retry delay of a pass that
/// failed transiently (doubled per failure).
const TICK: Duration = Duration::from_secs(5);
/// Shortest wait between two looks at the schedule.
const MIN_TICK: Duration = Duration::from_millis(50);
/// Longest retry delay of a pass that keeps failing transiently.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// Runs until `shutdown` says stop. Passes still running then are dropped with the runtime;
/// the store makes them resumable.
pub async fn run(
    engine: Arc<Engine>,
    queue: Arc<SyncQueue>,
    schedule: Schedule,
    shutdown: Shutdown,
) {
    let mut s = Scheduler {
        engine,
        queue,
        schedule,
        users: HashSet::new(),
        read_at: None,
        due: HashMap::new(),
        failures: HashMap::new(),
        running: HashSet::new(),
        rerun: HashSet::new(),
        front: VecDeque::new(),
        tasks: JoinSet::new(),
    };
    loop {
        s.refresh_users().await;
        let now = Instant::now();
        s.take_bumps(now);
        s.start_passes(now);
        let wait = s.next_wake(now);
        tokio::select! {
            Some(done) = s.tasks.join_next(), if !s.tasks.is_empty() => {
                if let Ok((user, result)) = done {
                    s.finished(user, result);
                }
            }
            _ = s.queue.notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.stopping() => return,
        }
    }
}

/// The scheduler's state: which users are syncing, when each is due, what runs.
struct Scheduler {
    engine: Arc<Engine>,
    queue: Arc<SyncQueue>,
    schedule: Schedule,
    /// Users in state `syncing`, as last read from the store.
    users: HashSet<String>,
    read_at: Option<Instant>,
    /// When each user's next pass is due.
    due: HashMap<String, Instant>,
    /// Transient failures in a row, per user (for the retry delay).
    failures: HashMap<String, u32>,
    running: HashSet<String>,
    /// Bumped by a login while a pass ran: another pass right after it.
    rerun: HashSet<String>,
    /// Bumped by a login: before anyone due.
    front: VecDeque<String>,
    /// Each pass's user and outcome (`None`: the user was no longer syncing).
    tasks: JoinSet<(String, Option<Result<PassReport, SyncError>>)>,
}

impl Scheduler {
    /// Reads the syncing users again when asked to, or every `REFRESH_EVERY`.
    async fn refresh_users(&mut self) {
        let stale = self.read_at.is_none_or(|at| at.elapsed() >= REFRESH_EVERY);
        if self.queue.refresh.swap(false, Ordering::Relaxed) || stale {
            match self.engine.store.syncing_users().await {
                Ok(u) => self.users = u.into_iter().collect(),
                Err(e) => warn!(error = %e, "sync scheduler cannot read the store"),
            }
            self.read_at = Some(Instant::now());
        }
    }

    /// New users are due now; logins move their user to the front (or to a rerun).
    fn take_bumps(&mut self, now: Instant) {
        let users = &self.users;
        self.due.retain(|u, _| users.contains(u));
        for u in users {
            self.due.entry(u.clone()).or_insert(now);
        }
        for u in self.queue.take_urgent() {
            if !users.contains(&u) {
                continue;
            }
            if self.running.contains(&u) {
                self.rerun.insert(u);
            } else if !self.front.contains(&u) {
                debug!(user = %u, "sync bumped by a login");
                self.front.push_back(u);
            }
        }
        self.front.retain(|u| users.contains(u));
    }

    /// Starts passes, bumped users first, then the longest due, up to the concurrency.
    fn start_passes(&mut self, now: Instant) {
        while self.running.len() < self.schedule.concurrency.max(1) {
            let next = self.front.pop_front().or_else(|| {
                self.due
                    .iter()
                    .filter(|(u, at)| **at <= now && !self.running.contains(*u))
                    .min_by_key(|(_, at)| **at)
                    .map(|(u, _)| u.clone())
            });
            let Some(user) = next else { break };
            if self.running.contains(&user) {
                continue;
            }
            self.running.insert(user.clone());
            let e = self.engine.clone();
            self.tasks.spawn(async move {
                // Asked again now: the set read from the store may be seconds old, and a user
                // cut over or forced to a route meanwhile is not synced.
                let r = match e.store.user_state(&user).await {
                    Ok(UserState::Syncing) => Some(e.pass(&user, None, false).await),
                    Ok(_) => None,
                    Err(err) => Some(Err(err.into())),
                };
                (user, r)
            });
        }
    }

    /// How long until the next user not running is due.
    fn next_wake(&self, now: Instant) -> Duration {
        self.due
            .iter()
            .filter(|(u, _)| !self.running.contains(*u))
            .map(|(_, at)| at.saturating_duration_since(now))
            .min()
            .unwrap_or(TICK)
            .clamp(MIN_TICK, TICK)
    }

    /// A pass ended: the user's next one is due after the interval, sooner after a transient
    /// failure (backing off), at once if a login bumped the user meanwhile.
    fn finished(&mut self, user: String, result: Option<Result<PassReport, SyncError>>) {
        self.running.remove(&user);
        let Some(result) = result else {
            debug!(user = %user, "not syncing any more: no pass");
            self.users.remove(&user);
            self.due.remove(&user);
            self.rerun.remove(&user);
            return;
        };
        let next = match result {
            Ok(_) => {
                self.failures.remove(&user);
                self.schedule.interval
            }
            Err(e) if e.retryable() => {
                let n = self.failures.entry(user.clone()).or_insert(0);
                *n += 1;
                (TICK * (1u32 << (*n - 1).min(6))).min(MAX_RETRY_DELAY)
            }
            Err(_) => self.schedule.interval,
        };
        let next = if self.rerun.remove(&user) {
            Duration::ZERO
        } else {
            next
        };
        self.due.insert(user, Instant::now() + next);
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
