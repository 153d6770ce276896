//! The README's demo: two real Dovecot backends with sample users and mail, `mailferry serve`
//! in front of them, a walk-through of a user being moved, then the system stays up for you.
//!
//! Run through `scripts/demo.sh` (installs Dovecot, builds, then runs this).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::client::Client;
use support::mailferry::{Mailferry, Options};
use support::Backends;

fn main() {
    let wait = !std::env::args().any(|a| a == "--no-wait");
    println!("Starting two Dovecot backends (legacy: maildir, '.'; new: sdbox, '/') ...");
    let backends = Backends::start();
    println!(
        "  legacy IMAP {}  LMTP {}",
        backends.legacy.imap, backends.legacy.lmtp
    );
    println!(
        "  new    IMAP {}  LMTP {}",
        backends.new.imap, backends.new.lmtp
    );
    let proxy = Mailferry::start(
        &backends,
        Options {
            allow_plaintext: true,
            ..Options::default()
        },
    );
    println!("mailferry is serving:");
    println!(
        "  IMAP (STARTTLS) {}   IMAPS {}   LMTP {}   admin {}",
        proxy.imap, proxy.imaps, proxy.lmtp, proxy.admin
    );
    println!("  config: {}", proxy.config.display());
    println!();

    println!("1. alice logs in through the proxy; her route is legacy (the default):");
    let mut c = Client::plain(proxy.imap);
    println!("   {}", c.login("alice@example.org", "alicepw"));
    println!("   INBOX subjects: {:?}", c.inbox_subjects());
    println!("   (she now sits in IDLE)");
    c.send(b"i IDLE\r\n");
    let _ = c.line();

    println!(
        "2. the operator flips her: mailferry -c {} user route alice@example.org new",
        proxy.config.display()
    );
    proxy.route("alice@example.org", "new");
    println!("   her client receives: {}", c.line());

    println!("3. the client reconnects by itself and lands on the new backend:");
    let mut c = Client::plain(proxy.imap);
    println!("   {}", c.login("alice@example.org", "alicepw"));
    println!("   INBOX subjects: {:?}", c.inbox_subjects());
    let out = proxy.cli(&["user", "show", "alice@example.org"]);
    println!("4. mailferry user show alice@example.org:");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }
    println!();
    if !wait {
        println!("demo OK");
        return;
    }
    println!(
        "Try it yourself (users alice/bob/carol/dave@example.org, passwords alicepw/bobpw/...):"
    );
    println!(
        "  openssl s_client -quiet -starttls imap -connect {}",
        proxy.imap
    );
    println!("  openssl s_client -quiet -connect {}", proxy.imaps);
    println!("    then: a LOGIN bob@example.org bobpw / b SELECT INBOX / c FETCH 1:* ENVELOPE");
    println!(
        "  {} -c {} user route bob@example.org new",
        support::mailferry::binary().display(),
        proxy.config.display()
    );
    println!("  curl -s http://{}/metrics | grep mailferry_", proxy.admin);
    println!("Press Ctrl-C to stop everything.");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
