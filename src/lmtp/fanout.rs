//! After DATA: recipients de-duplicated and grouped by backend, one backend transaction per
//! group (the groups run concurrently), and the replies zipped back into RCPT order, one per
//! accepted RCPT, duplicates included (RFC 2033 §4.2).
//!
//! `prepare` opens those transactions when DATA begins, up to the backend's 354, so their
//! round trips overlap the client's upload; `deliver` re-checks cutover flags and routes
//! once the message is complete, takes the in-flight slots, and sends the message only on
//! an early transaction whose recipients are still exactly its backend's group. Any other
//! is abandoned before the message (the backend stores nothing) and a fresh one is run.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use tracing::{info, warn};

use super::client::{BackendPool, ClientError, RcptOutcome, Transaction};
use super::data::stuff;
use super::reply::Reply;
use super::server::{MailFrom, Message};
use super::LmtpContext;
use crate::control::inflight::InFlight;
use crate::route::Route;

/// The recipients of one message, each user once: a repeated RCPT gets the reply of the
/// first, and the message is stored once per mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// For each accepted RCPT, in order: the index of its unique recipient.
    slots: Vec<usize>,
    /// Unique recipients in order of first appearance: (routing key, address as first given).
    unique: Vec<(String, String)>,
}

impl Plan {
    /// From (routing key, address) per accepted RCPT, in RCPT order.
    pub fn new<'a>(rcpts: impl IntoIterator<Item = (&'a str, &'a str)>) -> Plan {
        let mut plan = Plan {
            slots: Vec::new(),
            unique: Vec::new(),
        };
        for (key, address) in rcpts {
            let idx = match plan.unique.iter().position(|(k, _)| k == key) {
                Some(i) => i,
                None => {
                    plan.unique.push((key.to_owned(), address.to_owned()));
                    plan.unique.len() - 1
                }
            };
            plan.slots.push(idx);
        }
        plan
    }

    /// Unique recipients: (routing key, address).
    pub fn unique(&self) -> &[(String, String)] {
        &self.unique
    }

    /// The addresses of the unique recipients `members`, as first given.
    fn addresses(&self, members: &[usize]) -> Vec<String> {
        members.iter().map(|&u| self.unique[u].1.clone()).collect()
    }

    /// One reply per RCPT, from one reply per unique recipient.
    pub fn zip(&self, unique_replies: &[Reply]) -> Vec<Reply> {
        self.slots
            .iter()
            .map(|&i| {
                unique_replies
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| Reply::new(451, "4.3.0 Internal error, try again later"))
            })
            .collect()
    }
}

/// Unique-recipient indexes grouped by backend, keeping their order within each group.
pub fn group(routes: &[Option<Route>]) -> Vec<(Route, Vec<usize>)> {
    let mut groups: Vec<(Route, Vec<usize>)> = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        let Some(route) = route else { continue };
        match groups.iter_mut().find(|(r, _)| r == route) {
            Some((_, v)) => v.push(i),
            None => groups.push((*route, vec![i])),
        }
    }
    groups
}

/// The 4xx for a user being cut over.
pub fn cutover_reply(address: &str) -> Reply {
    Reply::new(
        451,
        format!("4.2.0 <{address}> Mailbox is being migrated, try again later"),
    )
}

/// The 4xx when the directory cannot be asked.
pub fn directory_reply(address: &str) -> Reply {
    Reply::new(
        451,
        format!("4.3.0 <{address}> Directory unavailable, try again later"),
    )
}

/// The 4xx when the owning backend has no LMTP address configured.
pub fn no_backend_reply(address: &str, route: Route) -> Reply {
    Reply::new(
        451,
        format!("4.3.5 <{address}> No LMTP configured for backend {route}"),
    )
}

fn deferred(reason: &'static str) {
    metrics::counter!("mailferry_lmtp_deferrals_total", "reason" => reason).increment(1);
}

/// Backend transactions started when DATA began, their envelopes sent while the client is
/// still uploading the message. Dropping this abandons them before any message byte reaches
/// a backend.
pub struct Prepared {
    early: Vec<Early>,
}

/// One backend's transaction waiting for the message.
struct Early {
    route: Route,
    /// Routing keys of its recipients, in order: it is used only for exactly this group.
    keys: Vec<String>,
    body: oneshot::Sender<Bytes>,
    result: tokio::task::JoinHandle<Transaction>,
    /// When the envelope went out: the backend has seen nothing since.
    opened: Instant,
}

