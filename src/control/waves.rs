//! Waves: importing users, and migrating or cutting over a named group of them at once, at
//! most `[cutover] wave_concurrency` cutovers at a time. A wave cutover takes only users whose
//! sync has caught up (unless asked for all), and reports the others instead of failing them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::info;

use super::cutover::Direction;
use super::machine::Actor;
use super::{Control, ControlError};
use crate::store::sync::SyncProgress;
use crate::store::waves::{Imported, WaveMark, WaveTimes};
use crate::store::UserState;

/// One user of a wave, as `wave show` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    /// Address.
    pub email: String,
    /// Migration state.
    pub state: UserState,
    /// Messages copied and on legacy.
    pub messages: (u64, u64),
    /// Whether the sync has caught up (a cutover now has only a small delta to copy).
    pub caught_up: bool,
    /// Why the last transition failed.
    pub last_error: Option<String>,
}

/// What `wave show` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WaveView {
    /// Wave name.
    pub name: String,
    /// Users per state (states without users left out).
    pub states: BTreeMap<String, u64>,
    /// Users in the wave.
    pub users: u64,
    /// Users whose sync has caught up.
    pub caught_up: u64,
    /// Messages copied of those on legacy, over the wave.
    pub messages_copied: u64,
    /// Messages on legacy.
    pub messages_total: u64,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// Bytes on legacy.
    pub bytes_total: u64,
    /// Copy speed since `wave migrate`, bytes per second.
    pub bytes_per_sec: Option<f64>,
    /// Seconds until the copy is done at that speed.
    pub eta_secs: Option<u64>,
    /// When the wave was imported, migrated, cut over.
    pub times: WaveTimes,
    /// The last `wave cutover` run by this server.
    pub cutover: Option<WaveJob>,
    /// Every user.
    pub members: Vec<Member>,
}

/// Progress of a `wave cutover`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WaveJob {
    /// Users the run cuts over.
    pub total: u64,
    /// Of those, now on new.
    pub done: u64,
    /// Of those, failed (on legacy, `failed`).
    pub failed: u64,
    /// Users left out, with why.
    pub skipped: Vec<String>,
    /// Seconds since the epoch when it started.
    pub started_at: i64,
    /// Seconds it took, once finished.
    pub took_secs: Option<f64>,
}

impl WaveJob {
    /// Whether every user of the run has ended.
    pub fn finished(&self) -> bool {
        self.took_secs.is_some()
    }
}

/// What `wave migrate` or `wave cutover` started.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WaveStarted {
    /// Wave name.
    pub name: String,
    /// Users the command acts on.
    pub started: u64,
    /// Users left out, with why.
    pub skipped: Vec<String>,
}

/// Whether `p` shows a sync that has caught up: a pass ended cleanly and everything on
/// legacy at its end was copied.
pub fn caught_up(p: &SyncProgress) -> bool {
    p.passes > 0 && p.last_error.is_none() && p.messages_copied >= p.messages_total
}

impl Control {
    /// `mailferry import`: adds users (and their waves) in one transaction.
    pub async fn import(
        &self,
        users: Vec<(String, Option<String>)>,
    ) -> Result<Imported, ControlError> {
        let users: Vec<(String, Option<String>)> = users
            .into_iter()
            .map(|(e, w)| (self.routes.key(&e), w))
            .collect();
        let done = self.store.import_users(&users).await?;
        info!(
            added = done.added,
            moved = done.moved,
            unchanged = done.unchanged,
            "users imported"
        );
        Ok(done)
    }

    /// `wave list`: every wave with its users per state.
    pub async fn waves(&self) -> Result<Vec<WaveView>, ControlError> {
        let mut out = Vec::new();
        for (name, _) in self.store.waves().await? {
            let mut view = WaveView {
                name: name.clone(),
                ..WaveView::default()
            };
            for m in self.store.wave_members(&name).await? {
                view.users += 1;
                *view.states.entry(m.state.to_string()).or_default() += 1;
            }
            out.push(view);
        }
        Ok(out)
    }

    /// Sets the gauges of users per state and per wave and state (`/metrics`).
    pub async fn publish_gauges(&self) -> Result<(), ControlError> {
        let summary = self.store.summary().await?;
        for state in UserState::ALL {
            let n = summary
                .users
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            metrics::gauge!("mailferry_users", "state" => state.as_str()).set(n as f64);
        }
        for w in self.waves().await? {
            for state in UserState::ALL {
                let n = w.states.get(state.as_str()).copied().unwrap_or(0);
                metrics::gauge!("mailferry_wave_users", "wave" => w.name.clone(), "state" => state.as_str())
                    .set(n as f64);
            }
        }
        Ok(())
    }

