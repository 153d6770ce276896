//! One identity per user (DESIGN.md §2): the key a login or a recipient is routed by.
//! Case-folded; a bare login completed with `[directory] default_domain`; the sub-address
//! after `[directory] recipient_delimiter` dropped. The backend still gets what the client or
//! the MTA sent; only routing, sessions, counters, sync and the store use the key.

/// How logins and recipients become user keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Completes a login without `@` (lower case, without the `@`).
    default_domain: Option<String>,
    /// Separates a local part from its sub-address (`+` in `alice+news@`).
    delimiter: Option<char>,
}

impl Identity {
    /// From `[directory] default_domain` and `recipient_delimiter` (empty: none); the config's
    /// validation has checked both.
    pub fn new(default_domain: &str, delimiter: &str) -> Identity {
        let domain = default_domain.trim().trim_start_matches('@').to_lowercase();
        Identity {
            default_domain: (!domain.is_empty()).then_some(domain),
            delimiter: delimiter.chars().next(),
        }
    }

    /// The user key of `login` (a login name or a recipient address).
    pub fn key(&self, login: &str) -> String {
        let folded = login.trim().to_lowercase();
        let (local, domain) = match folded.rsplit_once('@') {
            Some((l, d)) => (l.to_owned(), Some(d.to_owned())),
            None => (folded, self.default_domain.clone()),
        };
        let local = match self.delimiter {
            // A local part that starts with the delimiter is kept whole: nothing before it.
            Some(d) => match local.split_once(d) {
                Some((base, _)) if !base.is_empty() => base.to_owned(),
                _ => local,
            },
            None => local,
        };
        match domain {
            Some(d) => format!("{local}@{d}"),
            None => local,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_settings_a_key_is_the_folded_login() {
        let id = Identity::default();
        assert_eq!(id.key(" Alice@Example.ORG "), "alice@example.org");
        assert_eq!(id.key("alice"), "alice");
        assert_eq!(id.key("alice+news@example.org"), "alice+news@example.org");
    }

    #[test]
    fn a_bare_login_gets_the_default_domain_and_sub_addresses_fold() {
        let id = Identity::new("Example.org", "+");
        assert_eq!(id.key("ALICE"), "alice@example.org");
        assert_eq!(id.key("alice+news@example.org"), "alice@example.org");
        assert_eq!(id.key("Alice+a+b"), "alice@example.org");
        assert_eq!(id.key("bob@other.net"), "bob@other.net");
        assert_eq!(id.key("+weird@example.org"), "+weird@example.org");
    }
}
