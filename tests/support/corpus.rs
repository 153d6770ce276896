//! A seeded test corpus for the sync engine: nested and non-ASCII folder names, special-use
//! folders, multipart and 8-bit messages, attachments of 1–10 MB, flags and custom keywords,
//! INTERNALDATEs over years, duplicate Message-IDs, identical duplicates, messages without
//! Message-ID, and bodies that look like IMAP protocol (`{123}`, `A OK`, `\r\n.\r\n`).
//!
//! Loading goes through IMAP APPEND as the master user, so flags, keywords and INTERNALDATE are
//! exactly what the corpus says.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::dovecot::{Dovecot, MASTER_PASSWORD, MASTER_USER};

/// What to generate.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Seed: the same seed gives the same corpus, byte for byte.
    pub seed: u64,
    /// Small messages (a few KB), spread over the folders.
    pub messages: usize,
    /// Messages with an attachment of `large_min..=large_max` bytes.
    pub large: usize,
    /// Smallest large attachment.
    pub large_min: usize,
    /// Largest large attachment.
    pub large_max: usize,
    /// Use the full folder tree (else INBOX only).
    pub folders: bool,
    /// Approximate size of a small message's text.
    pub small_size: usize,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            seed: 42,
            messages: 60,
            large: 1,
            large_min: 1024 * 1024,
            large_max: 2 * 1024 * 1024,
            folders: true,
            small_size: 3000,
        }
    }
}

/// One message to store.
#[derive(Clone, Debug)]
pub struct Message {
    /// Folder path components (decoded, e.g. `["Projekte", "Größe"]`).
    pub folder: Vec<String>,
    /// Full RFC 5322 message with CRLF line ends.
    pub body: Vec<u8>,
    /// Flags and keywords.
    pub flags: Vec<String>,
    /// INTERNALDATE (`dd-Mon-yyyy hh:mm:ss +zzzz`).
    pub date: String,
}

/// A generated corpus.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// Folders (decoded components), parents before children; INBOX and special-use included.
    pub folders: Vec<Vec<String>>,
    /// Folders to leave unsubscribed (all others are subscribed).
    pub unsubscribed: Vec<Vec<String>>,
    /// Messages in APPEND order.
    pub messages: Vec<Message>,
}

impl Corpus {
    /// Total bytes of all messages.
    pub fn bytes(&self) -> u64 {
        self.messages.iter().map(|m| m.body.len() as u64).sum()
    }
}

/// SplitMix64: tiny, seedable, stable across crate versions.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True with probability `p` percent.
    pub fn chance(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn path(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| s.to_string()).collect()
}

/// The folder tree: INBOX and children, nested and non-ASCII names, special-use folders.
pub fn folder_tree() -> Vec<Vec<String>> {
    vec![
        path(&["INBOX"]),
        path(&["INBOX", "Rechnungen"]),
        path(&["Sent"]),
        path(&["Drafts"]),
        path(&["Trash"]),
        path(&["Junk"]),
        path(&["Archive"]),
        path(&["Archive", "2019"]),
        path(&["Projekte"]),
        path(&["Projekte", "2024"]),
        path(&["Projekte", "2024", "Größe Ä"]),
        path(&["日本語"]),
        path(&["Tom & Jerry"]),
        path(&["Listen", "rust-lang"]),
    ]
}

const WORDS: &[&str] = &[
    "migration",
    "mailbox",
    "proxy",
    "legacy",
    "cutover",
    "Dovecot",
    "quota",
    "folder",
    "sync",
    "message",
    "attachment",
    "invoice",
    "meeting",
    "Größe",
    "naïve",
    "café",
    "日本",
    "Ω",
];
const KEYWORDS: &[&str] = &[
    "$Forwarded",
    "$MDNSent",
    "$Label1",
    "projekt_x",
    "Urgent",
    "NonJunk",
];
const SYSTEM_FLAGS: &[&str] = &["\\Seen", "\\Answered", "\\Flagged", "\\Draft", "\\Deleted"];
const MONTHS: &[&str] = &[
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const ZONES: &[&str] = &["+0000", "+0100", "-0700", "+0530", "-0330", "+1200"];

fn text(rng: &mut Rng, bytes: usize) -> String {
    let mut s = String::new();
    let mut line = 0;
    while s.len() < bytes {
        let w = rng.pick(WORDS);
        s.push_str(w);
        line += w.len() + 1;
        if line > 68 {
            s.push_str("\r\n");
            line = 0;
        } else {
            s.push(' ');
        }
    }
    s.push_str("\r\n");
    s
}

fn base64_lines(rng: &mut Rng, raw_len: usize) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let chars = raw_len.div_ceil(3) * 4;
    let mut out = String::with_capacity(chars + chars / 76 * 2 + 2);
    let mut x = rng.next();
    for i in 0..chars {
        if i % 8 == 0 {
            x = rng.next();
        }
        out.push(B64[(x & 63) as usize] as char);
        x >>= 6;
        if i % 76 == 75 {
            out.push_str("\r\n");
        }
    }
    out.push_str("\r\n");
    out
}

