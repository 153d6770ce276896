//! `mailferry verify`: compares legacy and new for one user, independently of the sync state:
//! the folder set after mapping, per-folder counts, and per message the SHA-256 of the full
//! message, flags, keywords and INTERNALDATE (as an instant), plus subscriptions.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::client::{Client, Endpoint, Fetched, ListEntry, Next};
use super::incremental::normalized;
use super::mailboxes::{encode_path, Folder, Mapper, Rules};
use super::{sha256_hex, SyncError};

/// The result of a comparison.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Folders compared.
    pub folders: usize,
    /// Messages on legacy in compared folders.
    pub messages: usize,
    /// Readable differences: what legacy has and new has not, or has otherwise.
    pub differences: Vec<String>,
    /// What exists only on new (folders, messages): a difference for `verify`, which asks
    /// whether both sides are equal; a note for the cutover's gate, which asks whether
    /// anything would be lost.
    #[serde(default)]
    pub extras: Vec<String>,
}

impl VerifyReport {
    /// Whether both sides agree.
    pub fn same(&self) -> bool {
        self.differences.is_empty() && self.extras.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Sig {
    hash: String,
    flags: Vec<String>,
    date: Option<i64>,
    uid: u32,
}

/// Compares both sides of `email`.
pub async fn verify(
    legacy: &Endpoint,
    new: &Endpoint,
    rules: &Rules,
    email: &str,
) -> Result<VerifyReport, SyncError> {
    let (mut src, mut tgt) = tokio::try_join!(
        Client::login(legacy, email, None),
        Client::login(new, email, None)
    )?;
    let r = compare(&mut src, &mut tgt, rules).await;
    tokio::join!(src.logout(), tgt.logout());
    r
}

fn separator(list: &[ListEntry]) -> char {
    list.iter().find_map(|e| e.delimiter).unwrap_or('/')
}

/// Both sides' folders: legacy's selectable ones, all of new's, and new's separator.
pub(crate) async fn list_both(
    src: &mut Client,
    tgt: &mut Client,
) -> Result<(Vec<Folder>, Vec<Folder>, char), SyncError> {
    let (sl, tl) = tokio::try_join!(src.list(), tgt.list())?;
    let (ssep, tsep) = (separator(&sl), separator(&tl));
    let source = sl
        .iter()
        .map(|e| Folder::from_list(e, ssep))
        .filter(|f| f.selectable)
        .collect();
    let target = tl.iter().map(|e| Folder::from_list(e, tsep)).collect();
    Ok((source, target, tsep))
}

/// The legacy folders the sync copies (not excluded by the rules), each with the wire name
/// it has on new.
pub(crate) fn map_folders<'a>(
    source: &'a [Folder],
    target: &[Folder],
    tsep: char,
    rules: &Rules,
) -> Vec<(&'a Folder, String)> {
    let mapper = Mapper::new(source, target, tsep, rules.clone());
    mapper
        .map_all(source)
        .into_iter()
        .map(|(f, p)| (f, encode_path(&p, tsep)))
        .collect()
}

pub(crate) async fn compare(
    src: &mut Client,
    tgt: &mut Client,
    rules: &Rules,
) -> Result<VerifyReport, SyncError> {
    let mut report = VerifyReport::default();
    let (source, target, tsep) = list_both(src, tgt).await?;
    let mapped = map_folders(&source, &target, tsep, rules);
    let by_name: HashMap<&str, &Folder> = target.iter().map(|f| (f.raw.as_str(), f)).collect();
    for (f, t) in &mapped {
        match by_name.get(t.as_str()) {
            Some(tf) if tf.selectable => {
                if f.subscribed != tf.subscribed {
                    report.differences.push(format!(
                        "subscription of {:?}: legacy {}, new {}",
                        f.raw,
                        yes(f.subscribed),
                        yes(tf.subscribed)
                    ));
                }
            }
            _ => report.differences.push(format!(
                "folder {:?} (legacy {:?}) missing on new",
                t, f.raw
            )),
        }
    }
    for tf in target.iter().filter(|t| t.selectable) {
        if !mapped.iter().any(|(_, t)| t == &tf.raw) {
            report
                .extras
                .push(format!("folder {:?} exists only on new", tf.raw));
        }
    }
    for (f, t) in &mapped {
        if !by_name.get(t.as_str()).is_some_and(|tf| tf.selectable) {
            continue;
        }
        report.folders += 1;
        let (s, n) = tokio::try_join!(signatures(src, &f.raw), signatures(tgt, t))?;
        report.messages += s.len();
        diff_folder(&f.raw, &s, &n, &mut report);
    }
    Ok(report)
}

fn yes(b: bool) -> &'static str {
    if b {
        "subscribed"
    } else {
        "not subscribed"
    }
}