impl Early {
    /// Whether this transaction may carry the message of `route`'s group `members`: young
    /// enough, on that backend, and for exactly those recipients in that order.
    fn fits(&self, route: Route, members: &[usize], plan: &Plan) -> bool {
        self.opened.elapsed() < EARLY_MAX_WAIT
            && self.route == route
            && self.keys.len() == members.len()
            && self
                .keys
                .iter()
                .zip(members)
                .all(|(k, &u)| *k == plan.unique()[u].0)
    }
}

/// Longest an early transaction may wait for its message. The backend sees no byte while the
/// client uploads, and would time the session out (Dovecot: 5 minutes idle); a transaction
/// older than this is abandoned and a fresh one run instead.
const EARLY_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts, for the recipients of the transaction entering DATA, one backend transaction per
/// backend as routed now, up to the backend's 354. Nothing is decided here: `deliver`
/// checks cutover flags and routes again when the message is complete and uses an early
/// transaction only if its recipients are still exactly that backend's group.
pub async fn prepare(ctx: &LmtpContext, mail: &MailFrom, rcpts: &[(String, String)]) -> Prepared {
    let plan = Plan::new(
        rcpts
            .iter()
            .map(|(addr, key)| (key.as_str(), addr.as_str())),
    );
    let mut routes: Vec<Option<Route>> = vec![None; plan.unique().len()];
    for (u, (key, _)) in plan.unique().iter().enumerate() {
        if ctx.deliveries.is_cutover(key) {
            continue;
        }
        if let Ok(lookup) = ctx.routes.lookup(key).await {
            routes[u] = Some(lookup.route);
        }
    }
    let mut early = Vec::new();
    for (route, members) in group(&routes) {
        let Some(pool) = ctx.pool(route).cloned() else {
            continue;
        };
        let addrs = plan.addresses(&members);
        let keys = members
            .iter()
            .map(|&u| plan.unique()[u].0.clone())
            .collect();
        let (body, rx) = oneshot::channel::<Bytes>();
        let (mail, t) = (mail.clone(), ctx.timeouts.client.clone());
        let result = tokio::spawn(async move {
            pool.deliver_when(&mail, &addrs, async move { rx.await.ok() }, &t)
                .await
        });
        early.push(Early {
            route,
            keys,
            body,
            result,
            opened: Instant::now(),
        });
    }
    Prepared { early }
}

/// Delivers a complete message; returns exactly one reply per RCPT of `msg`, in order. The
/// recipient data is the routing key (normalized user) chosen at RCPT time. `prepared` holds
/// the transactions `prepare` started when DATA began, if any.
pub async fn deliver(
    ctx: &LmtpContext,
    msg: Message<String>,
    prepared: Option<Prepared>,
) -> Vec<Reply> {
    let started = Instant::now();
    let plan = Plan::new(
        msg.rcpts
            .iter()
            .map(|(addr, key)| (key.as_str(), addr.as_str())),
    );
    let Routing {
        mut replies,
        routes,
        slots,
    } = route_again(ctx, &plan).await;
    let outgoing = Outgoing {
        ctx,
        plan: &plan,
        mail: &msg.mail,
        wire: Bytes::from(stuff(&msg.body)),
    };
    let early = prepared.map(|p| p.early).unwrap_or_default();
    let runs = outgoing.start_runs(&routes, early);
    let results = finish_runs(ctx, runs).await;
    let size = msg.body.len();
    let tally = record_replies(&plan, results, size, &mut replies);
    // The backends have answered: the cutover sequence may go on.
    drop(slots);

    let unique: Vec<Reply> = replies
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Reply::new(451, "4.3.0 Internal error, try again later")))
        .collect();
    let out = plan.zip(&unique);
    tally.log_summary(&out, size, msg.normalised, started);
    out
}

/// Where each unique recipient of a complete message goes, decided again after DATA.
struct Routing {
    /// Per unique recipient: its 4xx if it was deferred here.
    replies: Vec<Option<Reply>>,
    /// Per unique recipient: its backend, if it was not deferred.
    routes: Vec<Option<Route>>,
    /// Held until the backends have answered: the cutover sequence waits for these. Taken
    /// before any message byte goes to a backend.
    slots: Vec<InFlight>,
}

