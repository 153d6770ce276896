//! The confirmer stage, and where the appender's completed APPENDs go: UID pairs to the
//! state store (until then a row stays pending, which a crash only turns into a match by hash
//! on the next pass), counts to the report and progress, refused MULTIAPPEND batches back to
//! be retried one message at a time.

use std::collections::VecDeque;

use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::append::InFlight;
use super::intents::intended;
use super::msg::Msg;
use super::Rows;
use crate::backend::error::BackendError;
use crate::store::sync::{FolderState, UidRow};
use crate::sync::client::Client;
use crate::sync::proto::{self, Status, StatusText};
use crate::sync::{add, PassReport, Progress, SyncError};

/// What the confirmer writes.
pub(super) enum Confirm {
    /// Legacy → new UID pairs of acknowledged APPENDs (new UID 0: not copyable, skipped).
    Pairs(Vec<(u32, u32)>),
    /// Acknowledged without a usable APPENDUID: the rows stay pending, now with their hash.
    Hashed(Vec<UidRow>),
    /// Intents of messages legacy no longer had when they were fetched.
    Gone(Vec<u32>),
}

/// Records what the appender and fetcher report, all that is waiting in one transaction each.
pub(super) async fn record(
    rows: Rows<'_>,
    mut confirms: mpsc::UnboundedReceiver<Confirm>,
    mut committed: watch::Receiver<u32>,
) -> Result<(), SyncError> {
    while let Some(first) = confirms.recv().await {
        let (mut pairs, mut hashed, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        let mut next = Some(first);
        while let Some(c) = next {
            match c {
                Confirm::Pairs(p) => pairs.extend(p),
                Confirm::Hashed(r) => hashed.extend(r),
                Confirm::Gone(u) => gone.extend(u),
            }
            next = confirms.try_recv().ok();
        }
        let store = rows.store;
        if !hashed.is_empty() {
            store.add_pending(rows.user, rows.folder, &hashed).await?;
        }
        // An intent still committing would land after its deletion (and linger as pending).
        let top = gone.iter().copied().max().unwrap_or(0);
        if !gone.is_empty() && intended(&mut committed, top).await {
            store.delete_uids(rows.user, rows.folder, &gone).await?;
        }
        store.confirm_uids(rows.user, rows.folder, &pairs).await?;
    }
    Ok(())
}

/// Where completed APPENDs go.
pub(super) struct Completions<'a> {
    pub user: &'a str,
    pub confirms: mpsc::UnboundedSender<Confirm>,
    /// Messages of a refused MULTIAPPEND, to be sent one at a time.
    pub singles: VecDeque<Msg>,
    /// Acknowledged without usable APPENDUID: `recover` matches them by hash afterwards.
    pub needs_recovery: bool,
    /// The confirmer has stopped (the store failed): the copy stops and reports its error.
    pub store_failed: bool,
    pub report: &'a mut PassReport,
    pub progress: &'a Progress,
}

impl<'a> Completions<'a> {
    pub fn new(
        user: &'a str,
        confirms: mpsc::UnboundedSender<Confirm>,
        report: &'a mut PassReport,
        progress: &'a Progress,
    ) -> Self {
        Completions {
            user,
            confirms,
            singles: VecDeque::new(),
            needs_recovery: false,
            store_failed: false,
            report,
            progress,
        }
    }

    /// Hands `c` to the confirmer, noting if it has stopped.
    fn confirm(&mut self, c: Confirm) {
        if self.confirms.send(c).is_err() {
            self.store_failed = true;
        }
    }

    /// Handles the reply to one APPEND command.
    pub fn complete(
        &mut self,
        tgt: &Client,
        state: &mut FolderState,
        cmd: InFlight,
        status: Status,
        info: &StatusText,
    ) -> Result<(), BackendError> {
        if status == Status::Ok {
            self.stored(state, cmd, info);
            return Ok(());
        }
        if cmd.msgs.len() > 1 {
            // MULTIAPPEND is atomic (RFC 3502): nothing was stored; retry one by one to find
            // which message the server refuses.
            self.singles.extend(cmd.msgs);
            return Ok(());
        }
        let err = tgt.refused("APPEND", status, info);
        let code = info.code_name();
        if status == Status::Bad || matches!(code.as_str(), "" | "PARSE" | "CANNOT") {
            for m in &cmd.msgs {
                warn!(user = %self.user, folder = %state.source_name, uid = m.uid, error = %err, "message not copyable");
                state.last_uid = state.last_uid.max(m.uid);
                self.report.failed += 1;
            }
            let none: Vec<(u32, u32)> = cmd.msgs.iter().map(|m| (m.uid, 0)).collect();
            self.confirm(Confirm::Pairs(none));
            return Ok(());
        }
        Err(err)
    }

    /// An acknowledged APPEND: its UID pairs to the confirmer (or its rows left for `recover`
    /// where APPENDUID does not say where they went), its counts to the report.
    fn stored(&mut self, state: &mut FolderState, cmd: InFlight, info: &StatusText) {
        let n = cmd.msgs.len() as u64;
        let bytes = cmd.bytes();
        let uids = (info.code_name() == "APPENDUID")
            .then(|| {
                info.code
                    .get(2)
                    .and_then(|v| v.bytes())
                    .and_then(|b| proto::parse_uid_set(b, cmd.msgs.len() + 1))
            })
            .flatten();
        match uids {
            Some(uids)
                if uids.len() == cmd.msgs.len()
                    && info.code_number(0) == Some(u64::from(state.target_uidvalidity)) =>
            {
                let pairs: Vec<(u32, u32)> = cmd.msgs.iter().map(|m| m.uid).zip(uids).collect();
                if let Some(max) = pairs.iter().map(|p| p.0).max() {
                    state.last_uid = state.last_uid.max(max);
                }
                self.confirm(Confirm::Pairs(pairs));
            }
            // No UIDPLUS (or a target folder recreated meanwhile): the pending rows stay and
            // are matched by content hash right after the copy.
            _ => {
                self.needs_recovery = true;
                let rows: Vec<UidRow> = cmd
                    .msgs
                    .iter()
                    .filter(|m| m.hash.is_some())
                    .map(Msg::row)
                    .collect();
                if !rows.is_empty() {
                    self.confirm(Confirm::Hashed(rows));
                }
            }
        }
        self.report.appended += n;
        self.report.appended_bytes += bytes;
        add(&self.progress.messages_done, n);
        add(&self.progress.bytes_done, bytes);
        metrics::counter!("mailferry_sync_appended_messages_total").increment(n);
        metrics::counter!("mailferry_sync_appended_bytes_total").increment(bytes);
    }
}
