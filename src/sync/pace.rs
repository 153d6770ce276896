//! Adaptive pacing per backend (AIMD): the engine measures APPEND/FETCH round trips and backs
//! off when a backend slows down or says it is overloaded, then creeps back up.
//!
//! [`Pace`] is the pure state machine (feed it samples, read the allowed concurrency and pause);
//! [`Limiter`] wraps it for one backend with a slot counter the passes wait on, the log lines
//! and the `mailferry_sync_backoff_total{backend}` metric.
//!
//! Latency is compared with a *baseline*, the lowest of the recent samples: a backend that is
//! merely slow (a far-away legacy server) is not penalised, only one that gets slower than it
//! was a moment ago. The smoothed latency is an EWMA so one slow batch does not trigger a
//! backoff, while a sustained rise does within a few batches.
//!
//! Latency below an absolute *floor* never counts as slow: a copy that keeps a fast backend
//! busy raises the round trip through its own queueing, which is not the backend slowing down
//! (docs/sync.md, Pacing).
//!
//! [`ServiceClock`] turns the replies of pipelined commands into service-time samples.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::info;

use crate::route::Route;

/// Tuning of a [`Pace`]; the defaults suit IMAP batches of tens of milliseconds to seconds.
#[derive(Debug, Clone)]
pub struct PaceConfig {
    /// Highest allowed concurrency (the configured `per_backend`).
    pub max: usize,
    /// Back off when the smoothed latency exceeds this multiple of the baseline.
    pub factor: f64,
    /// Latency counts as normal again below this multiple of the baseline (hysteresis, so the
    /// limit does not flap around `factor`).
    pub normal_factor: f64,
    /// EWMA weight of a new sample.
    pub alpha: f64,
    /// How many recent samples the baseline (their minimum) is taken over.
    pub window: usize,
    /// Samples needed before latency can cause a backoff (a baseline of one sample means little).
    pub min_samples: usize,
    /// Samples after a backoff before latency may cause another one: the batches already in
    /// flight were sent at the old concurrency and say nothing about the new one.
    pub cooldown: usize,
    /// Consecutive normal samples per additive increase of the limit.
    pub recover_every: usize,
    /// Pause after the first backoff; doubled for each further backoff without a recovery.
    pub pause: Duration,
    /// Longest pause.
    pub max_pause: Duration,
    /// Smoothed latency (per [`SAMPLE_UNIT_BYTES`]) at or below which a backend is never
    /// considered slow, whatever its baseline (`[sync] latency_floor_ms`).
    pub floor: Duration,
}

impl PaceConfig {
    /// Defaults for a backend allowing `max` concurrent connections.
    pub fn new(max: usize) -> PaceConfig {
        PaceConfig {
            max: max.max(1),
            factor: 3.0,
            normal_factor: 1.5,
            alpha: 0.25,
            window: 128,
            min_samples: 8,
            cooldown: 4,
            recover_every: 4,
            pause: Duration::from_millis(250),
            max_pause: Duration::from_secs(8),
            floor: Duration::from_millis(crate::config::DEFAULT_LATENCY_FLOOR_MS),
        }
    }

    /// Sets the latency floor.
    pub fn with_floor(mut self, floor: Duration) -> PaceConfig {
        self.floor = floor;
        self
    }
}

/// What a sample or an overload signal changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Nothing worth reporting (the limit may have grown by one).
    None,
    /// The limit was cut.
    Backoff {
        /// Limit before.
        from: usize,
        /// Limit now.
        to: usize,
        /// Smoothed latency in milliseconds (0 when no sample was seen yet).
        smoothed_ms: f64,
        /// Baseline latency in milliseconds (0 when no sample was seen yet).
        baseline_ms: f64,
        /// Pause the caller should observe before sending more.
        pause: Duration,
        /// Why: `latency`, or the response code (`LIMIT`, `INUSE`, `UNAVAILABLE`, `TIMEOUT`).
        reason: String,
    },
    /// The limit is back at its maximum.
    Recovered {
        /// Smoothed latency in milliseconds.
        smoothed_ms: f64,
        /// Baseline latency in milliseconds.
        baseline_ms: f64,
    },
}

