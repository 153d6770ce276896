//! Accept loops: a permit per connection, backoff on accept errors, stop on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::shutdown::Shutdown;

/// How long the refusal of a connection over the limit may take to write.
const OVERLOAD_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Accepts on `listener` until shutdown; each connection runs `handler` as a tracked task
/// holding one of `permits`. Over the limit, `overload` is written and the socket closed.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shutdown: Shutdown,
    permits: Arc<Semaphore>,
    overload: &'static [u8],
    handler: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.stopping() => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => {
                backoff = Duration::from_millis(10);
                tcp
            }
            Err(e) => {
                // EMFILE and friends: wait rather than spin, then try again.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let fut = handler(tcp);
                shutdown.spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
            Err(_) => {
                metrics::counter!("mailferry_connections_refused_total").increment(1);
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    let _ =
                        tokio::time::timeout(OVERLOAD_REPLY_TIMEOUT, tcp.write_all(overload)).await;
                });
            }
        }
    }
}