async fn signatures(c: &mut Client, mailbox: &str) -> Result<Vec<Sig>, SyncError> {
    let sel = c.select(mailbox, true).await?;
    let mut out = Vec::with_capacity(sel.exists as usize);
    if sel.exists == 0 {
        return Ok(out);
    }
    let tag = c.tag();
    c.write(format!("{tag} UID FETCH 1:* (UID FLAGS INTERNALDATE BODY.PEEK[])\r\n").as_bytes())
        .await?;
    while let Next::Untagged(r) = c.next_of("UID FETCH", &tag).await? {
        if let Some(f) = Fetched::parse(&r) {
            let Some(body) = f.body else { continue };
            out.push(Sig {
                hash: sha256_hex(&body),
                flags: normalized(&f.flags.unwrap_or_default()),
                date: f.internaldate.as_deref().and_then(parse_internaldate),
                uid: f.uid,
            });
        }
    }
    Ok(out)
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// Fewer messages on new is a difference, more an extra.
fn diff_counts(name: &str, s: usize, n: usize, report: &mut VerifyReport) {
    let counts = format!("{name:?}: {s} messages on legacy, {n} on new");
    match s.cmp(&n) {
        std::cmp::Ordering::Greater => report.differences.push(counts),
        std::cmp::Ordering::Less => report.extras.push(counts),
        std::cmp::Ordering::Equal => {}
    }
}

fn diff_folder(name: &str, s: &[Sig], n: &[Sig], report: &mut VerifyReport) {
    diff_counts(name, s.len(), n.len(), report);
    let out = &mut report.differences;
    let group = |v: &[Sig]| {
        let mut m: BTreeMap<String, Vec<Sig>> = BTreeMap::new();
        for x in v {
            m.entry(x.hash.clone()).or_default().push(x.clone());
        }
        for g in m.values_mut() {
            g.sort_by(|a, b| (&a.flags, a.date).cmp(&(&b.flags, b.date)));
        }
        m
    };
    let (gs, gn) = (group(s), group(n));
    for (h, a) in &gs {
        let b = gn.get(h).map_or(&[][..], Vec::as_slice);
        if a.len() > b.len() {
            out.push(format!(
                "{name:?}: message sha256 {} (legacy UID {}) missing on new ({} on legacy, {} on new)",
                short(h),
                a[0].uid,
                a.len(),
                b.len()
            ));
        }
        for (x, y) in a.iter().zip(b) {
            if x.flags != y.flags {
                out.push(format!(
                    "{name:?}: legacy UID {} / new UID {}: flags ({}) vs ({})",
                    x.uid,
                    y.uid,
                    x.flags.join(" "),
                    y.flags.join(" ")
                ));
            }
            if x.date != y.date {
                out.push(format!(
                    "{name:?}: legacy UID {} / new UID {}: INTERNALDATE {:?} vs {:?}",
                    x.uid, y.uid, x.date, y.date
                ));
            }
        }
    }
    for (h, b) in &gn {
        let a = gs.get(h).map_or(0, Vec::len);
        if b.len() > a {
            report.extras.push(format!(
                "{name:?}: message sha256 {} (new UID {}) extra on new ({} on legacy, {} on new)",
                short(h),
                b[0].uid,
                a,
                b.len()
            ));
        }
    }
}

/// Parses an INTERNALDATE (`"17-Jul-1996 02:44:25 -0700"`) into seconds since the epoch.
pub fn parse_internaldate(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, rest) = s.split_once(' ')?;
    let (time, zone) = rest.trim().split_once(' ')?;
    let mut d = date.split('-');
    let day: i64 = d.next()?.trim().parse().ok()?;
    let mon = d.next()?;
    let year: i64 = d.next()?.parse().ok()?;
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let month = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(mon))? as i64 + 1;
    let mut t = time.split(':');
    let (h, m, sec): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    // The backend's text: bounded to what RFC 3501's date-time allows, so no arithmetic below
    // can overflow and no slicing can split a character.
    if !(1..=31).contains(&day)
        || !(0..=9999).contains(&year)
        || !(0..=23).contains(&h)
        || !(0..=59).contains(&m)
        || !(0..=60).contains(&sec)
    {
        return None;
    }
    let (sign, z) = match (zone.strip_prefix('+'), zone.strip_prefix('-')) {
        (Some(z), _) => (1, z),
        (_, Some(z)) => (-1, z),
        _ => return None,
    };
    if z.len() != 4 || !z.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let z: i64 = z.parse().ok()?;
    let offset = (z / 100 * 60 + z % 100) * 60 * sign;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_internaldates_are_refused_not_a_panic() {
        for bad in [
            "1-Jan-2000 00:00:00 é0000",
            "1-Jan-99999999999999 00:00:00 +0000",
            "1-Jan-2000 99:00:00 +0000",
            "1-Jan-2000 00:00:00 +00",
            "1-Jan-2000 00:00:00 0000",
            "40-Jan-2000 00:00:00 +0000",
        ] {
            assert_eq!(parse_internaldate(bad), None, "{bad}");
        }
    }

    #[test]
    fn internaldate_is_an_instant() {
        assert_eq!(parse_internaldate("01-Jan-1970 00:00:00 +0000"), Some(0));
        assert_eq!(
            parse_internaldate("17-Jul-1996 02:44:25 -0700"),
            Some(837_596_665)
        );
        assert_eq!(
            parse_internaldate(" 1-Mar-2024 01:00:00 +0100"),
            parse_internaldate("01-Mar-2024 00:00:00 +0000")
        );
        assert_eq!(parse_internaldate("garbage"), None);
    }

    #[test]
    fn diff_reports_missing_extra_and_flags() {
        let sig = |h: &str, f: &[&str], uid| Sig {
            hash: h.into(),
            flags: f.iter().map(|s| s.to_string()).collect(),
            date: Some(1),
            uid,
        };
        let mut r = VerifyReport::default();
        diff_folder(
            "INBOX",
            &[sig("aa", &[], 1), sig("bb", &["\\seen"], 2)],
            &[sig("bb", &[], 7), sig("cc", &[], 8)],
            &mut r,
        );
        let out = &r.differences;
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(out.iter().any(|l| l.contains("missing on new")));
        assert!(out.iter().any(|l| l.contains("flags")));
        assert_eq!(r.extras.len(), 1, "{r:#?}");
        assert!(r.extras[0].contains("extra on new"));
        assert!(!r.same());
    }
}