/// The AIMD state of one backend; pure (no clock, no I/O).
#[derive(Debug, Clone)]
pub struct Pace {
    cfg: PaceConfig,
    limit: usize,
    smoothed: Option<f64>,
    recent: VecDeque<f64>,
    /// Samples since the last backoff (for the cooldown).
    since_backoff: usize,
    /// Consecutive normal samples (for the additive increase).
    normal_run: usize,
    /// Backoffs since the limit was last at its maximum (for the pause growth).
    backoffs: u32,
}

impl Pace {
    /// A pace starting at full concurrency.
    pub fn new(cfg: PaceConfig) -> Pace {
        Pace {
            limit: cfg.max,
            cfg,
            smoothed: None,
            recent: VecDeque::new(),
            since_backoff: usize::MAX,
            normal_run: 0,
            backoffs: 0,
        }
    }

    /// Allowed concurrency now, between 1 and `max`.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The highest limit.
    pub fn max(&self) -> usize {
        self.cfg.max
    }

    /// `base` scaled by the current limit (rounded up, at least 1): how many batches may be in
    /// flight on one connection when `base` is the unthrottled depth.
    pub fn depth(&self, base: usize) -> usize {
        (base * self.limit)
            .div_ceil(self.cfg.max)
            .clamp(1, base.max(1))
    }

    /// Smoothed latency in seconds, once a sample was seen.
    pub fn smoothed(&self) -> Option<f64> {
        self.smoothed
    }

    /// The low-water mark of the recent samples, in seconds.
    pub fn baseline(&self) -> Option<f64> {
        self.recent.iter().copied().reduce(f64::min)
    }

    /// Feeds one round-trip sample.
    pub fn sample(&mut self, rtt: Duration) -> Change {
        let x = rtt.as_secs_f64();
        if self.recent.len() >= self.cfg.window {
            self.recent.pop_front();
        }
        self.recent.push_back(x);
        let s = match self.smoothed {
            Some(s) => s + self.cfg.alpha * (x - s),
            None => x,
        };
        self.smoothed = Some(s);
        self.since_backoff = self.since_backoff.saturating_add(1);
        let base = self.baseline().unwrap_or(x);
        // A zero baseline (sub-resolution timer) would make every sample look slow.
        let base_eff = base.max(1e-4);
        let floor = self.cfg.floor.as_secs_f64();
        if self.recent.len() >= self.cfg.min_samples
            && s > (self.cfg.factor * base_eff).max(floor)
            && self.since_backoff > self.cfg.cooldown
        {
            return self.cut("latency".into());
        }
        // Normal again below the floor too: a backend whose latency is back under it is not
        // slow, even if its idle baseline was far lower.
        if s <= (self.cfg.normal_factor * base_eff).max(floor / 2.0) {
            self.normal_run += 1;
            if self.limit < self.cfg.max && self.normal_run >= self.cfg.recover_every {
                self.normal_run = 0;
                self.limit += 1;
                if self.limit == self.cfg.max {
                    self.backoffs = 0;
                    return Change::Recovered {
                        smoothed_ms: s * 1e3,
                        baseline_ms: base * 1e3,
                    };
                }
            }
        } else {
            self.normal_run = 0;
        }
        Change::None
    }

    /// The backend answered `NO [LIMIT]`/`[INUSE]`/`[UNAVAILABLE]` or timed out: cut at once.
    pub fn overloaded(&mut self, code: &str) -> Change {
        self.cut(code.to_owned())
    }

    fn cut(&mut self, reason: String) -> Change {
        let from = self.limit;
        self.limit = (self.limit / 2).max(1);
        self.since_backoff = 0;
        self.normal_run = 0;
        let pause = self
            .cfg
            .pause
            .saturating_mul(1u32 << self.backoffs.min(16))
            .min(self.cfg.max_pause);
        self.backoffs = self.backoffs.saturating_add(1);
        Change::Backoff {
            from,
            to: self.limit,
            smoothed_ms: self.smoothed.unwrap_or(0.0) * 1e3,
            baseline_ms: self.baseline().unwrap_or(0.0) * 1e3,
            pause,
            reason,
        }
    }
}

