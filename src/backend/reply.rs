//! The backend's side of a login, parsed: responses taken off the buffer within a bound,
//! the greeting, the tagged replies, the capabilities. Pure (bytes in, values out), so that
//! `fuzz/fuzz_targets/backend_login.rs` can feed it anything a backend might send.

use bytes::BytesMut;

use crate::wire::framer::Framer;

/// Longest backend response accepted while logging in (a CAPABILITY line is ~1 KiB).
pub const MAX_RESPONSE: usize = 64 * 1024;

/// A backend response longer than [`MAX_RESPONSE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("response too large")]
pub struct TooLarge;

/// Takes complete responses (lines and their `{n}` literals) off a connection's buffer.
#[derive(Debug, Default)]
pub struct ResponseReader {
    framer: Framer,
}

impl ResponseReader {
    /// The next complete response off the front of `buf`, without its final CRLF; `None`
    /// when more bytes are needed. Never lets `buf` hold more than one bound's worth.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<u8>>, TooLarge> {
        match self.framer.frame(buf, MAX_RESPONSE as u64, MAX_RESPONSE) {
            Ok(Some(n)) => {
                let frame = buf.split_to(n);
                let line = frame.strip_suffix(b"\n").unwrap_or(&frame);
                Ok(Some(line.strip_suffix(b"\r").unwrap_or(line).to_vec()))
            }
            Ok(None) if buf.len() <= MAX_RESPONSE => Ok(None),
            _ => Err(TooLarge),
        }
    }
}

/// What a greeting says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Greeting {
    /// `* OK`: go on; whether it offers SASL-IR.
    Ready {
        /// `SASL-IR` in a `[CAPABILITY ...]` code.
        sasl_ir: bool,
    },
    /// `* BYE`: refused (the whole line).
    Bye(String),
    /// Anything else, `* PREAUTH` included: a session authenticated as someone already, or
    /// not IMAP; no credentials go to it.
    Unexpected,
}

/// Reads a greeting.
pub fn greeting(line: &[u8]) -> Greeting {
    if line.starts_with(b"* BYE") {
        return Greeting::Bye(String::from_utf8_lossy(line).into_owned());
    }
    if !line.starts_with(b"* OK") {
        return Greeting::Unexpected;
    }
    let text = String::from_utf8_lossy(line);
    Greeting::Ready {
        sasl_ir: capability_code(&text).is_some_and(|c| has_cap(c, "SASL-IR")),
    }
}

/// A response, as seen while waiting for the tagged reply to `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The tagged reply: what follows the tag.
    Tagged(String),
    /// A continuation request (`+`), which no command of the login phase expects then.
    Continuation,
    /// Anything else (untagged data).
    Untagged,
}

/// Classifies `resp` while waiting for `tag`'s reply.
pub fn reply(resp: &[u8], tag: &str) -> Reply {
    if let Some(rest) = resp
        .strip_prefix(tag.as_bytes())
        .and_then(|r| r.strip_prefix(b" "))
    {
        return Reply::Tagged(String::from_utf8_lossy(rest).into_owned());
    }
    if resp.starts_with(b"+") {
        return Reply::Continuation;
    }
    Reply::Untagged
}

/// What the tagged reply to AUTHENTICATE says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginReply {
    /// Logged in; the capabilities if the reply or an untagged response carried them, and
    /// the text after the code.
    Ok {
        /// From `[CAPABILITY ...]` or `* CAPABILITY`.
        capabilities: Option<String>,
        /// Human text of the reply.
        text: String,
    },
    /// `NO` on the credentials (`[AUTHENTICATIONFAILED]` or no code).
    AuthFailed,
    /// `NO` with another code (`[UNAVAILABLE]`, `[LIMIT]`...): the backend's own status.
    Refused,
    /// Neither OK nor NO: its first word.
    Unexpected(String),
}