/// Takes an in-flight slot and asks the route again for each unique recipient, deferring
/// those now being cut over, unroutable, or without a backend LMTP.
async fn route_again(ctx: &LmtpContext, plan: &Plan) -> Routing {
    let n = plan.unique().len();
    let mut routing = Routing {
        replies: vec![None; n],
        routes: vec![None; n],
        slots: Vec::with_capacity(n),
    };
    for (u, (key, address)) in plan.unique().iter().enumerate() {
        // Checked again now, not only at RCPT: a cutover may have started since.
        let Some(slot) = ctx.deliveries.begin(key) else {
            deferred("cutover");
            routing.replies[u] = Some(cutover_reply(address));
            continue;
        };
        // And the route asked again (a cache hit unless it changed): a cutover may have
        // finished since RCPT, and then the mail belongs on the new side.
        match ctx.routes.lookup(key).await {
            Err(e) => {
                warn!(user = %key, error = %e, "directory lookup failed after DATA");
                deferred("directory");
                routing.replies[u] = Some(directory_reply(address));
            }
            Ok(lookup) if ctx.pool(lookup.route).is_none() => {
                deferred("no_backend");
                routing.replies[u] = Some(no_backend_reply(address, lookup.route));
            }
            Ok(lookup) => {
                routing.routes[u] = Some(lookup.route);
                routing.slots.push(slot);
            }
        }
    }
    routing
}

/// One backend transaction for a group of unique recipients, ready to be awaited.
type Run<'a> = Pin<Box<dyn Future<Output = (Route, Vec<usize>, Transaction)> + Send + 'a>>;

/// What every backend run of one message shares.
struct Outgoing<'a> {
    ctx: &'a LmtpContext,
    plan: &'a Plan,
    mail: &'a MailFrom,
    /// The message dot-stuffed and terminated, as a backend gets it after 354.
    wire: Bytes,
}

impl<'a> Outgoing<'a> {
    /// One run per backend group: on the early transaction opened for exactly that group,
    /// else on a fresh one.
    fn start_runs(&self, routes: &[Option<Route>], mut early: Vec<Early>) -> Vec<Run<'a>> {
        let mut runs: Vec<Run<'a>> = Vec::new();
        for (route, members) in group(routes) {
            if let Some(i) = early
                .iter()
                .position(|e| e.fits(route, &members, self.plan))
            {
                runs.push(self.resume(early.swap_remove(i), route, members));
            } else if let Some(pool) = self.ctx.pool(route) {
                runs.push(self.fresh(pool, route, members));
            }
        }
        // Early transactions that no longer match (a recipient deferred or moved since DATA
        // began) are abandoned before their message: those backends store nothing.
        drop(early);
        runs
    }

    /// Hands the message to an early transaction; the run yields its result.
    fn resume(&self, e: Early, route: Route, members: Vec<usize>) -> Run<'a> {
        // If its envelope already ended (refusals, failure) the message is not needed and
        // this send goes nowhere; the result says what happened.
        let _ = e.body.send(self.wire.clone());
        let count = members.len();
        Box::pin(async move {
            let tx = e
                .result
                .await
                .unwrap_or_else(|_| Transaction::all_failed(count, ClientError::Abandoned, true));
            (route, members, tx)
        })
    }

    /// A whole transaction (envelope and message) on `pool` for `members`.
    fn fresh(&self, pool: &'a BackendPool, route: Route, members: Vec<usize>) -> Run<'a> {
        let addrs = self.plan.addresses(&members);
        let (mail, wire, t) = (self.mail, self.wire.clone(), &self.ctx.timeouts.client);
        Box::pin(async move {
            let tx = pool.deliver(mail, &addrs, &wire, t).await;
            (route, members, tx)
        })
    }
}

/// What one backend transaction gave its group.
struct GroupResult {
    route: Route,
    /// Unique-recipient indexes of the group, in the order of `outcomes`.
    members: Vec<usize>,
    outcomes: Vec<RcptOutcome>,
}

async fn maybe<F: Future>(f: Option<F>) -> Option<F::Output> {
    match f {
        Some(f) => Some(f.await),
        None => None,
    }
}