/// Bytes a latency sample is normalised to: a batch of 8 MB naturally takes longer than one
/// message of 4 KB, so larger batches are scaled down to this size before comparing.
pub const SAMPLE_UNIT_BYTES: u64 = 256 * 1024;

/// A round trip of `elapsed` that moved `bytes`, as a comparable sample.
pub fn normalise(elapsed: Duration, bytes: u64) -> Duration {
    if bytes <= SAMPLE_UNIT_BYTES {
        return elapsed;
    }
    elapsed.mul_f64(SAMPLE_UNIT_BYTES as f64 / bytes as f64)
}

struct LimiterState {
    pace: Pace,
    in_use: usize,
    paused_until: Option<Instant>,
}

/// The pace of one backend shared by all passes: connection slots bounded by the adaptive limit.
pub struct Limiter {
    backend: Route,
    state: Mutex<LimiterState>,
    released: Notify,
}

/// A connection slot of a backend; given back on drop.
pub struct Slot {
    limiter: Arc<Limiter>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.lock().in_use -= 1;
        self.limiter.released.notify_waiters();
    }
}

impl Limiter {
    /// A limiter for `backend` allowing up to `max` connections, with the default floor.
    pub fn new(backend: Route, max: usize) -> Arc<Limiter> {
        Self::with_config(backend, PaceConfig::new(max))
    }

