//! The cutover's verification gate (DESIGN.md §2, step 5): after the final delta, before the
//! route changes, checks that everything on legacy is on new. `counts`: every legacy folder
//! is synced, every legacy message has a confirmed new UID in the UID map, every mapped new
//! UID exists on new, and new holds at least as many messages as legacy (more is noted, not
//! refused: a new platform may greet its users with a message of its own). `full` also compares every message's
//! content hash, flags and date (`verify`). The result is the evidence stored with the user.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::client::Client;
use super::engine::Engine;
use super::verify::{list_both, map_folders};
use super::SyncError;
use crate::config::GateMode;
use crate::store::sync::FolderState;

/// What the gate compared and found; stored with the user as the cutover's evidence.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Evidence {
    /// Seconds since the epoch.
    pub at: i64,
    /// `counts` or `full`.
    pub mode: String,
    /// Per folder: legacy name, messages on each side, and how many the UID map accounts for.
    pub folders: Vec<FolderCount>,
    /// Messages on legacy in all compared folders.
    pub legacy_messages: u64,
    /// Messages on new in all compared folders.
    pub new_messages: u64,
    /// What differed, for a human; empty when the gate is clean.
    pub differences: Vec<String>,
    /// What was found that loses nothing (mail on new the sync did not put there, such as a
    /// welcome message of the new platform), for a human.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Evidence {
    /// Whether nothing differed.
    pub fn clean(&self) -> bool {
        self.differences.is_empty()
    }
}

/// One folder's counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FolderCount {
    /// Legacy folder name (wire form).
    pub folder: String,
    /// Messages on legacy.
    pub legacy: u32,
    /// Messages on new.
    pub new: u32,
    /// Legacy messages the UID map pairs with a message present on new.
    pub mapped: u32,
}

/// Checks that every legacy UID has a confirmed copy present on new; returns how many do.
fn check_map(
    name: &str,
    legacy: &[u32],
    map: &HashMap<u32, Option<u32>>,
    on_new: &HashSet<u32>,
    d: &mut Vec<String>,
) -> u32 {
    let mut mapped = 0;
    for uid in legacy {
        match map.get(uid) {
            Some(Some(t)) if *t > 0 && on_new.contains(t) => mapped += 1,
            Some(Some(0)) => d.push(format!("{name:?}: legacy UID {uid} could not be copied")),
            Some(Some(t)) => d.push(format!(
                "{name:?}: legacy UID {uid} was copied as new UID {t}, which is gone from new"
            )),
            Some(None) => d.push(format!("{name:?}: legacy UID {uid}: APPEND not confirmed")),
            None => d.push(format!("{name:?}: legacy UID {uid} not copied")),
        }
    }
    mapped
}

/// Differences listed in the evidence before the rest are summed up in one line.
const MAX_LISTED: usize = 50;

impl Engine {
    /// Runs the gate for `email` (route still legacy, nothing arriving on either side).
    pub async fn gate(&self, email: &str, mode: GateMode) -> Result<Evidence, SyncError> {
        let (mut src, mut tgt) = self.logins(email).await?;
        let result = self.gate_with(email, mode, &mut src, &mut tgt).await;
        tokio::join!(src.logout(), tgt.logout());
        let mut ev = result?;
        if ev.differences.len() > MAX_LISTED {
            let more = ev.differences.len() - MAX_LISTED;
            ev.differences.truncate(MAX_LISTED);
            ev.differences.push(format!("... and {more} more"));
        }
        Ok(ev)
    }

    async fn gate_with(
        &self,
        email: &str,
        mode: GateMode,
        src: &mut Client,
        tgt: &mut Client,
    ) -> Result<Evidence, SyncError> {
        let mut ev = Evidence {
            at: crate::store::now(),
            mode: match mode {
                GateMode::Counts => "counts".into(),
                GateMode::Full => "full".into(),
            },
            ..Evidence::default()
        };
        let synced: HashMap<String, FolderState> = self
            .store
            .sync_folders(email)
            .await?
            .into_iter()
            .map(|f| (f.source_name.clone(), f))
            .collect();
        for name in self.legacy_folders(src, tgt).await? {
            let Some(state) = synced.get(&name) else {
                ev.differences
                    .push(format!("{name:?}: on legacy but never synced"));
                continue;
            };
            self.count_folder(email, state, src, tgt, &mut ev).await?;
        }
        if mode == GateMode::Full {
            let full = super::verify::compare(src, tgt, &self.rules).await?;
            ev.differences.extend(full.differences);
            ev.notes.extend(full.extras);
        }
        Ok(ev)
    }

    /// The legacy folders the sync copies (selectable, not excluded by the rules).
    async fn legacy_folders(
        &self,
        src: &mut Client,
        tgt: &mut Client,
    ) -> Result<Vec<String>, SyncError> {
        let (source, target, tsep) = list_both(src, tgt).await?;
        Ok(map_folders(&source, &target, tsep, &self.rules)
            .into_iter()
            .map(|(f, _)| f.raw.clone())
            .collect())
    }

    /// Counts one folder on both sides against its UID map.
    async fn count_folder(
        &self,
        email: &str,
        state: &FolderState,
        src: &mut Client,
        tgt: &mut Client,
        ev: &mut Evidence,
    ) -> Result<(), SyncError> {
        let name = &state.source_name;
        let (ls, ns) =
            tokio::try_join!(src.select(name, true), tgt.select(&state.target_name, true))?;
        let (legacy, new) = tokio::try_join!(src.uid_search("1:*"), tgt.uid_search("1:*"))?;
        let legacy = if ls.exists == 0 { Vec::new() } else { legacy };
        let on_new: HashSet<u32> = if ns.exists == 0 {
            HashSet::new()
        } else {
            new.into_iter().collect()
        };
        let d = &mut ev.differences;
        if ls.uidvalidity != state.source_uidvalidity || ns.uidvalidity != state.target_uidvalidity
        {
            d.push(format!("{name:?}: UIDVALIDITY changed since the last pass"));
        }
        let map: HashMap<u32, Option<u32>> = self
            .store
            .uid_map(email, name)
            .await?
            .into_iter()
            .map(|r| (r.source_uid, r.target_uid))
            .collect();
        let mapped = check_map(name, &legacy, &map, &on_new, d);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let (l, n) = (count(legacy.len()), count(on_new.len()));
        if n < l {
            d.push(format!("{name:?}: {l} messages on legacy, {n} on new"));
        } else if n > mapped {
            ev.notes.push(format!(
                "{name:?}: {} message(s) on new that the sync did not copy (kept)",
                n - mapped
            ));
        }
        ev.legacy_messages += u64::from(l);
        ev.new_messages += u64::from(n);
        ev.folders.push(FolderCount {
            folder: name.clone(),
            legacy: l,
            new: n,
            mapped,
        });
        Ok(())
    }
}
