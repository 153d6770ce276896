//! A small blocking IMAP client for proxy tests: plain, STARTTLS or implicit TLS, with
//! byte-level access so tests can assert exact transcripts.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// Anything an IMAP conversation can run over.
pub trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

/// One IMAP client connection.
pub struct Client {
    r: BufReader<Box<dyn Io>>,
    tag: u32,
    /// The greeting line.
    pub greeting: String,
}

fn tls_config(ca: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("read CA");
    for c in CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.expect("CA pem")).expect("add CA");
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Opens a TCP connection with timeouts set.
pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.set_nodelay(true).ok();
    s
}

/// Wraps a TCP stream in client TLS (verifying `ca`, offering `alpn`).
/// One HTTP/1.1 request (`Connection: close`, a JSON body, a bearer `token` if given); returns
/// the status code and the whole response, headers included.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = tcp(addr);
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("HTTP request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

pub fn tls_wrap(s: TcpStream, ca: &Path, alpn: &[&[u8]]) -> std::io::Result<Box<dyn Io>> {
    let conn = rustls::ClientConnection::new(
        tls_config(ca, alpn),
        ServerName::try_from("localhost").unwrap(),
    )
    .map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, s);
    // Drive the handshake now so failures surface here.
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(Box::new(stream))
}

impl Client {
    /// Plain TCP; reads the greeting.
    pub fn plain(addr: SocketAddr) -> Client {
        Self::over(Box::new(tcp(addr)))
    }

    /// Implicit TLS; reads the greeting.
    pub fn tls(addr: SocketAddr, ca: &Path) -> Client {
        Self::over(tls_wrap(tcp(addr), ca, &[b"imap"]).expect("TLS handshake"))
    }

    /// Plain TCP, then STARTTLS; returns the client over TLS (greeting = the plain one).
    pub fn starttls(addr: SocketAddr, ca: &Path) -> Client {
        let s = tcp(addr);
        let mut r = BufReader::new(s);
        let mut greeting = String::new();
        r.read_line(&mut greeting).unwrap();
        r.get_mut().write_all(b"s0 STARTTLS\r\n").unwrap();
        let mut ok = String::new();
        r.read_line(&mut ok).unwrap();
        assert!(ok.starts_with("s0 OK"), "STARTTLS: {ok}");
        assert!(r.buffer().is_empty());
        let tls = tls_wrap(r.into_inner(), ca, &[]).expect("STARTTLS handshake");
        Client {
            r: BufReader::new(tls),
            tag: 1,
            greeting: greeting.trim_end().to_owned(),
        }
    }

    /// Over an already connected stream; reads the greeting.
    pub fn over(io: Box<dyn Io>) -> Client {
        let mut c = Client {
            r: BufReader::new(io),
            tag: 1,
            greeting: String::new(),
        };
        c.greeting = c.line();
        assert!(c.greeting.starts_with("* OK"), "greeting: {}", c.greeting);
        c
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).expect("write");
        self.r.get_mut().flush().expect("flush");
    }

    /// Reads one line without CRLF (literal data is returned as following lines).
    pub fn line(&mut self) -> String {
        let mut l = Vec::new();
        let n = self.r.read_until(b'\n', &mut l).expect("read line");
        assert!(n > 0, "connection closed");
        String::from_utf8_lossy(&l)
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    }

    /// Reads a line, or `None` at end of stream or on error.
    pub fn try_line(&mut self) -> Option<String> {
        let mut l = Vec::new();
        match self.r.read_until(b'\n', &mut l) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(
                String::from_utf8_lossy(&l)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
        }
    }

    /// Reads exactly `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.r.read_exact(&mut v).expect("read bytes");
        v
    }

    /// Sends `tag cmd` and returns (untagged lines, tagged line without tag). Literals in
    /// responses are read whole and appended to their line.
    pub fn cmd(&mut self, cmd: &str) -> (Vec<String>, String) {
        let tag = format!("c{}", self.tag);
        self.tag += 1;
        self.send(format!("{tag} {cmd}\r\n").as_bytes());
        let mut untagged = Vec::new();
        loop {
            let mut line = self.line();
            while let Some(n) = literal(&line) {
                let data = self.bytes(n);
                line.push_str(&String::from_utf8_lossy(&data));
                line.push_str(&self.line());
            }
            if let Some(rest) = line.strip_prefix(&format!("{tag} ")) {
                return (untagged, rest.to_owned());
            }
            untagged.push(line);
        }
    }

    /// LOGIN with quoted arguments; returns the tagged reply.
    pub fn login(&mut self, user: &str, pass: &str) -> String {
        self.cmd(&format!("LOGIN \"{user}\" \"{pass}\"")).1
    }

    /// Subjects of all INBOX messages.
    pub fn inbox_subjects(&mut self) -> Vec<String> {
        let (_, ok) = self.cmd("SELECT INBOX");
        assert!(ok.starts_with("OK"), "SELECT: {ok}");
        let (lines, ok) = self.cmd("FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])");
        assert!(ok.starts_with("OK"), "FETCH: {ok}");
        lines
            .iter()
            .filter_map(|l| l.split("Subject: ").nth(1))
            .map(|s| s.trim().trim_end_matches(')').trim().to_owned())
            .collect()
    }
}

/// `{n}` at the end of a line.
pub fn literal(line: &str) -> Option<usize> {
    let inner = line.strip_suffix('}')?;
    let open = inner.rfind('{')?;
    inner[open + 1..].trim_end_matches('+').parse().ok()
}
