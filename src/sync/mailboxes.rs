//! Folder mapping from legacy to new: modified UTF-7 (RFC 3501 §5.1.3), hierarchy separator
//! translation, INBOX, special-use roles mapped to the target's own folders, operator rename and
//! exclude rules, and characters the target cannot hold.

use std::collections::{HashMap, HashSet};

use base64::engine::{GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use regex::Regex;

use super::client::ListEntry;
use crate::config::SyncConfig;

fn mutf7_engine() -> GeneralPurpose {
    // RFC 3501: modified BASE64 uses ',' instead of '/', and no padding.
    GeneralPurpose::new(
        &base64::alphabet::IMAP_MUTF7,
        GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone),
    )
}

/// Encodes a Unicode mailbox name in modified UTF-7.
pub fn mutf7_encode(name: &str) -> String {
    let engine = mutf7_engine();
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        out.push_str(&engine.encode(bytes));
        out.push('-');
        pending.clear();
    };
    for c in name.chars() {
        if ('\x20'..='\x7e').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// Decodes a modified UTF-7 mailbox name; `None` if it is not valid modified UTF-7.
pub fn mutf7_decode(name: &str) -> Option<String> {
    let engine = mutf7_engine();
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('&') {
        let (plain, tail) = rest.split_at(i);
        if !plain.chars().all(|c| ('\x20'..='\x7e').contains(&c)) {
            return None;
        }
        out.push_str(plain);
        let end = tail.find('-')?;
        let b64 = &tail[1..end];
        if b64.is_empty() {
            out.push('&');
        } else {
            let bytes = engine.decode(b64).ok()?;
            if bytes.len() % 2 != 0 {
                return None;
            }
            let units: Vec<u16> = bytes
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            let s = String::from_utf16(&units).ok()?;
            // Printable ASCII must not be base64-encoded (RFC 3501), so a canonical round trip holds.
            if s.chars().any(|c| ('\x20'..='\x7e').contains(&c)) {
                return None;
            }
            out.push_str(&s);
        }
        rest = &tail[end + 1..];
    }
    if !rest.chars().all(|c| ('\x20'..='\x7e').contains(&c)) {
        return None;
    }
    out.push_str(rest);
    Some(out)
}

/// A special-use role (RFC 6154) the engine maps by role rather than by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `\Sent`
    Sent,
    /// `\Drafts`
    Drafts,
    /// `\Trash`
    Trash,
    /// `\Junk`
    Junk,
    /// `\Archive`
    Archive,
}

impl Role {
    /// The role among upper-cased LIST attributes.
    pub fn from_attributes(attrs: &[String]) -> Option<Role> {
        attrs.iter().find_map(|a| {
            Some(match a.as_str() {
                "\\SENT" => Role::Sent,
                "\\DRAFTS" => Role::Drafts,
                "\\TRASH" => Role::Trash,
                "\\JUNK" => Role::Junk,
                "\\ARCHIVE" => Role::Archive,
                _ => return None,
            })
        })
    }
}

/// One side's folder, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    /// Name as on the wire (modified UTF-7, this side's separator).
    pub raw: String,
    /// Decoded hierarchy components (`["INBOX", "Projekte", "Größe"]`).
    pub path: Vec<String>,
    /// Special-use role.
    pub role: Option<Role>,
    /// Whether it holds messages (not `\Noselect`/`\NonExistent`).
    pub selectable: bool,
    /// Whether the user subscribed to it.
    pub subscribed: bool,
}

impl Folder {
    /// Decodes a LIST entry with the side's separator (`sep` when the entry has none).
    pub fn from_list(e: &ListEntry, sep: char) -> Folder {
        let sep = e.delimiter.unwrap_or(sep);
        // A name that is not valid modified UTF-7 is kept as it is rather than dropped.
        let decoded = mutf7_decode(&e.name).unwrap_or_else(|| e.name.clone());
        let mut path: Vec<String> = decoded.split(sep).map(str::to_owned).collect();
        if path
            .first()
            .is_some_and(|p| p.eq_ignore_ascii_case("INBOX"))
        {
            path[0] = "INBOX".into();
        }
        Folder {
            raw: e.name.clone(),
            path,
            role: Role::from_attributes(&e.attributes),
            selectable: e.selectable(),
            subscribed: e.subscribed,
        }
    }