/// Runs the backend transactions concurrently (one per backend: at most two) and logs those
/// that failed.
async fn finish_runs(ctx: &LmtpContext, runs: Vec<Run<'_>>) -> Vec<GroupResult> {
    let mut runs = runs.into_iter();
    let (a, b) = tokio::join!(maybe(runs.next()), maybe(runs.next()));
    let mut results = Vec::with_capacity(2);
    for (route, members, tx) in [a, b].into_iter().flatten() {
        if let Some(e) = &tx.error {
            let addr = ctx.pool(route).map_or("", |p| p.addr.as_str());
            warn!(backend = %route, addr = %addr, error = %e, "backend LMTP transaction failed");
        }
        results.push(GroupResult {
            route,
            members,
            outcomes: tx.outcomes,
        });
    }
    results
}

/// Recipients counted for the summary line.
#[derive(Default)]
struct Tally {
    /// Stored, per backend: legacy, new.
    delivered: [usize; 2],
    /// Not stored (deferred or rejected by a backend).
    failed: usize,
}

impl Tally {
    /// Counts one backend reply; returns its outcome label for the metrics.
    fn count(&mut self, route: Route, reply: &Reply) -> &'static str {
        if reply.is_positive() {
            self.delivered[(route == Route::New) as usize] += 1;
            "delivered"
        } else if reply.is_transient() {
            self.failed += 1;
            deferred("backend");
            "deferred"
        } else {
            self.failed += 1;
            "rejected"
        }
    }

    /// The one line logged per message, with `out` its replies (one per RCPT).
    fn log_summary(&self, out: &[Reply], size: usize, normalised: u64, started: Instant) {
        info!(
            rcpts = out.len(),
            size,
            legacy = self.delivered[0],
            new = self.delivered[1],
            not_delivered = out.iter().filter(|r| !r.is_positive()).count(),
            backend_failures = self.failed,
            normalised,
            ms = started.elapsed().as_millis() as u64,
            "message handled"
        );
    }
}

/// Puts each backend outcome as its recipient's reply into `replies` (per unique recipient),
/// counting deliveries and stored bytes (`size` once per backend that stored the message).
fn record_replies(
    plan: &Plan,
    results: Vec<GroupResult>,
    size: usize,
    replies: &mut [Option<Reply>],
) -> Tally {
    let mut tally = Tally::default();
    for GroupResult {
        route,
        members,
        outcomes,
    } in results
    {
        let mut any_stored = false;
        for (k, &u) in members.iter().enumerate() {
            let reply = backend_reply(route, &plan.unique()[u].1, outcomes.get(k));
            any_stored |= reply.is_positive();
            let outcome = tally.count(route, &reply);
            metrics::counter!("mailferry_lmtp_deliveries_total", "backend" => route.as_str(), "outcome" => outcome)
                .increment(1);
            replies[u] = Some(reply);
        }
        if any_stored {
            metrics::counter!("mailferry_lmtp_bytes_total", "backend" => route.as_str())
                .increment(size as u64);
        }
    }
    tally
}

/// The reply for `address` from its backend's outcome: the backend's own, or a 451 when it
/// gave none.
fn backend_reply(route: Route, address: &str, outcome: Option<&RcptOutcome>) -> Reply {
    match outcome {
        Some(RcptOutcome::Reply(r)) => r.clone(),
        Some(RcptOutcome::Failed { status, reason }) => Reply::new(
            451,
            format!("{status} <{address}> Backend {route} failed ({reason}), try again later"),
        ),
        None => Reply::new(
            451,
            format!("4.3.0 <{address}> Internal error, try again later"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_share_one_delivery_and_replies_keep_rcpt_order() {
        let plan = Plan::new([
            ("a", "A@x"),
            ("b", "b@x"),
            ("a", "a@x"),
            ("c", "c@x"),
            ("b", "B@x"),
        ]);
        assert_eq!(
            plan.unique(),
            &[
                ("a".to_string(), "A@x".to_string()),
                ("b".to_string(), "b@x".to_string()),
                ("c".to_string(), "c@x".to_string())
            ]
        );
        let replies = [
            Reply::new(250, "a"),
            Reply::new(451, "b"),
            Reply::new(550, "c"),
        ];
        let codes: Vec<u16> = plan.zip(&replies).iter().map(|r| r.code).collect();
        assert_eq!(codes, [250, 451, 250, 550, 451]);
    }

    #[test]
    fn groups_by_backend_in_order() {
        let g = group(&[
            Some(Route::New),
            None,
            Some(Route::Legacy),
            Some(Route::New),
        ]);
        assert_eq!(g, vec![(Route::New, vec![0, 3]), (Route::Legacy, vec![2])]);
    }
}
