//! Growing delay after failed logins, per source address (slows password guessing).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Failures are forgotten this long after the last one.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

/// Failed-login counts per client address.
pub struct AuthDelay {
    base: Duration,
    max: Duration,
    failures: DashMap<IpAddr, (u32, Instant)>,
}

impl AuthDelay {
    /// Delay starts at `base` and doubles per failure up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        AuthDelay {
            base,
            max,
            failures: DashMap::new(),
        }
    }

    /// Records a failure from `ip` and returns how long to wait before answering.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        if self.failures.len() > 100_000 {
            self.failures
                .retain(|_, (_, at)| at.elapsed() < FORGET_AFTER);
        }
        let mut e = self.failures.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= FORGET_AFTER {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = Instant::now();
        let factor = 1u32 << (e.0 - 1).min(16);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// A successful login from `ip` clears its count.
    pub fn succeeded(&self, ip: IpAddr) {
        self.failures.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_then_caps_and_resets() {
        let d = AuthDelay::new(Duration::from_millis(100), Duration::from_millis(350));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(d.failed(ip), Duration::from_millis(100));
        assert_eq!(d.failed(ip), Duration::from_millis(200));
        assert_eq!(d.failed(ip), Duration::from_millis(350));
        d.succeeded(ip);
        assert_eq!(d.failed(ip), Duration::from_millis(100));
    }
}
