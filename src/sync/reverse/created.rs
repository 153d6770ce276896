//! Folders created on new since the cutover: created on legacy (hierarchy separator, modified
//! UTF-7 and special-use roles translated back by the folder mapper) with their subscription,
//! given a sync state so that forward passes know them, and their messages carried back.

use std::collections::HashSet;

use tracing::info;

use super::{folder, Lists, Reverse};
use crate::backend::error::BackendError;
use crate::store::sync::FolderState;
use crate::sync::mailboxes::{encode_path, Folder, Mapper, Rules};
use crate::sync::{proto, SyncError};

/// Carries back every selectable folder of new that no folder state maps to.
pub(super) async fn carry_created(
    rev: &mut Reverse<'_>,
    lists: &Lists,
    states: &[FolderState],
) -> Result<(), SyncError> {
    let on_new = Lists::folders(&lists.new, lists.new_sep);
    let mapped: HashSet<&str> = states.iter().map(|s| s.target_name.as_str()).collect();
    let created: Vec<&Folder> = on_new
        .iter()
        .filter(|f| !mapped.contains(f.raw.as_str()))
        .collect();
    if created.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = created.iter().map(|f| f.raw.clone()).collect();
    let statuses = rev.new.status_many(&names).await?;
    // New → legacy: roles map to legacy's own folders; the operator's rules are legacy's.
    let on_legacy = Lists::folders(&lists.legacy, lists.legacy_sep);
    let mapper = Mapper::new(&on_new, &on_legacy, lists.legacy_sep, Rules::default());
    let mut taken: HashSet<String> = states
        .iter()
        .map(|s| s.source_name.to_lowercase())
        .collect();
    for (f, status) in created.into_iter().zip(statuses) {
        // Vanished meanwhile, or a parent that holds nothing: legacy makes its own parents.
        let Some(status) = status else { continue };
        if status.messages == 0 && has_children(f, &on_new, lists.new_sep) {
            continue;
        }
        let Some(name) = legacy_name(&mapper, f, &mut taken, lists.legacy_sep) else {
            let why = "special-use folder of a role legacy already syncs with another folder; \
                       not carried back";
            rev.warn(&f.raw, why.to_owned());
            continue;
        };
        create_on_legacy(rev, &name, f.subscribed).await?;
        let st = FolderState::fresh(rev.user, &name, &f.raw, 0, 0, f.subscribed);
        folder::carry_back(rev, st, true).await?;
    }
    Ok(())
}

/// Whether `f` is the parent of another folder of new.
fn has_children(f: &Folder, on_new: &[Folder], sep: char) -> bool {
    let prefix = format!("{}{sep}", f.raw);
    on_new.iter().any(|o| o.raw.starts_with(&prefix))
}

/// The name on legacy of a folder created on new: what the mapper makes of it, with a suffix
/// where a synced folder has that name already; `None` for a special-use folder whose role's
/// folder on legacy is synced already.
fn legacy_name(
    mapper: &Mapper,
    f: &Folder,
    taken: &mut HashSet<String>,
    sep: char,
) -> Option<String> {
    let mut path = mapper.map(f)?;
    let mut name = encode_path(&path, sep);
    if taken.contains(&name.to_lowercase()) {
        if f.role.is_some() {
            return None;
        }
        let base = path.last()?.clone();
        let mut n = 2;
        while taken.contains(&name.to_lowercase()) {
            *path.last_mut()? = format!("{base}_{n}");
            name = encode_path(&path, sep);
            n += 1;
        }
    }
    taken.insert(name.to_lowercase());
    Some(name)
}

/// Creates `name` on legacy (already there is fine: a rerun after a crash), subscribed if
/// new's folder is.
async fn create_on_legacy(
    rev: &mut Reverse<'_>,
    name: &str,
    subscribe: bool,
) -> Result<(), SyncError> {
    let cmd = format!("CREATE {}", proto::quote(name));
    match rev.legacy.command("CREATE", &cmd).await {
        Ok(_) => {
            info!(user = %rev.user, folder = %name, "reverse delta: folder created on legacy");
            rev.report.folders_created += 1;
        }
        Err(BackendError::Refused { ref code, .. }) if code == "ALREADYEXISTS" => {}
        Err(e) => return Err(e.into()),
    }
    if subscribe {
        let cmd = format!("SUBSCRIBE {}", proto::quote(name));
        rev.legacy.command("SUBSCRIBE", &cmd).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::client::ListEntry;

    fn folder(raw: &str, sep: char, attrs: &[&str]) -> Folder {
        let e = ListEntry {
            name: raw.into(),
            delimiter: Some(sep),
            attributes: attrs.iter().map(|a| a.to_ascii_uppercase()).collect(),
            subscribed: false,
        };
        Folder::from_list(&e, sep)
    }

    #[test]
    fn names_on_legacy_translate_separators_and_roles_and_avoid_synced_folders() {
        let new = vec![
            folder("Projects/v1.2", '/', &[]),
            folder("Sent", '/', &["\\Sent"]),
            folder("Sent/2025", '/', &[]),
            folder("Taken", '/', &[]),
        ];
        let legacy = vec![
            folder("Sent Items", '.', &["\\Sent"]),
            folder("Taken", '.', &[]),
        ];
        let m = Mapper::new(&new, &legacy, '.', Rules::default());
        let mut taken: HashSet<String> = ["taken".to_owned(), "sent items".to_owned()].into();
        let name = |f: &Folder, taken: &mut HashSet<String>| legacy_name(&m, f, taken, '.');
        assert_eq!(name(&new[0], &mut taken).as_deref(), Some("Projects.v1_2"));
        assert_eq!(
            name(&new[1], &mut taken),
            None,
            "legacy's \\Sent is synced already"
        );
        assert_eq!(
            name(&new[2], &mut taken).as_deref(),
            Some("Sent Items.2025")
        );
        assert_eq!(name(&new[3], &mut taken).as_deref(), Some("Taken_2"));
        assert_eq!(name(&new[3], &mut taken).as_deref(), Some("Taken_3"));
    }
}
