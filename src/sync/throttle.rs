//! The bytes/s budget shared by all passes: a token bucket that may go into debt by one
//! message, so a message larger than a second's budget still passes (and the next ones wait).

use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Mutex;

/// A shared bytes/s limiter; `0` means unlimited.
pub struct Throttle {
    rate: u64,
    state: Mutex<Bucket>,
}

struct Bucket {
    /// Available bytes; negative while in debt.
    tokens: f64,
    last: Instant,
}

impl Throttle {
    /// A limiter of `bytes_per_second` (0 = unlimited).
    pub fn new(bytes_per_second: u64) -> Throttle {
        Throttle {
            rate: bytes_per_second,
            state: Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    /// The configured rate (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Waits until `bytes` may be sent. Callers are served in order (the lock is fair), and
    /// the burst is capped at a tenth of a second's budget so a measured rate stays close.
    pub async fn acquire(&self, bytes: u64) {
        if self.rate == 0 || bytes == 0 {
            return;
        }
        let rate = self.rate as f64;
        let mut b = self.state.lock().await;
        let now = Instant::now();
        let burst = rate / 10.0;
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        b.tokens -= bytes as f64;
        if b.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-b.tokens / rate);
            // Holding the lock while sleeping keeps later callers behind this debt.
            tokio::time::sleep(wait).await;
            b.tokens = 0.0;
            b.last = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn debt_is_paid_in_time() {
        let t = Throttle::new(1000);
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            t.acquire(500).await;
        }
        // 5000 bytes at 1000 B/s with at most 100 bytes of burst: about 4.9 s of virtual time.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(4800), "{took:?}");
    }
}