    /// Whether this is INBOX.
    pub fn is_inbox(&self) -> bool {
        self.path.len() == 1 && self.path[0] == "INBOX"
    }
}

/// Encodes hierarchy components for a side with separator `sep`.
pub fn encode_path(path: &[String], sep: char) -> String {
    let joined = path.join(&sep.to_string());
    mutf7_encode(&joined)
}

/// Errors in operator folder rules.
#[derive(Debug, thiserror::Error)]
#[error("sync folder rule {rule:?}: {source}")]
pub struct RuleError {
    /// The offending pattern.
    pub rule: String,
    /// Why it does not compile.
    pub source: regex::Error,
}

/// Operator rules: exclusions and renames on the `/`-separated, decoded source path.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    exclude: Vec<Regex>,
    rename: Vec<(Regex, String)>,
}

impl Rules {
    /// Compiles the `[sync]` rules.
    pub fn from_config(cfg: &SyncConfig) -> Result<Rules, RuleError> {
        let compile = |p: &str| {
            Regex::new(p).map_err(|source| RuleError {
                rule: p.to_owned(),
                source,
            })
        };
        Ok(Rules {
            exclude: cfg
                .exclude
                .iter()
                .map(|p| compile(p))
                .collect::<Result<_, _>>()?,
            rename: cfg
                .rename
                .iter()
                .map(|r| Ok((compile(&r.from)?, r.to.clone())))
                .collect::<Result<_, RuleError>>()?,
        })
    }
}

/// Maps source folders to target paths for one user.
#[derive(Debug, Clone)]
pub struct Mapper {
    target_sep: char,
    /// Target folder path per special-use role.
    target_roles: HashMap<Role, Vec<String>>,
    /// Source role folders' paths, longest first, with their role.
    source_roles: Vec<(Vec<String>, Role)>,
    rules: Rules,
}

impl Mapper {
    /// Builds a mapper from both sides' folder lists.
    pub fn new(source: &[Folder], target: &[Folder], target_sep: char, rules: Rules) -> Mapper {
        let mut target_roles = HashMap::new();
        for f in target {
            if let Some(r) = f.role {
                target_roles.entry(r).or_insert_with(|| f.path.clone());
            }
        }
        let mut source_roles: Vec<(Vec<String>, Role)> = source
            .iter()
            .filter_map(|f| Some((f.path.clone(), f.role?)))
            .collect();
        source_roles.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Mapper {
            target_sep,
            target_roles,
            source_roles,
            rules,
        }
    }

    /// The target path of a source folder, or `None` if a rule excludes it.
    pub fn map(&self, f: &Folder) -> Option<Vec<String>> {
        let joined = f.path.join("/");
        if self.rules.exclude.iter().any(|r| r.is_match(&joined)) {
            return None;
        }
        // Components that hold the target's separator (or `/`, used by the rules) cannot be
        // represented as one level there: replace the character.
        let clean = |c: &str| -> String {
            c.chars()
                .map(|ch| {
                    if ch == self.target_sep || ch == '/' || ch.is_control() {
                        '_'
                    } else {
                        ch
                    }
                })
                .collect()
        };
        let mut path: Vec<String> = f.path.iter().map(|c| clean(c)).collect();
        // Special-use: the folder (or an ancestor) with a role goes to the target's folder of
        // that role, whatever its name there.
        for (prefix, role) in &self.source_roles {
            if f.path.starts_with(prefix) {
                if let Some(t) = self.target_roles.get(role) {
                    let mut p = t.clone();
                    p.extend(path.drain(prefix.len()..));
                    path = p;
                }
                break;
            }
        }
        let mut joined = path.join("/");
        for (re, to) in &self.rules.rename {
            if re.is_match(&joined) {
                joined = re.replace(&joined, to.as_str()).into_owned();
                break;
            }
        }
        let mut out: Vec<String> = joined
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        if out.is_empty() {
            return None;
        }
        if out[0].eq_ignore_ascii_case("INBOX") {
            out[0] = "INBOX".into();
        }
        Some(out)
    }

