//! One shutdown signal for the whole process: stop accepting, give sessions a grace period,
//! then force them to say BYE and close.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// After the grace period, how long sessions get to say BYE and close before the tasks are
/// aborted.
const CLOSE_AFTER_BYE: Duration = Duration::from_secs(5);

/// Shared by listeners and sessions; cheap to clone.
#[derive(Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A fresh signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Completes when listeners must stop accepting.
    pub async fn stopping(&self) {
        self.stop.cancelled().await
    }

    /// Completes when sessions must end now.
    pub async fn forced(&self) {
        self.force.cancelled().await
    }

    /// The token sessions select on to end now.
    pub fn force_token(&self) -> CancellationToken {
        self.force.clone()
    }

    /// Tracks a connection task so `drain` can wait for it.
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(fut);
    }

    /// Stops accepting, waits up to `grace` for sessions, then forces the rest to close.
    pub async fn drain(&self, grace: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                sessions = self.tracker.len(),
                "grace period over, closing sessions"
            );
            self.force.cancel();
            let _ = tokio::time::timeout(CLOSE_AFTER_BYE, self.tracker.wait()).await;
        }
    }
}