    /// `wave show`: the wave's users, totals per state, copy progress, speed and ETA.
    pub async fn wave(&self, name: &str) -> Result<WaveView, ControlError> {
        let times = self
            .store
            .wave_times(name)
            .await?
            .ok_or_else(|| ControlError::Conflict(format!("no wave named {name:?}")))?;
        let mut view = WaveView {
            name: name.to_owned(),
            cutover: self.wave_job(name),
            ..WaveView::default()
        };
        for m in self.store.wave_members(name).await? {
            let p = self.store.sync_progress(&m.email).await?;
            view.add(m, &p);
        }
        let since = times.migrate_at.map(|t| crate::store::now() - t);
        if let Some(secs) = since.filter(|s| *s > 0) {
            let speed = view.bytes_copied as f64 / secs as f64;
            view.bytes_per_sec = Some(speed);
            let left = view.bytes_total.saturating_sub(view.bytes_copied) as f64;
            view.eta_secs = (speed > 0.0).then(|| (left / speed).ceil() as u64);
        }
        view.times = times;
        Ok(view)
    }

    /// `wave migrate`: every user of the wave on legacy (or failed there) starts syncing.
    pub async fn wave_migrate(&self, name: &str) -> Result<WaveStarted, ControlError> {
        let actor = Actor::Wave(name.to_owned());
        let mut out = self.wave_start(name).await?;
        for m in self.store.wave_members(name).await? {
            match self.migrate(&m.email, &actor).await {
                Ok(_) => out.started += 1,
                Err(ControlError::Conflict(why)) => out.skipped.push(why),
                Err(e) => return Err(e),
            }
        }
        self.store.mark_wave(name, WaveMark::Migrate).await?;
        Ok(out)
    }

    /// `wave cutover`: cuts the wave's users over in the background, `wave_concurrency` at a
    /// time; users whose sync has not caught up are skipped (reported) unless `all`.
    pub async fn wave_cutover(
        self: &Arc<Self>,
        name: &str,
        all: bool,
    ) -> Result<WaveStarted, ControlError> {
        let mut out = self.wave_start(name).await?;
        let mut users = Vec::new();
        for m in self.store.wave_members(name).await? {
            let p = self.store.sync_progress(&m.email).await?;
            match m.state {
                UserState::New => out.skipped.push(format!("{}: already new", m.email)),
                s if s.is_moving() => out.skipped.push(format!("{}: {s} running", m.email)),
                _ if all || caught_up(&p) => users.push(m.email),
                s => out.skipped.push(format!(
                    "{}: {s}, sync not caught up ({}/{} messages); --all takes it anyway",
                    m.email, p.messages_copied, p.messages_total
                )),
            }
        }
        out.started = users.len() as u64;
        let job = Arc::new(Mutex::new(WaveJob {
            total: out.started,
            skipped: out.skipped.clone(),
            started_at: crate::store::now(),
            ..WaveJob::default()
        }));
        self.wave_jobs.insert(name.to_owned(), job.clone());
        self.store.mark_wave(name, WaveMark::Cutover).await?;
        let me = self.clone();
        let actor = Actor::Wave(name.to_owned());
        tokio::spawn(async move { me.run_wave(users, actor, job).await });
        Ok(out)
    }

    /// Cuts `users` over, at most `wave_concurrency` at once, counting outcomes into `job`.
    async fn run_wave(self: Arc<Self>, users: Vec<String>, actor: Actor, job: Arc<Mutex<WaveJob>>) {
        let started = std::time::Instant::now();
        let slots = Arc::new(Semaphore::new(self.cutover.wave_concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for email in users {
            let (me, slots, actor, job) = (self.clone(), slots.clone(), actor.clone(), job.clone());
            tasks.spawn(async move {
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                let ended = me.move_user(&email, Direction::Cutover, actor).await;
                if let Ok(mut j) = job.lock() {
                    match ended {
                        Ok(UserState::New) => j.done += 1,
                        _ => j.failed += 1,
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        if let Ok(mut j) = job.lock() {
            j.took_secs = Some(started.elapsed().as_secs_f64());
            info!(wave = %actor, done = j.done, failed = j.failed, secs = j.took_secs, "wave cutover ended");
        }
    }

    /// The answer of a wave command, once the wave is known to exist.
    async fn wave_start(&self, name: &str) -> Result<WaveStarted, ControlError> {
        if self.store.wave_times(name).await?.is_none() {
            return Err(ControlError::Conflict(format!("no wave named {name:?}")));
        }
        Ok(WaveStarted {
            name: name.to_owned(),
            ..WaveStarted::default()
        })
    }

    fn wave_job(&self, name: &str) -> Option<WaveJob> {
        let job = self.wave_jobs.get(name)?;
        let j = job.lock().ok()?;
        Some(j.clone())
    }
}

impl WaveView {
    fn add(&mut self, m: crate::store::UserRecord, p: &SyncProgress) {
        self.users += 1;
        *self.states.entry(m.state.to_string()).or_default() += 1;
        let up = caught_up(p);
        self.caught_up += u64::from(up);
        self.messages_copied += p.messages_copied;
        self.messages_total += p.messages_total;
        self.bytes_copied += p.bytes_copied;
        self.bytes_total += p.bytes_total;
        self.members.push(Member {
            email: m.email,
            state: m.state,
            messages: (p.messages_copied, p.messages_total),
            caught_up: up,
            last_error: m.last_error,
        });
    }
}