    /// Maps every selectable source folder; names that collide on the target get a suffix.
    /// Returns (source folder, target path) pairs.
    pub fn map_all<'a>(&self, source: &'a [Folder]) -> Vec<(&'a Folder, Vec<String>)> {
        let mut taken: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        for f in source {
            let Some(mut p) = self.map(f) else { continue };
            let key = |p: &[String]| p.join("\u{0}").to_lowercase();
            let mut n = 2;
            while taken.contains(&key(&p)) {
                if let Some(last) = p.last_mut() {
                    *last = format!(
                        "{}_{n}",
                        last.trim_end_matches(|c: char| c.is_ascii_digit() || c == '_')
                    );
                }
                n += 1;
            }
            taken.insert(key(&p));
            out.push((f, p));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(raw: &str, sep: char, attrs: &[&str]) -> Folder {
        Folder::from_list(
            &ListEntry {
                name: raw.into(),
                delimiter: Some(sep),
                attributes: attrs.iter().map(|a| a.to_ascii_uppercase()).collect(),
                subscribed: false,
            },
            sep,
        )
    }

    #[test]
    fn rfc3501_examples() {
        assert_eq!(
            mutf7_encode("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(
            mutf7_decode("~peter/mail/&U,BTFw-/&ZeVnLIqe-").unwrap(),
            "~peter/mail/台北/日本語"
        );
        assert_eq!(mutf7_encode("Tom & Jerry"), "Tom &- Jerry");
        assert_eq!(mutf7_decode("Entw&APw-rfe").unwrap(), "Entwürfe");
        assert!(mutf7_decode("&Jjo!").is_none());
        assert!(mutf7_decode("&AGE-").is_none(), "ASCII must not be encoded");
    }

    proptest::proptest! {
        #[test]
        fn mutf7_round_trip(s in "\\PC{0,24}") {
            let enc = mutf7_encode(&s);
            proptest::prop_assert!(enc.is_ascii());
            proptest::prop_assert_eq!(mutf7_decode(&enc), Some(s));
        }

        #[test]
        fn mutf7_decode_never_panics(s in ".{0,32}") {
            let _ = mutf7_decode(&s);
        }
    }

    fn rules(exclude: &[&str], rename: &[(&str, &str)]) -> Rules {
        Rules {
            exclude: exclude.iter().map(|r| Regex::new(r).unwrap()).collect(),
            rename: rename
                .iter()
                .map(|(a, b)| (Regex::new(a).unwrap(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn separators_roles_and_rules() {
        let source = vec![
            folder("INBOX", '.', &[]),
            folder("INBOX.Rechnungen", '.', &[]),
            folder("Sent Items", '.', &["\\Sent"]),
            folder("Sent Items.2023", '.', &[]),
            folder("Projekte.Gr&APYA3w-e", '.', &[]),
            folder("a/b", '.', &[]),
            folder("Spam", '.', &[]),
            folder("Old.Stuff", '.', &[]),
        ];
        let target = vec![folder("INBOX", '/', &[]), folder("Sent", '/', &["\\Sent"])];
        let m = Mapper::new(
            &source,
            &target,
            '/',
            rules(&["^Spam$"], &[("^Old/(.*)$", "Archive/$1")]),
        );
        let mapped: Vec<(String, Option<String>)> = source
            .iter()
            .map(|f| (f.raw.clone(), m.map(f).map(|p| encode_path(&p, '/'))))
            .collect();
        let get = |raw: &str| mapped.iter().find(|(r, _)| r == raw).unwrap().1.clone();
        assert_eq!(get("INBOX").as_deref(), Some("INBOX"));
        assert_eq!(get("INBOX.Rechnungen").as_deref(), Some("INBOX/Rechnungen"));
        assert_eq!(get("Sent Items").as_deref(), Some("Sent"));
        assert_eq!(get("Sent Items.2023").as_deref(), Some("Sent/2023"));
        assert_eq!(
            get("Projekte.Gr&APYA3w-e").as_deref(),
            Some("Projekte/Gr&APYA3w-e")
        );
        assert_eq!(get("a/b").as_deref(), Some("a_b"));
        assert_eq!(get("Spam"), None);
        assert_eq!(get("Old.Stuff").as_deref(), Some("Archive/Stuff"));
    }

    #[test]
    fn collisions_get_a_suffix() {
        let source = vec![folder("a/b", '.', &[]), folder("a_b", '.', &[])];
        let m = Mapper::new(&source, &[], '/', Rules::default());
        let all = m.map_all(&source);
        assert_eq!(all[0].1, vec!["a_b".to_string()]);
        assert_eq!(all[1].1, vec!["a_b_2".to_string()]);
    }
}
