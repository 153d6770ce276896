//! `mailferry import FILE.csv [--wave NAME]`: `email[,wave]` per line; blank lines and `#`
//! comments are skipped, bad lines are reported by number and the rest imported.

use std::fmt;

/// A line that could not be imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// 1-based line number.
    pub line: usize,
    /// Why.
    pub why: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.why)
    }
}

/// Users read from a file: (address, wave), and the lines refused.
#[derive(Debug, Default)]
pub struct Parsed {
    /// The users, in file order, each once.
    pub users: Vec<(String, Option<String>)>,
    /// Lines refused.
    pub rejected: Vec<Rejected>,
}

/// Parses the file's text; `wave` is the wave of lines that name none.
pub fn parse(text: &str, wave: Option<&str>) -> Parsed {
    let mut out = Parsed::default();
    let mut seen = std::collections::HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line, wave) {
            Ok((email, w)) => {
                if seen.insert(email.clone()) {
                    out.users.push((email, w));
                }
            }
            Err(why) => out.rejected.push(Rejected { line: i + 1, why }),
        }
    }
    out
}

fn parse_line(line: &str, default_wave: Option<&str>) -> Result<(String, Option<String>), String> {
    let mut fields = line.split(',').map(str::trim);
    let email = fields.next().unwrap_or_default();
    let wave = fields.next().filter(|w| !w.is_empty());
    if fields.next().is_some() {
        return Err(format!("{line:?}: more than two fields (email[,wave])"));
    }
    check_email(email)?;
    let wave = wave.or(default_wave);
    if let Some(w) = wave {
        check_wave(w)?;
    }
    Ok((email.to_lowercase(), wave.map(str::to_owned)))
}

fn check_email(email: &str) -> Result<(), String> {
    let ok = match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
                && email.len() <= 254
                && email.bytes().all(|b| b.is_ascii_graphic() && b != b'"')
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{email:?} is not an e-mail address"))
    }
}

fn check_wave(w: &str) -> Result<(), String> {
    let ok = w.len() <= 64
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "wave {w:?}: use letters, digits, '-', '_' and '.' (at most 64)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_comments_waves_and_rejections() {
        let text = "# users of the pilot\n\
                    alice@example.org\n\
                    \n\
                    Bob@Example.org, w2\n\
                    not-an-address\n\
                    carol@example.org,w 3\n\
                    dave@example.org,w1,extra\n\
                    alice@example.org\n";
        let p = parse(text, Some("w1"));
        assert_eq!(
            p.users,
            vec![
                ("alice@example.org".into(), Some("w1".into())),
                ("bob@example.org".into(), Some("w2".into())),
            ]
        );
        let lines: Vec<usize> = p.rejected.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![5, 6, 7]);
        assert!(p.rejected[0].to_string().starts_with("line 5: "));
    }

    #[test]
    fn without_a_wave_users_have_none() {
        let p = parse("a@x.org\n", None);
        assert_eq!(p.users, vec![("a@x.org".into(), None)]);
    }
}
