//! Accept loops: a permit per connection (per protocol, and before login per source address),
//! backoff on accept errors, stop on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::permits::{AddressSlot, AddressSlots};
use crate::shutdown::Shutdown;

/// How long the refusal of a connection over the limit may take to write.
const OVERLOAD_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Which connections a listener takes, and what it says to the others. Clones share counts.
#[derive(Clone)]
pub struct Admission {
    /// Open connections of the listener's protocol; over it, `overload` is said.
    pub permits: Arc<Semaphore>,
    /// The refusal when `permits` are exhausted.
    pub overload: &'static [u8],
    /// Slots per source address before login, and the refusal when an address has none left.
    /// Checked first, so that a refused address never takes one of `permits`.
    pub per_address: Option<(Arc<AddressSlots>, &'static [u8])>,
}

impl Admission {
    /// At most `max` connections, without a per-address count.
    pub fn new(max: usize, overload: &'static [u8]) -> Admission {
        Admission {
            permits: Arc::new(Semaphore::new(max)),
            overload,
            per_address: None,
        }
    }

    /// A slot for a connection from `tcp`'s peer, or the refusal to write.
    fn admit(&self, tcp: &TcpStream) -> Result<Admitted, &'static [u8]> {
        let slot = match (&self.per_address, tcp.peer_addr()) {
            (Some((slots, refusal)), Ok(peer)) => match slots.try_acquire(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    metrics::counter!("mailferry_connections_refused_total", "reason" => "address")
                        .increment(1);
                    debug!(%peer, "refused: too many connections before login from this address");
                    return Err(refusal);
                }
            },
            _ => None,
        };
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Admitted { permit, slot }),
            Err(_) => {
                metrics::counter!("mailferry_connections_refused_total", "reason" => "limit")
                    .increment(1);
                Err(self.overload)
            }
        }
    }
}

/// An admitted connection's permits.
struct Admitted {
    permit: tokio::sync::OwnedSemaphorePermit,
    slot: Option<AddressSlot>,
}

/// Accepts on `listener` until shutdown; each admitted connection runs `handler` as a tracked
/// task holding one of the permits, and is handed its per-address slot to give back at login.
/// A connection that is not admitted is told why and closed.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shutdown: Shutdown,
    admission: Admission,
    handler: F,
) where
    F: Fn(TcpStream, Option<AddressSlot>) -> Fut,
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
        match admission.admit(&tcp) {
            Ok(Admitted { permit, slot }) => {
                let fut = handler(tcp, slot);
                shutdown.spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
            Err(refusal) => {
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    let _ =
                        tokio::time::timeout(OVERLOAD_REPLY_TIMEOUT, tcp.write_all(refusal)).await;
                });
            }
        }
    }
}