    /// A limiter with explicit tuning.
    pub fn with_config(backend: Route, cfg: PaceConfig) -> Arc<Limiter> {
        Arc::new(Limiter {
            backend,
            state: Mutex::new(LimiterState {
                pace: Pace::new(cfg),
                in_use: 0,
                paused_until: None,
            }),
            released: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LimiterState> {
        // The state stays consistent even if a holder panicked: every update is one assignment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a connection slot under the current limit (and any pause).
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            self.wait_pause().await;
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release between check and await is not lost.
            released.as_mut().enable();
            {
                let mut s = self.lock();
                if s.in_use < s.pace.limit() {
                    s.in_use += 1;
                    return Slot {
                        limiter: self.clone(),
                    };
                }
            }
            released.await;
        }
    }

    /// Sleeps out a pause imposed by the last backoff, if any.
    pub async fn wait_pause(&self) {
        let until = self.lock().paused_until;
        if let Some(until) = until {
            if until > Instant::now() {
                tokio::time::sleep_until(until).await;
            }
        }
    }

    /// How many of `base` batches may be in flight on one connection now.
    pub fn depth(&self, base: usize) -> usize {
        self.lock().pace.depth(base)
    }

    /// The current connection limit.
    pub fn limit(&self) -> usize {
        self.lock().pace.limit()
    }

    /// Records the round trip of a batch of `bytes` that took `elapsed`.
    pub fn sample(&self, elapsed: Duration, bytes: u64) {
        let change = self.lock().pace.sample(normalise(elapsed, bytes));
        self.apply(change);
    }

    /// Records an overload answer (`LIMIT`, `INUSE`, `UNAVAILABLE`) or a timeout.
    pub fn overloaded(&self, code: &str) {
        let change = self.lock().pace.overloaded(code);
        self.apply(change);
    }

    fn apply(&self, change: Change) {
        let backend = self.backend.as_str();
        match change {
            Change::None => {}
            Change::Backoff {
                from,
                to,
                smoothed_ms,
                baseline_ms,
                pause,
                reason,
            } => {
                self.lock().paused_until = Some(Instant::now() + pause);
                metrics::counter!("mailferry_sync_backoff_total", "backend" => backend)
                    .increment(1);
                metrics::gauge!("mailferry_sync_backend_limit", "backend" => backend)
                    .set(to as f64);
                info!(
                    backend,
                    reason = %reason,
                    from,
                    to,
                    smoothed_ms = format_args!("{smoothed_ms:.1}"),
                    baseline_ms = format_args!("{baseline_ms:.1}"),
                    pause_ms = pause.as_millis() as u64,
                    "sync backing off"
                );
            }
            Change::Recovered {
                smoothed_ms,
                baseline_ms,
            } => {
                let max = self.lock().pace.max();
                metrics::gauge!("mailferry_sync_backend_limit", "backend" => backend)
                    .set(max as f64);
                info!(
                    backend,
                    limit = max,
                    smoothed_ms = format_args!("{smoothed_ms:.1}"),
                    baseline_ms = format_args!("{baseline_ms:.1}"),
                    "sync recovered"
                );
            }
        }
        // A grown limit lets a waiting pass in.
        self.released.notify_waiters();
    }
}

/// Service time of pipelined commands, one after another: from when a command was sent or the
/// one before it finished (whichever is later), minus the time the sending side itself held
/// the pipeline up (backpressure, the store, the throttle): that waiting is not the backend's.
pub(crate) struct ServiceClock {
    prev_done: Instant,
    blocked: Duration,
}

impl ServiceClock {
    /// A clock for a pipeline starting now.
    pub(crate) fn new() -> ServiceClock {
        ServiceClock {
            prev_done: Instant::now(),
            blocked: Duration::ZERO,
        }
    }

    /// The sending side held the pipeline up for `d` while a command was outstanding.
    pub(crate) fn block(&mut self, d: Duration) {
        self.blocked += d;
    }

    /// The front command, sent at `sent`, has just been answered: its service time. The next
    /// command's starts now.
    pub(crate) fn done(&mut self, sent: Instant) -> Duration {
        let now = Instant::now();
        let service = now
            .saturating_duration_since(sent.max(self.prev_done))
            .saturating_sub(self.blocked);
        (self.prev_done, self.blocked) = (now, Duration::ZERO);
        service
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Relative behaviour alone, without the absolute floor.
    fn relative(max: usize) -> PaceConfig {
        PaceConfig::new(max).with_floor(Duration::ZERO)
    }

    fn warm(p: &mut Pace, n: usize, rtt: u64) {
        for _ in 0..n {
            assert_eq!(p.sample(ms(rtt)), Change::None);
        }
    }

    #[test]
    fn steady_latency_keeps_full_concurrency() {
        let mut p = Pace::new(relative(20));
        for i in 0..200 {
            // Jitter within 2x of the baseline is normal.
            assert_eq!(p.sample(ms(10 + (i % 10))), Change::None);
        }
        assert_eq!(p.limit(), 20);
        assert_eq!(p.depth(2), 2);
    }

    #[test]
    fn one_slow_sample_is_smoothed_away() {
        let mut p = Pace::new(relative(8));
        warm(&mut p, 20, 10);
        assert_eq!(p.sample(ms(60)), Change::None);
        assert_eq!(p.limit(), 8);
    }

    #[test]
    fn rising_latency_halves_with_a_pause_then_recovers_additively() {
        let cfg = relative(16);
        let mut p = Pace::new(cfg.clone());
        warm(&mut p, 20, 10);
        let mut cut = None;
        for _ in 0..10 {
            if let Change::Backoff {
                from, to, pause, ..
            } = p.sample(ms(100))
            {
                cut = Some((from, to, pause));
                break;
            }
        }
        assert_eq!(cut, Some((16, 8, cfg.pause)));
        assert_eq!(p.limit(), 8);
        assert_eq!(p.depth(2), 1);
        // Still slow after the cooldown: halved again, with a longer pause.
        let mut second = None;
        for _ in 0..=cfg.cooldown {
            if let Change::Backoff { to, pause, .. } = p.sample(ms(100)) {
                second = Some((to, pause));
            }
        }
        assert_eq!(second, Some((4, cfg.pause * 2)));
        // Back to normal: the EWMA comes down, then +1 per `recover_every` normal samples.
        let mut recovered_after = None;
        for i in 0..400 {
            let c = p.sample(ms(10));
            assert!(!matches!(c, Change::Backoff { .. }), "{c:?}");
            if matches!(c, Change::Recovered { .. }) {
                recovered_after = Some(i);
                break;
            }
        }
        assert_eq!(p.limit(), 16);
        // 12 steps of recover_every samples each, plus the time the average needs to come down.
        let n = recovered_after.expect("recovered");
        assert!(n >= 12 * cfg.recover_every, "{n}");
    }

    #[test]
    fn busy_but_under_the_floor_is_not_slow() {
        // 1 ms idle, 100 ms under load: our own queueing, not a struggling backend.
        let mut p = Pace::new(PaceConfig::new(20));
        warm(&mut p, 20, 1);
        for _ in 0..200 {
            assert_eq!(p.sample(ms(100)), Change::None);
        }
        assert_eq!(p.limit(), 20);
    }

    #[test]
    fn above_the_floor_and_the_baseline_backs_off_then_recovers_under_the_floor() {
        let mut p = Pace::new(PaceConfig::new(8));
        warm(&mut p, 20, 5);
        let cut = (0..20).find_map(|_| match p.sample(ms(600)) {
            Change::Backoff { to, reason, .. } => Some((to, reason)),
            _ => None,
        });
        assert_eq!(cut, Some((4, "latency".to_string())));
        // Back to 50 ms: ten times the idle baseline, but under half the floor, so normal.
        let recovered = (0..400).any(|_| matches!(p.sample(ms(50)), Change::Recovered { .. }));
        assert!(recovered);
        assert_eq!(p.limit(), 8);
    }

    #[test]
    fn overload_answers_cut_at_once_down_to_one() {
        let mut p = Pace::new(PaceConfig::new(5));
        let c = p.overloaded("LIMIT");
        assert!(
            matches!(c, Change::Backoff { from: 5, to: 2, ref reason, .. } if reason == "LIMIT"),
            "{c:?}"
        );
        p.overloaded("INUSE");
        assert_eq!(p.limit(), 1);
        p.overloaded("UNAVAILABLE");
        assert_eq!(p.limit(), 1);
        assert_eq!(p.depth(2), 1);
    }

    #[test]
    fn pause_grows_and_is_capped() {
        let cfg = relative(4);
        let mut p = Pace::new(cfg.clone());
        let pauses: Vec<Duration> = (0..10)
            .map(|_| match p.overloaded("LIMIT") {
                Change::Backoff { pause, .. } => pause,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(pauses[0], cfg.pause);
        assert_eq!(pauses[1], cfg.pause * 2);
        assert_eq!(pauses[9], cfg.max_pause);
    }

    #[test]
    fn too_few_samples_do_not_back_off() {
        let mut p = Pace::new(relative(4));
        p.sample(ms(1));
        for _ in 0..5 {
            assert_eq!(p.sample(ms(100)), Change::None);
        }
        assert_eq!(p.limit(), 4);
    }

    #[test]
    fn overload_errors_name_their_backend() {
        use crate::backend::error::BackendError;
        use crate::sync::SyncError;
        let refused = |code: &str| {
            SyncError::Backend(BackendError::Refused {
                backend: Route::New,
                command: "APPEND",
                code: code.into(),
                text: "NO".into(),
            })
        };
        assert_eq!(refused("LIMIT").overload(), Some((Route::New, "LIMIT")));
        assert_eq!(refused("INUSE").overload(), Some((Route::New, "INUSE")));
        assert_eq!(refused("OVERQUOTA").overload(), None);
        let timeout = SyncError::Backend(BackendError::Timeout {
            backend: Route::Legacy,
            phase: "FETCH",
        });
        assert_eq!(timeout.overload(), Some((Route::Legacy, "TIMEOUT")));
    }

    #[test]
    fn large_batches_are_normalised() {
        assert_eq!(normalise(ms(10), 1000), ms(10));
        assert_eq!(normalise(ms(320), 32 * SAMPLE_UNIT_BYTES), ms(10));
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_slots_follow_the_limit() {
        let l = Limiter::new(Route::New, 2);
        let a = l.acquire().await;
        let _b = l.acquire().await;
        l.overloaded("INUSE");
        assert_eq!(l.limit(), 1);
        drop(a);
        // Two in use before, one now, limit one: a third must wait until another is released.
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        drop(_b);
        let slot = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("slot after release")
            .expect("task");
        drop(slot);
    }
}
