//! Log output (DESIGN.md §7b): human lines by default, JSON lines for shippers, on stderr.
//!
//! One event is one line, whatever its fields hold. A login name, an ID field, a recipient or
//! a folder name comes from a client or a backend; written raw, a CR or LF in it would end the
//! line and start a forged one, and an ESC would drive the terminal of whoever reads the log.
//! The JSON format escapes them (it writes JSON strings); the human format writes every field
//! through [`EscapedFields`], and colours only a terminal.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{self, Writer};
use tracing_subscriber::fmt::{FormatFields, MakeWriter, SubscriberBuilder};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `2026-01-01T00:00:00.000000Z  INFO target: message name=value ...`
    Human,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber: events as `MAILFERRY_LOG` selects (default `info`), to
/// stderr, coloured only when stderr is a terminal.
pub fn init(format: Format) {
    let filter =
        EnvFilter::try_from_env("MAILFERRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal();
    match format {
        Format::Human => human(filter, std::io::stderr, colour).init(),
        Format::Json => json(filter, std::io::stderr).init(),
    }
}

/// The human format writing to `writer`.
pub fn human<W>(
    filter: EnvFilter,
    writer: W,
    colour: bool,
) -> SubscriberBuilder<EscapedFields, format::Format<format::Full>, EnvFilter, W>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(colour)
        .fmt_fields(EscapedFields)
}

/// The JSON format writing to `writer`.
pub fn json<W>(
    filter: EnvFilter,
    writer: W,
) -> SubscriberBuilder<format::JsonFields, format::Format<format::Json>, EnvFilter, W>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .json()
}

/// Fields as tracing's default writes them (the message bare, then `name=value`, separated
/// by spaces), with every control character in a value escaped as Rust escapes it (`\r`, `\n`,
/// `\u{1b}`...).
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = Visitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `log.*`: where a `log` record came from, already in the line's target.
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let separator = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = write_field(&mut self.writer, separator, field.name(), value);
    }
}

fn write_field(
    w: &mut Writer<'_>,
    separator: &str,
    name: &str,
    value: &dyn fmt::Debug,
) -> fmt::Result {
    w.write_str(separator)?;
    if name != "message" {
        write!(w, "{}=", name.trim_start_matches("r#"))?;
    }
    write!(Escaped(w), "{value:?}")
}

/// Passes text on with its control characters escaped.
struct Escaped<W>(W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(char::is_control) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            write!(self.0, "{}", c.escape_debug())?;
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::{info, info_span, warn};

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// What a client or backend may put in a name: a forged line, a screen clear, colours, a
    /// window title (OSC ... BEL), a C1 CSI.
    const EVIL: &str =
        "x\r\n2031-01-01T00:00:00Z  INFO forged: line\x1b[2J\x1b[31m\x1b]0;t\x07\u{9b}1m";

    /// Logs as the proxy and the sync engine do: a span field recorded as a string, a folder
    /// name and a user as `%` (Display) fields, and the message itself.
    fn log_evil() {
        let span = info_span!("imap", sid = "s1", user = tracing::field::Empty);
        span.record("user", EVIL);
        let _g = span.enter();
        info!(user = %EVIL, folder = %EVIL, n = 3, "session end");
        warn!(reason = ?EVIL, "{EVIL}");
    }

    #[test]
    fn human_lines_are_one_per_event_with_control_characters_escaped() {
        let out = Captured::default();
        let sub = human(EnvFilter::new("info"), out.clone(), false).finish();
        tracing::subscriber::with_default(sub, log_evil);
        let text = out.text();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        let escaped = r"x\r\n2031-01-01T00:00:00Z  INFO forged: line\u{1b}[2J\u{1b}[31m\u{1b}]0;t\u{7}\u{9b}1m";
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].ends_with(&format!(
                "imap{{sid=\"s1\" user=\"{escaped}\"}}: mailferry::logging::tests: session end \
                 user={escaped} folder={escaped} n=3"
            )),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(" INFO "), "{}", lines[0]);
        assert!(
            lines[1].ends_with(&format!(": {escaped} reason=\"{escaped}\"")),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn json_lines_carry_the_values_exactly() {
        let out = Captured::default();
        let sub = json(EnvFilter::new("info"), out.clone()).finish();
        tracing::subscriber::with_default(sub, log_evil);
        let text = out.text();
        assert_eq!(text.lines().count(), 2, "{text}");
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["fields"]["message"], "session end");
        assert_eq!(first["fields"]["user"], EVIL);
        assert_eq!(first["fields"]["folder"], EVIL);
        assert_eq!(first["span"]["user"], EVIL);
        let second: serde_json::Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(second["fields"]["message"], EVIL);
    }
}
