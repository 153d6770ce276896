//! A real IMAP client this project did not write (mbsync, from isync) works through the proxy
//! unchanged: syncing through mailferry gives the same Maildir as syncing directly.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::mailferry::{Mailferry, Options};
use support::Backends;

fn mbsync(dir: &Path, name: &str, addr: SocketAddr, ca: &Path) -> PathBuf {
    let store = dir.join(name);
    std::fs::create_dir_all(&store).unwrap();
    let rc = dir.join(format!("{name}.mbsyncrc"));
    std::fs::write(
        &rc,
        format!(
            "IMAPAccount acct\nHost 127.0.0.1\nPort {port}\nUser alice@example.org\nPass alicepw\n\
             SSLType IMAPS\nCertificateFile {ca}\nAuthMechs PLAIN\n\n\
             IMAPStore far\nAccount acct\n\n\
             MaildirStore near\nPath {store}/\nInbox {store}/INBOX\nSubFolders Verbatim\n\n\
             Channel ch\nFar :far:\nNear :near:\nPatterns *\nCreate Near\nSync Pull\nSyncState *\n",
            port = addr.port(),
            ca = ca.display(),
            store = store.display(),
        ),
    )
    .unwrap();
    let out = Command::new("mbsync")
        .arg("-c")
        .arg(&rc)
        .arg("-a")
        .output()
        .expect("mbsync (apt-get install isync)");
    assert!(
        out.status.success(),
        "mbsync {name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    store
}

/// mbsync writes a random `X-TUID` header into each message it stores; everything else is
/// the server's bytes.
fn without_tuid(msg: Vec<u8>) -> String {
    String::from_utf8_lossy(&msg)
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("X-TUID: "))
        .collect()
}

/// Folder → sorted message contents, for a Maildir tree written by mbsync.
fn contents(root: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut msgs = Vec::new();
        for sub in ["cur", "new"] {
            if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
                for e in rd.flatten() {
                    msgs.push(without_tuid(std::fs::read(e.path()).unwrap()));
                }
            }
        }
        if dir.join("cur").exists() {
            msgs.sort();
            let rel = dir.strip_prefix(root).unwrap().display().to_string();
            out.insert(rel, msgs);
        }
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() && !["cur", "new", "tmp"].contains(&name.as_str()) {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
fn mbsync_through_the_proxy_equals_a_direct_sync() {
    let backends = Backends::start();
    let legacy = &backends.legacy;
    for i in 0..20 {
        let msg = format!(
            "From: s{i}@example.net\r\nTo: alice@example.org\r\nSubject: message {i}\r\n\
             Message-ID: <m{i}@mailferry.test>\r\n\r\nbody {i} {{5}}\r\nA OK looks like IMAP\r\n.\r\n"
        );
        let folder = match i % 3 {
            0 => "INBOX",
            1 => "Sent",
            _ => "Projects.2024",
        };
        legacy.save("alice@example.org", folder, msg.as_bytes());
    }
    let proxy = Mailferry::start(&backends, Options::default());
    let dir = tempfile::tempdir().unwrap();
    let direct = mbsync(dir.path(), "direct", legacy.imaps, &legacy.cert.cert_pem);
    let proxied = mbsync(dir.path(), "proxied", proxy.imaps, &proxy.cert.cert_pem);
    let direct = contents(&direct);
    let proxied = contents(&proxied);
    assert!(
        direct.len() >= 4,
        "folders synced: {:?}",
        direct.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        direct.values().map(Vec::len).sum::<usize>(),
        21,
        "20 messages + the marker"
    );
    assert_eq!(
        direct, proxied,
        "same folders, same messages, byte for byte"
    );
}