fn date(rng: &mut Rng) -> String {
    format!(
        "{:02}-{}-{} {:02}:{:02}:{:02} {}",
        1 + rng.below(28),
        rng.pick(MONTHS),
        2005 + rng.below(20),
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.pick(ZONES)
    )
}

fn flags(rng: &mut Rng) -> Vec<String> {
    let mut f: Vec<String> = SYSTEM_FLAGS
        .iter()
        .filter(|_| rng.chance(30))
        .map(|s| s.to_string())
        .collect();
    for k in KEYWORDS {
        if rng.chance(12) {
            f.push(k.to_string());
        }
    }
    f
}

/// Builds one message of kind `kind` (0..6).
fn message(
    rng: &mut Rng,
    n: usize,
    kind: usize,
    size: usize,
    message_id: Option<String>,
) -> Vec<u8> {
    let mut h = format!(
        "From: Sender {n} <sender{n}@example.net>\r\nTo: user@example.org\r\nSubject: corpus message {n} kind {kind}\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    );
    if let Some(id) = message_id {
        h.push_str(&format!("Message-ID: {id}\r\n"));
    }
    h.push_str("MIME-Version: 1.0\r\n");
    let body = match kind {
        0 => format!("Content-Type: text/plain; charset=us-ascii\r\n\r\n{}", text(rng, size)),
        1 => format!(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nUmlaute: äöü ß — 日本語 — Ω\r\n{}",
            text(rng, size)
        ),
        2 => format!(
            "Content-Type: multipart/alternative; boundary=\"b{n}\"\r\n\r\n--b{n}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}--b{n}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>{}</p>\r\n--b{n}--\r\n",
            text(rng, size / 2),
            text(rng, size / 2)
        ),
        3 => format!(
            "Content-Type: multipart/mixed; boundary=\"m{n}\"\r\n\r\n--m{n}\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--m{n}\r\nContent-Type: application/octet-stream; name=\"a{n}.bin\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"a{n}.bin\"\r\n\r\n{}--m{n}--\r\n",
            base64_lines(rng, size)
        ),
        // Looks like IMAP and SMTP protocol: literal syntax, tagged replies, end-of-data.
        4 => format!(
            "Content-Type: text/plain\r\n\r\nA OK done\r\n* 1 FETCH (BODY[] {{123}}\r\n{{5+}}\r\nt1 NO [LIMIT] x\r\n\r\n.\r\n..\r\n.\r\n{}",
            text(rng, size / 2)
        ),
        _ => format!(
            "Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{}",
            String::from_utf8_lossy(&[b'c', b'a', b'f', 0xc3, 0xa9]).into_owned() + &text(rng, size)
        ),
    };
    let mut out = h.into_bytes();
    out.extend_from_slice(body.as_bytes());
    if kind == 5 {
        // A raw Latin-1 byte, not valid UTF-8: real 8-bit mail.
        out.extend_from_slice(b"Gr\xfc\xdfe\r\n");
    }
    out
}

/// Generates the corpus of `spec`.
pub fn generate(spec: &Spec) -> Corpus {
    let mut rng = Rng::new(spec.seed);
    let folders = if spec.folders {
        folder_tree()
    } else {
        vec![path(&["INBOX"])]
    };
    let unsubscribed = if spec.folders {
        vec![path(&["Listen", "rust-lang"]), path(&["Tom & Jerry"])]
    } else {
        vec![]
    };
    let mut messages = Vec::new();
    let mut last_id: Option<String> = None;
    let total = spec.messages + spec.large;
    for n in 0..total {
        let large = n >= spec.messages;
        let folder = if n % 3 == 0 {
            folders[0].clone()
        } else {
            rng.pick(&folders).clone()
        };
        let kind = if large { 3 } else { rng.below(6) };
        let size = if large {
            spec.large_min + rng.below(spec.large_max - spec.large_min + 1)
        } else {
            spec.small_size / 2 + rng.below(spec.small_size)
        };
        let id = match rng.below(10) {
            0 => None,
            1 if last_id.is_some() => last_id.clone(),
            _ => Some(format!("<{}.{n}@corpus.mailferry.test>", rng.next())),
        };
        last_id = id.clone().or(last_id);
        let body = message(&mut rng, n, kind, size, id);
        let m = Message {
            folder,
            body,
            flags: flags(&mut rng),
            date: date(&mut rng),
        };
        // Every tenth message is stored twice, byte for byte: the engine must keep both.
        if n % 10 == 7 && !large {
            messages.push(m.clone());
        }
        messages.push(m);
    }
    Corpus {
        folders,
        unsubscribed,
        messages,
    }
}

/// Modified UTF-7 wire name of a decoded path on a backend with separator `sep`.
pub fn wire_name(path: &[String], sep: char) -> String {
    mailferry::sync::mailboxes::encode_path(path, sep)
}

/// A master-user IMAP session for loading and inspecting a backend.
pub struct Session {
    reader: BufReader<TcpStream>,
    tag: u32,
}

/// The result of one command: untagged lines (with literals inline) and the tagged status.
pub struct Reply {
    /// Untagged lines as text (lossy).
    pub lines: Vec<String>,
    /// The tagged completion after the tag.
    pub status: String,
}

impl Session {
    /// Logs in to `d` as `user` through the master user.
    pub fn open(d: &Dovecot, user: &str) -> Session {
        let s = TcpStream::connect_timeout(&d.imap, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        s.set_nodelay(true).ok();
        let mut sess = Session {
            reader: BufReader::new(s),
            tag: 0,
        };
        sess.read_line();
        let r = sess.run(&format!(
            "LOGIN \"{user}*{MASTER_USER}\" \"{MASTER_PASSWORD}\""
        ));
        assert!(r.status.starts_with("OK"), "login {user}: {}", r.status);
        sess
    }

    fn read_line(&mut self) -> String {
        let mut out = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = self.reader.read_until(b'\n', &mut line).expect("read");
            assert!(n > 0, "connection closed");
            let lit = line
                .strip_suffix(b"}\r\n")
                .and_then(|l| l.iter().rposition(|&c| c == b'{').map(|i| &l[i + 1..]))
                .and_then(|d| std::str::from_utf8(d.strip_suffix(b"+").unwrap_or(d)).ok())
                .and_then(|d| d.parse::<usize>().ok());
            out.extend_from_slice(&line);
            match lit {
                Some(n) => {
                    let mut buf = vec![0; n];
                    self.reader.read_exact(&mut buf).expect("literal");
                    out.extend_from_slice(&buf);
                }
                None => return String::from_utf8_lossy(&out).trim_end().to_string(),
            }
        }
    }

    fn next_tag(&mut self) -> String {
        self.tag += 1;
        format!("c{}", self.tag)
    }

    fn wait(&mut self, tag: &str) -> Reply {
        let mut lines = Vec::new();
        loop {
            let l = self.read_line();
            if let Some(rest) = l.strip_prefix(&format!("{tag} ")) {
                return Reply {
                    lines,
                    status: rest.to_string(),
                };
            }
            lines.push(l);
        }
    }

    /// Runs one command line.
    pub fn run(&mut self, cmd: &str) -> Reply {
        let tag = self.next_tag();
        self.reader
            .get_mut()
            .write_all(format!("{tag} {cmd}\r\n").as_bytes())
            .expect("write");
        self.wait(&tag)
    }

    /// Runs one command line and asserts OK.
    pub fn ok(&mut self, cmd: &str) -> Reply {
        let r = self.run(cmd);
        assert!(r.status.starts_with("OK"), "{cmd}: {}", r.status);
        r
    }

    /// APPENDs messages (LITERAL+, pipelined), asserting every one is accepted.
    pub fn append_all(&mut self, items: &[(&str, &Message)]) {
        for chunk in items.chunks(50) {
            let mut tags = Vec::new();
            let mut out = Vec::new();
            for (mbox, m) in chunk {
                let tag = self.next_tag();
                out.extend_from_slice(
                    format!(
                        "{tag} APPEND \"{mbox}\" ({}) \"{}\" {{{}+}}\r\n",
                        m.flags.join(" "),
                        m.date,
                        m.body.len()
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(&m.body);
                out.extend_from_slice(b"\r\n");
                tags.push(tag);
            }
            self.reader.get_mut().write_all(&out).expect("write");
            for tag in tags {
                let r = self.wait(&tag);
                assert!(r.status.starts_with("OK"), "APPEND: {}", r.status);
            }
        }
    }

    /// LOGOUT.
    pub fn close(mut self) {
        let _ = self.run("LOGOUT");
    }
}

/// Creates the corpus's folders and subscriptions on `d` for `user` and appends its messages.
pub fn load(d: &Dovecot, user: &str, corpus: &Corpus) {
    let sep = d.separator;
    let mut s = Session::open(d, user);
    for f in &corpus.folders {
        let name = wire_name(f, sep);
        let r = s.run(&format!("CREATE \"{name}\""));
        assert!(
            r.status.starts_with("OK") || r.status.contains("ALREADYEXISTS"),
            "CREATE {name}: {}",
            r.status
        );
        if corpus.unsubscribed.contains(f) {
            s.run(&format!("UNSUBSCRIBE \"{name}\""));
        } else {
            s.ok(&format!("SUBSCRIBE \"{name}\""));
        }
    }
    let names: Vec<String> = corpus
        .messages
        .iter()
        .map(|m| wire_name(&m.folder, sep))
        .collect();
    let items: Vec<(&str, &Message)> = names
        .iter()
        .map(String::as_str)
        .zip(corpus.messages.iter())
        .collect();
    s.append_all(&items);
    s.close();
}