/// Reads the tagged reply to the login (`status` is what follows the tag).
pub fn login_reply(status: &str, untagged: &[Vec<u8>]) -> LoginReply {
    if let Some(rest) = status.strip_prefix("OK") {
        let rest = rest.trim_start();
        let (caps, text) = match capability_code(rest) {
            Some(caps) => (
                Some(caps.to_owned()),
                rest.split_once(']')
                    .map_or("", |(_, t)| t)
                    .trim()
                    .to_owned(),
            ),
            None => (None, rest.to_owned()),
        };
        return LoginReply::Ok {
            capabilities: caps.or_else(|| untagged_capability(untagged)),
            text,
        };
    }
    if let Some(code) = status.strip_prefix("NO") {
        let code = code.trim_start();
        if code.starts_with('[') && !code.starts_with("[AUTHENTICATIONFAILED]") {
            return LoginReply::Refused;
        }
        return LoginReply::AuthFailed;
    }
    LoginReply::Unexpected(status.split(' ').next().unwrap_or("").to_owned())
}

/// The contents of a `[CAPABILITY ...]` response code in `text`.
pub fn capability_code(text: &str) -> Option<&str> {
    let start = text.find("[CAPABILITY ")? + "[CAPABILITY ".len();
    let end = text[start..].find(']')? + start;
    Some(&text[start..end])
}

/// The list of a `* CAPABILITY` response among `untagged`.
pub fn untagged_capability(untagged: &[Vec<u8>]) -> Option<String> {
    untagged.iter().find_map(|u| {
        u.strip_prefix(b"* CAPABILITY ")
            .map(|c| String::from_utf8_lossy(c).into_owned())
    })
}

fn has_cap(caps: &str, name: &str) -> bool {
    caps.split(' ').any(|c| c.eq_ignore_ascii_case(name))
}

/// Removes capabilities the splice cannot honour from a capability list.
pub fn filter_capabilities(caps: &str, strip: &[String]) -> String {
    caps.split(' ')
        .filter(|c| !c.is_empty() && !strip.iter().any(|s| s.eq_ignore_ascii_case(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_handling() {
        let t = "[CAPABILITY IMAP4rev1 SASL-IR COMPRESS=DEFLATE IDLE] Logged in";
        assert_eq!(
            capability_code(t),
            Some("IMAP4rev1 SASL-IR COMPRESS=DEFLATE IDLE")
        );
        assert_eq!(
            filter_capabilities(
                "IMAP4rev1 SASL-IR COMPRESS=DEFLATE IDLE",
                &["compress=deflate".into()]
            ),
            "IMAP4rev1 SASL-IR IDLE"
        );
    }

    #[test]
    fn greetings_and_login_replies() {
        assert_eq!(
            greeting(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] ready"),
            Greeting::Ready { sasl_ir: true }
        );
        assert_eq!(
            greeting(b"* PREAUTH logged in as root"),
            Greeting::Unexpected
        );
        assert!(matches!(greeting(b"* BYE go away"), Greeting::Bye(_)));
        assert_eq!(reply(b"m2 OK done", "m2"), Reply::Tagged("OK done".into()));
        assert_eq!(reply(b"m22 OK done", "m2"), Reply::Untagged);
        assert_eq!(reply(b"+ ", "m2"), Reply::Continuation);
        assert_eq!(
            login_reply("OK [CAPABILITY IMAP4rev1 IDLE] Logged in", &[]),
            LoginReply::Ok {
                capabilities: Some("IMAP4rev1 IDLE".into()),
                text: "Logged in".into()
            }
        );
        assert_eq!(
            login_reply("NO [AUTHENTICATIONFAILED] no", &[]),
            LoginReply::AuthFailed
        );
        assert_eq!(login_reply("NO [LIMIT] busy", &[]), LoginReply::Refused);
        assert_eq!(
            login_reply("BAD what", &[]),
            LoginReply::Unexpected("BAD".into())
        );
    }

    #[test]
    fn responses_are_taken_whole_and_bounded() {
        let mut r = ResponseReader::default();
        let mut buf = BytesMut::from(&b"* OK {3}\r\nabc\r\nm1 OK x\r\n* partial"[..]);
        assert_eq!(r.next(&mut buf), Ok(Some(b"* OK {3}\r\nabc".to_vec())));
        assert_eq!(r.next(&mut buf), Ok(Some(b"m1 OK x".to_vec())));
        assert_eq!(r.next(&mut buf), Ok(None));
        let mut huge = BytesMut::from(vec![b'a'; MAX_RESPONSE + 1].as_slice());
        assert_eq!(ResponseReader::default().next(&mut huge), Err(TooLarge));
    }
}
