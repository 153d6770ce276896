//! Rollback's reverse delta new → legacy (DESIGN.md §2): before the route flips back, what
//! happened on new since the cutover is carried to legacy, folder by folder of the UID map
//! (`folder.rs`): mail that arrived on new is appended with its flags, keywords and
//! INTERNALDATE and gets a UID map row, so that no later pass copies it again either way
//! (`arrivals.rs`); flag changes are set; messages the user expunged on new are expunged on
//! legacy, and only those the map pairs with a message gone from new. Folders created on new
//! are created on legacy and copied (`created.rs`); a folder deleted on new is kept.
//!
//! Crash safety: the intent of each APPEND is durable before it goes out
//! (`store::reverse`); a rerun first matches the intents on legacy by content hash, so a pass
//! killed anywhere and run again leaves no duplicate on legacy.

mod arrivals;
mod created;
mod folder;

use std::fmt;
use std::time::Instant;

use serde::Serialize;
use tracing::{info, warn, Instrument};

use super::client::{Client, ListEntry};
use super::engine::Engine;
use super::mailboxes::Folder;
use super::pass::separator;
use super::SyncError;
use crate::route::Route;
use crate::store::sync::FolderState;

/// What a reverse pass carried back to legacy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReverseReport {
    /// Folders carried back (those of the UID map, and those created on new).
    pub folders: usize,
    /// Messages that arrived on new, appended to legacy.
    pub appended: u64,
    /// Bytes appended to legacy.
    pub appended_bytes: u64,
    /// Messages of new found on legacy by content (appended by a pass that died before
    /// recording them) and recorded instead of appended again.
    pub matched: u64,
    /// Legacy messages whose flags and keywords were set to new's.
    pub flag_updates: u64,
    /// Legacy messages expunged because the user expunged them on new.
    pub expunged: u64,
    /// Folders created on legacy because they were created on new.
    pub folders_created: usize,
    /// What was left alone, for the operator (`folder: why`).
    pub warnings: Vec<String>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

impl fmt::Display for ReverseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} appended to legacy ({} bytes), {} found there already, {} flag updates, \
             {} expunged, {} folders created, in {} folders",
            self.appended,
            self.appended_bytes,
            self.matched,
            self.flag_updates,
            self.expunged,
            self.folders_created,
            self.folders
        )?;
        if !self.warnings.is_empty() {
            write!(f, "; warnings: {}", self.warnings.join("; "))?;
        }
        Ok(())
    }
}

impl Engine {
    /// Carries what happened on new since the cutover back to legacy, under the user's sync
    /// lease (`SyncError::PassInProgress` while another pass of the user runs). Meant for a
    /// rollback: the user's deliveries are deferred and their sessions kicked meanwhile.
    pub async fn reverse_pass(&self, email: &str) -> Result<ReverseReport, SyncError> {
        let started = Instant::now();
        let span = tracing::debug_span!("reverse", user = %email);
        let result = self
            .under_lease(email, self.reverse_logged_in(email))
            .instrument(span)
            .await;
        match &result {
            Ok(r) => info!(user = %email, report = %r, "reverse delta done"),
            Err(e @ SyncError::PassInProgress { .. }) => {
                info!(user = %email, error = %e, "reverse delta not started");
            }
            Err(e) => {
                if let Some((backend, code)) = e.overload() {
                    self.pace(backend).overloaded(code);
                }
                warn!(user = %email, error = %e, "reverse delta failed");
            }
        }
        result.map(|mut r| {
            r.duration_ms = started.elapsed().as_millis() as u64;
            r
        })
    }

    /// Both logins (each holding a connection slot of its backend's pace), then the pass.
    async fn reverse_logged_in(&self, email: &str) -> Result<ReverseReport, SyncError> {
        let _l = self.pace(Route::Legacy).acquire().await;
        let _n = self.pace(Route::New).acquire().await;
        let (mut legacy, mut new) = self.logins(email).await?;
        let rev = Reverse {
            engine: self,
            user: email,
            legacy: &mut legacy,
            new: &mut new,
            report: ReverseReport::default(),
        };
        let result = rev.run().await;
        tokio::join!(legacy.logout(), new.logout());
        result
    }
}

/// What every step of a user's reverse pass shares.
struct Reverse<'a> {
    engine: &'a Engine,
    /// The user (the key of their state in the store).
    user: &'a str,
    /// Logged in to legacy as the user: written to.
    legacy: &'a mut Client,
    /// Logged in to new as the user: only read.
    new: &'a mut Client,
    report: ReverseReport,
}

/// Both sides' folder lists.
struct Lists {
    legacy: Vec<ListEntry>,
    new: Vec<ListEntry>,
    legacy_sep: char,
    new_sep: char,
}

impl Lists {
    fn selectable(list: &[ListEntry], name: &str) -> bool {
        list.iter().any(|e| e.name == name && e.selectable())
    }

    /// The selectable folders of one side, decoded.
    fn folders(list: &[ListEntry], sep: char) -> Vec<Folder> {
        list.iter()
            .map(|e| Folder::from_list(e, sep))
            .filter(|f| f.selectable)
            .collect()
    }
}

impl Reverse<'_> {
    /// The folders of the UID map, then those created on new; returns what was done.
    async fn run(mut self) -> Result<ReverseReport, SyncError> {
        let (legacy, new) = tokio::try_join!(self.legacy.list(), self.new.list())?;
        let lists = Lists {
            legacy_sep: separator(&legacy),
            new_sep: separator(&new),
            legacy,
            new,
        };
        let mut states = self.engine.store.sync_folders(self.user).await?;
        states.sort_by(|a, b| a.source_name.cmp(&b.source_name));
        for st in &states {
            if self.on_both_sides(&lists, st) {
                folder::carry_back(&mut self, st.clone(), false).await?;
            }
        }
        created::carry_created(&mut self, &lists, &states).await?;
        Ok(self.report)
    }

    /// Whether a folder of the UID map can be carried back: new deleted it since the cutover
    /// (nothing is deleted on legacy), or legacy lost it (nothing to carry into): a warning.
    fn on_both_sides(&mut self, lists: &Lists, st: &FolderState) -> bool {
        if !Lists::selectable(&lists.new, &st.target_name) {
            let why = "deleted on new since the cutover; kept on legacy as it was".to_owned();
            self.warn(&st.source_name, why);
            return false;
        }
        if !Lists::selectable(&lists.legacy, &st.source_name) {
            let why = format!(
                "gone from legacy; what new holds in {} is not carried back",
                st.target_name
            );
            self.warn(&st.source_name, why);
            return false;
        }
        true
    }

    /// Something left alone, for the report and the log.
    fn warn(&mut self, folder: &str, why: String) {
        warn!(user = %self.user, folder = %folder, "reverse delta: {why}");
        self.report.warnings.push(format!("{folder}: {why}"));
    }
}
