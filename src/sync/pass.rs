//! One pass of one user, in the order it runs: list and map the folders, follow folders gone
//! from legacy (renamed or deleted), create what new lacks, ask both sides for STATUS (new's
//! subscriptions follow meanwhile), visit the folders that changed, largest copy first
//! (`folder::sync_folder`), then record folders empty on both sides without visiting them.

use std::collections::{HashMap, HashSet};

use tracing::{debug, info, warn};

use super::client::{Client, ListEntry, MailboxStatus};
use super::engine::Engine;
use super::folder;
use super::mailboxes::{encode_path, Folder, Mapper};
use super::proto;
use super::{PassReport, Progress, SyncError};
use crate::backend::error::BackendError;
use crate::route::Route;
use crate::store::sync::FolderState;

/// What every step of a user's pass shares: both logged-in connections and what the pass
/// reports to.
pub(crate) struct Pass<'a> {
    /// The engine running the pass.
    pub engine: &'a Engine,
    /// The user (the key of their state in the store).
    pub user: &'a str,
    /// Logged in to legacy as the user.
    pub src: &'a mut Client,
    /// Logged in to new as the user.
    pub tgt: &'a mut Client,
    /// What the pass did so far.
    pub report: PassReport,
    /// Live counters for whoever watches.
    pub progress: &'a Progress,
}

/// The folders of a pass: legacy's selectable ones, those of them that map, and new's list.
struct Folders {
    /// Legacy's selectable folders.
    source: Vec<Folder>,
    /// Each mapped legacy folder with its name on new (modified UTF-7, new's separator).
    mapped: Vec<(Folder, String)>,
    /// New's folders as listed (read again after a RENAME or CREATE).
    tgt_list: Vec<ListEntry>,
    /// New's hierarchy separator.
    tgt_sep: char,
}

impl Folders {
    /// Whether legacy still has a selectable folder of this name.
    fn on_legacy(&self, raw: &str) -> bool {
        self.source.iter().any(|f| f.raw == raw)
    }

    /// New's folders, as the mapper sees them.
    fn target(&self) -> Vec<Folder> {
        self.tgt_list
            .iter()
            .map(|e| Folder::from_list(e, self.tgt_sep))
            .collect()
    }

    /// Whether new lists a folder of this name.
    fn on_target(&self, name: &str) -> bool {
        self.tgt_list.iter().any(|e| e.name == name)
    }
}

/// STATUS of each mapped folder on both sides (`None`: it vanished during the pass).
struct Statuses {
    legacy: Vec<Option<MailboxStatus>>,
    new: Vec<Option<MailboxStatus>>,
}

/// Which mapped folders (by index) a pass visits, and which it records without a visit.
struct Plan {
    /// Folders to visit, the largest copy first.
    visits: Vec<usize>,
    /// Folders new to the pass and empty on legacy: STATUS may give their state in full.
    empty_on_legacy: Vec<usize>,
}

impl Pass<'_> {
    /// Runs the pass's steps in order; returns what it did.
    pub(crate) async fn run(mut self) -> Result<PassReport, SyncError> {
        let mut folders = self.list_folders().await?;
        let mut states: HashMap<String, FolderState> = self
            .engine
            .store
            .sync_folders(self.user)
            .await?
            .into_iter()
            .map(|s| (s.source_name.clone(), s))
            .collect();
        self.follow_gone_folders(&mut folders, &mut states).await?;
        self.create_missing(&mut folders).await?;
        let statuses = self.status_round(&folders).await?;
        let plan = self.plan_visits(&folders, &states, &statuses);
        for i in plan.visits {
            let state = states.get(&folders.mapped[i].0.raw);
            self.visit(&folders.mapped[i], state).await?;
        }
        self.record_empty(&folders, &plan.empty_on_legacy, &statuses)
            .await?;
        Ok(self.report)
    }

    /// Lists both sides and maps legacy's folders onto new.
    async fn list_folders(&mut self) -> Result<Folders, SyncError> {
        let (src_list, tgt_list) = tokio::try_join!(self.src.list(), self.tgt.list())?;
        let src_sep = separator(&src_list);
        let tgt_sep = separator(&tgt_list);
        let source: Vec<Folder> = src_list
            .iter()
            .map(|e| Folder::from_list(e, src_sep))
            .filter(|f| f.selectable)
            .collect();
        let folders = Folders {
            source,
            mapped: Vec::new(),
            tgt_list,
            tgt_sep,
        };
        let mapper = Mapper::new(
            &folders.source,
            &folders.target(),
            tgt_sep,
            self.engine.rules.clone(),
        );
        let mapped = mapper
            .map_all(&folders.source)
            .into_iter()
            .map(|(f, p)| (f.clone(), encode_path(&p, tgt_sep)))
            .collect();
        let folders = Folders { mapped, ..folders };
        self.report.folders = folders.mapped.len();
        Ok(folders)
    }

    /// Folders gone from legacy since the last pass: renamed (a folder new to the pass has the
    /// same UIDVALIDITY) or deleted. New follows; parents first, since renaming a parent on
    /// new moves its children along.
    async fn follow_gone_folders(
        &mut self,
        folders: &mut Folders,
        states: &mut HashMap<String, FolderState>,
    ) -> Result<(), SyncError> {
        let mut gone: Vec<FolderState> = states
            .values()
            .filter(|s| !folders.on_legacy(&s.source_name))
            .cloned()
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        let new_names: Vec<String> = folders
            .mapped
            .iter()
            .filter(|(f, _)| !states.contains_key(&f.raw))
            .map(|(f, _)| f.raw.clone())
            .collect();
        let fresh = self.src.status_many(&new_names).await?;
        // Roles as new listed them before any rename: special-use folders are never deleted.
        let roles = folders.target();
        gone.sort_by_key(|s| s.target_name.len());
        for old in gone {
            let renamed_to = new_names
                .iter()
                .zip(&fresh)
                .find(|(_, st)| st.is_some_and(|st| st.uidvalidity == old.source_uidvalidity))
                .map(|(n, _)| n.clone());
            match renamed_to {
                Some(new_src) => self.follow_rename(folders, states, old, new_src).await?,
                None => self.follow_delete(folders, states, &roles, old).await?,
            }
        }
        Ok(())
    }

    /// Legacy renamed `old` to `new_src`: new's folder is renamed too (unless new already has
    /// the new name, or lacks the old one) and the folder's state follows.
    async fn follow_rename(
        &mut self,
        folders: &mut Folders,
        states: &mut HashMap<String, FolderState>,
        old: FolderState,
        new_src: String,
    ) -> Result<(), SyncError> {
        let Some((_, new_tgt)) = folders.mapped.iter().find(|(f, _)| f.raw == new_src) else {
            return Ok(());
        };
        if folders.on_target(&old.target_name) && !folders.on_target(new_tgt) {
            let cmd = format!(
                "RENAME {} {}",
                proto::quote(&old.target_name),
                proto::quote(new_tgt)
            );
            self.tgt.command("RENAME", &cmd).await?;
            folders.tgt_list = self.tgt.list().await?;
            self.report.renamed += 1;
        }
        info!(user = %self.user, from = %old.source_name, to = %new_src, "folder renamed on legacy");
        let store = &self.engine.store;
        store
            .rename_sync_folder(self.user, &old.source_name, &new_src)
            .await?;
        let mut st = old.clone();
        st.source_name = new_src.clone();
        st.target_name = new_tgt.clone();
        store.put_sync_folder(&st).await?;
        states.remove(&old.source_name);
        states.insert(new_src, st);
        Ok(())
    }

    /// Legacy deleted `old` (or renamed it away, or made it `\Noselect`): new's folder goes
    /// too, but only if everything in it was put there by the sync (by its UID map), and never
    /// INBOX or a special-use folder. A folder kept is reported and shown by `user show`. The
    /// sync forgets the folder either way.
    async fn follow_delete(
        &mut self,
        folders: &Folders,
        states: &mut HashMap<String, FolderState>,
        roles: &[Folder],
        old: FolderState,
    ) -> Result<(), SyncError> {
        let protected = old.target_name.eq_ignore_ascii_case("INBOX")
            || roles
                .iter()
                .any(|t| t.raw == old.target_name && t.role.is_some());
        if !protected && folders.on_target(&old.target_name) {
            match self.not_ours_on_target(&old).await? {
                0 => {
                    let cmd = format!("DELETE {}", proto::quote(&old.target_name));
                    self.tgt.command("DELETE", &cmd).await?;
                    self.report.deleted += 1;
                }
                n => self.keep_folder(&old, n).await?,
            }
        }
        info!(user = %self.user, folder = %old.source_name, "folder deleted on legacy");
        self.engine
            .store
            .delete_sync_folder(self.user, &old.source_name)
            .await?;
        states.remove(&old.source_name);
        Ok(())
    }

    /// How many messages of `old`'s folder on new the sync did not put there (all of them when
    /// new's UIDVALIDITY changed since: its UIDs say nothing any more).
    async fn not_ours_on_target(&mut self, old: &FolderState) -> Result<usize, SyncError> {
        let ours: HashSet<u32> = self
            .engine
            .store
            .uid_map(self.user, &old.source_name)
            .await?
            .into_iter()
            .filter_map(|r| r.target_uid.filter(|&t| t > 0))
            .collect();
        let selected = self.tgt.select(&old.target_name, true).await?;
        let on_new = if selected.exists == 0 {
            Vec::new()
        } else {
            self.tgt.uid_search("1:*").await?
        };
        self.tgt.command("CLOSE", "CLOSE").await?;
        if selected.uidvalidity != old.target_uidvalidity {
            return Ok(on_new.len().max(usize::from(selected.exists > 0)));
        }
        Ok(on_new.iter().filter(|u| !ours.contains(u)).count())
    }

    /// Leaves a folder gone from legacy on new because it holds `n` messages the sync did not
    /// put there: reported by the pass and recorded for `user show`.
    async fn keep_folder(&mut self, old: &FolderState, n: usize) -> Result<(), SyncError> {
        warn!(user = %self.user, folder = %old.target_name, not_copied = n,
            "folder gone from legacy kept on new: it holds mail the sync did not put there");
        let warning = format!(
            "gone from legacy, kept on new: {n} message(s) there were not copied by the sync"
        );
        self.engine
            .store
            .put_sync_warning(self.user, &old.target_name, &warning)
            .await?;
        self.report.kept.push(old.target_name.clone());
        Ok(())
    }

    /// Creates on new each mapped folder it lacks; lists new again if any was created (a
    /// server may subscribe what it creates).
    async fn create_missing(&mut self, folders: &mut Folders) -> Result<(), SyncError> {
        let target = folders.target();
        for (_, name) in &folders.mapped {
            if target.iter().any(|t| &t.raw == name && t.selectable) {
                continue;
            }
            let cmd = format!("CREATE {}", proto::quote(name));
            match self.tgt.command("CREATE", &cmd).await {
                Ok(_) => self.report.created += 1,
                // A parent created implicitly by an earlier CREATE, or a race: fine.
                Err(BackendError::Refused { ref code, .. }) if code == "ALREADYEXISTS" => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.report.created > 0 {
            folders.tgt_list = self.tgt.list().await?;
        }
        Ok(())
    }

    /// STATUS, pipelined, of every mapped folder on both sides at once; new's subscriptions
    /// are set meanwhile. On new, folders new to the pass are asked for too: their first
    /// STATUS (an index each for a fresh user) overlaps legacy's instead of being a round of
    /// its own at the end, when new would have nothing else to do.
    async fn status_round(&mut self, folders: &Folders) -> Result<Statuses, SyncError> {
        let src_names: Vec<String> = folders.mapped.iter().map(|(f, _)| f.raw.clone()).collect();
        let tgt_names: Vec<String> = folders.mapped.iter().map(|(_, t)| t.clone()).collect();
        let (src, tgt) = (&mut *self.src, &mut *self.tgt);
        let (legacy, (new, subscriptions)) = tokio::try_join!(
            async { Ok::<_, SyncError>(src.status_many(&src_names).await?) },
            async {
                let st = tgt.status_many(&tgt_names).await?;
                let changed = follow_subscriptions(tgt, &folders.mapped, &folders.tgt_list).await?;
                Ok((st, changed))
            }
        )?;
        self.report.subscriptions += subscriptions;
        Ok(Statuses { legacy, new })
    }

    /// Which folders changed since the last pass (counted in the report), in visiting order.
    fn plan_visits(
        &mut self,
        folders: &Folders,
        states: &HashMap<String, FolderState>,
        statuses: &Statuses,
    ) -> Plan {
        let condstore = self.src.has("CONDSTORE");
        // With the messages each may have to copy.
        let mut visits: Vec<(usize, u32)> = Vec::new();
        let mut empty_on_legacy = Vec::new();
        for (i, (folder, tname)) in folders.mapped.iter().enumerate() {
            let Some(ss) = statuses.legacy[i] else {
                vanished(self.user, folder);
                continue;
            };
            match states.get(&folder.raw) {
                Some(s) => {
                    let Some(ts) = statuses.new[i] else {
                        vanished(self.user, folder);
                        continue;
                    };
                    if unchanged(s, &ss, &ts, tname, condstore) {
                        continue;
                    }
                    visits.push((i, ss.uidnext.saturating_sub(s.source_uidnext)));
                }
                // Counted once new's STATUS has answered for it.
                None if ss.messages == 0 => {
                    empty_on_legacy.push(i);
                    continue;
                }
                None => visits.push((i, ss.messages)),
            }
            self.report.folders_changed += 1;
        }
        // The largest copy first: the user's pass then ends with small folders instead of
        // one long copy started late, which keeps the target's connections evenly busy.
        visits.sort_by_key(|&(_, todo)| std::cmp::Reverse(todo));
        Plan {
            visits: visits.into_iter().map(|(i, _)| i).collect(),
            empty_on_legacy,
        }
    }

    /// Most special-use and archive folders of a fresh user are empty on both sides: their
    /// state is written from STATUS, without SELECT round trips, in one transaction (one at a
    /// time they queued at the store behind other users' commits). One that already has mail
    /// on new (delivered there, or an earlier run's copy) is visited instead.
    async fn record_empty(
        &mut self,
        folders: &Folders,
        empty_on_legacy: &[usize],
        statuses: &Statuses,
    ) -> Result<(), SyncError> {
        let mut empty: Vec<FolderState> = Vec::new();
        for &i in empty_on_legacy {
            let (folder, tname) = &folders.mapped[i];
            let (Some(ss), Some(ts)) = (statuses.legacy[i], statuses.new[i]) else {
                vanished(self.user, folder);
                continue;
            };
            self.report.folders_changed += 1;
            if ts.messages > 0 {
                self.visit(&folders.mapped[i], None).await?;
                continue;
            }
            empty.push(FolderState {
                highest_modseq: ss.highestmodseq.unwrap_or(0),
                source_uidnext: ss.uidnext,
                ..FolderState::fresh(
                    self.user,
                    &folder.raw,
                    tname,
                    ss.uidvalidity,
                    ts.uidvalidity,
                    folder.subscribed,
                )
            });
        }
        self.engine.store.put_sync_folders(&empty).await?;
        Ok(())
    }

    /// Brings one folder up to date (`folder::sync_folder`), shown in the progress.
    async fn visit(
        &mut self,
        (folder, tname): &(Folder, String),
        state: Option<&FolderState>,
    ) -> Result<(), SyncError> {
        self.progress.set_folder(&folder.raw);
        match folder::sync_folder(self, folder, tname, state.cloned()).await {
            // The target folder does not exist although CREATE did not fail (a `\Noselect`
            // name the server keeps, or one deleted meanwhile): the other folders go on, and
            // the next pass tries again.
            Err(SyncError::Backend(BackendError::Refused {
                backend: Route::New,
                command: "SELECT",
                ref code,
                ref text,
            })) if matches!(code.as_str(), "NONEXISTENT" | "TRYCREATE") => {
                warn!(user = %self.user, folder = %folder.raw, target = %tname, error = %text, "target folder missing, not copied this pass");
                Ok(())
            }
            r => r,
        }
    }
}

/// A folder listed at the start of the pass that STATUS no longer finds on one side.
fn vanished(user: &str, folder: &Folder) {
    debug!(user = %user, folder = %folder.raw, "folder vanished during the pass");
}

/// Subscribes or unsubscribes on new each mapped folder whose subscription differs from
/// legacy's (`tgt_list` is new's current list); returns how many were changed.
async fn follow_subscriptions(
    tgt: &mut Client,
    mapped: &[(Folder, String)],
    tgt_list: &[ListEntry],
) -> Result<usize, SyncError> {
    let mut changed = 0;
    for (folder, tname) in mapped {
        let on_target = tgt_list.iter().any(|e| &e.name == tname && e.subscribed);
        if folder.subscribed != on_target {
            let verb = if folder.subscribed {
                "SUBSCRIBE"
            } else {
                "UNSUBSCRIBE"
            };
            tgt.command(verb, &format!("{verb} {}", proto::quote(tname)))
                .await?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// Whether nothing changed on either side since the state was recorded.
fn unchanged(
    s: &FolderState,
    src: &MailboxStatus,
    tgt: &MailboxStatus,
    tname: &str,
    condstore: bool,
) -> bool {
    s.target_name == tname
        && s.source_uidvalidity == src.uidvalidity
        && s.source_uidnext == src.uidnext
        && s.source_messages == src.messages
        && s.target_uidvalidity == tgt.uidvalidity
        // Without CONDSTORE flag changes are invisible to STATUS: always compare.
        && condstore
        && src.highestmodseq.is_some_and(|m| m == s.highest_modseq)
}

/// The hierarchy separator of a listing (`/` when it names none).
pub(super) fn separator(list: &[ListEntry]) -> char {
    list.iter().find_map(|e| e.delimiter).unwrap_or('/')
}
